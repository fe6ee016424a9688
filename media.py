"""Reading media: which files are images or videos, and how to get RGB pixels out of them.

Training (dataset.py), face cropping (faces.py), prediction (predict.py) and the web
page (app.py) all read files through here, so a file type that trains also predicts,
and an image looks the same to every one of them.

    rgb = load_rgb("face.png")                           # PIL RGB, any mode, EXIF upright
    for index, frame in sample_frames("clip.mp4", 8):    # (frame index, (H, W, 3) uint8)
        ...
    crop_name("clip", 12, 0)                             # 'clip_f0012_0.jpg', as faces.py writes

Nothing here imports torch: faces.py's worker processes stay light.
"""
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}  # GIF: the first frame
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}
# The pixel budget for files from strangers (predict.py, app.py). Pillow's own limit (179 MP)
# lets a 20 KB one-bit PNG of 13000x13000 decode into 1.7 GB; 40 MP (a 48 MP phone photo is
# saved at 12 MP) decodes into at most about 120 MB of RGB.
MAX_PIXELS = 40_000_000
# Pillow refuses a picture of over twice its own limit while opening it, before its size can be checked
# against --max_pixels (and a raised --max_pixels would change nothing). Its check is switched off here, in
# the one module that reads files, and check_pixels() applies the limit instead: --max_pixels where one
# is given, else Pillow's own refusal threshold.
PILLOW_LIMIT = 2 * Image.MAX_IMAGE_PIXELS
Image.MAX_IMAGE_PIXELS = None
# face crops written by faces.py: <source>_f<frame>_<face>.jpg; training groups them by <source>
CROP_NAME = re.compile(r"^(?P<source>.+)_f(?P<frame>\d+)(?:_(?P<face>\d+))?$")


class MediaError(ValueError):
    """A file that cannot be read as an image or a video; the message names the file."""


def is_image(path):
    return Path(path).suffix.lower() in IMAGE_EXTS


def is_video(path):
    return Path(path).suffix.lower() in VIDEO_EXTS


def find_media(inputs, skip=None):
    """Images and videos among `inputs`: files as given, folders searched recursively (minus
    anything under `skip`). Returns (files, [(input, one-line problem)]) for missing files,
    other file types and folders without media."""
    files, problems, skip = [], [], Path(skip).resolve() if skip else None
    for given in map(Path, inputs):
        if given.is_dir():
            found = [p for p in sorted(given.rglob("*")) if p.is_file() and (is_image(p) or is_video(p))
                     and not (skip and skip in p.resolve().parents)]
            files += found
            if not found:
                problems.append((str(given), f"{given}: no images or videos inside"))
        elif not given.is_file():
            problems.append((str(given), f"{given}: file not found"))
        elif is_image(given) or is_video(given):
            files.append(given)
        else:
            problems.append((str(given), f"{given}: not an image or video (extensions: "
                                         f"{' '.join(sorted(IMAGE_EXTS | VIDEO_EXTS))})"))
    return list(dict.fromkeys(files)), problems  # the same file given twice is one input


def unique_stem(path, clashes, taken):
    """File-name-safe stem; parent folder added when two inputs share a stem, then a number."""
    path = Path(path)
    name = path.stem if path.stem not in clashes else f"{path.parent.name}_{path.stem}"
    stem = re.sub(r"[^\w.-]+", "-", name)
    candidate, n = stem, 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}-{n}"
    taken.add(candidate)
    return candidate


def crop_name(stem, frame, face):
    return f"{stem}_f{frame:04d}_{face}.jpg"


def crop_source(path):
    """'clip_f0003_0.jpg' -> 'clip'; '' for a name faces.py did not write."""
    m = CROP_NAME.match(Path(path).stem)
    return m["source"] if m else ""


def check_pixels(path, width, height, max_pixels):
    """Refuse a picture or video frame larger than max_pixels (None: Pillow's own limit), before anything is
    decoded."""
    limit = max_pixels or PILLOW_LIMIT
    if width * height > limit:
        raise MediaError(f"{path}: {width}x{height} is {width * height / 1e6:.0f} MP, over the {limit / 1e6:g} MP "
                         f"limit{' (--max_pixels)' if max_pixels else ''}; scale it down first")


def load_rgb(path, max_pixels=None):
    """Open any image as 8-bit RGB: grayscale, palette, RGBA, CMYK and 16-bit included.

    max_pixels: refuse larger images from their header alone (None: Pillow's own limit).
    Raises MediaError for anything that cannot be decoded.
    """
    try:
        with Image.open(path) as im:
            check_pixels(path, im.width, im.height, max_pixels)
            im.load()  # decode now, so a truncated file fails here and not in a worker
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit: scale 0..65535 to 0..255 (convert("L") would clip instead)
                a = np.asarray(im, dtype=np.float32) / 257.0
                im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
            if im.mode == "P":
                im = im.convert("RGBA")
            if im.mode in ("RGBA", "LA", "PA"):
                # transparent pixels become white, as most viewers show them
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im.convert("RGBA"))
            return im.convert("RGB")
    except MediaError:
        raise
    except Exception as e:  # broken files raise OSError, SyntaxError, struct.error, bomb errors...
        raise MediaError(f"{path}: {type(e).__name__}: {e}") from e


def _frame_count(container, stream):
    """Frames in the stream: stored, else duration x rate, else counted (demuxing only)."""
    import av
    total = stream.frames
    if total <= 0 and stream.average_rate:
        seconds = (float(stream.duration * stream.time_base) if stream.duration
                   else (container.duration or 0) / av.time_base)
        total = round(seconds * float(stream.average_rate))
    if total <= 0:
        total = sum(1 for p in container.demux(stream) if p.size)
        container.seek(0)
    return total


def sample_frames(path, n_frames=32, max_pixels=None):
    """Yield (frame index, RGB uint8 (H, W, 3)) for n_frames indices spread evenly over a video.

    Decodes sequentially and keeps the wanted frames: seeking only lands on keyframes
    (often 100-250 frames apart), so it saves little and makes indices inexact.
    Raises MediaError when the file cannot be opened or no frame decodes, and after the frames
    that did decode when fewer decode than the header announces (a truncated download).
    """
    import av  # imported here: image-only work never loads FFmpeg
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            check_pixels(path, stream.codec_context.width, stream.codec_context.height, max_pixels)
            total = _frame_count(container, stream)
            wanted = sorted({round(i) for i in np.linspace(0, total - 1, n_frames)}) if total > n_frames \
                else range(total)
            stream.thread_type = "AUTO"
            wanted_set, last, got = set(wanted), wanted[-1] if len(wanted) else -1, 0
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted_set:  # convert only the kept frames: the costly step
                    got += 1
                    rgb = frame.to_ndarray(format="rgb24")
                    # Phone videos store "turn by 90" in a display matrix; upright faces detect best.
                    # rotation = degrees counterclockwise to display; np.rot90 turns counterclockwise.
                    yield index, np.ascontiguousarray(np.rot90(rgb, round(frame.rotation / 90))) \
                        if frame.rotation else rgb
                if index >= last:
                    break  # a wrong estimated total means a few frames more or fewer: accepted
            if got == 0:
                raise MediaError(f"{path}: no decodable frames")
            if got < len(wanted) and stream.frames > 0:  # the header counts its frames: the data ends early
                raise MediaError(f"{path}: only {got} of {len(wanted)} sampled frames decode (the header announces "
                                 f"{stream.frames} frames: a truncated file?)")
    except av.FFmpegError as e:  # includes InvalidDataError for random bytes / truncation
        raise MediaError(f"{path}: {e}") from e
