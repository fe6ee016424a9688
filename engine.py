"""Training and evaluation loops, device and precision choice, checkpoints.

Loops take every object they use as an argument and return a dict of metrics;
main.py and report.py build the logs and plots from those dicts.
"""
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


def get_device(name="auto"):
    """CUDA when present, else CPU; `name` ("cpu", "cuda", "cuda:1") overrides."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_supports_bf16():
    """True on CPUs with native bf16 math (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device, precision="auto"):
    """The dtype for torch.autocast, or None for plain fp32.

    auto: bf16 on CUDA GPUs that have it (else fp16) and on CPUs with native bf16;
    fp32 elsewhere, since emulated bf16 on an old CPU is slower than fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else None


def _to_device(images, device, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device, non_blocking=True, memory_format=fmt)


def train_one_epoch(model, criterion, optimizer, loader, device, epoch, amp_dtype=None,
                    scaler=None, channels_last=False, desc=None):
    """One pass over `loader`; returns {"loss", "acc", "img_s"} averaged over images."""
    model.train()
    total_loss, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc or f"train {epoch}", leave=False, unit="batch")
    for images, labels in bar:
        images, labels = _to_device(images, device, channels_last), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
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
        n = labels.size(0)
        total_loss += loss.item() * n  # weight by batch size: the last batch may be small
        correct += (logits.argmax(1) == labels).sum().item()
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}",
                        img_s=f"{seen / (time.perf_counter() - start):.1f}")
    return {"loss": total_loss / seen, "acc": correct / seen, "img_s": seen / (time.perf_counter() - start)}


@torch.inference_mode()
def evaluate(model, criterion, loader, device, amp_dtype=None, channels_last=False, desc="eval"):
    """Returns {"loss", "acc", "img_s"} plus "probs" (P(fake) per image) and "labels" as numpy arrays."""
    model.eval()
    total_loss, probs, labels_all, start = 0.0, [], [], time.perf_counter()
    for images, labels in tqdm(loader, desc=desc, leave=False, unit="batch"):
        images, labels = _to_device(images, device, channels_last), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images).float()
        total_loss += criterion(logits, labels).item() * labels.size(0)
        probs.append(logits.softmax(1)[:, 1].cpu())
        labels_all.append(labels.cpu())
    probs, labels_all = torch.cat(probs).numpy(), torch.cat(labels_all).numpy()
    n = len(labels_all)
    return {"loss": total_loss / n, "acc": float(((probs >= 0.5) == labels_all).mean()),
            "img_s": n / (time.perf_counter() - start), "probs": probs, "labels": labels_all}


def save_checkpoint(state, path):
    """Write atomically: a crash mid-write never leaves a broken last.pt behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def load_checkpoint(path, map_location="cpu"):
    """Load one of our checkpoint dicts, safely (weights_only=True: tensors and plain data only)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: checkpoint not found; train first (python main.py) or pass --checkpoint PATH")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch's own text suggests weights_only=False: never do that with files you got
        raise CheckpointError(f"{path}: not a checkpoint written by main.py, or a damaged one "
                              f"({type(e).__name__}); train one with python main.py") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint written by main.py (no 'model'/'args' entries)")
    return ckpt


def seed_everything(seed):
    """Seed python, numpy and torch. Full GPU determinism would also need
    torch.backends.cudnn.deterministic = True, which costs speed; we leave it off."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
