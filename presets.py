"""What the network sees: the training and evaluation transforms, side by side.

Images reach these as uint8 (3, S, S) tensors from the decoded-image cache, S =
cache_size_for(image_size, crop_pct) = image_size / crop_pct (256 for 224 at the default
0.875): a little larger than the input, so random crops have room, and evaluation
centre-crops at the same scale. --crop_pct 1 feeds the whole face, resized to the input
(on 256-px faces with --image_size 256: the native pixels, neither resampled nor cropped).

    --augment none           centre crop, as in evaluation
    --augment flip           centre crop + horizontal flip
    --augment crop_flip      random crop + flip
    --augment blur_jpeg      random crop + flip + occasional blur and JPEG re-compression
                             (Wang et al., CVPR 2020, "CNN-generated images are surprisingly
                             easy to spot... for now": their Blur+JPEG (0.1) setting)
    --augment blur_jpeg_0.5  the same on half the images (their Blur+JPEG (0.5))
    --augment rescale        flip + half the images shrunk to 50-100% and enlarged back: how
                             sharp a face is says nothing of its source
    --augment compress       centre crop + flip + JPEG re-compression at the quality of online
                             video (40-100, half the images; SBI's setting): real and fake
                             alike, so compression is no cue, as in face-swap videos
    --augment video          compress, and half the images shrunk to 25-100% and scaled back
                             (the DFDC winner's downscale): faces cut from video are small faces
                             enlarged, and a detector trained on sharp photos calls every such
                             face fake, real or not

--input_jpeg Q re-encodes every image at JPEG quality Q as the last step of both transforms
(training and evaluation, so predict.py too): the shared training faces are all JPEG 75,
while a PNG from a generator or a large photo scaled down carries no JPEG blocks at all, and
a detector that never saw such an input has no reason to score it like the training faces.

Nothing rotates or crops to another scale: a generator leaves its traces at the pixel level,
and resampling smears them (rescale and video do it on purpose, to half the images).
"""
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

CROP_PCT = 224 / 256  # input size / cached size: ImageNet's classic 224 crop of a 256 resize


def cache_size_for(image_size, crop_pct=CROP_PCT):
    """The cached (and evaluation-resized) size: a little larger than the input (256 for 224)
    so random crops have room; the input size itself at crop_pct 1."""
    return int(round(image_size / crop_pct))


def resize_square(im, size):
    """Resize the short side to `size` and centre-crop a square: PIL image -> (size, size, 3) uint8."""
    return np.array(ImageOps.fit(im, (size, size), Image.Resampling.BILINEAR))


# --input_route: how an image becomes the square the transforms start from (the cache, predict.py).
#   resize  the short side resized to the cache size, centre square (every face seen whole)
#   crop    the centre square at the image's own pixels (SAFE, Li et al., KDD 2025): a generator's
#           pixel-level traces are never resampled away; an image smaller than that is enlarged
ROUTES = ("resize", "crop")


def square_pixels(im, size, route="resize"):
    """PIL image -> (size, size, 3) uint8 as --input_route says."""
    if route == "crop" and min(im.size) >= size:
        left, top = (im.width - size) // 2, (im.height - size) // 2
        return np.array(im.crop((left, top, left + size, top + size)))
    return resize_square(im, size)


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


def _blur_jpeg(p):
    return [v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 3.0))], p=p),
            v2.RandomApply([v2.JPEG(quality=(30, 100))], p=p)]


def _compress():
    return [v2.RandomApply([v2.JPEG(quality=(40, 100))], p=0.5)]


# --augment NAME -> (random crops?, the steps after the crop and the flip). A new augmentation is one
# entry here (and, if it takes a number, one flag in main.py passed through transforms() below).
AUGMENTATIONS = {
    "none": (False, None),  # no flip either: exactly the evaluation transform
    "flip": (False, []),
    "crop_flip": (True, []),
    "blur_jpeg": (True, _blur_jpeg(0.1)),
    "blur_jpeg_0.5": (True, _blur_jpeg(0.5)),
    "rescale": (False, [v2.RandomApply([Downscale((0.5, 1.0))], p=0.5)]),
    "compress": (False, _compress()),
    "video": (False, [v2.RandomApply([Downscale()], p=0.5), *_compress()]),
}


def _finish(steps, mean, std, jpeg):
    """The steps every transform ends with: the optional fixed JPEG re-encoding, then float and normalise."""
    return v2.Compose(steps + ([v2.JPEG(quality=jpeg)] if jpeg else [])
                      + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def train_transform(image_size, mean, std, augment="blur_jpeg", crop_pct=CROP_PCT, jpeg=0, route="resize"):
    """uint8 (3, S, S) -> normalized float (3, image_size, image_size), augmented as `augment` says;
    jpeg > 0 re-encodes every image at that quality last, as eval_transform does. With route "crop"
    the crop is always a random one (SAFE's random crops: where in the face a patch sits is no cue)."""
    random_crop, extra = AUGMENTATIONS[augment]
    crop = v2.RandomCrop(image_size) if random_crop or route == "crop" else v2.CenterCrop(image_size)
    steps = [v2.Resize(cache_size_for(image_size, crop_pct), antialias=True), crop]  # a no-op on cached pixels
    if extra is not None:
        steps += [v2.RandomHorizontalFlip(), *extra]
    return _finish(steps, mean, std, jpeg)


def eval_transform(image_size, mean, std, crop_pct=CROP_PCT, jpeg=0, route="resize"):
    """Deterministic: resize the short side (256 for 224), centre crop, (re-encode as JPEG), normalize; same
    scale as training. With route "crop" the whole square as cached, at its own pixels: a network that
    pools over any size then scores every patch of it, each as it trained on random image_size crops."""
    if route == "crop":
        return _finish([], mean, std, jpeg)
    return _finish([v2.Resize(cache_size_for(image_size, crop_pct), antialias=True), v2.CenterCrop(image_size)],
                   mean, std, jpeg)


class Transforms(NamedTuple):
    train: v2.Compose
    eval: v2.Compose
    cache_size: int  # the decoded-image cache's side (cache_size_for)
    route: str = "resize"  # how an image becomes that square (square_pixels)


def transforms(config, mean, std):
    """The transforms a run's configuration (main.py's flags, a checkpoint's "args") asks for: the one
    place where data flags reach them, for a new run and for a checkpoint loaded back to score."""
    size, crop_pct, jpeg = config["image_size"], config.get("crop_pct", CROP_PCT), config.get("input_jpeg", 0)
    route = config.get("input_route", "resize")
    return Transforms(train_transform(size, mean, std, config.get("augment", "none"), crop_pct, jpeg, route),
                      eval_transform(size, mean, std, crop_pct, jpeg, route), cache_size_for(size, crop_pct), route)
