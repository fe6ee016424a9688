"""Training and evaluation loops, checkpoints, and a trained detector loaded back for scoring.

Loops take every object they use as an argument and return a dict of metrics;
main.py and report.py build the logs and plots from those dicts.

    stats = train_one_epoch(model, criterion, optimizer, loader, precision, epoch)  # {"loss", "acc", "img_s"}
    average = weight_average(model, decay=0.998)                 # EMA weights, updated after each step
    stats = evaluate(model, criterion, loader, precision)        # + "probs" (P(fake)) and "labels"
    detector = load_detector("results/checkpoints/best.pt")      # model, transform, threshold, args
"""
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, DistributedSampler

import presets
from cli import progress
from model import DeepfakeDetector, FlipAverage, check_name, detector_from
from utils import choose_precision, gather_scores, get_device, sum_over_ranks

DEFAULT_THRESHOLD = 0.5  # the decision threshold of a checkpoint that stores none (interrupted run)


def make_criterion(config):
    """The loss, built from a run's configuration (main.py's flags, or a checkpoint's "args"): the one
    place to change it. Training, validation, test scoring, --test_sets and benchmark.py all take it
    from here, and the training-curves plot names it (loss_name). A loss with a setting reads it from
    config (add its flag in main.py; a checkpoint keeps it)."""
    return nn.CrossEntropyLoss()


def loss_name(criterion):
    """'Cross entropy loss' for nn.CrossEntropyLoss, 'Focal loss' for a FocalLoss: the plot's title."""
    name = type(criterion).__name__
    return " ".join(re.findall(r"[A-Z]+[a-z0-9]*", name) or [name]).capitalize()


def fake_probability(logits):
    """(B, 2) logits -> (B,) P(fake), in fp32 whatever the autocast dtype."""
    return logits.float().softmax(1)[:, 1]


# ---------------------------------------------------------------- the learning-rate schedule

def lr_factor(step, total_steps, warmup_steps=0, floor=0.0):
    """The multiplier of each group's learning rate at optimizer step `step` (0-based): a linear
    warm-up from ~0 to 1 over warmup_steps, then a cosine from 1 down to `floor` at total_steps.
    A pure function of the step, so a resumed run continues exactly where it stopped; change
    the schedule here (and only here)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2


def make_scheduler(optimizer, epochs, steps_per_epoch, warmup_epochs=0.0, floor=0.0):
    """lr_factor stepped once per batch (torch's LambdaLR; a resumed run with more --epochs
    stretches the cosine over the new length)."""
    total, warmup = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, floor))


def resume_scheduler(scheduler, state):
    """Continue a checkpoint's schedule at its step; the learning rate then follows this run's
    lr_factor (the same, unless a resume changed --epochs)."""
    scheduler.load_state_dict(state)
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


# ---------------------------------------------------------------- loops

def train_one_epoch(model, criterion, optimizer, loader, precision, epoch, scaler=None, scheduler=None, desc=None,
                    after_step=None):
    """One pass over `loader`, stepping `scheduler` and calling `after_step()` (the weight average's
    update) after each batch; returns {"loss", "acc", "img_s"} averaged over images (of every process)."""
    model.train()
    total_loss, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    bar = progress(loader, desc or f"train {epoch}")
    for images, labels in bar:
        images, labels = precision.to_device(images), labels.to(precision.device, non_blocking=True)
        with precision.autocast():
            logits = model(images)
            loss = criterion(logits.float(), labels)
        # compute gradient and step (the scaler only acts for fp16 on CUDA)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()
        n = labels.size(0)
        total_loss += loss.item() * n  # weight by batch size: the last batch may be small
        correct += (logits.argmax(1) == labels).sum().item()
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    total_loss, correct, seen = sum_over_ranks(total_loss, correct, seen)  # under torchrun: all processes
    return {"loss": total_loss / seen, "acc": correct / seen, "img_s": seen / (time.perf_counter() - start)}


@torch.inference_mode()
def evaluate(model, criterion, loader, precision, desc="eval"):
    """Returns {"loss", "acc", "img_s"} plus "probs" (P(fake) per image) and "labels" as numpy arrays.

    Under torchrun each process scores its share of the images (loader.sampler lists which) and
    every process gets the whole split back, in dataset order.
    """
    model.eval()
    total_loss, probs, labels_all, start = 0.0, [], [], time.perf_counter()
    for images, labels in progress(loader, desc):
        images, labels = precision.to_device(images), labels.to(precision.device, non_blocking=True)
        with precision.autocast():
            logits = model(images).float()
        total_loss += criterion(logits, labels).item() * labels.size(0)
        probs.append(fake_probability(logits).cpu())
        labels_all.append(labels.cpu())
    # a process may have had no images to score (torchrun with more processes than images)
    probs = torch.cat(probs).numpy() if probs else np.zeros(0, np.float32)
    labels_all = torch.cat(labels_all).numpy() if labels_all else np.zeros(0, np.int64)
    probs, labels_all, total_loss = gather_scores(loader.sampler, probs, labels_all, total_loss)
    n = max(len(labels_all), 1)  # an empty set gives empty arrays, not a division by zero
    return {"loss": total_loss / n, "acc": float(((probs >= 0.5) == labels_all).sum() / n),
            "img_s": n / (time.perf_counter() - start), "probs": probs, "labels": labels_all}


def weight_average(model, decay):
    """An exponential moving average of `model`'s weights and BatchNorm statistics: a copy that
    `.update_parameters(model)` moves towards the model, `.module` to use it.

    After n updates it is sum(decay**(n-i) * w_i) / sum(decay**(n-i)) over the weights w_1..w_n
    seen (the bias correction Adam uses): no trace of the initial weights, a plain mean over the
    first steps, an EMA with `decay` once n >> 1 / (1 - decay). The average of the last few hundred
    steps sits in a flatter spot than the last step's weights, which tends to carry over better
    to data unlike the training set (Izmailov et al. 2018, SWA; Cha et al. 2021, SWAD); timm's and
    torchvision's reference trainers keep one."""
    def update(averages, currents, n_averaged):  # n_averaged >= 1: the first update copies
        if not averages[0].is_floating_point():  # BatchNorm's batch counter: a count, not averaged
            torch._foreach_copy_(averages, currents)
            return
        weight = (1 - decay) / (1 - decay ** (int(n_averaged) + 1))
        torch._foreach_lerp_(averages, currents, weight)
    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def balanced_sampler(ds):
    """WeightedRandomSampler drawing each class equally often (train split only).

    It draws from torch's global RNG, which main.py re-seeds every epoch so that
    a resumed run sees the same batches as an uninterrupted one.
    """
    counts = Counter(ds.targets)
    weights = torch.tensor([1.0 / counts[t] for t in ds.targets], dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(weights, len(weights), replacement=True)


class PairedBatchSampler(torch.utils.data.Sampler):
    """Training batches in which each real face and its self-blend travel together, as SBI
    (Shiohara & Yamasaki, CVPR 2022) trains: identity, pose and background then no longer tell
    real from fake, only the blending traces do. Every other image is paired with another at
    random, so a batch holds batch_size // 2 pairs. The order comes from torch's generator,
    which main.py seeds per epoch: a resumed run draws the same batches."""

    def __init__(self, ds, batch_size):
        blend_of = {s.row: i for i, s in enumerate(ds.samples) if s.pseudo}
        self.pairs = [(i, blend_of[s.row]) for i, s in enumerate(ds.samples)
                      if not s.pseudo and s.label == 0 and s.row in blend_of]
        paired = {i for pair in self.pairs for i in pair}
        self.singles = [i for i in range(len(ds)) if i not in paired]
        self.per_batch = max(1, batch_size // 2)  # pairs per batch

    def __iter__(self):
        singles = [self.singles[k] for k in torch.randperm(len(self.singles)).tolist()]
        # An odd image out waits for the next epoch (a new one each epoch), as make_loader's drop_last
        # does: alone in a batch it would break BatchNorm (one value per channel to normalise).
        units = self.pairs + [tuple(singles[k:k + 2]) for k in range(0, len(singles) - 1, 2)]
        order = [units[k] for k in torch.randperm(len(units)).tolist()]
        for k in range(0, len(order), self.per_batch):
            yield [i for unit in order[k:k + self.per_batch] for i in unit]

    def __len__(self):
        return math.ceil((len(self.pairs) + len(self.singles) // 2) / self.per_batch)


def make_loader(ds, batch_size, workers, dist, train=False, balance="none", seed=0):
    """Batches of `ds`. Under torchrun each process takes its share: a DistributedSampler for
    training (re-shuffled per epoch by set_epoch), every world-th image for evaluation (each
    image scored exactly once, no padding). A training set with self-blends keeps each real
    face and its blend in one batch (PairedBatchSampler)."""
    if train and ds.blend is not None and not dist.on:
        return DataLoader(ds, batch_sampler=PairedBatchSampler(ds, batch_size), num_workers=workers,
                          pin_memory=torch.cuda.is_available())
    if dist.on:
        sampler = DistributedSampler(ds, dist.world, dist.rank, shuffle=True, seed=seed) if train \
            else range(dist.rank, len(ds), dist.world)
    else:
        sampler = balanced_sampler(ds) if train and balance == "sampler" else None
    # A last training batch of one image is dropped: BatchNorm cannot normalise one value per channel (a
    # small image leaves a 1x1 map at the end), and one image of an epoch is no loss. Workers restart each
    # epoch: their RNG then follows the per-epoch seed.
    per_process = sampler.num_samples if isinstance(sampler, DistributedSampler) else len(ds)
    return DataLoader(ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=torch.cuda.is_available(),
                      drop_last=train and per_process % batch_size == 1 and per_process > 1)


# ---------------------------------------------------------------- checkpoints

class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def save_checkpoint(state, path):
    """Write atomically: a crash mid-write never leaves a broken last.pt behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load one of our checkpoint dicts, safely (weights_only=True: tensors and plain data only)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: checkpoint not found; train first (python main.py) or pass --checkpoint PATH")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch's own text suggests weights_only=False: never do that with files you got
        raise CheckpointError(f"{path}: not a checkpoint written by main.py, or a damaged one "
                              f"({type(e).__name__}); train one with python main.py") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt.get("args"), dict):
        raise CheckpointError(f"{path}: not a checkpoint written by main.py (no 'model'/'args' entries)")
    return ckpt


@dataclass
class Detector:
    """A trained detector, ready to score: what load_detector returns."""
    model: DeepfakeDetector       # in eval mode, on precision.device (Grad-CAM explains this one)
    scorer: object                # what scores: the model, or FlipAverage(model) with --tta flip
    precision: object             # utils.Precision: device, autocast dtype, memory layout
    transform: object             # presets.eval_transform for the checkpoint's image size
    image_size: int
    cache_size: int               # the side images are decoded at before the transform (presets.cache_size_for)
    threshold: float              # P(fake) >= threshold -> "fake"
    threshold_source: str
    args: dict                    # the flags the checkpoint was trained with
    epoch: int                    # 0-based epoch the weights are from
    route: str = "resize"         # how a picture becomes the cached square (presets.square_pixels, --input_route)
    validated_on: dict = None     # what the run scored it on after training (validation_record), if anything

    @property
    def input_side(self):
        """The side of what the scorer sees: image_size, or on the crop route the whole cached square."""
        return self.cache_size if self.route == "crop" else self.image_size

    def preprocess(self, pil):
        """PIL face crop -> normalized (3, S, S), exactly as the training cache + eval transform."""
        pixels = presets.square_pixels(pil, self.cache_size, self.route)  # (s, s, 3) uint8
        return self.transform(torch.from_numpy(pixels).permute(2, 0, 1))

    @torch.inference_mode()
    def fake_probs(self, batch):
        """(B, 3, S, S) preprocessed faces -> (B,) P(fake) on the CPU."""
        with self.precision.autocast():
            return fake_probability(self.scorer(self.precision.to_device(batch))).cpu()


def load_detector(path, device="auto", precision="auto", tta=None):
    """Checkpoint -> Detector (model, eval transform, threshold, args). CheckpointError names the file.

    tta: "flip" or "none" to override the checkpoint's --tta (None: as trained).
    """
    ckpt = load_checkpoint(path)
    args = ckpt["args"]
    name = args.get("model")
    try:
        check_name(name)
    except ValueError:
        raise CheckpointError(f"{path}: trained for model {name!r}, which model.py does not know") from None
    model = detector_from(args)
    try:
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # wrong shapes or keys: another architecture's weights
        raise CheckpointError(f"{path}: its weights do not fit a {name} DeepfakeDetector "
                              f"({str(e).splitlines()[0][:150]})") from None
    run = choose_precision(get_device(device) if isinstance(device, str) else device, precision)
    run.prepare(model.eval())
    image_size = args.get("image_size") or model.input_size
    tf = presets.transforms({**args, "image_size": image_size}, model.mean, model.std)  # crop_pct: as trained
    threshold, source = ckpt.get("threshold"), "checkpoint (val EER point)"
    if threshold is None:
        threshold, source = DEFAULT_THRESHOLD, f"{DEFAULT_THRESHOLD} default (checkpoint has no threshold)"
    scorer = FlipAverage(model) if (tta or args.get("tta")) == "flip" else model
    return Detector(model, scorer, run, tf.eval, image_size, tf.cache_size, float(threshold), source, args,
                    ckpt.get("epoch", -1), tf.route, ckpt.get("validated_on"))


# ---------------------------------------------------------------- what a checkpoint was validated on

def validation_record(in_domain, test_sets):
    """What a checkpoint keeps of its run's scores (plain data): the in-domain ROC-AUC, and per --test_sets
    folder the ROC-AUC that says most: a labelled folder's own, a fake-only folder's against the real-only
    folders pooled (real photos of other sources) where there are any, else against the test reals."""
    rows = [r for r in test_sets if "error" not in r and r.get("roc_auc") is not None]
    sets = [{"set": r["name"], "against": "its own reals", "roc_auc": r["roc_auc"]}
            for r in rows if r.get("kind") == "labelled"]
    for fakes in dict.fromkeys(r["fakes"] for r in rows if r.get("kind") == "pair"):
        pairs = [r for r in rows if r.get("kind") == "pair" and r["fakes"] == fakes]
        best = max(pairs, key=lambda r: ("+" in r["reals"], not r["reals"].endswith(" reals")))
        sets.append({"set": fakes, "against": best["reals"], "roc_auc": best["roc_auc"]})
    return {"in_domain": {"data": in_domain["path"], "roc_auc": in_domain["roc_auc"]},
            "sets": [s for s in sets if not s["set"].endswith((" fakes", " reals"))]}


def validation_line(record):
    """One line beside a verdict: what the model was validated on, so that a "real" on a face of an
    unknown generator is not read as proof."""
    if not record:
        return ("validated on: its own test split only; not validated on other generators, face swaps or edits: "
                "a 'real' verdict on those is no proof")
    domain = record["in_domain"]
    sets = ", ".join(f"{s['set']} {s['roc_auc']:.2f}" for s in record["sets"])
    return (f"validated on: {domain['data']} (in-domain) ROC-AUC {domain['roc_auc']:.2f}"
            + (f"; never trained on: {sets}" if sets else "")
            + "; not validated on anything else: a 'real' verdict on another kind of fake is no proof")


def record_validation(path, record):
    """Store validation_record() in the checkpoint at path (atomically)."""
    ckpt = load_checkpoint(path)
    ckpt["validated_on"] = record
    save_checkpoint(ckpt, path)
