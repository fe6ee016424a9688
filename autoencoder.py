"""Latent-decoder pseudo-fakes: a real photo passed through a diffusion model's autoencoder.

A latent diffusion model (Stable Diffusion, FLUX) draws its picture in a small latent space and
leaves the pixels to its autoencoder's decoder: every image it makes carries that decoder's
trace. A real photo encoded and decoded again carries the same trace with the photo's own
content, so a detector trained on "photo against its reconstruction" can learn nothing but the
trace (dataset alignment: Rajan et al., ICLR 2025, "On the Effectiveness of Dataset Alignment
for Fake Image Detection").

    python main.py --data_root D --pseudo_fakes taef2    # real + fake + a reconstruction of every real image

The autoencoder is TAEF2 (Ollin Boer Bohan's Tiny AutoEncoder for FLUX.2, MIT licence): a small
convolutional network distilled into FLUX.2's latent space (32 channels, 8x smaller), whose
decoder up-samples by nearest-neighbour 2x steps followed by 3x3 convolutions, as Stable
Diffusion's does. Its weights are two files no package carries (--latent_weights, default
../shared/weights/taef2: taef2_encoder.pth, taef2_decoder.pth from github.com/madebyollin/taesd).

What keeps the pair apart by the trace alone: the reconstruction is made from the very pixels the
real image is trained from (the decoded-image cache), once, and stored beside the cache; where
the real image is a JPEG, the reconstruction is re-encoded with that file's own quantisation
tables, so both carry the same compression (without it a detector learns "no JPEG blocks =
fake", Chen et al., NeurIPS 2025, "Dual Data Alignment"); and a real image and its
reconstruction go through the same random crop, flip, blur and JPEG in training (the same random
draw, dataset.DeepfakeDataset), so they differ in nothing else.
"""
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never windows
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image
from torch import nn

import sbi
from cli import progress

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "shared" / "weights" / "taef2"
FILES = ("taef2_encoder.pth", "taef2_decoder.pth")
LATENT_CHANNELS = 32  # FLUX.2's latent space
WIDTH = 64            # channels of every hidden layer
STRIDE = 8            # three 2x steps: images are padded to a multiple of this


class AutoencoderError(RuntimeError):
    """The autoencoder's weights cannot be used; the message names the file and the way out."""


# ---------------------------------------------------------------- the network

def conv(n_in, n_out, **kwargs):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Block(nn.Module):
    """Three 3x3 convolutions with a residual path; pooled=True adds the GroupNorm branch of
    TAEF2's deepest blocks (it lets them see the whole image's statistics)."""

    def __init__(self, n_in, n_out, pooled=False):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = (nn.Sequential(nn.Conv2d(n_in, 4 * n_in, 1, bias=False), nn.GroupNorm(4, 4 * n_in), nn.ReLU(),
                                   nn.Conv2d(4 * n_in, n_in, 1, bias=False)) if pooled else None)

    def forward(self, x):
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


class Clamp(nn.Module):
    """Soft limit of the latents to (-3, 3), as the decoder was trained to read them."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


def encoder():
    """(B, 3, H, W) in [0, 1] -> (B, 32, H/8, W/8) latents. Layer order = the weight file's keys."""
    down = lambda: conv(WIDTH, WIDTH, stride=2, bias=False)  # noqa: E731
    return nn.Sequential(
        conv(3, WIDTH), Block(WIDTH, WIDTH),
        down(), Block(WIDTH, WIDTH), Block(WIDTH, WIDTH), Block(WIDTH, WIDTH),
        down(), Block(WIDTH, WIDTH), Block(WIDTH, WIDTH), Block(WIDTH, WIDTH),
        down(), *(Block(WIDTH, WIDTH, pooled=True) for _ in range(3)),
        conv(WIDTH, LATENT_CHANNELS))


def decoder():
    """(B, 32, h, w) latents -> (B, 3, 8h, 8w), about [0, 1]: nearest-neighbour 2x up-sampling, then a 3x3
    convolution, three times."""
    up = lambda: (nn.Upsample(scale_factor=2), conv(WIDTH, WIDTH, bias=False))  # noqa: E731
    return nn.Sequential(
        Clamp(), conv(LATENT_CHANNELS, WIDTH), nn.ReLU(),
        *(Block(WIDTH, WIDTH, pooled=True) for _ in range(3)), *up(),
        Block(WIDTH, WIDTH), Block(WIDTH, WIDTH), Block(WIDTH, WIDTH), *up(),
        Block(WIDTH, WIDTH), Block(WIDTH, WIDTH), Block(WIDTH, WIDTH), *up(),
        Block(WIDTH, WIDTH), conv(WIDTH, 3))


class Autoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = encoder(), decoder()

    def forward(self, x):
        """(B, 3, H, W) in [0, 1], H and W multiples of 8 -> its reconstruction, clamped to [0, 1]."""
        return self.decoder(self.encoder(x)).clamp(0, 1)


def load_autoencoder(folder=DEFAULT_WEIGHTS):
    """TAEF2 with its weights from folder (both files, read with weights_only=True)."""
    net = Autoencoder()
    for part, what, name in zip((net.encoder, net.decoder), ("encoder", "decoder"), FILES):
        path = Path(folder) / name
        if not path.is_file():
            raise AutoencoderError(f"{path}: not found; --pseudo_fakes taef2 needs {' and '.join(FILES)} from "
                                   f"github.com/madebyollin/taesd in --latent_weights")
        try:
            part.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            raise AutoencoderError(f"{path}: not TAEF2's {what} weights ({type(e).__name__}); download it again "
                                   f"from github.com/madebyollin/taesd") from None
    return net.eval()


@torch.no_grad()
def reconstruct(net, images):
    """(N, H, W, 3) uint8 -> the same through the autoencoder, uint8; sides not a multiple of 8 are padded
    (edge pixels) and cut back."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    h, w = x.shape[-2:]
    pad = (0, -w % STRIDE, 0, -h % STRIDE)
    y = net(nn.functional.pad(x, pad, mode="replicate"))[..., :h, :w]
    return (y * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- the same compression as the real file

def jpeg_tables(path):
    """(quantisation tables, chroma subsampling) of a JPEG file, or None for any other file."""
    try:
        with Image.open(path) as im:
            if im.format != "JPEG":
                return None
            from PIL import JpegImagePlugin
            return im.quantization, JpegImagePlugin.get_sampling(im)
    except (OSError, ValueError):
        return None


def compress_like(pixels, tables):
    """(H, W, 3) uint8 re-encoded as a JPEG with the given tables (jpeg_tables) and decoded again."""
    qtables, sampling = tables
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", qtables=qtables, subsampling=max(sampling, 0))
    return np.asarray(Image.open(buffer).convert("RGB"))


# ---------------------------------------------------------------- once per image

def store_for(cache):
    """The folder of the reconstructions of a decoded-image cache's pixels: beside the cache, named by its
    size and route (dataset.build_cache), so every cache of those pixels shares it (other seeds, --train_extra)."""
    folder = Path(cache.filename).parent
    return folder.parent / f"taef2-{folder.name.rsplit('-', 1)[0]}"


def make_reconstructions(cache, samples, folder=DEFAULT_WEIGHTS, batch_size=8):
    """Reconstruct the cached pixels of every sample that lacks one, once: PNG files (lossless) named by the
    sha1 of the source file in store_for(cache), compressed as the source file was. Returns that folder."""
    store = store_for(cache)
    missing = [s for s in samples if not (store / f"{s.digest}.png").is_file()]
    if missing:
        store.mkdir(parents=True, exist_ok=True)
        net = load_autoencoder(folder)
        for start in progress(range(0, len(missing), batch_size),
                              f"reconstructing {len(missing)} real training images with TAEF2 (autoencoder.py)",
                              unit="batch"):
            batch = missing[start:start + batch_size]
            for s, pixels in zip(batch, reconstruct(net, cache[[s.row for s in batch]])):
                tables = jpeg_tables(s.path)
                tmp = store / f"{s.digest}.tmp.png"  # renamed when whole: a stopped run leaves no half file
                Image.fromarray(compress_like(pixels, tables) if tables else pixels).save(tmp)
                tmp.replace(store / f"{s.digest}.png")
    return store


class Reconstruction:
    """What DeepfakeDataset calls for a pseudo-fake sample: cached pixels of row -> its stored reconstruction."""

    same_augmentation = True  # a real image and its reconstruction take the same random draws in a batch
    made = "TAEF2 reconstructions"  # what summary.md calls these pseudo-fakes
    no_face = 0  # needs no face (a self-blend's mask does)

    def __init__(self, store, digests):
        self.store, self.digests = store, digests  # digests: {cache row: sha1 of its source file}

    def pixels(self, row):
        """(S, S, 3) uint8 reconstruction of cached row."""
        return np.asarray(Image.open(self.store / f"{self.digests[row]}.png").convert("RGB"))

    def __call__(self, img, row):
        return torch.from_numpy(self.pixels(row).copy()).permute(2, 0, 1)


# ---------------------------------------------------------------- the picture

def save_examples(ds, path, n=4):
    """pseudo_fakes.png: the pairs trained together, real | reconstruction | what changed (x8), for n real
    training images, at their own pixels."""
    real = sbi.blended_reals(ds)[:n]
    fig, axes = plt.subplots(len(real), 3, figsize=(9, 3 * len(real)), squeeze=False)
    for ax_row, s in zip(axes, real):
        img, made = np.array(ds.cache[s.row]), ds.blend.pixels(s.row)
        change = np.clip(np.abs(made.astype(np.int16) - img).max(-1) * 8, 0, 255).astype(np.uint8)
        for ax, picture, title in zip(ax_row, (img, made, change),
                                      ("real", "TAEF2 reconstruction (label: fake)", "|reconstruction - real| x 8")):
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.suptitle("Latent-decoder pseudo-fakes (autoencoder.py): each real image and its reconstruction are trained "
                 "in the same batch, with the same augmentation", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
