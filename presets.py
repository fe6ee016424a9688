"""What the network sees: the training and evaluation transforms, side by side.

Images reach these as uint8 (3, S, S) tensors from the decoded-image cache, S =
cache_size_for(image_size, crop_pct) = image_size / crop_pct (256 for 224 at the default
0.875): a little larger than the input, so random crops have room, and evaluation
centre-crops at the same scale. --crop_pct 1 feeds the whole face, resized to the input
(on 256-px faces with --image_size 256: the native pixels, neither resampled nor cropped).

    --augment none        centre crop, as in evaluation
    --augment flip        centre crop + horizontal flip
    --augment crop_flip   random crop + flip
    --augment blur_jpeg   random crop + flip + occasional blur and JPEG re-compression
                          (Wang et al., CVPR 2020, "CNN-generated images are surprisingly
                          easy to spot... for now": their Blur+JPEG (0.1) setting)
    --augment compress    centre crop + flip + JPEG re-compression at the quality of online
                          video (40-100, half the images; SBI's setting): real and fake
                          alike, so compression is no cue, as in face-swap videos
    --augment video       compress, and half the images shrunk to 25-100% and scaled back
                          (the DFDC winner's downscale): faces cut from video are small faces
                          enlarged, and a detector trained on sharp photos calls every such
                          face fake, real or not

No other augmentation rescales or rotates: resampling smears the pixel-level traces a generator
leaves, which are what a detector of GAN images learns from.
"""
import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

AUGMENTATIONS = ("none", "flip", "crop_flip", "blur_jpeg", "compress", "video")
CROP_PCT = 224 / 256  # input size / cached size: ImageNet's classic 224 crop of a 256 resize


def cache_size_for(image_size, crop_pct=CROP_PCT):
    """The cached (and evaluation-resized) size: a little larger than the input (256 for 224)
    so random crops have room; the input size itself at crop_pct 1."""
    return int(round(image_size / crop_pct))


def resize_square(im, size):
    """Resize the short side to `size` and centre-crop a square: PIL image -> (size, size, 3) uint8."""
    return np.array(ImageOps.fit(im, (size, size), Image.Resampling.BILINEAR))


class Downscale(torch.nn.Module):
    """Shrink a (3, S, S) image to a random share of S in `scale` and enlarge it back to S: the
    detail of a face that filled fewer pixels."""

    def __init__(self, scale=(0.25, 1.0)):
        super().__init__()
        self.scale = scale

    def forward(self, img):
        size = img.shape[-1]
        low, high = self.scale
        small = max(1, round(size * (low + (high - low) * torch.rand(()).item())))
        return v2.functional.resize(v2.functional.resize(img, small, antialias=True), size, antialias=True)


def train_transform(image_size, mean, std, augment="blur_jpeg", crop_pct=CROP_PCT):
    """uint8 (3, S, S) -> normalized float (3, image_size, image_size), augmented as `augment` says."""
    crop = v2.RandomCrop(image_size) if augment in ("crop_flip", "blur_jpeg") else v2.CenterCrop(image_size)
    steps = [v2.Resize(cache_size_for(image_size, crop_pct), antialias=True), crop]  # a no-op on cached pixels
    if augment != "none":
        steps.append(v2.RandomHorizontalFlip())
    if augment == "blur_jpeg":
        steps += [v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 3.0))], p=0.1),
                  v2.RandomApply([v2.JPEG(quality=(30, 100))], p=0.1)]
    if augment == "video":
        steps.append(v2.RandomApply([Downscale()], p=0.5))
    if augment in ("compress", "video"):
        steps.append(v2.RandomApply([v2.JPEG(quality=(40, 100))], p=0.5))
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def eval_transform(image_size, mean, std, crop_pct=CROP_PCT):
    """Deterministic: resize the short side (256 for 224), centre crop, normalize; same scale as training."""
    return v2.Compose([
        v2.Resize(cache_size_for(image_size, crop_pct), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])
