"""Train, evaluate and report a real-vs-fake face image detector.

    python main.py --epochs 10 --batch_size 16 --lr 1e-4             # Dataset/, ImageNet ResNet18
    python main.py --data_root ../shared/data/faces140k --weights none --epochs 3
    python main.py --resume                                          # continue results/checkpoints/last.pt
    python main.py --evaluate_only --checkpoint results/checkpoints/best.pt

Everything a grader needs lands in --output_dir (default results/): summary.md
first, then the report, plots, metrics.json, history.csv, args.json, split.csv.
"""
import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import dataset
import engine
import features
import gradcam
import report
from model import MODELS, DeepfakeDetector, WeightsError, input_size

# flags that define the data split and the network: a resumed or re-evaluated
# run takes these from the checkpoint, so its test split is the one trained for
SPLIT_AND_MODEL_KEYS = ("val_fraction", "test_fraction", "seed", "max_per_class", "image_size", "model",
                        "freeze_backbone", "unfreeze_at", "backbone_lr_scale", "augment")


def _positive(cast):
    def check(text):
        value = cast(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return check


def _fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def get_args_parser():
    parser = argparse.ArgumentParser(description="Deepfake face-image detector", add_help=True)
    g = parser.add_argument_group("data")
    g.add_argument("--data_root", default="Dataset", help="folder with real_data/ and fake_data/, or "
                   "train/val/test/ with those inside (default: Dataset)")
    g.add_argument("--val_fraction", type=_fraction, default=0.15, help="share of images for validation (default: 0.15)")
    g.add_argument("--test_fraction", type=_fraction, default=0.15, help="share of images for test (default: 0.15)")
    g.add_argument("--max_per_class", type=int, default=0, help="use a seeded random subset of N images "
                   "per class, for quick runs (default: 0 = all)")
    g.add_argument("--balance", choices=["none", "sampler", "oversample"], default="none",
                   help="balance classes in the training split only: weighted sampler or repeated "
                   "minority images (default: none)")
    g.add_argument("--augment", choices=["default", "none"], default="default",
                   help="training augmentation: default (random crop, flip, mild colour, blur, JPEG) or none (eval transform); "
                   "none with a frozen backbone trains the head on cached features (default: default)")
    g.add_argument("--image_size", type=_positive(int), default=None,
                   help="input size in pixels (default: the model's ImageNet size: 224, 384 for "
                   "efficientnet_v2_s)")
    g.add_argument("--cache_dir", default="cache", help="decoded-image cache; delete it any time (default: cache)")
    g.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="data-loading processes (default: min(2, CPU count))")
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="resnet18", choices=sorted(MODELS), help="backbone (default: resnet18)")
    g.add_argument("--weights", default="imagenet", help="imagenet (torchvision download), none (random init), "
                   "or PATH to a backbone state_dict file (default: imagenet)")
    g.add_argument("--freeze_backbone", action="store_true", help="train the two-class head only (default: off)")
    g.add_argument("--unfreeze_at", type=_positive(int), default=None, metavar="EPOCH",
                   help="train the head only for epochs 1..EPOCH-1, then everything from EPOCH on "
                   "(default: off)")
    g.add_argument("--backbone_lr_scale", type=float, default=None, metavar="SCALE",
                   help="backbone learning rate = lr * SCALE, the head keeps lr (default: 0.1 with "
                   "--unfreeze_at, else 1.0)")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=_positive(int), default=10, help="number of epochs (default: 10)")
    g.add_argument("--batch_size", type=_positive(int), default=16, help="images per batch (default: 16)")
    g.add_argument("--lr", type=_positive(float), default=1e-4, help="AdamW learning rate (default: 1e-4)")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    g.add_argument("--seed", type=int, default=0, help="seeds the split, init and batches (default: 0)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N (default: auto)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast + channels_last on CUDA and on CPUs with native bf16, "
                   "else fp32 (default: auto)")
    g = parser.add_argument_group("output and checkpoints")
    g.add_argument("--output_dir", default="results", help="where reports and checkpoints go (default: results)")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from CKPT (default: <output_dir>/checkpoints/last.pt)")
    g.add_argument("--overwrite", action="store_true", help="allow replacing an earlier run in --output_dir")
    g.add_argument("--evaluate_only", action="store_true", help="only evaluate --checkpoint and write the report")
    g.add_argument("--checkpoint", default=None, help="checkpoint for --evaluate_only "
                   "(default: <output_dir>/checkpoints/best.pt)")
    g.add_argument("--eval_split", choices=["test", "all"], default="test", help="with --evaluate_only: the "
                   "test split of the checkpoint's data split, or every image under --data_root (default: test)")
    return parser


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.val_fraction + args.test_fraction >= 1:
        parser.error(f"--val_fraction + --test_fraction must leave images to train on "
                     f"(got {args.val_fraction} + {args.test_fraction})")
    if args.backbone_lr_scale is None:  # fine-tuning after a head-only warm-up: move the backbone gently
        args.backbone_lr_scale = 0.1 if args.unfreeze_at else 1.0
    return args


def make_loader(ds, args, train):
    sampler = dataset.balanced_sampler(ds) if train and args.balance == "sampler" else None
    return DataLoader(ds, batch_size=args.batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                      drop_last=False)  # workers restart each epoch: their RNG then follows the per-epoch seed


def load_data(args, model):
    data = dataset.prepare_data(args.data_root, args.image_size, model.mean, model.std, args.val_fraction,
                                args.test_fraction, args.seed, args.max_per_class, args.cache_dir, args.workers)
    scoring_all = args.evaluate_only and args.eval_split == "all"  # a held-out folder: no split needed
    for split, ds in data.datasets.items():
        if len(ds) == 0 and not scoring_all:
            why = (f"--{split}_fraction is 0, but validation picks the best epoch and the threshold, and "
                   f"test gives the report" if split != "train" and getattr(args, f"{split}_fraction") == 0 else
                   f"{len({s.group for s in data.samples})} groups (videos, duplicate sets, single images) are "
                   f"too few for --val_fraction {args.val_fraction} and --test_fraction {args.test_fraction}")
            raise dataset.DatasetError(f"{args.data_root}: the {split} split is empty: {why}; "
                                       f"add images or change the fractions")
    if args.augment == "none":
        data.datasets["train"].transform = data.datasets["val"].transform
    if args.balance == "oversample":
        data.datasets["train"] = dataset.oversample(data.datasets["train"])
    return data


def data_story(data):
    """The facts about the data that belong in summary.md."""
    counts = {split: f"{len(ds)} ({sum(t == 0 for t in ds.targets)} real, {sum(t == 1 for t in ds.targets)} fake)"
              for split, ds in data.datasets.items()}
    story = {"layout": "pre-split folders" if data.presplit else "one pool, split here (stratified, grouped, seeded)",
             **{f"{k} images": v for k, v in counts.items()},
             "byte-identical duplicates found (kept in one split)": data.duplicates,
             "groups of several files (video frames or copies), each kept in one split": data.multi_file_groups,
             "unreadable files skipped": len(data.corrupt)}
    if data.dropped_copies:
        story["val/test copies of train files removed"] = data.dropped_copies
    if data.corrupt:
        story["unreadable files"] = ", ".join(f"`{p}`" for p in list(data.corrupt)[:10])
    return story


def backbone_frozen_in(args, epoch):
    """Is the backbone frozen in (0-based) `epoch`? --unfreeze_at counts epochs from 1, as printed."""
    if args.unfreeze_at:
        return epoch + 1 < args.unfreeze_at
    return args.freeze_backbone


def fit(args, model, data, device, out, resume_from=None):
    """The training loop: one epoch, validate, checkpoint; returns the history rows.

    resume_from: a checkpoint dict (from --resume) to continue from.
    """
    amp = engine.autocast_dtype(device, args.precision)
    loaders = {"train": make_loader(data.datasets["train"], args, True),
               "val": make_loader(data.datasets["val"], args, False)}
    criterion = nn.CrossEntropyLoss()
    # two groups (backbone, head) holding every parameter from the start, frozen or not, so the
    # optimizer's state_dict keeps its shape across --unfreeze_at and --resume; the scheduler scales both
    optimizer = torch.optim.AdamW(model.param_groups(args.lr, args.backbone_lr_scale), lr=args.lr,
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    start_epoch, best_auc, history = 0, -1.0, []
    if resume_from is not None:
        ckpt = resume_from
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scheduler.T_max != args.epochs:  # more (or fewer) epochs than first planned: stretch the cosine
            scheduler.T_max = args.epochs
            for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base_lr * (1 + math.cos(math.pi * scheduler.last_epoch / args.epochs)) / 2
        start_epoch, best_auc, history = ckpt["epoch"] + 1, ckpt["best_auc"], ckpt["history"]
        print(f"resumed from epoch {start_epoch} (best val AUC so far {best_auc:.4f})")
    state = lambda epoch, threshold: {  # noqa: E731  (one dict: everything a resume needs)
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": epoch, "best_auc": best_auc, "history": history, "args": vars(args), "threshold": threshold,
        "classes": list(dataset.CLASSES)}
    epoch, cached = start_epoch, None
    try:
        for epoch in range(start_epoch, args.epochs):
            start = time.perf_counter()
            frozen = backbone_frozen_in(args, epoch)  # set per epoch, so a resumed run gets it right too
            model.freeze_backbone(frozen)
            net, epoch_loaders, channels_last = model, loaders, amp is not None
            if frozen and args.augment == "none":  # same images, same fixed backbone: features once
                cached = cached or features.feature_loaders(model.backbone, loaders, device, amp, channels_last)
                net, epoch_loaders, channels_last = model.head, cached, False
            # batches and augmentation depend on (seed, epoch) only, so resuming replays them exactly
            torch.manual_seed(args.seed + epoch)
            tr = engine.train_one_epoch(net, criterion, optimizer, epoch_loaders["train"], device, epoch,
                                        amp, scaler, channels_last=channels_last,
                                        desc=f"epoch {epoch + 1}/{args.epochs} train")
            va = engine.evaluate(net, criterion, epoch_loaders["val"], device, amp, channels_last, desc="val")
            scheduler.step()
            val_m = report.compute_metrics(va["labels"], va["probs"])
            threshold = report.eer_threshold(va["labels"], va["probs"])[0]
            score = va["acc"] if math.isnan(val_m["roc_auc"]) else val_m["roc_auc"]  # AUC needs both classes
            history.append({"epoch": epoch + 1, "train_loss": tr["loss"], "train_acc": tr["acc"],
                            "val_loss": va["loss"], "val_acc": va["acc"], "val_auc": val_m["roc_auc"],
                            "lr": optimizer.param_groups[1]["lr"], "backbone_lr": optimizer.param_groups[0]["lr"],
                            "backbone_frozen": frozen, "train_img_s": tr["img_s"],
                            "epoch_s": time.perf_counter() - start})
            print(f"epoch {epoch + 1}/{args.epochs}  train loss {tr['loss']:.4f} acc {tr['acc']:.4f} "
                  f"({tr['img_s']:.1f} img/s) | val loss {va['loss']:.4f} acc {va['acc']:.4f} "
                  f"AUC {val_m['roc_auc']:.4f}")
            report.write_history_csv(history, out / "history.csv")
            improved = score > best_auc
            best_auc = max(best_auc, score)
            engine.save_checkpoint(state(epoch, threshold), out / "checkpoints" / "last.pt")
            if improved:
                engine.save_checkpoint(state(epoch, threshold), out / "checkpoints" / "best.pt")
    except KeyboardInterrupt:
        last = out / "checkpoints" / "last.pt"
        if last.exists():  # the end of the last finished epoch: --resume then replays exactly
            print(f"\ninterrupted in epoch {epoch + 1}; {last} holds the last finished epoch, "
                  f"the partial one is dropped so that a resumed run matches an uninterrupted one")
        else:  # no epoch finished yet: keep the partial work rather than nothing
            engine.save_checkpoint(state(epoch - 1, None), last)
            print(f"\ninterrupted in epoch {epoch + 1}: saved the partly trained model to {last}")
        print(f"continue with: python main.py --resume --output_dir {out}")
        sys.exit(130)
    return history


def evaluate_and_report(args, model, ckpt, data, device, out, history):
    """Score the test split with the best checkpoint; write every report file."""
    model.load_state_dict(ckpt["model"])
    amp = engine.autocast_dtype(device, args.precision)
    split = "test" if args.eval_split == "test" else "all"
    ds = data.datasets["test"] if split == "test" else dataset.DeepfakeDataset(
        data.samples, data.datasets["test"].transform, data.datasets["test"].cache, data.datasets["test"].size)
    te = engine.evaluate(model, nn.CrossEntropyLoss(), make_loader(ds, args, False), device, amp,
                         amp is not None, desc=split)
    threshold = ckpt["threshold"] if ckpt.get("threshold") is not None else 0.5
    metrics = report.write_test_report(out, te["labels"], te["probs"], threshold, split)
    if len(ds):  # heatmaps of right and wrong calls; written before summary.md, which shows it
        gradcam.save_examples(model, ds, te["probs"], te["labels"], threshold, out / "gradcam_examples.png", device)
    if history:
        report.plot_training_curves(history, out / "training_curves.png")
    metrics.update(inference_img_s=te["img_s"], best_epoch=ckpt["epoch"] + 1, checkpoint_args=ckpt["args"])
    report.write_json(metrics, out / "metrics.json")
    training = {"best epoch (by val ROC-AUC)": ckpt["epoch"] + 1, "epochs run": len(history or []),
                "device / precision": f"{device} / {amp or 'fp32'}",
                "inference speed on this split": f"{te['img_s']:.1f} img/s"} if history else None
    report.write_summary(out, {"title": f"{ckpt['args']['model']} on {args.data_root}",
                               "command": "python " + " ".join(sys.argv) if sys.argv else "",
                               "metrics": metrics, "data": data_story(data), "training": training})
    m = metrics["at_val_threshold"]
    print(f"{split}: accuracy {m['accuracy']:.4f}  F1 {m['f1']:.4f}  ROC-AUC {m['roc_auc']:.4f}  "
          f"EER {m['eer']:.4f} at threshold {threshold:.3f}  ->  {out / 'summary.md'}")
    return metrics


def restore_from_checkpoint(args, out):
    """Load the checkpoint that --evaluate_only or --resume starts from, and take from it the
    flags that fix the split and the network (a resume also keeps its data folder)."""
    if args.evaluate_only:
        path = Path(args.checkpoint or Path(args.output_dir) / "checkpoints" / "best.pt")
    else:
        path = Path(args.resume or Path(args.output_dir) / "checkpoints" / "last.pt")
    try:
        ckpt = engine.load_checkpoint(path)
    except engine.CheckpointError as e:
        sys.exit(f"error: {e}")
    keys = list(SPLIT_AND_MODEL_KEYS)
    if args.evaluate_only and args.eval_split == "all":
        keys.remove("max_per_class")  # every image of the folder, not the training run's subset
    if args.resume is not None:
        if args.data_root != ckpt["args"]["data_root"]:
            print(f"note: resuming on the checkpoint's data, {ckpt['args']['data_root']}")
        keys.append("data_root")
        best = out / "checkpoints" / "best.pt"
        if not best.exists() and (path.parent / "best.pt").exists():  # resumed into a new --output_dir
            best.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path.parent / "best.pt", best)
    for key in keys:
        setattr(args, key, ckpt["args"].get(key, getattr(args, key)))  # .get: older checkpoints
    return ckpt


def main(args):
    engine.seed_everything(args.seed)
    device = engine.get_device(args.device)
    out = Path(args.output_dir) / ("evaluation" if args.evaluate_only else "")
    ckpt = None
    if args.evaluate_only or args.resume is not None:
        ckpt = restore_from_checkpoint(args, out)
    elif (out / "checkpoints" / "last.pt").exists():
        if not args.overwrite:
            sys.exit(f"{out} already holds a run; continue it with --resume, pick another --output_dir, "
                     f"or replace it with --overwrite")
        for old in (out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt"):
            old.unlink(missing_ok=True)  # asked for: an old best.pt must not pass for the new run's
    if args.evaluate_only and any(out.glob("*")) and not args.overwrite:
        sys.exit(f"{out} already holds an evaluation; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    try:
        args.image_size = args.image_size or input_size(args.model)
        model = DeepfakeDetector(args.model, "none" if ckpt else args.weights,
                                 freeze_backbone=args.freeze_backbone, image_size=args.image_size)
        data = load_data(args, model)
    except (WeightsError, ValueError, dataset.DatasetError) as e:
        sys.exit(f"error: {e}")
    model.to(device)
    if engine.autocast_dtype(device, args.precision) is not None:
        model.to(memory_format=torch.channels_last)  # conv kernels for bf16/fp16 are fastest in NHWC
    dataset.write_split_csv(data.samples, out / "split.csv")
    report.write_json(vars(args), out / "args.json")
    history = []
    if not args.evaluate_only:
        start = time.perf_counter()
        history = fit(args, model, data, device, out, resume_from=ckpt)
        print(f"trained in {time.perf_counter() - start:.0f} s")
        best = out / "checkpoints" / "best.pt"
        ckpt = engine.load_checkpoint(best if best.exists() else out / "checkpoints" / "last.pt", device)
    return evaluate_and_report(args, model, ckpt, data, device, out, history)


if __name__ == "__main__":
    main(parse_args())
