"""Every speed measurement of the project, one subcommand each, side by side in one run.

    python benchmark.py train     # training/inference img/s: default path vs plain fp32
    python benchmark.py predict   # predict.py's model img/s vs fp32 eager, one image and batched
    python benchmark.py features  # a head epoch on cached features vs a full epoch
    python benchmark.py faces     # ms per frame of video decoding, YuNet and dlib
    python benchmark.py ddp       # main.py training img/s: one process vs torchrun --nproc_per_node=2

Each prints a table and the machine it ran on (CPU model and its avx2 / avx512_bf16 / amx
flags, or the GPU). Rows are measured in turn, `--rounds` times, and each keeps its best,
so a burst of load from another process does not decide a ratio. The machines here are
shared: read the ratios (all from one run), not the absolute numbers.
"""
import argparse
import csv
import itertools
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import dataset
import engine
import features
import presets
import runtime
import utils
from cli import DEFAULT_WORKERS, add_machine_flags, positive
from media import MediaError, is_video, load_rgb, sample_frames
from model import DeepfakeDetector
from presets import AUGMENTATIONS

FACES = "../shared/data/faces140k"


def best_of(rounds, rows, measure):
    """{row: best value (per element for tuples)}, measuring every row once per round, rows taking turns."""
    best = {}
    for r in range(rounds):
        for row in rows:
            value = measure(row)
            print(f"  round {r + 1} {row}: {value}")
            best[row] = tuple(map(max, best[row], value)) if isinstance(value, tuple) and row in best \
                else max(best.get(row, value), value)
    return best


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------- train: the default path vs plain fp32

def images_per_s(step, loader, batches):
    """Run `step` on one warm-up batch, then time `batches` more (data loading included)."""
    it = iter(loader)
    step(*next(it))
    start, seen = time.perf_counter(), 0
    for images, labels in itertools.islice(it, batches):
        step(images, labels)
        seen += len(labels)
    return seen / (time.perf_counter() - start)


def train_and_infer(ds, eval_ds, precision, workers, compiled, scoring, args):
    """(train img/s, inference img/s) of a fresh ResNet18 on `ds`, run as `precision` says, with
    `workers` loader processes, the training step under torch.compile or not, inference through
    `scoring` ("torch" or "onnx", as main.py's --runtime)."""
    torch.manual_seed(0)
    model = precision.prepare(DeepfakeDetector("resnet18", weights="none"))
    net = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = engine.make_criterion({})

    def train_step(images, labels):
        with precision.autocast():
            loss = criterion(net(precision.to_device(images)).float(), labels.to(precision.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.inference_mode()
    def infer_step(images, labels):
        with precision.autocast():
            scorer(precision.to_device(images))

    loader = lambda d: DataLoader(d, batch_size=args.batch_size, shuffle=True, num_workers=workers,  # noqa: E731
                                  drop_last=True)
    model.train()
    if compiled:  # compile before the clock starts: one forward and backward
        train_step(*next(iter(loader(ds))))
    train = images_per_s(train_step, loader(ds), args.batches)
    model.eval()
    scorer = runtime.OnnxScorer(model, args.image_size) if runtime.pays_off(scoring, precision) else model
    return train, images_per_s(infer_step, loader(eval_ds), args.batches * 2)


def bench_train(args):
    device = utils.get_device(args.device)
    default = utils.choose_precision(device, args.precision)
    fp32 = utils.Precision(device)
    mean, std = DeepfakeDetector("resnet18", "none").mean, DeepfakeDetector("resnet18", "none").std
    n = args.batch_size * (args.batches * 2 + 2)  # enough images that no timed batch repeats a decode
    data = dataset.prepare_data(args.data_root, presets.transforms(vars(args), mean, std), val_fraction=0.0,
                                test_fraction=0.0, max_per_class=n // 2 + 1, cache_dir=args.cache_dir,
                                workers=args.workers)
    cached = data.datasets["train"]
    plain = dataset.DeepfakeDataset(cached.samples, cached.transform, cache=None, size=cached.size)
    as_eval = lambda d: dataset.DeepfakeDataset(d.samples, presets.eval_transform(args.image_size, mean, std),  # noqa
                                                d.cache, d.size)
    w = args.workers
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # the extra-workers row, on purpose
    rows = {f"plain: decode every JPEG, fp32 NCHW, PyTorch, {w} workers": (plain, fp32, w, False, "torch"),
            f"**default** (main.py): cache, {default}, PyTorch, {w} workers": (cached, default, w, False, "torch"),
            "default, scored by ONNX Runtime (main.py --runtime onnx)": (cached, default, w, False, "onnx"),
            "default, 0 workers (loading in the main process)": (cached, default, 0, False, "torch"),
            f"default, {w + 2} workers": (cached, default, w + 2, False, "torch"),
            "default + torch.compile of the training step": (cached, default, w, True, "torch")}
    if args.skip_compile:
        rows.popitem()
    print(f"ResNet18 {args.image_size}px, batch {args.batch_size}, --augment {args.augment}, {len(cached)} images; "
          f"{utils.describe_machine(device)}")
    results = best_of(args.rounds, list(rows), lambda row: train_and_infer(rows[row][0], as_eval(rows[row][0]),
                                                                            *rows[row][1:], args))
    (base_train, base_infer) = results[next(iter(rows))]
    print("\n| path | train img/s | x plain | inference img/s | x plain |\n| --- | --- | --- | --- | --- |")
    for name, (train, infer) in results.items():
        print(f"| {name} | {train:.1f} | {train / base_train:.2f} | {infer:.1f} | {infer / base_infer:.2f} |")
    augmentation_cost(cached, args.image_size, mean, std)
    return results


def augmentation_cost(cached, image_size, mean, std, n=64):
    """ms per image of each --augment preset on cached pixels, in this process (a loader worker's share)."""
    pixels = [torch.from_numpy(np.array(cached.cache[s.row])).permute(2, 0, 1) for s in cached.samples[:n]]
    print("\n| --augment | ms per image |\n| --- | --- |")
    for name in AUGMENTATIONS:
        transform = presets.train_transform(image_size, mean, std, name)
        seconds = min(timed(lambda: [transform(p) for p in pixels]) for _ in range(3))
        print(f"| {name} | {1000 * seconds / len(pixels):.2f} |")


# ---------------------------------------------------------------- predict: model img/s of predict.py's path

def bench_predict(args):
    """Model img/s of predict.py's default path vs plain fp32 eager, on the same face crops.

    --checkpoint none builds a random 224 px resnet18 (speed does not depend on the weights).
    Crops are decoded and preprocessed once: this times the model only.
    """
    device = utils.get_device(args.device)
    ckpt = args.checkpoint
    if ckpt == "none":  # a throwaway checkpoint of a random resnet18
        ckpt = Path(args.cache_dir) / "benchmark-random-resnet18.pt"
        engine.save_checkpoint({"model": DeepfakeDetector("resnet18", "none").state_dict(),
                                "args": {"model": "resnet18", "image_size": 224}}, ckpt)
    fast = engine.load_detector(ckpt, device, args.precision)
    plain = engine.load_detector(ckpt, device, "fp32")
    plain.model.to(memory_format=torch.contiguous_format)  # seed-style NCHW (load_detector picks channels_last on CPUs)
    paths = sorted(p for p in Path(args.input).rglob("*") if p.suffix.lower() in (".jpg", ".png"))[:args.images]
    x = torch.stack([fast.preprocess(load_rgb(p)) for p in paths])

    def eager(batch):
        with torch.no_grad():
            engine.fake_probability(plain.model(batch.to(device)))

    onnx = engine.load_detector(ckpt, device, "fp32")
    export_s = timed(lambda: runtime.choose_scorer(onnx, "onnx"))
    used = "used by" if runtime.pays_off("auto", fast.precision) else "NOT used on this machine by"
    bs = args.batch_size
    rows = {f"plain: fp32 NCHW eager, batch {bs}": (eager, bs),
            "fp32 NCHW eager, 1 image at a time": (eager, 1),
            f"PyTorch {fast.precision} + inference_mode, batch {bs}": (fast.fake_probs, bs),
            f"ONNX Runtime fp32, batch {bs} ({used} predict.py on {runtime.EXPORT_PAYS_AT}+ faces, app.py, "
            f"main.py's test scoring)": (onnx.fake_probs, bs)}
    for fn, bs in rows.values():
        fn(x[:bs])  # warm-up: first calls pick kernels and allocate

    def speed(row):
        fn, bs = rows[row]
        return len(x) / timed(lambda: [fn(x[i:i + bs]) for i in range(0, len(x), bs)])
    print(f"{len(x)} face crops at {fast.image_size} px; model only; {utils.describe_machine(device)}; "
          f"ONNX export + session start {export_s:.1f} s")
    speeds = best_of(args.rounds, list(rows), speed)
    base = speeds[next(iter(rows))]
    print("\n| path | img/s | x |\n| --- | --- | --- |")
    for name, s in speeds.items():
        print(f"| {name} | {s:.1f} | {s / base:.2f} |")
    return speeds


# ---------------------------------------------------------------- features: the frozen-backbone fast path

def bench_features(args, head_epochs=5):
    """A full training epoch, a frozen-backbone epoch on images, the one-time feature pass and
    head epochs on cached features, on the same data in one run."""
    device = utils.get_device(args.device)
    precision = utils.choose_precision(device, args.precision)
    utils.seed_everything(0)
    model = DeepfakeDetector(args.model, "none")
    data = dataset.prepare_data(args.data_root, presets.transforms({"image_size": model.input_size}, model.mean,
                                                                   model.std),
                                max_per_class=args.max_per_class, cache_dir=args.cache_dir, workers=args.workers)
    train_ds = data.datasets["train"]
    train_ds.transform = data.datasets["val"].transform  # no augmentation: what the fast path requires
    precision.prepare(model)
    train = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    criterion = engine.make_criterion({})
    optimizer = torch.optim.AdamW(model.param_groups(1e-4), lr=1e-4)
    epoch = lambda net, loader: timed(lambda: engine.train_one_epoch(net, criterion, optimizer, loader,  # noqa
                                                                      precision, 0))
    epoch(model, train)  # warm-up: first-call kernel selection and worker start-up are not epoch cost
    full = epoch(model, train)
    model.freeze_backbone(True)
    frozen = epoch(model, train)
    cached = {}
    extract_s = timed(lambda: cached.update(train=features.feature_loader(model.backbone, train, precision)))
    head_s = sorted(epoch(model.head, cached["train"]) for _ in range(head_epochs))[head_epochs // 2]  # median
    rows = [("full training epoch (backbone + head)", full), ("frozen backbone, plain path (forward every epoch)",
                                                              frozen),
            ("frozen backbone, feature pass (first epoch, once)", extract_s),
            (f"frozen backbone, cached features (median of {head_epochs})", head_s)]
    print(f"\n{args.model}, {len(train_ds)} training images at {model.input_size} px, batch {args.batch_size}, "
          f"{precision}; {utils.describe_machine(device)}")
    print("\n| epoch | seconds | x cheaper |\n| --- | --- | --- |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.4f} | {full / seconds:.1f} |")
    return {"full_epoch_s": full, "frozen_epoch_s": frozen, "feature_pass_s": extract_s, "head_epoch_s": head_s,
            "speedup": full / head_s}


# ---------------------------------------------------------------- faces: decoding and face detection

def bench_faces(args):
    """ms/frame of decoding and of each detector, per clip, on frames sampled as in a faces.py run."""
    from detect import load_detector  # here: the other subcommands need no face detector package
    detectors = {name: load_detector(name) for name in ("yunet", "dlib")}
    totals = {name: [0, 0.0] for name in ["decode", *detectors]}  # frames, seconds
    sources = sorted(p for p in Path(args.input).rglob("*") if is_video(p)) if Path(args.input).is_dir() \
        else [Path(args.input)]
    print(f"load average {os.getloadavg()[0]:.1f}; one process; {utils.describe_machine(torch.device('cpu'))}")
    print("\n| clip | size | frames | step | faces/frame | ms/frame | frames/s |\n" + "| --- " * 7 + "|")

    def row(clip, size, n, step, found, seconds):
        totals[step][0] += n
        totals[step][1] += seconds
        print(f"| {clip} | {size} | {n} | {step} | {found} | {1000 * seconds / n:.1f} | {n / seconds:.1f} |")
    for src in sources:
        try:
            start = time.perf_counter()
            frames = [rgb for _, rgb in sample_frames(src, args.frames)]
            decode_s = time.perf_counter() - start
        except MediaError as e:
            print(f"WARNING: {e}")
            continue
        size = f"{frames[0].shape[1]}x{frames[0].shape[0]}"
        row(src.name, size, len(frames), "decode", "", decode_s)
        for name, detect in detectors.items():
            start = time.perf_counter()
            found = sum(len(detect(rgb)) for rgb in frames)
            row(src.name, size, len(frames), name, f"{found / len(frames):.2f}", time.perf_counter() - start)
    for step, (n, seconds) in totals.items():
        if n:
            print(f"| ALL | | {n} | {step} | | {1000 * seconds / n:.1f} | {n / seconds:.1f} |")
    return {step: n / seconds for step, (n, seconds) in totals.items() if n}


# ---------------------------------------------------------------- ddp: one process vs torchrun

def bench_ddp(args):
    """Training img/s of main.py in one process vs `torchrun --nproc_per_node=N`, same data and global batch."""
    main_py = Path(__file__).resolve().with_name("main.py")
    speeds = {}
    for n in (1, args.processes):
        out = Path(tempfile.mkdtemp(prefix=f"bench-ddp{n}-"))
        launch = [sys.executable, str(main_py)] if n == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(main_py)]
        flags = ["--data_root", args.data_root, "--weights", "none", "--max_per_class", str(args.max_per_class),
                 "--epochs", str(args.epochs), "--batch_size", str(args.batch_size // n), "--image_size",
                 str(args.image_size), "--workers", "0", "--cache_dir", args.cache_dir, "--output_dir", str(out)]
        print(f"  {n} process(es): main.py {' '.join(flags)}", flush=True)
        subprocess.run(launch + flags, check=True, capture_output=True)
        with open(out / "history.csv", newline="") as f:
            speeds[n] = max(float(r["train_img_s"]) for r in csv.DictReader(f))  # the best epoch: the first warms up
    print(f"\n{utils.describe_machine(torch.device('cpu'))}; global batch {args.batch_size}, {args.image_size} px")
    print("\n| processes | train img/s | x one process |\n| --- | --- | --- |")
    for n, speed in speeds.items():
        print(f"| {n} | {speed:.1f} | {speed / speeds[1]:.2f} |")
    return speeds


# ---------------------------------------------------------------- command line

def get_args_parser():
    parser = argparse.ArgumentParser(description="Speed measurements, side by side in one run")
    sub = parser.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_machine_flags(common, runtime=None)  # --precision: the "default" rows' (the plain rows stay fp32)
    common.add_argument("--rounds", type=positive(int), default=2, help="measure every row this many times, "
                        "interleaved, and keep each row's best (default: 2)")
    common.add_argument("--cache_dir", default="cache", help="decoded-image cache (default: cache)")
    common.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"data-loading processes, as main.py's (default: {DEFAULT_WORKERS})")
    p = sub.add_parser("train", parents=[common], help="training and inference img/s vs plain fp32")
    p.add_argument("--data_root", default=FACES, help=f"images to time on (default: {FACES})")
    p.add_argument("--batch_size", type=positive(int), default=32, help="images per batch (default: 32)")
    p.add_argument("--batches", type=positive(int), default=6, help="timed batches per measurement (default: 6)")
    p.add_argument("--image_size", type=positive(int), default=224, help="input size (default: 224)")
    p.add_argument("--augment", choices=AUGMENTATIONS, default="flip", help="training augmentation, the same "
                   "in every row (default: flip, main.py's from random init)")
    p.add_argument("--skip_compile", action="store_true", help="leave out the torch.compile row (it compiles "
                   "for a minute or more on a small CPU) (default: off)")
    p = sub.add_parser("predict", parents=[common], help="predict.py's model img/s vs fp32 eager")
    p.add_argument("--checkpoint", default="none", help="a checkpoint, or none for a random resnet18 (default: none)")
    p.add_argument("--input", default=FACES, help=f"face crops to score (default: {FACES})")
    p.add_argument("--images", type=positive(int), default=128, help="how many crops (default: 128)")
    p.add_argument("--batch_size", type=positive(int), default=32, help="faces per forward pass (default: 32)")
    p = sub.add_parser("features", parents=[common], help="cached-feature head epochs vs full epochs")
    p.add_argument("--data_root", default=FACES, help=f"images (default: {FACES})")
    p.add_argument("--model", default="resnet18", help="backbone (default: resnet18)")
    p.add_argument("--max_per_class", type=positive(int), default=150, help="images per class (default: 150)")
    p.add_argument("--batch_size", type=positive(int), default=16, help="images per batch (default: 16)")
    p = sub.add_parser("faces", parents=[common], help="decoding and face detection ms/frame")
    p.add_argument("--input", default="../shared/data/videos", help="a video or a folder of them "
                   "(default: ../shared/data/videos)")
    p.add_argument("--frames", type=positive(int), default=16, help="frames sampled per video (default: 16)")
    p = sub.add_parser("ddp", parents=[common], help="main.py training img/s: one process vs torchrun")
    p.add_argument("--data_root", default=FACES, help=f"images (default: {FACES})")
    p.add_argument("--processes", type=positive(int), default=2, help="torchrun processes (default: 2)")
    p.add_argument("--max_per_class", type=positive(int), default=150, help="images per class (default: 150)")
    p.add_argument("--epochs", type=positive(int), default=2, help="epochs; the fastest counts (default: 2)")
    p.add_argument("--batch_size", type=positive(int), default=32, help="global batch, split over the "
                   "processes (default: 32)")
    p.add_argument("--image_size", type=positive(int), default=128, help="input size (default: 128)")
    return parser


def main(args):
    return {"train": bench_train, "predict": bench_predict, "features": bench_features,
            "faces": bench_faces, "ddp": bench_ddp}[args.what](args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
