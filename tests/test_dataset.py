"""Data: layouts, leak-free splits, the cache, image modes and bad files."""
import shutil
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import presets

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def make_images(folder, n, seed, prefix="img", size=24):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{prefix}{i:03d}.png")


@pytest.fixture
def pool(tmp_path):
    """40 real + 60 fake distinct random images (imbalanced on purpose)."""
    make_images(tmp_path / "data" / "real_data", 40, 1)
    make_images(tmp_path / "data" / "fake_data", 60, 2)
    return tmp_path / "data"


def prepare(root, tmp_path, image_size=16, augment="none", **kw):
    transforms = presets.transforms({"image_size": image_size, "augment": augment}, MEAN, STD)
    return dataset.prepare_data(root, transforms, **{"cache_dir": tmp_path / "cache", "workers": 0, **kw})


def split_of(data):
    return {s.path: s.split for s in data.samples}


def test_split_is_stratified_seeded_and_disjoint(pool, tmp_path):
    a = prepare(pool, tmp_path, val_fraction=0.2, test_fraction=0.2, seed=3)
    paths = {split: {s.path for s in ds.samples} for split, ds in a.datasets.items()}
    assert not (paths["train"] & paths["val"]) and not (paths["train"] & paths["test"]) \
        and not (paths["val"] & paths["test"])
    assert sum(len(p) for p in paths.values()) == 100
    for split, frac in (("val", 0.2), ("test", 0.2)):  # each class keeps its share
        counts = Counter(a.datasets[split].targets)
        assert counts[0] == 40 * frac and counts[1] == 60 * frac
    assert split_of(prepare(pool, tmp_path, val_fraction=0.2, test_fraction=0.2, seed=3)) == split_of(a)
    assert split_of(prepare(pool, tmp_path, val_fraction=0.2, test_fraction=0.2, seed=4)) != split_of(a)


def test_duplicates_and_video_frames_never_cross_splits(pool, tmp_path):
    fake = pool / "fake_data"
    for i in range(10):  # byte-identical copies under other names
        shutil.copy(fake / f"img{i:03d}.png", fake / f"copy{i:03d}.png")
    for v in range(6):   # 6 videos x 5 frames, named as faces.py names them
        make_images(fake, 5, 100 + v, prefix=f"video{v}_f")
        for f in fake.glob(f"video{v}_f*.png"):
            f.rename(f.with_name(f.stem + "_0.png"))
    data = prepare(pool, tmp_path, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert data.duplicates == 10
    by_digest, by_video = defaultdict(set), defaultdict(set)
    for s in data.samples:
        by_digest[s.digest].add(s.split)
        if s.path.split("/")[-1].startswith("video"):
            by_video[s.path.split("/")[-1].split("_f")[0]].add(s.split)
    assert all(len(splits) == 1 for splits in by_digest.values())
    assert len(by_video) == 6 and all(len(splits) == 1 for splits in by_video.values())
    assert len({tuple(s) for s in by_video.values()}) > 1  # videos do spread over splits


def test_manifest_groups_crops_of_one_source(pool, tmp_path):
    fake = pool / "fake_data"
    rows = ["file,source,frame,face,x0,y0,x1,y1,score,detector"]
    rows += [f"img{i:03d}.png,clips/{i % 4}.mp4,{i},0,0,0,1,1,0.9,yunet" for i in range(60)]
    (fake / "manifest.csv").write_text("\n".join(rows) + "\n")
    data = prepare(pool, tmp_path, val_fraction=0.25, test_fraction=0.25, seed=0)
    per_source = defaultdict(set)
    for s in data.samples:
        if s.label == 1:
            per_source[int(s.path[-7:-4]) % 4].add(s.split)
    assert all(len(splits) == 1 for splits in per_source.values())


def test_corrupt_files_are_reported_and_skipped(pool, tmp_path, capsys):
    real = pool / "real_data"
    (real / "notes.jpg").write_text("not an image at all")
    truncated = (real / "img000.png").read_bytes()
    (real / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    data = prepare(pool, tmp_path)
    out = capsys.readouterr()
    said = next(line for line in out.out.splitlines() if "unreadable" in line)
    assert said.startswith("warning: skipped 2 unreadable") and "Warning" not in out.out + out.err  # no source line
    assert "notes.jpg" in out.out and "truncated.png" in out.out
    assert set(p.split("/")[-1] for p in data.corrupt) == {"notes.jpg", "truncated.png"}
    assert all(s.path not in data.corrupt for s in data.samples) and len(data.samples) == 100
    for ds in data.datasets.values():  # every remaining sample loads
        ds[len(ds) - 1]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1", "I;16", "I"])
def test_every_image_mode_loads_as_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        im = Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16))
    elif mode == "I":
        im = Image.fromarray(np.full((20, 30), 65535, dtype=np.int32))
    else:
        im = rgb.convert(mode)
    path = tmp_path / ("img.tif" if mode in ("CMYK", "I;16", "I") else "img.png")
    im.save(path)
    out = dataset.load_rgb(path)
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode in ("I;16", "I"):  # full-scale 16-bit white stays white, not clipped garbage
        assert np.asarray(out).min() == 255


def test_cache_is_reused_and_invalidated_when_a_file_changes(pool, tmp_path):
    a = prepare(pool, tmp_path)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    prepare(pool, tmp_path)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # same files: same cache
    target = pool / "real_data" / "img000.png"
    Image.new("RGB", (24, 24), (255, 0, 0)).save(target)
    b = prepare(pool, tmp_path)
    assert len(list((tmp_path / "cache").iterdir())) == 2
    row = next(s.row for s in b.samples if s.path == str(target))
    assert (b.datasets["train"].cache[row][..., 0] == 255).all()
    before, after = (next(s.digest for s in data.samples if s.path == str(target)) for data in (a, b))
    assert before != after  # the edited file was hashed anew


def test_cached_and_plain_paths_give_the_same_eval_tensor(pool, tmp_path):
    data = prepare(pool, tmp_path)
    ds = data.datasets["test"]
    plain = dataset.DeepfakeDataset(ds.samples, ds.transform, cache=None, size=ds.size)
    x_cached, y = ds[0]
    x_plain, y2 = plain[0]
    assert x_cached.shape == x_plain.shape == (3, 16, 16) and y == y2
    assert torch.equal(x_cached, x_plain)


def test_oversampling_happens_after_the_split_on_train_only(pool, tmp_path):
    data = prepare(pool, tmp_path, val_fraction=0.2, test_fraction=0.2)
    train = dataset.oversample(data.datasets["train"])
    counts = Counter(train.targets)
    assert counts[0] == counts[1] == 36
    held_out = {s.path for split in ("val", "test") for s in data.datasets[split].samples}
    assert not held_out & {s.path for s in train.samples}


def test_presplit_layout_drops_test_copies_of_train_images(tmp_path):
    root = tmp_path / "data"
    for split, seed in (("train", 1), ("val", 2), ("test", 3)):
        make_images(root / split / "real_data", 6, seed * 10)
        make_images(root / split / "fake_data", 6, seed * 10 + 1)
    shutil.copy(root / "train" / "fake_data" / "img000.png", root / "test" / "fake_data" / "leak.png")
    data = prepare(root, tmp_path)
    assert data.presplit and data.dropped_copies == 1
    assert {split: len(ds) for split, ds in data.datasets.items()} == {"train": 12, "val": 12, "test": 12}


@pytest.mark.parametrize("presplit", [False, True])
def test_train_extra_joins_training_only_and_leaves_the_held_out_splits_alone(pool, tmp_path, presplit):
    root = pool
    if presplit:
        root = tmp_path / "presplit"
        for split, seed in (("train", 1), ("val", 2), ("test", 3)):
            for c, name in enumerate(dataset.CLASS_DIRS):
                make_images(root / split / name, 6, seed * 10 + c)
        make_images(root / "test" / "real_data", 1, 5, prefix="talk_f0000_")  # a frame of video "talk", in test
    before = split_of(prepare(root, tmp_path))
    extra = tmp_path / "video_reals"
    make_images(extra / "real_data", 7, 99, prefix="clip")  # real faces only: one class is enough
    if presplit:  # another frame of the test video: training on it would leak
        make_images(extra / "real_data", 1, 6, prefix="talk_f0001_")
    test_file = next(p for p, split in sorted(before.items()) if split == "test")
    shutil.copy(test_file, extra / "real_data" / "copy_of_a_test_face.png")
    data = prepare(root, tmp_path, train_extra=[extra])
    after = split_of(data)
    extras = {p: split for p, split in after.items() if p.startswith(str(extra))}
    assert len(extras) == 7 and set(extras.values()) == {"train"}  # the copy of a test face is left out
    assert data.dropped_extra == {"copies": 1, "copies_held_out": 1, "same_video_held_out": int(presplit)}
    assert str(extra / "real_data" / "copy_of_a_test_face.png") not in after
    assert {p: split for p, split in after.items() if p not in extras} == before  # same split as without them
    train = data.datasets["train"]
    assert sum(s.extra for s in train.samples) == 7 and all(s.label == 0 for s in train.samples if s.extra)
    with pytest.raises(dataset.DatasetError, match=r"needs real_data/ or fake_data/ inside \(either is enough\)"):
        prepare(root, tmp_path, train_extra=[tmp_path / "cache"])


@pytest.mark.parametrize("case", ["missing_root", "missing_class", "empty_class", "wrong_layout"])
def test_bad_layouts_name_the_path(tmp_path, case):
    root = tmp_path / "data"
    if case != "missing_root":
        root.mkdir()
    if case in ("missing_class", "empty_class"):
        make_images(root / "real_data", 3, 0)
    if case == "empty_class":
        (root / "fake_data").mkdir()
    if case == "wrong_layout":
        make_images(root / "cats", 3, 0)
    with pytest.raises(dataset.DatasetError) as e:
        prepare(root, tmp_path)
    assert str(root) in str(e.value) and "real_data" in str(e.value)


def test_faces_py_output_folder_trains_without_its_preview_sheet(pool, tmp_path):
    fake = pool / "fake_data"
    (fake / "manifest.csv").write_text("file,source,frame,face,x0,y0,x1,y1,score,detector\n")
    Image.new("RGB", (50, 50)).save(fake / "preview.png")
    data = prepare(pool, tmp_path)
    assert len(data.samples) == 100 and not any(s.path.endswith("preview.png") for s in data.samples)


def augmented_face(augment, seeds=40):
    """The sample face as evaluation sees it, and as `augment` gives it under each of `seeds` seeds."""
    from conftest import sample_face

    img = torch.from_numpy(sample_face().copy()).permute(2, 0, 1)
    plain = presets.eval_transform(256, [0.5] * 3, [0.5] * 3, crop_pct=1)(img)
    transform = presets.train_transform(256, [0.5] * 3, [0.5] * 3, augment, crop_pct=1)
    outs = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        outs.append(transform(img))
    return plain, outs


def test_compress_recompresses_about_half_the_images_real_and_fake_alike():
    counts = {}
    for augment in ("flip", "compress"):
        plain, outs = augmented_face(augment)
        as_is = (plain, plain.flip(-1))  # what flip alone can give
        counts[augment] = sum(min(float((out - x).abs().mean()) for x in as_is) > 1e-3 for out in outs)
    assert counts["flip"] == 0 and 10 <= counts["compress"] <= 30


def test_video_shrinks_about_half_the_faces_and_keeps_their_size():
    def detail(x):  # mean step between neighbouring pixels: what shrinking a face takes away
        return float((x[..., 1:] - x[..., :-1]).abs().mean())
    counts = {}
    for augment in ("compress", "video"):
        plain, outs = augmented_face(augment)
        assert all(out.shape == plain.shape for out in outs)
        # JPEG alone keeps more of it (>= 0.81 on this face)
        counts[augment] = sum(detail(out) < 0.78 * detail(plain) for out in outs)
    assert counts["compress"] == 0 and 10 <= counts["video"] <= 30
