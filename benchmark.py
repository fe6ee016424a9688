"""How fast is the default training path? Measured against the plain one, in one run.

    python benchmark.py --data_root ../shared/data/faces140k
    python benchmark.py --data_root ../shared/data/faces140k --batches 6 --batch_size 32

Every row trains and evaluates the same ResNet18 (random init) on the same
images, batch size and data-loading workers; only the listed options change:

    plain fp32      decode every JPEG every epoch, fp32, NCHW  (what a first script does)
    cache fp32      decoded uint8 cache, fp32
    plain bf16+CL   decoding every epoch, bf16 autocast + channels_last
    default         cache + bf16 autocast + channels_last      (main.py's path on this CPU)

Speeds are images/s over `--batches` timed batches after one warm-up batch.
The rows are measured in turn, `--rounds` times, and each row keeps its best
round, so a burst of load from another process does not decide the ratio. The
machines here are shared: read the ratios (all from this one run), not the
absolute numbers.
"""
import argparse
import itertools
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

import dataset
import engine
from model import DeepfakeDetector


def get_args_parser():
    parser = argparse.ArgumentParser(description="Training/inference speed of the default path vs plain fp32")
    parser.add_argument("--data_root", default="../shared/data/faces140k", help="images to time on "
                        "(default: ../shared/data/faces140k)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per batch (default: 32)")
    parser.add_argument("--batches", type=int, default=6, help="timed batches per measurement (default: 6)")
    parser.add_argument("--rounds", type=int, default=2, help="measure every row this many times, "
                        "interleaved, and keep each row's best (default: 2)")
    parser.add_argument("--image_size", type=int, default=224, help="input size (default: 224)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="data-loading processes, the same for every row (default: min(2, CPU count))")
    parser.add_argument("--cache_dir", default="cache", help="decoded-image cache (default: cache)")
    return parser


def images_per_s(step, loader, batches):
    """Run `step` on one warm-up batch, then time `batches` more (data loading included)."""
    it = iter(loader)
    step(*next(it))
    start, seen = time.perf_counter(), 0
    for images, labels in itertools.islice(it, batches):
        step(images, labels)
        seen += len(labels)
    return seen / (time.perf_counter() - start)


def measure(ds, eval_tf, amp, channels_last, args):
    torch.manual_seed(0)
    model = DeepfakeDetector("resnet18", weights="none")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=True)

    def train_step(images, labels):
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            loss = criterion(model(images.contiguous(memory_format=fmt)).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.inference_mode()
    def infer_step(images, labels):
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            model(images.contiguous(memory_format=fmt))

    model.train()
    train = images_per_s(train_step, loader, args.batches)
    # inference reads the same images through the deterministic eval transform
    eval_ds = dataset.DeepfakeDataset(ds.samples, eval_tf, ds.cache, ds.size)
    model.eval()
    infer = images_per_s(infer_step, DataLoader(eval_ds, batch_size=args.batch_size, num_workers=args.workers,
                                                drop_last=True), args.batches * 2)
    return train, infer


def main(args):
    torch.manual_seed(0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    n = args.batch_size * (args.batches * 2 + 2)  # enough images that no timed batch repeats a decode
    data = dataset.prepare_data(args.data_root, args.image_size, mean, std, val_fraction=0.0, test_fraction=0.0,
                                max_per_class=n // 2 + 1, cache_dir=args.cache_dir, workers=args.workers)
    cached = data.datasets["train"]
    plain = dataset.DeepfakeDataset(cached.samples, cached.transform, cache=None, size=cached.size)
    bf16 = torch.bfloat16 if engine.cpu_supports_bf16() else None
    rows = [("plain fp32", plain, None, False), ("cache fp32", cached, None, False),
            ("plain bf16+CL", plain, bf16, True), ("default", cached, bf16, True)]
    if bf16 is None:
        print("this CPU has no native bf16: main.py's default path is fp32 here; bf16 rows skipped")
        rows = rows[:2]
    print(f"ResNet18 {args.image_size}px, batch {args.batch_size}, {args.workers} loader workers, "
          f"{torch.get_num_threads()} torch threads, {len(cached)} images, CPU")
    results = {}
    for r in range(args.rounds):
        for name, ds, amp, cl in rows:
            train, infer = measure(ds, data.datasets["test"].transform, amp, cl, args)
            print(f"  round {r + 1} {name}: train {train:.1f} img/s, inference {infer:.1f} img/s")
            best = results.get(name, (0.0, 0.0))
            results[name] = (max(best[0], train), max(best[1], infer))
    base_train, base_infer = results["plain fp32"]
    print("\n| path | train img/s | x plain | inference img/s | x plain |\n| --- | --- | --- | --- | --- |")
    for name, (train, infer) in results.items():
        print(f"| {name} | {train:.1f} | {train / base_train:.2f} | {infer:.1f} | {infer / base_infer:.2f} |")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
