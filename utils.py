"""The machine: device, precision, seeds, CPU facts, memory, and several processes (torchrun).

Shared by the training, prediction and benchmark code, the way torchvision's references
keep such helpers in their utils.py.

    device = get_device("auto")                 # CUDA when present
    precision = choose_precision(device)        # autocast dtype + memory layout, printable
    with precision.autocast():
        logits = model(precision.to_device(images))
"""
import contextlib
import datetime
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


def describe_machine(device):
    """The GPU's name, or the CPU's with the flags that decide its speed; plus torch and its threads."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    return f"{name}; torch {torch.__version__}, {torch.get_num_threads()} threads"


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

    @property
    def name(self):
        """fp32, bf16 or fp16: the --precision value that gives this choice back."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")

    def __str__(self):
        dtype = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(self.amp_dtype, "fp32")
        return f"{self.device} / {dtype}" + (" + channels_last" if self.channels_last else "")


def choose_precision(device, precision="auto"):
    """The fastest correct way to run on `device` (or the one asked for).

    auto: bf16 autocast on CUDA GPUs that have it (else fp16) and on CPUs with native bf16
    (AVX512-BF16 or AMX); fp32 elsewhere, since emulated bf16 on an older CPU is slower than fp32.
    Memory layout: channels_last (NHWC) on every CPU, where oneDNN's convolutions are fastest in
    it for fp32 too (1.3x training, 1.4x inference on an AVX2-only EPYC: benchmark.py train), and
    on CUDA with autocast (tensor cores want NHWC); fp32 on a GPU stays NCHW.
    """
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_supports_bf16() else "fp32"
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Precision(device, amp_dtype, channels_last=device.type == "cpu" or amp_dtype is not None)


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


# ---------------------------------------------------------------- several processes (torchrun)

@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes; a plain `python main.py` is rank 0 of 1."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0

    @property
    def on(self):
        return self.world > 1


def init_distributed(device_name="auto", timeout_s=1800):
    """(Dist, device): join the process group torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK.

    NCCL when the processes have GPUs (each takes cuda:LOCAL_RANK), gloo on CPUs. A collective
    that waits longer than timeout_s (a rank died or hangs) raises instead of waiting forever.
    Without torchrun: Dist() and the device asked for.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return Dist(), get_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    device = torch.device(f"cuda:{local_rank}") if cuda else get_device("cpu" if device_name == "auto" else device_name)
    if cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world, local_rank), device


@contextlib.contextmanager
def main_rank_first(dist):
    """Rank 0 runs the block first (it builds a cache), the others wait, then read what it wrote."""
    if dist.on and not dist.main:
        torch.distributed.barrier()
    yield
    if dist.on and dist.main:
        torch.distributed.barrier()


def sum_over_ranks(*values):
    """The sums of these numbers over every process (themselves in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    shares = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shares, values)
    return tuple(sum(column) for column in zip(*shares))


def gather_scores(indices, probs, labels, loss_sum):
    """Join every rank's share of an evaluation: rank r scored the dataset rows `indices` (a sampler).

    Returns (probs, labels) of the whole dataset in dataset order and the summed loss, on every
    rank; in a single process, the arguments unchanged.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return probs, labels, loss_sum
    shares = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shares, (list(indices), probs, labels, loss_sum))
    indices, probs, labels, losses = zip(*shares)
    order = np.argsort(np.concatenate(indices), kind="stable")
    return np.concatenate(probs)[order], np.concatenate(labels)[order], sum(losses)
