"""Shared fixtures: the real data in ../shared/data, and one tiny trained checkpoint."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project is flat files, not a package
SHARED = ROOT.parent / "shared" / "data"


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
def trained_run(faces_root, tmp_path_factory):
    """A real (tiny) training run through main.py: 40 images per class, 64 px, 2 epochs.

    Returns the output folder; its checkpoints/best.pt is what predict/app tests load.
    """
    import main
    out = tmp_path_factory.mktemp("run")
    args = main.parse_args(["--data_root", str(faces_root), "--weights", "none", "--epochs", "2",
                            "--max_per_class", "40", "--image_size", "64", "--batch_size", "16",
                            "--output_dir", str(out), "--cache_dir", str(out / "cache"), "--workers", "0"])
    main.main(args)
    return out
