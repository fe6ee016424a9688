"""The machine: device, precision, seeds, CPU facts, memory.

Shared by the training, prediction and benchmark code, the way torchvision's references
keep such helpers in their utils.py.

    device = get_device("auto")                 # CUDA when present
    precision = choose_precision(device)        # autocast dtype + memory layout, printable
    with precision.autocast():
        logits = model(precision.to_device(images))
"""
import os
import random
import resource
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


# ---------------------------------------------------------------- device and precision

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


def cpu_description():
    """'AMD EPYC 7B13 (avx2 yes, avx512_bf16 no, amx no)': the facts that decide CPU speed."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the name alone
        import platform
        return platform.processor() or name
    has = lambda *names: "yes" if any(n in flags for n in names) else "no"  # noqa: E731
    return (f"{name}, {os.cpu_count()} cores (avx2 {has('avx2')}, avx512_bf16 {has('avx512_bf16')}, "
            f"amx {has('amx_bf16', 'amx_tile')})")


@dataclass(frozen=True)
class Precision:
    """How tensors run on the device: the autocast dtype (None = plain fp32) and the memory layout."""
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def to_device(self, x):
        """A batch onto the device; images (B, 3, H, W) in the chosen layout, anything else as is."""
        fmt = torch.channels_last if self.channels_last and x.dim() == 4 else torch.contiguous_format
        return x.to(self.device, non_blocking=True, memory_format=fmt)

    def prepare(self, model):
        """Move a model to the device, in the layout its inputs will have."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return model.to(self.device, memory_format=fmt)

    def __str__(self):
        dtype = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(self.amp_dtype, "fp32")
        return f"{self.device} / {dtype}" + (" + channels_last" if self.channels_last else "")


def choose_precision(device, precision="auto"):
    """The fastest correct way to run on `device` (or the one asked for).

    auto: bf16 autocast on CUDA GPUs that have it (else fp16) and on CPUs with native bf16;
    fp32 elsewhere, since emulated bf16 on an older CPU is slower than fp32.
    channels_last goes with autocast: conv kernels for bf16/fp16 are fastest in NHWC.
    """
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_supports_bf16() else "fp32"
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Precision(device, amp_dtype, channels_last=amp_dtype is not None)


# ---------------------------------------------------------------- seeds and memory

def seed_everything(seed):
    """Seed python, numpy and torch. Full GPU determinism would also need
    torch.backends.cudnn.deterministic = True, which costs speed; we leave it off."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mib(device=None):
    """Peak memory of this process so far: CUDA allocations on a GPU, else resident memory.

    On Linux this reads VmHWM: ru_maxrss survives exec, so a child started by a big parent
    (pytest, a notebook) would report the parent's peak instead.
    """
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux (bytes on macOS)
