"""A run's configuration: flags resolved against a checkpoint, the defaults for random init,
the bundled sample when Dataset/ is empty, the weights fallback offline, the output folder.

main.py calls these before training; each one prints what it decided and records what a
reader of the results must know in args.notes (summary.md shows them on top).
"""
import shutil
import sys
from pathlib import Path

import engine
from media import IMAGE_EXTS
from model import DeepfakeDetector, WeightsError, input_size

# A resumed run takes every flag from its checkpoint unless the command line gives it again.
# These may then differ (the change is printed); any other flag that differs would change the
# model, the data split or the batches, so the resume is refused instead.
RESUME_MAY_CHANGE = {"epochs", "workers", "device", "precision", "cache_dir", "output_dir", "test_sets"}
NEVER_FROM_CHECKPOINT = {"resume", "evaluate_only", "checkpoint", "eval_split", "overwrite", "runtime"}
# Defaults that differ when training from random init (--weights none): see README, "Training from scratch".
# 128 px learns as well from scratch as 224 px on the shared faces (measured) in a third of the time;
# pretrained weights keep the input size they were trained at (model.input_size()).
SCRATCH = {"augment": "flip", "image_size": 128}
PRETRAINED = {"augment": "blur_jpeg"}
SAMPLE = Path(__file__).resolve().parent / "samples" / "faces"
# what --evaluate_only takes from the checkpoint: the network and its test split
MODEL_AND_SPLIT = ("model", "image_size", "data_root", "val_fraction", "test_fraction", "seed", "max_per_class")


def resolve_defaults(args):
    """Fill in the defaults that depend on other flags ('auto'); a given value is kept.
    Returns what was decided, one line each, for printing."""
    scratch = args.weights == "none"
    defaults = SCRATCH if scratch else {**PRETRAINED, "image_size": input_size(args.model)}
    decided = []
    for key, value in defaults.items():
        if getattr(args, key) in ("auto", None):
            setattr(args, key, value)
            decided.append(f"--{key} {value} ({'random init' if scratch else 'pretrained weights'} default)")
    return decided


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


def prepare_output(args, resume_path, write=True):
    """The run folder; never replaces an earlier run or evaluation unless asked. write=False (torchrun's
    ranks > 0) makes the same checks and changes nothing: rank 0 alone writes."""
    out = Path(args.output_dir) / ("evaluation" if args.evaluate_only else "")
    last, best = out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt"
    if args.evaluate_only and any(out.glob("*")) and not args.overwrite:
        sys.exit(f"{out} already holds an evaluation; pass --overwrite to replace it")
    if resume_path is None and not args.evaluate_only and last.exists():
        if not args.overwrite:
            sys.exit(f"{out} already holds a run; continue it with --resume, pick another --output_dir, "
                     f"or replace it with --overwrite")
        if write:
            last.unlink()
            best.unlink(missing_ok=True)  # asked for: an old best.pt must not pass for the new run's
    if write and resume_path is not None and not best.exists() and (resume_path.parent / "best.pt").exists():
        best.parent.mkdir(parents=True, exist_ok=True)  # resumed into a new folder: keep the best so far
        shutil.copy2(resume_path.parent / "best.pt", best)
    if write:
        out.mkdir(parents=True, exist_ok=True)
    return out


def use_sample_if_no_data(args):
    """A first run with no --data_root and nothing in Dataset/ yet trains on the bundled sample."""
    if args.evaluate_only or args.resume is not None or "data_root" in args.given:
        return
    if any(p.suffix.lower() in IMAGE_EXTS for p in Path(args.data_root).rglob("*")):
        return  # the user's data, never mixed with the sample
    args.data_root = str(SAMPLE)
    args.notes.append("Dataset/ is empty: trained on the bundled sample (samples/faces, 100 real + 100 fake, for "
                      "trying the pipeline, not for judging a model); put your data in Dataset/, see Dataset/README.md")
    print(f"note: {args.notes[-1]}")


def build_model(args, pretrained=True):
    """DeepfakeDetector with --weights; ImageNet weights that cannot be downloaded fall back to random
    init (with a warning now, at the end and in the report) unless --weights was asked for by name."""
    weights = args.weights if pretrained else "none"
    decided = resolve_defaults(args)
    try:
        model = DeepfakeDetector(args.model, weights, freeze_backbone=args.freeze_backbone, image_size=args.image_size)
    except WeightsError as e:
        if weights != "imagenet" or "weights" in args.given:
            raise
        args.weights = "none"
        for key in SCRATCH:  # the random-init defaults, for flags the user left to us
            if key not in args.given:
                setattr(args, key, None)
        decided = resolve_defaults(args)
        args.notes.append(f"{str(e).splitlines()[0].rstrip('.')}: trained from RANDOM INIT (--weights none), not a "
                          f"pretrained result; connect and rerun, or pass --weights PATH (README: Pretrained weights)")
        print(f"warning: {args.notes[-1]}")
        model = DeepfakeDetector(args.model, "none", freeze_backbone=args.freeze_backbone, image_size=args.image_size)
    for line in decided:
        print(line)
    return model


def single_process_only(args, dist):
    """What a torchrun run cannot do, said before anything starts."""
    if dist.on and args.balance == "sampler":
        sys.exit("error: --balance sampler weighs one process's view of the data; under torchrun use "
                 "--balance oversample")
    if dist.on and args.unfreeze_at:
        sys.exit("error: --unfreeze_at changes which parameters train mid-run, which DistributedDataParallel "
                 "cannot follow; run it in one process (python main.py)")
