"""Shared fixtures: the bundled sample, the real data in ../shared/data, one tiny trained checkpoint,
and short face videos written here (so video tests run in any clone)."""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project is flat files, not a package
SHARED = ROOT.parent / "shared" / "data"
SAMPLE = ROOT / "samples" / "faces"


def sample_face(i=0, label="real_data"):
    """The i-th bundled face photo as RGB uint8 (256, 256, 3)."""
    return np.asarray(Image.open(sorted((SAMPLE / label).glob("*.jpg"))[i]).convert("RGB"))


def write_video(path, frames, rate=10, codec="mpeg4", fmt=None):
    import av
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for rgb in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return Path(path)


def face_scene(n, w=480, h=360, face=None):
    """A face photo pasted on grey, drifting to the right, as n frames."""
    face = np.asarray(Image.fromarray(sample_face() if face is None else face).resize((160, 160)))
    frames = []
    for i in range(n):
        rgb = np.full((h, w, 3), 90, np.uint8)
        x = 60 + 10 * i
        rgb[100:260, x:x + 160] = face
        frames.append(rgb)
    return frames


@pytest.fixture(scope="session")
def sample_root():
    """samples/faces: the 100 real + 100 fake faces bundled with the project."""
    return SAMPLE


@pytest.fixture(scope="session")
def faces_root():
    """../shared/data/faces140k (900 real + 900 fake); skipped in a clone without it."""
    root = SHARED / "faces140k"
    if not (root / "real_data").is_dir():
        pytest.skip(f"real data not found at {root} (it sits beside the project in CI)")
    return root


@pytest.fixture(scope="session")
def videos_root():
    root = SHARED / "videos"
    if not root.is_dir():
        pytest.skip(f"real videos not found at {root} (they sit beside the project in CI)")
    return root


@pytest.fixture(scope="session")
def face_video(tmp_path_factory):
    """A 12-frame clip of a bundled face moving over a grey background."""
    return write_video(tmp_path_factory.mktemp("video") / "face.mp4", face_scene(12))


@pytest.fixture(scope="session")
def trained_run(sample_root, tmp_path_factory):
    """A real (tiny) training run through main.py: 40 bundled images per class, 64 px, 2 epochs.

    Returns the output folder; its checkpoints/best.pt is what predict/app tests load.
    """
    import main
    out = tmp_path_factory.mktemp("run")
    args = main.parse_args(["--data_root", str(sample_root), "--weights", "none", "--epochs", "2",
                            "--max_per_class", "40", "--image_size", "64", "--batch_size", "16",
                            "--output_dir", str(out), "--cache_dir", str(out / "cache"), "--workers", "0"])
    main.main(args)
    return out
