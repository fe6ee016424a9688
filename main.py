"""Train, evaluate and report a real-vs-fake face image detector.

    python main.py --epochs 10 --batch_size 16 --lr 1e-4             # Dataset/, ImageNet ResNet18
    python main.py --data_root ../shared/data/faces140k --weights none --epochs 3
    python main.py --resume --output_dir results                     # continue results/checkpoints/last.pt
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
import utils
from model import MODELS, DeepfakeDetector, WeightsError, input_size
from cli import at_least, fraction, given_flags, positive

# A resumed run takes every flag from its checkpoint unless the command line gives it again.
# These may then differ (the change is printed); any other flag that differs would change the
# model, the data split or the batches, so the resume is refused instead.
RESUME_MAY_CHANGE = {"epochs", "workers", "device", "precision", "cache_dir", "output_dir"}
NEVER_FROM_CHECKPOINT = {"resume", "evaluate_only", "checkpoint", "eval_split", "overwrite"}
# what --evaluate_only takes from the checkpoint: the network and its test split
MODEL_AND_SPLIT = ("model", "image_size", "data_root", "val_fraction", "test_fraction", "seed", "max_per_class")


def get_args_parser():
    parser = argparse.ArgumentParser(description="Deepfake face-image detector", add_help=True)
    g = parser.add_argument_group("data")
    g.add_argument("--data_root", default="Dataset", help="folder with real_data/ and fake_data/, or "
                   "train/val/test/ with those inside (default: Dataset)")
    g.add_argument("--val_fraction", type=fraction, default=0.15, help="share of images for validation (default: 0.15)")
    g.add_argument("--test_fraction", type=fraction, default=0.15, help="share of images for test (default: 0.15)")
    g.add_argument("--max_per_class", type=at_least(int, 0), default=0, help="use a seeded random subset of "
                   "N images per class, for quick runs (default: 0 = all)")
    g.add_argument("--balance", choices=["none", "sampler", "oversample"], default="none",
                   help="balance classes in the training split only: weighted sampler or repeated "
                   "minority images (default: none)")
    g.add_argument("--augment", choices=["default", "none"], default="default",
                   help="training augmentation: default (random crop, flip, mild colour, blur, JPEG) or none (eval transform); "
                   "none with a frozen backbone trains the head on cached features (default: default)")
    g.add_argument("--image_size", type=at_least(int, 32), default=None,
                   help="input size in pixels, at least 32 (the backbones downsample 32x) (default: the model's "
                   "ImageNet size: 224, 384 for efficientnet_v2_s)")
    g.add_argument("--cache_dir", default="cache", help="decoded-image cache; delete it any time (default: cache)")
    g.add_argument("--workers", type=at_least(int, 0), default=min(2, os.cpu_count() or 1),
                   help="data-loading processes; 0 loads in the main process (default: min(2, CPU count))")
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="resnet18", choices=sorted(MODELS), help="backbone (default: resnet18)")
    g.add_argument("--weights", default="imagenet", help="imagenet (torchvision download), none (random init), "
                   "or PATH to a backbone state_dict file (default: imagenet)")
    g.add_argument("--freeze_backbone", action="store_true", help="train the two-class head only (default: off)")
    g.add_argument("--unfreeze_at", type=positive(int), default=None, metavar="EPOCH",
                   help="train the head only for epochs 1..EPOCH-1, then everything from EPOCH on "
                   "(default: off)")
    g.add_argument("--backbone_lr_scale", type=float, default=None, metavar="SCALE",
                   help="backbone learning rate = lr * SCALE, the head keeps lr (default: 0.1 with "
                   "--unfreeze_at, else 1.0)")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=positive(int), default=10, help="number of epochs (default: 10)")
    g.add_argument("--batch_size", type=positive(int), default=16, help="images per batch (default: 16)")
    g.add_argument("--lr", type=positive(float), default=1e-4, help="AdamW learning rate (default: 1e-4)")
    g.add_argument("--weight_decay", type=at_least(float, 0), default=1e-4, help="AdamW weight decay (default: 1e-4)")
    g.add_argument("--seed", type=int, default=0, help="seeds the split, init and batches (default: 0)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N (default: auto)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast + channels_last on CUDA and on CPUs with native bf16, "
                   "else fp32 (default: auto)")
    g = parser.add_argument_group("output and checkpoints")
    g.add_argument("--output_dir", default="results", help="where reports and checkpoints go (default: results)")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from CKPT (default: <output_dir>/checkpoints/last.pt) with its flags; "
                   "--epochs, --workers, --device and --precision may be given anew")
    g.add_argument("--overwrite", action="store_true", help="allow replacing an earlier run in --output_dir")
    g.add_argument("--evaluate_only", action="store_true", help="only evaluate --checkpoint and write the report")
    g.add_argument("--checkpoint", default=None, help="checkpoint for --evaluate_only "
                   "(default: <output_dir>/checkpoints/best.pt)")
    g.add_argument("--eval_split", choices=["test", "all"], default="test", help="with --evaluate_only: the "
                   "test split of the checkpoint's data split, or every image under --data_root (default: test)")
    return parser


def parse_args(argv=None):
    """Parse and check the flags; args.given lists the ones the command line really gave."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.val_fraction + args.test_fraction >= 1:
        parser.error(f"--val_fraction + --test_fraction must leave images to train on "
                     f"(got {args.val_fraction} + {args.test_fraction})")
    args.given = given_flags(get_args_parser, argv, args)  # a resume keeps the checkpoint's value of the others
    if args.backbone_lr_scale is None:  # fine-tuning after a head-only warm-up: move the backbone gently
        args.backbone_lr_scale = 0.1 if args.unfreeze_at else 1.0
    return args


def recorded(args):
    """The flags to save (args.json, checkpoints): everything but the parse bookkeeping."""
    return {k: v for k, v in vars(args).items() if k != "given"}


def take_flags_from_checkpoint(args, saved):
    """--resume: every flag not given comes from the checkpoint; --evaluate_only: the model and split.

    A given flag that contradicts the checkpoint stops the run with one line naming both values,
    except RESUME_MAY_CHANGE on a resume, which are applied and announced.
    """
    if args.evaluate_only:
        keys = [k for k in MODEL_AND_SPLIT if not (args.eval_split == "all" and k in ("data_root", "max_per_class"))]
    else:
        keys = [k for k in saved if k in vars(args) and k not in NEVER_FROM_CHECKPOINT and k != "output_dir"]
        if args.resume:  # a checkpoint path: its run folder, unless another is given
            keys.append("output_dir")
    for key in keys:
        if key not in args.given:
            setattr(args, key, saved.get(key, getattr(args, key)))  # .get: older checkpoints
        elif getattr(args, key) != saved.get(key, getattr(args, key)):
            mine, theirs = getattr(args, key), saved[key]
            if args.resume is not None and key in RESUME_MAY_CHANGE:
                print(f"note: --{key} {mine} (the checkpoint ran with {theirs})")
            else:
                what = "resume" if args.resume is not None else "evaluate"
                sys.exit(f"error: --{key} {mine} conflicts with the checkpoint's {theirs}; to {what} it, leave "
                         f"--{key} out" + (" (or start a new run with --output_dir)" if what == "resume" else ""))


# ---------------------------------------------------------------- data

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
    if not args.evaluate_only and len(set(data.datasets["val"].targets)) < 2:
        raise dataset.DatasetError(f"{args.data_root}: the validation split holds one class only, so its ROC-AUC "
                                   f"cannot pick the best epoch; add images or raise --val_fraction")
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
             "unreadable files skipped": len(data.corrupt),
             "files in both real_data and fake_data, left out": len(data.conflicts)}
    if data.dropped_copies:
        story["val/test copies of train files removed"] = data.dropped_copies
    if data.corrupt:
        story["unreadable files"] = ", ".join(f"`{p}`" for p in list(data.corrupt)[:10])
    if data.conflicts:
        story["left out as both real and fake"] = ", ".join(f"`{p}`" for p in data.conflicts[:10])
    return story


# ---------------------------------------------------------------- the training loop and its steps

def learning_rate(epoch, args):
    """Cosine decay from --lr at epoch 0 towards 0 at --epochs (a longer resumed run stretches it)."""
    return args.lr * (1 + math.cos(math.pi * epoch / args.epochs)) / 2


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:  # the backbone group runs at lr * --backbone_lr_scale
        group["lr"] = lr * group["lr_scale"]


def group_lr(optimizer, name):
    return next(g["lr"] for g in optimizer.param_groups if g["name"] == name)


def freeze_for_epoch(model, args, epoch):
    """Freeze the backbone in (0-based) `epoch` if asked; --unfreeze_at counts epochs from 1, as printed."""
    frozen = epoch + 1 < args.unfreeze_at if args.unfreeze_at else args.freeze_backbone
    model.freeze_backbone(frozen)
    return frozen


def trainable_part(model, loaders, frozen, args, precision, feature_cache):
    """What this epoch trains: the model on images or, with a frozen backbone and no augmentation,
    the head alone on backbone features computed once (features.py) and kept in `feature_cache`."""
    if not (frozen and args.augment == "none"):
        return model, loaders
    if not feature_cache:
        feature_cache.update(features.feature_loaders(model.backbone, loaders, precision))
    return model.head, feature_cache


def checkpoint_state(model, optimizer, epoch, best_val_auc, history, threshold, args):
    """One dict holds everything a resume or a prediction needs."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "best_val_auc": best_val_auc, "history": history, "threshold": threshold, "args": recorded(args),
            "classes": list(dataset.CLASSES)}


def interrupted(state, out, epoch):
    """Ctrl-C: keep last.pt at the last finished epoch (so --resume replays exactly), or, in the
    first epoch, the partly trained model rather than nothing. Exits with code 130."""
    last = out / "checkpoints" / "last.pt"
    if last.exists():
        print(f"\ninterrupted in epoch {epoch + 1}; {last} holds the last finished epoch, the partial one is "
              f"dropped so that a resumed run matches an uninterrupted one")
    else:
        engine.save_checkpoint(state, last)
        print(f"\ninterrupted in epoch {epoch + 1}: saved the partly trained model to {last}")
    print(f"continue with: python main.py --resume --output_dir {out}")
    sys.exit(130)


def fit(args, model, data, precision, out, resume_from=None):
    """The training loop: train, validate, schedule, log, checkpoint; returns the history rows."""
    loaders = {"train": make_loader(data.datasets["train"], args, True),
               "val": make_loader(data.datasets["val"], args, False)}
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(model.param_groups(args.lr, args.backbone_lr_scale), lr=args.lr,
                                  weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.amp_dtype == torch.float16)
    start_epoch, best_val_auc, history, feature_cache = 0, -math.inf, [], {}
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        start_epoch, best_val_auc, history = (resume_from["epoch"] + 1, resume_from["best_val_auc"],
                                              resume_from["history"])
        print(f"resumed at epoch {start_epoch + 1} (best val AUC so far {best_val_auc:.4f})")
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, args.epochs):
            start = time.perf_counter()
            frozen = freeze_for_epoch(model, args, epoch)
            net, epoch_loaders = trainable_part(model, loaders, frozen, args, precision, feature_cache)
            set_learning_rate(optimizer, learning_rate(epoch, args))
            torch.manual_seed(args.seed + epoch)  # batches and augmentation follow (seed, epoch): resumes replay them
            train = engine.train_one_epoch(net, criterion, optimizer, epoch_loaders["train"], precision, epoch,
                                           scaler, desc=f"epoch {epoch + 1}/{args.epochs} train")
            val = engine.evaluate(net, criterion, epoch_loaders["val"], precision, desc="val")
            val_auc = report.roc_auc(val["labels"], val["probs"])
            threshold = report.eer_threshold(val["labels"], val["probs"])[0]
            history.append({"epoch": epoch + 1, "train_loss": train["loss"], "train_acc": train["acc"],
                            "val_loss": val["loss"], "val_acc": val["acc"], "val_auc": val_auc,
                            "lr": group_lr(optimizer, "head"), "backbone_lr": group_lr(optimizer, "backbone"),
                            "backbone_frozen": frozen, "train_img_s": train["img_s"],
                            "epoch_s": time.perf_counter() - start})
            print(f"epoch {epoch + 1}/{args.epochs}  train loss {train['loss']:.4f} acc {train['acc']:.4f} "
                  f"({train['img_s']:.1f} img/s) | val loss {val['loss']:.4f} acc {val['acc']:.4f} AUC {val_auc:.4f}")
            report.write_history_csv(history, out / "history.csv")
            improved, best_val_auc = val_auc > best_val_auc, max(best_val_auc, val_auc)
            state = checkpoint_state(model, optimizer, epoch, best_val_auc, history, threshold, args)
            engine.save_checkpoint(state, out / "checkpoints" / "last.pt")
            if improved:
                engine.save_checkpoint(state, out / "checkpoints" / "best.pt")
    except KeyboardInterrupt:
        interrupted(checkpoint_state(model, optimizer, epoch - 1, best_val_auc, history, None, args), out, epoch)
    return history


# ---------------------------------------------------------------- report

def evaluate_and_report(args, detector, data, out, history):
    """Score the test split (or every image) with a loaded detector; write every report file."""
    split = "test" if args.eval_split == "test" else "all"
    test = data.datasets["test"]
    ds = test if split == "test" else dataset.DeepfakeDataset(data.samples, test.transform, test.cache, test.size)
    te = engine.evaluate(detector.model, nn.CrossEntropyLoss(), make_loader(ds, args, False), detector.precision,
                         desc=split)
    metrics = report.write_test_report(out, te["labels"], te["probs"], detector.threshold, split)
    if len(ds):  # heatmaps of right and wrong calls; written before summary.md, which shows it
        gradcam.save_examples(detector.model, ds, te["probs"], te["labels"], detector.threshold,
                              out / "gradcam_examples.png", detector.precision.device)
    if history:
        report.plot_training_curves(history, out / "training_curves.png")
    metrics.update(inference_img_s=te["img_s"], best_epoch=detector.epoch + 1, checkpoint_args=detector.args,
                   peak_memory_mib=utils.peak_memory_mib(detector.precision.device))
    report.write_json(metrics, out / "metrics.json")
    training = {"best epoch (by val ROC-AUC)": detector.epoch + 1, "epochs run": len(history),
                "device / precision": str(detector.precision),
                "inference speed on this split": f"{te['img_s']:.1f} img/s"} if history else None
    report.write_summary(out, {"title": f"{detector.args['model']} on {args.data_root}",
                               "command": "python " + " ".join(sys.argv) if sys.argv else "",
                               "metrics": metrics, "data": data_story(data), "training": training})
    m = metrics["at_val_threshold"]
    print(f"{split}: accuracy {m['accuracy']:.4f}  F1 {m['f1']:.4f}  ROC-AUC {m['roc_auc']:.4f}  "
          f"EER {m['eer']:.4f} at threshold {detector.threshold:.3f}  ->  {out / 'summary.md'}")
    return metrics


# ---------------------------------------------------------------- main

def checkpoint_to_start_from(args):
    """The checkpoint --evaluate_only or --resume starts from, with its flags taken over."""
    if args.evaluate_only:
        path = Path(args.checkpoint or Path(args.output_dir) / "checkpoints" / "best.pt")
    else:
        path = Path(args.resume or Path(args.output_dir) / "checkpoints" / "last.pt")
    try:
        ckpt = engine.load_checkpoint(path)
    except engine.CheckpointError as e:
        sys.exit(f"error: {e}")
    take_flags_from_checkpoint(args, ckpt["args"])
    return path, ckpt


def prepare_output(args, resume_path):
    """The run folder; never replaces an earlier run or evaluation unless asked."""
    out = Path(args.output_dir) / ("evaluation" if args.evaluate_only else "")
    last, best = out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt"
    if args.evaluate_only and any(out.glob("*")) and not args.overwrite:
        sys.exit(f"{out} already holds an evaluation; pass --overwrite to replace it")
    if resume_path is None and not args.evaluate_only and last.exists():
        if not args.overwrite:
            sys.exit(f"{out} already holds a run; continue it with --resume, pick another --output_dir, "
                     f"or replace it with --overwrite")
        last.unlink()
        best.unlink(missing_ok=True)  # asked for: an old best.pt must not pass for the new run's
    if resume_path is not None and not best.exists() and (resume_path.parent / "best.pt").exists():
        best.parent.mkdir(parents=True, exist_ok=True)  # resumed into a new folder: keep the best so far
        shutil.copy2(resume_path.parent / "best.pt", best)
    out.mkdir(parents=True, exist_ok=True)
    return out


def main(args):
    resume_path, ckpt = None, None
    if args.evaluate_only or args.resume is not None:
        resume_path, ckpt = checkpoint_to_start_from(args)
    utils.seed_everything(args.seed)
    out = prepare_output(args, None if args.evaluate_only else resume_path)
    try:
        if args.evaluate_only:
            detector = engine.load_detector(resume_path, args.device, args.precision)
            model = detector.model
        else:
            args.image_size = args.image_size or input_size(args.model)
            model = DeepfakeDetector(args.model, "none" if ckpt else args.weights,
                                     freeze_backbone=args.freeze_backbone, image_size=args.image_size)
        data = load_data(args, model)
    except (WeightsError, ValueError, dataset.DatasetError, engine.CheckpointError) as e:
        sys.exit(f"error: {e}")
    dataset.write_split_csv(data.samples, out / "split.csv")
    report.write_json(recorded(args), out / "args.json")
    history = []
    if not args.evaluate_only:
        precision = utils.choose_precision(utils.get_device(args.device), args.precision)
        precision.prepare(model)
        start = time.perf_counter()
        history = fit(args, model, data, precision, out, resume_from=ckpt)
        print(f"trained in {time.perf_counter() - start:.0f} s")
        best = out / "checkpoints" / "best.pt"
        detector = engine.load_detector(best if best.exists() else out / "checkpoints" / "last.pt",
                                        args.device, args.precision)
    return evaluate_and_report(args, detector, data, out, history)


if __name__ == "__main__":
    main(parse_args())
