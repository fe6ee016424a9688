"""Data: find the images, split them without leaks, cache decoded pixels, augment.

Two layouts are read (real_data -> label 0, fake_data -> label 1):

    Dataset/real_data/*.jpg             one pool, split here (stratified, seeded)
    Dataset/fake_data/*.jpg
    Dataset/{train,val,test}/{real_data,fake_data}/*.jpg   already split (val optional)

Why the care: a detector's test score means nothing if a test image (or a frame
of the same video, or a byte-identical copy) was also seen in training. So exact
duplicates and frames of one source video are grouped, and a group lives in one
split only. Balancing (oversampling) happens after the split, on train only.

    from dataset import prepare_data
    data = prepare_data("Dataset", presets.transforms({"image_size": 224, "augment": "flip"}, mean, std))
    data.datasets["train"][0]   # (tensor (3, 224, 224) float, label)
"""
import csv
import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cli import progress
from media import IMAGE_EXTS, MediaError, crop_source, load_rgb
from presets import square_pixels

CLASSES = ("real", "fake")  # index = label
CLASS_DIRS = ("real_data", "fake_data")
SPLITS = ("train", "val", "test")
LAYOUT_HELP = ("expected <root>/real_data/ and <root>/fake_data/ with images, "
               "or <root>/{train,val,test}/{real_data,fake_data}/ (see Dataset/README.md)")


class DatasetError(Exception):
    """The data folder cannot be used; the message says which path and why."""


@dataclass
class Sample:
    path: str
    label: int
    group: str = ""       # source video or duplicate set: never split apart
    split: str = ""       # set here, or by the folder in the pre-split layout
    digest: str = ""      # sha1 of the file's bytes
    row: int = -1         # row in the decoded-image cache
    pseudo: bool = False  # a self-blended fake made from this real image (sbi.py), training only
    extra: bool = False   # from a --train_extra folder: training only, never split


# ---------------------------------------------------------------- finding files

def _images_in(folder):
    """Image files under folder, minus faces.py's contact sheet (preview.png beside a manifest.csv)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                  and not (p.name == "preview.png" and (p.parent / "manifest.csv").is_file()))


def _class_samples(folder, split="", both=True):
    """Samples of <folder>/real_data and <folder>/fake_data (both=False: either is enough); errors name the path."""
    samples = []
    for label, name in enumerate(CLASS_DIRS):
        d = folder / name
        if not d.is_dir() and not both and any((folder / c).is_dir() for c in CLASS_DIRS):
            continue
        if not d.is_dir():
            raise DatasetError(f"{d}: class folder missing; {LAYOUT_HELP}")
        files = _images_in(d)
        if not files:
            raise DatasetError(f"{d}: no images ({', '.join(sorted(IMAGE_EXTS))}); {LAYOUT_HELP}")
        sources = _manifest_sources(d)
        for p in files:
            source = sources.get(p.name) or crop_source(p)
            samples.append(Sample(str(p), label, group=source, split=split))
    return samples


def _manifest_sources(folder):
    """file name -> source video, from the manifest.csv that faces.py writes."""
    path = folder / "manifest.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["file"]: row["source"] for row in csv.DictReader(f) if row.get("file")}


def find_samples(root):
    """List every image under root with its label (and split, for a pre-split root)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found; {LAYOUT_HELP}")
    if (root / "train").is_dir():
        present = [s for s in SPLITS if (root / s).is_dir()]
        if "test" not in present:
            raise DatasetError(f"{root / 'test'}: missing in a pre-split root; {LAYOUT_HELP}")
        return [s for split in present for s in _class_samples(root / split, split)], True
    if not any((root / d).is_dir() for d in CLASS_DIRS):
        raise DatasetError(f"{root}: neither real_data/fake_data nor train/val/test inside; {LAYOUT_HELP}")
    return _class_samples(root), False


# ---------------------------------------------------------------- loading pixels

class _Decode(Dataset):
    """Decode + resize (or crop, presets.square_pixels) + hash one file; a DataLoader runs it on every core."""

    def __init__(self, paths, size, route="resize"):
        self.paths, self.size, self.route = paths, size, route

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        try:
            digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()
            return i, square_pixels(load_rgb(path), self.size, self.route), digest, ""
        except Exception as e:  # any decoder error means: skip this file, say why
            why = str(e).removeprefix(f"{path}: ") if isinstance(e, MediaError) else f"{type(e).__name__}: {e}"
            return i, np.zeros((self.size, self.size, 3), np.uint8), "", why


def build_cache(samples, size, cache_dir="cache", workers=2, route="resize"):
    """Decode every image once into a uint8 (N, size, size, 3) .npy memmap, resized or cropped as route says.

    The cache folder's name hashes the file list with sizes and mtimes, so any
    added, removed or edited file gives a new cache. Sets Sample.row and
    Sample.digest; returns (memmap, {path: error} for unreadable files).
    """
    paths = [s.path for s in samples]
    how = [size] if route == "resize" else [size, route]  # the key of a resized cache is what it always was
    key = hashlib.sha1(json.dumps(how + [
        (os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"{size}px{'' if route == 'resize' else '-' + route}-{key}"
    index_path = folder / "index.json"
    if index_path.is_file():  # written last, so its presence means the cache is complete
        index = json.loads(index_path.read_text())
    else:
        folder.mkdir(parents=True, exist_ok=True)
        images = np.lib.format.open_memmap(folder / "images.npy", "w+", np.uint8, (len(paths), size, size, 3))
        index = {"paths": paths, "digests": [""] * len(paths), "errors": {}}
        loader = DataLoader(_Decode(paths, size, route), batch_size=None, num_workers=workers)
        for i, pixels, digest, error in progress(loader, f"caching {len(paths)} images", unit="img"):
            images[i], index["digests"][i] = pixels.numpy(), digest
            if error:
                index["errors"][paths[i]] = error
        images.flush()
        tmp = index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)
    for row, s in enumerate(samples):
        s.row, s.digest = row, index["digests"][row]
    return np.load(folder / "images.npy", mmap_mode="r"), index["errors"]


# ---------------------------------------------------------------- splitting

def group_samples(samples):
    """Merge groups that share a source video or identical bytes (union-find).

    Returns the number of files that are byte-identical copies of another file.
    """
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for s in samples:
        keys = ["sha1:" + s.digest] + (["src:" + s.group] if s.group else [])
        for k in keys[1:]:
            parent[find(k)] = find(keys[0])
    for s in samples:
        s.group = find("sha1:" + s.digest)
    return len(samples) - len({s.digest for s in samples})


def split_groups(samples, val_fraction, test_fraction, seed):
    """Stratified, seeded split that never puts one group in two splits.

    Hand-written because scikit-learn has no train/val/test splitter that is
    both stratified and grouped with given fractions. Per class (a group's
    majority label), groups are shuffled, then each goes to the split that is
    least full relative to its target: exact fractions for single images, and
    videos spread over all splits in proportion.
    """
    groups = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    rng = random.Random(seed)
    for label in range(len(CLASSES)):
        members = sorted((g for g, m in groups.items()
                          if Counter(s.label for s in m).most_common(1)[0][0] == label))
        rng.shuffle(members)
        total = sum(len(groups[g]) for g in members)
        target = {"train": (1 - val_fraction - test_fraction) * total, "val": val_fraction * total,
                  "test": test_fraction * total}
        target = {k: t for k, t in target.items() if t > 0}
        filled = dict.fromkeys(target, 0)
        for g in members:
            split = min(target, key=lambda k: filled[k] / target[k])
            for s in groups[g]:
                s.split = split
            filled[split] += len(groups[g])


def drop_cross_class_copies(samples):
    """The same bytes under real_data/ and fake_data/ is a labelling error: leave out every copy.

    Returns (kept samples, sorted paths of the copies left out).
    """
    labels = {}
    for s in samples:
        labels.setdefault(s.digest, set()).add(s.label)
    both = {digest for digest, seen in labels.items() if len(seen) > 1}
    return [s for s in samples if s.digest not in both], sorted(s.path for s in samples if s.digest in both)


def class_folder_holding(path, roots):
    """The class folder (real_data/ or fake_data/, pre-split ones too) under one of roots that path lies in,
    or None: a run writing there would put its own pictures among the images."""
    path = Path(path).resolve()
    for root in (Path(r).resolve() for r in roots):
        if root in path.parents or root == path:
            parts = path.relative_to(root).parts
            for k, part in enumerate(parts[:2]):
                if part in CLASS_DIRS and (k == 0 or parts[0] in SPLITS):
                    return root.joinpath(*parts[:k + 1])
    return None


def find_extra_samples(root):
    """--train_extra: the images of root's real_data/ and/or fake_data/, for the training split only
    (e.g. real faces cut from videos beside a photo dataset)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: --train_extra folder not found")
    if not any((root / d).is_dir() for d in CLASS_DIRS):
        raise DatasetError(f"{root}: --train_extra needs real_data/ or fake_data/ inside (either is enough), "
                           f"e.g. python faces.py --input VIDEOS --output {root / 'real_data'}")
    return [replace(s, split="train", extra=True) for s in _class_samples(root, "train", both=False)]


def drop_cross_split_copies(samples):
    """Pre-split roots: drop val/test files whose bytes (or source) also sit in an earlier split."""
    first = {}
    for s in sorted(samples, key=lambda s: SPLITS.index(s.split)):
        first.setdefault(s.group, s.split)
    kept = [s for s in samples if first[s.group] == s.split]
    return kept, len(samples) - len(kept)


# ---------------------------------------------------------------- the dataset

class DeepfakeDataset(Dataset):
    """Face images and labels (0 real, 1 fake).

    Pixels come from the decoded cache (a uint8 memmap, fast) when one is given,
    else each image is decoded and resized to `size` on every access (the plain,
    slow path): the same pixels either way.
    """

    classes = CLASSES

    def __init__(self, samples, transform=None, cache=None, size=256, blend=None, route="resize"):
        self.samples, self.transform, self.cache, self.size, self.route = samples, transform, cache, size, route
        self.blend = blend  # makes the pseudo-fake of a real image: sbi.SelfBlend, autoencoder.Reconstruction
        self.targets = [s.label for s in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i, seed=None):
        s = self.samples[i]
        pixels = (np.array(self.cache[s.row]) if self.cache is not None
                  else square_pixels(load_rgb(s.path), self.size, self.route))
        img = torch.from_numpy(pixels).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W) uint8
        if s.pseudo:
            img = self.blend(img, s.row)
        if self.transform is None:
            return img, s.label
        if seed is None:
            return self.transform(img), s.label
        with torch.random.fork_rng(devices=[]):  # the given draw here, the stream untouched outside
            torch.manual_seed(seed)
            return self.transform(img), s.label

    def __getitems__(self, indices):
        """A batch (the DataLoader asks for whole batches where this exists). Where the pseudo-fakes say so
        (autoencoder.Reconstruction), a real image and its pseudo-fake in one batch take the same random crop,
        flip, blur and JPEG: then they differ only by what made the pseudo-fake."""
        if not getattr(self.blend, "same_augmentation", False):
            return [self[i] for i in indices]
        rows = Counter(self.samples[i].row for i in indices)
        seeds = {row: int(torch.randint(2**62, ())) for row, n in rows.items() if n > 1}
        return [self.__getitem__(i, seeds.get(self.samples[i].row)) for i in indices]


@dataclass
class Data:
    """What prepare_data found: one DeepfakeDataset per split, and what it skipped or merged."""
    datasets: dict
    samples: list
    corrupt: dict = field(default_factory=dict)   # path -> error
    conflicts: list = field(default_factory=list) # paths of images found in both classes, left out
    duplicates: int = 0                           # byte-identical copies found
    dropped_copies: int = 0                       # pre-split: val/test copies of train files, removed
    dropped_extra: dict = field(default_factory=dict)  # --train_extra files left out: "copies" of root files
    #   ("copies_held_out" of them of val/test files), "same_video_held_out" (frames of val/test videos)
    multi_file_groups: int = 0                    # groups of >1 file (video frames, copies)
    presplit: bool = False


def prepare_data(root, transforms, val_fraction=0.15, test_fraction=0.15, seed=0, max_per_class=0,
                 cache_dir="cache", workers=2, use_cache=True, train_extra=()):
    """Find, decode (once, cached), de-duplicate, group and split the images under root; the images
    of the train_extra folders join the training split only. transforms: presets.transforms()."""
    samples, presplit = find_samples(root)
    if max_per_class:
        rng = random.Random(seed)  # a seeded subset, not the first files alphabetically
        samples = [s for label in range(len(CLASSES))
                   for s in sorted(rng.sample([s for s in samples if s.label == label],
                                              min(max_per_class, sum(s.label == label for s in samples))),
                                   key=lambda s: s.path)]
    samples += [s for folder in train_extra for s in find_extra_samples(folder)]
    size = transforms.cache_size
    cache, corrupt = build_cache(samples, size, cache_dir, workers, transforms.route)
    if corrupt:
        print(f"warning: skipped {len(corrupt)} unreadable image(s); fix or delete them:\n  "
              + "\n  ".join(f"{p} ({e})" for p, e in list(corrupt.items())[:20])
              + ("\n  ..." if len(corrupt) > 20 else ""))
    samples = [s for s in samples if s.path not in corrupt]
    in_root = {s.digest for s in samples if not s.extra}  # a --train_extra copy of a root file is left out
    copies = [s.digest for s in samples if s.extra and s.digest in in_root]
    samples, conflicts = drop_cross_class_copies([s for s in samples if not (s.extra and s.digest in in_root)])
    if conflicts:
        print(f"warning: left out {len(conflicts)} file(s) whose bytes are in both real_data and fake_data; "
              f"keep each image in one class:\n  " + "\n  ".join(conflicts[:20])
              + ("\n  ..." if len(conflicts) > 20 else ""))
    for label, name in enumerate(CLASS_DIRS):
        if not any(s.label == label for s in samples):
            raise DatasetError(f"{root}: no readable images left in {name}/; nothing to train on")
    duplicates = group_samples(samples)  # extras too: a frame of a held-out video shares its group
    root, extras = [s for s in samples if not s.extra], [s for s in samples if s.extra]
    dropped = 0
    if presplit:
        root, dropped = drop_cross_split_copies(root)
        if not any(s.split == "val" for s in root):  # carve val out of train
            split_groups([s for s in root if s.split == "train"], val_fraction, 0.0, seed)
    else:
        split_groups(root, val_fraction, test_fraction, seed)  # the split is the same with or without extras
    held_out = {s.group for s in root if s.split != "train"}
    kept = [s for s in extras if s.group not in held_out]
    split_of = {s.digest: s.split for s in root}
    dropped_extra = {"copies": len(copies), "copies_held_out": sum(split_of.get(d) in ("val", "test") for d in copies),
                     "same_video_held_out": len(extras) - len(kept)}
    samples = root + kept
    sizes = Counter(s.group for s in samples)
    tf = {"train": transforms.train, "val": transforms.eval, "test": transforms.eval}
    datasets = {split: DeepfakeDataset([s for s in samples if s.split == split], tf[split],
                                       cache if use_cache else None, size, route=transforms.route)
                for split in SPLITS}
    return Data(datasets, samples, corrupt, conflicts, duplicates, dropped, dropped_extra,
                sum(n > 1 for n in sizes.values()), presplit)


def prepare_test_set(root, transform, size, cache_dir="cache", workers=2, route="resize"):
    """An extra held-out folder, scored after training (main.py --test_sets): real_data/ and/or
    fake_data/ inside (labelled), or a plain folder of images (labels unknown, reported as the
    share called fake), decoded at `size` and scored through `transform` (the evaluation one).
    Returns (DeepfakeDataset, labelled?, {path: error} of the unreadable files, left out)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: test set folder not found")
    labelled = any((root / d).is_dir() for d in CLASS_DIRS)
    folders = [(label, root / d) for label, d in enumerate(CLASS_DIRS)] if labelled else [(0, root)]
    samples = [Sample(str(p), label) for label, d in folders if d.is_dir() for p in _images_in(d)]
    if not samples:
        raise DatasetError(f"{root}: no images ({', '.join(sorted(IMAGE_EXTS))}) in the test set")
    cache, corrupt = build_cache(samples, size, cache_dir, workers, route)
    readable = [s for s in samples if s.path not in corrupt]
    if not readable:
        raise DatasetError(f"{root}: none of its {len(samples)} images could be read")
    return DeepfakeDataset(readable, transform, cache, size, route=route), labelled, corrupt


def check_splits(data, root, val_fraction, test_fraction):
    """Every split holds images, and validation holds both classes (its ROC-AUC picks the best epoch)."""
    for split, ds in data.datasets.items():
        if len(ds) == 0:
            fraction = {"val": val_fraction, "test": test_fraction}.get(split)
            why = (f"--{split}_fraction is 0, but validation picks the best epoch and the threshold, and "
                   f"test gives the report" if fraction == 0 else
                   f"{len({s.group for s in data.samples})} groups (videos, duplicate sets, single images) are "
                   f"too few for --val_fraction {val_fraction} and --test_fraction {test_fraction}")
            raise DatasetError(f"{root}: the {split} split is empty: {why}; add images or change the fractions")
    if len(set(data.datasets["val"].targets)) < 2:
        raise DatasetError(f"{root}: the validation split holds one class only, so its ROC-AUC cannot pick the "
                           f"best epoch; add images or raise --val_fraction")


def write_split_csv(samples, path):
    """One row per image: which split it went to and why (its group)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "class", "split", "group", "sha1"])
        for s in sorted(samples, key=lambda s: (SPLITS.index(s.split), s.path)):
            w.writerow([s.path, s.label, CLASSES[s.label], s.split, s.group, s.digest])


def oversample(dataset):
    """Repeat minority-class training samples until classes are equal (after the split, never before)."""
    by_label = {c: [s for s in dataset.samples if s.label == c] for c in set(dataset.targets)}
    most = max(len(v) for v in by_label.values())
    samples = [s for v in by_label.values() for s in (v * (most // len(v) + 1))[:most]]
    return DeepfakeDataset(samples, dataset.transform, dataset.cache, dataset.size, dataset.blend, dataset.route)
