"""The training loop: fit() runs the epochs (train, validate, keep the best, checkpoint, Ctrl-C).

    history = training.fit(args, model, data, precision, out, dist)               # a new run
    history = training.fit(args, model, data, precision, out, dist, resume_from=ckpt)  # --resume

main.py builds the model and the data, then calls fit(). One epoch's steps are engine.train_one_epoch()
and engine.evaluate(); the loss is engine.make_criterion(); what an epoch leaves in history.csv (and the
checkpoint, and the training-curves plot) is history_row(): a new per-epoch number is one line there.
"""
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import config
import dataset
import engine
import features
import report
from model import FlipAverage


@dataclass
class Loop:
    """What the epochs step: built once by setup(), brought back by resume()."""
    loaders: dict                 # "train", "val": DataLoaders of images
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object             # engine.make_scheduler: stepped after every batch
    scaler: torch.amp.GradScaler  # only acts for fp16 on CUDA
    average: object               # engine.weight_average (--ema_decay), or None
    split: dict                   # image path -> split: saved with each checkpoint, a resume must see the same
    start_epoch: int = 0
    best_val_auc: float = -math.inf
    history: list = field(default_factory=list)
    feature_cache: dict = None    # features.py: the frozen backbone's features ({} where they change each epoch)


def setup(args, model, data, precision, dist):
    """Loaders, loss, optimizer, schedule and weight average for a new run."""
    loaders = {"train": engine.make_loader(data.datasets["train"], args.batch_size, args.workers, dist, train=True,
                                           balance=args.balance, seed=args.seed),
               "val": engine.make_loader(data.datasets["val"], args.batch_size, args.workers, dist)}
    optimizer = torch.optim.AdamW(model.param_groups(args.lr, args.backbone_lr_scale), lr=args.lr,
                                  weight_decay=args.weight_decay)
    scheduler = engine.make_scheduler(optimizer, args.epochs, len(loaders["train"]), args.warmup_epochs,
                                      args.min_lr_ratio)
    scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.amp_dtype == torch.float16)
    average = engine.weight_average(model, args.ema_decay) if args.ema_decay else None
    return Loop(loaders, engine.make_criterion(vars(args)), optimizer, scheduler, scaler, average,
                {s.path: s.split for s in data.samples})


def resume(loop, model, ckpt):
    """Continue a checkpoint: weights (and their average), optimizer, schedule, history, epoch."""
    model.load_state_dict(ckpt.get("train_model", ckpt["model"]))
    if loop.average is not None:
        loop.average.module.load_state_dict(ckpt["model"])
        loop.average.n_averaged.fill_(ckpt.get("average_steps", 0))  # 0: a run without one starts it here
    loop.optimizer.load_state_dict(ckpt["optimizer"])
    engine.resume_scheduler(loop.scheduler, ckpt["scheduler"])
    loop.start_epoch, loop.best_val_auc, loop.history = ckpt["epoch"] + 1, ckpt["best_val_auc"], ckpt["history"]
    print(f"resumed at epoch {loop.start_epoch + 1} (best val AUC so far {loop.best_val_auc:.4f})")


def history_row(epoch, train, val, lrs, frozen, seconds):
    """What the history keeps of one (0-based) epoch. train, val: engine.train_one_epoch()'s and
    engine.evaluate()'s dicts (val holds every image's "labels" and "probs", for any metric). A new
    column is one more entry here; rows written before it (a resumed run) show it blank."""
    return {"epoch": epoch + 1, "train_loss": train["loss"], "train_acc": train["acc"],
            "val_loss": val["loss"], "val_acc": val["acc"], "val_auc": report.roc_auc(val["labels"], val["probs"]),
            **lrs, "backbone_frozen": frozen, "train_img_s": train["img_s"], "epoch_s": seconds}


def fit(args, model, data, precision, out, dist, resume_from=None):
    """Train for args.epochs, validating, logging and checkpointing each epoch; returns the history rows."""
    loop = setup(args, model, data, precision, dist)
    if resume_from is not None:
        resume(loop, model, resume_from)
    net = distributed(model, args, loop.start_epoch, precision, dist)
    epoch = loop.start_epoch
    try:
        for epoch in range(loop.start_epoch, args.epochs):
            row, threshold = run_epoch(loop, model, net, args, epoch, precision, dist)
            loop.history.append(row)
            print(f"epoch {epoch + 1}/{args.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} "
                  f"({row['train_img_s']:.1f} img/s) | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} "
                  f"AUC {row['val_auc']:.4f}")
            improved, loop.best_val_auc = row["val_auc"] > loop.best_val_auc, max(loop.best_val_auc, row["val_auc"])
            if dist.main:  # one writer: the other processes hold the same weights
                report.write_history_csv(loop.history, out / "history.csv")
                state = checkpoint_state(loop, model, epoch, threshold, args)
                engine.save_checkpoint(state, out / "checkpoints" / "last.pt")
                if improved:
                    engine.save_checkpoint(state, out / "checkpoints" / "best.pt")
    except KeyboardInterrupt:
        interrupted(checkpoint_state(loop, model, epoch - 1, None, args), out, epoch, dist)
    return loop.history


def run_epoch(loop, model, net, args, epoch, precision, dist):
    """Train and validate one epoch: (its history row, the threshold at validation's EER point)."""
    start = time.perf_counter()
    frozen = freeze_for_epoch(model, args, epoch)
    train_net, loaders = trainable_part(net, loop, frozen, args, precision)
    torch.manual_seed(args.seed + epoch)  # batches and augmentation follow (seed, epoch): resumes replay them
    if dist.on:
        loop.loaders["train"].sampler.set_epoch(epoch)
    lrs = {"lr": group_lr(loop.optimizer, "head"), "backbone_lr": group_lr(loop.optimizer, "backbone")}  # at start
    update = None if loop.average is None else lambda: loop.average.update_parameters(model)
    train = engine.train_one_epoch(train_net, loop.criterion, loop.optimizer, loaders["train"], precision, epoch,
                                   loop.scaler, loop.scheduler, desc=f"epoch {epoch + 1}/{args.epochs} train",
                                   after_step=update)
    val_net = train_net
    if loop.average is not None:  # validate (and keep) the average, not the last step's weights
        val_net = loop.average.module.head if train_net is model.head else loop.average.module
    val_net = FlipAverage(val_net) if args.tta == "flip" else val_net
    val = engine.evaluate(val_net, loop.criterion, loaders["val"], precision, desc="val")
    row = history_row(epoch, train, val, lrs, frozen, time.perf_counter() - start)
    return row, report.eer_threshold(val["labels"], val["probs"])[0]


# ---------------------------------------------------------------- the steps of an epoch

def group_lr(optimizer, name):
    return next(g["lr"] for g in optimizer.param_groups if g["name"] == name)


def freeze_for_epoch(model, args, epoch):
    """Freeze the backbone in (0-based) `epoch` if asked; --unfreeze_at counts epochs from 1, as printed."""
    frozen = epoch + 1 < args.unfreeze_at if args.unfreeze_at else args.freeze_backbone
    model.freeze_backbone(frozen)
    return frozen


def trainable_part(model, loop, frozen, args, precision):
    """What this epoch trains: the model on images or, with a frozen backbone and training images that
    come out the same every epoch, the head alone on backbone features computed once (features.py) and
    kept in loop.feature_cache. Under torchrun (a DistributedDataParallel model) always the model."""
    if not frozen or isinstance(model, DistributedDataParallel):
        return model, loop.loaders
    if loop.feature_cache is None:  # decided once, at the first frozen epoch
        train = loop.loaders["train"].dataset
        if train.blend is None and args.tta == "none" and repr(train.transform) == repr(
                loop.loaders["val"].dataset.transform):  # no random step: each epoch would see the same images
            backbone = nn.Sequential(model.input_filter, model.backbone).train(model.backbone.training)  # frozen: eval
            loop.feature_cache = features.feature_loaders(backbone, loop.loaders, precision)
        else:
            print("note: the backbone is frozen, but the training images change every epoch (a training transform "
                  "unlike the evaluation one: --augment or another data flag; self-blends; --tta), so it runs on "
                  "every image each epoch; without those its features are computed once")
            loop.feature_cache = {}
    return (model.head, loop.feature_cache) if loop.feature_cache else (model, loop.loaders)


def checkpoint_state(loop, model, epoch, threshold, args):
    """One dict holds everything a resume or a prediction needs. "model" is what was validated and
    predicts: the weight average when there is one (then "train_model" holds the weights training goes
    on from); "split" maps each image to its split."""
    average = loop.average
    weights = ({"model": model.state_dict()} if average is None else
               {"model": average.module.state_dict(), "train_model": model.state_dict(),
                "average_steps": int(average.n_averaged)})
    return {**weights, "optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(),
            "split": loop.split, "epoch": epoch, "best_val_auc": loop.best_val_auc, "history": loop.history,
            "threshold": threshold, "args": config.recorded(args), "classes": list(dataset.CLASSES)}


def interrupted(state, out, epoch, dist):
    """Ctrl-C: keep last.pt at the last finished epoch (so --resume replays exactly), or, in the
    first epoch, the partly trained model rather than nothing. Exits with code 130."""
    last = out / "checkpoints" / "last.pt"
    if not dist.main:
        sys.exit(130)  # rank 0 alone writes
    if last.exists():
        print(f"\ninterrupted in epoch {epoch + 1}; {last} holds the last finished epoch, the partial one is "
              f"dropped so that a resumed run matches an uninterrupted one")
    else:
        engine.save_checkpoint(state, last)
        print(f"\ninterrupted in epoch {epoch + 1}: saved the partly trained model to {last}")
    launch = "torchrun --standalone --nproc_per_node=N main.py" if dist.on else "python main.py"
    print(f"continue with: {launch} --resume --output_dir {out}")
    sys.exit(130)


def distributed(model, args, start_epoch, precision, dist):
    """The model wrapped for torchrun (gradients averaged over the processes), or as it is alone."""
    if not dist.on:
        return model
    freeze_for_epoch(model, args, start_epoch)  # DDP reduces the gradients of the parameters trainable now
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    print(f"{dist.world} processes, batch {args.batch_size} each: global batch {args.batch_size * dist.world}")
    return DistributedDataParallel(model, device_ids=[precision.device] if precision.device.type == "cuda" else None)
