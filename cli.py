"""The command line: flag checks shared by the entry scripts, and progress bars.

Nothing here imports torch, so faces.py (and its worker processes) start fast.

    parser.add_argument("--epochs", type=positive(int))         # "must be > 0, got 0" from argparse
    parser.add_argument("--max_per_class", type=at_least(int, 0))
    for batch in progress(loader, "train"): ...                  # a bar on a terminal, silent in a log
"""
import argparse
import os
import sys

from tqdm import tqdm

# data-loading processes: two keep a 2-core CPU's model fed (benchmark.py train) without
# crowding out its compute threads on bigger machines
DEFAULT_WORKERS = min(2, os.cpu_count() or 1)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RUNTIME_HELP = {
    "auto": "what scores: onnx (ONNX Runtime), torch (PyTorch, the model as written), auto: ONNX Runtime on a CPU "
            "without native bf16 when it pays back the export (a server, or 200+ images), else PyTorch "
            "(default: auto)",
    "torch": "what scores the test split and --test_sets: torch (PyTorch, the model as written in model.py), or "
             "onnx (an ONNX Runtime export of it, faster on CPUs without native bf16; a disagreement with PyTorch "
             "beyond 1e-3 is reported) (default: torch)",
}
_silent = False  # set in the processes that must not print (torchrun's ranks > 0)


def number(cast, text):
    """cast(text), or an argparse error that says what was expected (argparse alone says 'invalid check value')."""
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if cast is int else 'a number'}, got {text!r}") \
            from None


def at_least(cast, minimum, strict=False, maximum=None):
    """argparse type: cast(text) >= minimum (> minimum when strict), and <= maximum where one is given."""
    def check(text):
        value = number(cast, text)
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {text}")
        return value
    return check


def positive(cast):
    """argparse type: cast(text) > 0."""
    return at_least(cast, 0, strict=True)


def fraction(text):
    """argparse type: a float in [0, 1)."""
    value = number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def one_line(e):
    """'TypeName: first line of the message' of an exception, short enough for a one-line error."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]}".rstrip(": ")


def checked(fn):
    """argparse type from a function that raises ValueError with a message: argparse shows that message."""
    def check(text):
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return check


def add_machine_flags(group, runtime="auto"):
    """--device, --precision and (unless runtime is None) --runtime: declared here once for every
    entry script. main.py scores with PyTorch unless asked (runtime="torch"); predict.py and
    app.py pick the faster runtime (runtime="auto")."""
    group.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N (default: auto)")
    group.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), else "
                       "fp32; channels_last on CPUs and with autocast (default: auto)")
    if runtime is not None:
        choices = ("auto", "torch", "onnx") if runtime == "auto" else ("torch", "onnx")
        group.add_argument("--runtime", choices=choices, default=runtime, help=RUNTIME_HELP[runtime])


def given_flags(get_args_parser, argv, args):
    """The flags the command line really gave, as opposed to those filled in from defaults.

    argparse fills in a default only where the namespace lacks the attribute, so parsing
    into a namespace pre-filled with a marker leaves the marker exactly on the flags not given.
    """
    unset = object()
    probe = get_args_parser().parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return {k for k, v in vars(probe).items() if v is not unset}


def progress(iterable, desc, unit="batch", **kwargs):
    """A tqdm bar on a terminal; nothing when output goes to a file (disable=None), so a
    log holds the one line per epoch that main.py prints, not one per batch."""
    return tqdm(iterable, desc=desc, leave=False, unit=unit, disable=True if _silent else None, **kwargs)


def interruptible(main, *args):
    """Run an entry script's main(*args); Ctrl-C ends it with one line and exit code 130 (what a shell
    reports for it), not a traceback. What main() keeps of its work on Ctrl-C is its own business."""
    try:
        return main(*args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


def silence():
    """From now on this process prints nothing and shows no progress bar (errors still go to stderr)."""
    global _silent
    _silent = True
    sys.stdout = open(os.devnull, "w")
