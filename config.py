"""A run's configuration, resolved once: command-line flags + checkpoint (if any) + machine.

    args = main.parse_args()                   # what the user typed; some values still "auto"/None
    args, ckpt, ckpt_path = config.resolve(args, dist, device)   # every value decided, nothing "auto"

resolve() is the one place where defaults that depend on other flags are filled in, where a
resumed or evaluated run takes its flags from its checkpoint, where the bundled sample stands
in for an empty Dataset/, where an offline machine falls back to other weights, and where
"auto" device, precision and runtime become what this machine runs. It prints each decision
once; args.json and summary.md record the object it returns, and args.notes holds what a
reader of the results must know (summary.md shows the notes on top).
"""
import fcntl
import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import autoencoder
import dataset
import detect
import engine
import model
import report
import utils
from media import IMAGE_EXTS

# Defaults that depend on the weights. From random init (--weights none): 128 px learns as well
# as 224 px on the shared faces in a third of the time, and flip is the augmentation that helped
# (docs/experiments.md). Pretrained weights keep the input size they were trained at and use
# Wang et al.'s blur + JPEG augmentation.
SCRATCH = {"augment": "flip", "image_size": 128, "input_jpeg": 0}
# --input_jpeg 75 kept the main command's in-domain AUC and lifted its mean over fakes and reals it never
# saw, on each of 3 seeds (docs/experiments.md, "Beyond the training generator"); not measured from random init.
PRETRAINED = {"augment": "blur_jpeg", "input_jpeg": 75}
# Flags newer than some checkpoints, and what those checkpoints ran with: a resume or an evaluation of
# one must not get today's default instead.
BEFORE_THE_FLAG = {"input_jpeg": 0, "input_filter": "none", "input_route": "resize", "pseudo_from": "all"}
# Where ResNet18's ImageNet weights cannot be downloaded and the user named neither --model nor
# --weights: the backbone whose ImageNet weights come with the install. It beats ResNet18 from random
# init by a wide margin on the shared faces (docs/experiments.md, "Pretrained backbone").
OFFLINE_MODEL = "efficientnet_lite0"
WEIGHTS_DOC = "docs/training.md, 'Pretrained weights and offline use'"
SAMPLE = Path(__file__).resolve().parent / "samples" / "faces"

# Flags about this very run and machine: never taken from a checkpoint.
OWN = {"resume", "evaluate_only", "checkpoint", "eval_split", "overwrite", "device", "runtime", "machine", "notes",
       "run_id"}
# A resume takes every other flag from its checkpoint unless the command line gives it again; these
# may then differ (the change is printed). Any other difference would change the model, the data
# split or the batches, so the resume is refused instead.
RESUME_MAY_CHANGE = {"epochs", "workers", "precision", "cache_dir", "output_dir", "test_sets", "latent_weights"}
# An evaluation takes what was trained (model, weights, split, recipe) from its checkpoint; it may
# score in other batches or with test-time augmentation. Where and how it runs is its own.
EVALUATION_MAY_CHANGE = {"batch_size", "tta"}
EVALUATION_OWN = {"precision", "workers", "cache_dir", "test_sets", "output_dir"}

# ---------------------------------------------------------------- the one resolution step

def resolve(args, dist, device):
    """Flags + checkpoint + machine -> the run's configuration. Returns (args, ckpt, ckpt_path);
    ckpt and ckpt_path are None for a new run. Stops with one line on a contradiction."""
    args.notes, ckpt, path = [], None, None
    if args.evaluate_only or args.resume is not None:
        path, ckpt = checkpoint_to_start_from(args)
        take_flags_from_checkpoint(args, ckpt["args"])
        args.run_id = run_identity(ckpt)
    else:
        use_sample_if_no_data(args)
        args.run_id = uuid.uuid4().hex  # names this run in its checkpoints and its folder's manifest
    check_inputs(args)  # before any download
    if ckpt is None:
        choose_weights(args)
    for line in fill_defaults(args):
        print(line)
    precision = utils.choose_precision(device, args.precision)
    args.device, args.precision = str(device), precision.name
    args.machine = utils.describe_machine(device) + (f", {dist.world} processes" if dist.on else "")
    args.runtime = runtime_available(args.runtime, args.notes)
    return args, ckpt, path


def check_inputs(args):
    """The data, every --test_sets folder and what the self-blend mask needs, checked before anything downloads
    or trains."""
    try:
        dataset.find_samples(args.data_root)
    except dataset.DatasetError as e:
        if args.pseudo_fakes == "sbi_only" and "fake_data" in str(e):
            sys.exit(f"error: {e}. --pseudo_fakes sbi_only trains on real faces and their self-blends alone, but "
                     f"validation and test measure the detector on real fakes: put some fake faces of the kind "
                     f"you want to catch into fake_data/ (with sbi_only they are never trained on)")
        sys.exit(f"error: {e}")
    for folder in args.train_extra:
        try:
            dataset.find_extra_samples(folder)
        except dataset.DatasetError as e:
            sys.exit(f"error: {e}")
    inside = dataset.class_folder_holding(args.output_dir, [args.data_root, *args.train_extra])
    if inside:
        sys.exit(f"error: --output_dir {args.output_dir} is inside {inside}, where the images are read from: the "
                 f"next run would train on the report's pictures; pick an --output_dir outside the data")
    for item in args.test_sets:
        name, path = item.split("=", 1)
        if not Path(path).is_dir():
            sys.exit(f"error: --test_sets {name}={path}: folder not found")
    if args.pseudo_from == "train_extra" and args.pseudo_fakes != "none" and not args.train_extra:
        sys.exit("error: --pseudo_from train_extra makes pseudo-fakes of the --train_extra reals only, but no "
                 "--train_extra folder was given")
    if args.pseudo_fakes == "taef2" and not args.evaluate_only:
        missing = [f for f in autoencoder.FILES if not (Path(args.latent_weights) / f).is_file()]
        if missing:
            sys.exit(f"error: --pseudo_fakes taef2: {', '.join(missing)} not found in --latent_weights "
                     f"{args.latent_weights}; download them from github.com/madebyollin/taesd")
    if args.pseudo_fakes in ("sbi", "sbi_only") and args.sbi_mask == "hull" and not args.evaluate_only:
        try:
            detect.shape_predictor_file()
        except ImportError as e:
            sys.exit(f"error: --sbi_mask hull: {e}")


def fill_defaults(args):
    """Fill in the defaults that depend on other flags; a given (or checkpointed) value is kept.
    Returns what was decided about the weights, one line each, for printing."""
    if args.backbone_lr_scale is None:  # fine-tuning after a head-only warm-up: move the backbone gently
        args.backbone_lr_scale = 0.1 if args.unfreeze_at else 1.0
    scratch = args.weights == "none"
    defaults = SCRATCH if scratch else {**PRETRAINED, "image_size": model.input_size(args.model)}
    decided = []
    for key, value in defaults.items():
        if getattr(args, key) in ("auto", None):
            setattr(args, key, value)
            decided.append(f"--{key} {value} ({'random init' if scratch else 'pretrained weights'} default)")
    return decided


def choose_weights(args):
    """A new run's weights: fetched now (a download), or the offline fallback, said at the start
    and recorded in args.notes. An explicit --weights that cannot be had stops the run."""
    if args.weights == "none":
        return
    try:
        model.imagenet_network(args.model, args.weights)  # downloads into torch's cache, or finds the file
        return
    except model.WeightsError as e:
        if args.weights != "imagenet" or "weights" in args.given:
            sys.exit(f"error: {e}")
        why = str(e).splitlines()[0].rstrip(".")
    if "model" not in args.given:
        try:
            model.wheel_weights_file(OFFLINE_MODEL)
            args.model = OFFLINE_MODEL
            args.notes.append(f"{why}: trained {OFFLINE_MODEL} with the ImageNet weights that come with the "
                              f"install instead of resnet18 (the better of the two offline choices); connect and "
                              f"rerun for ResNet18, or pass --model (see {WEIGHTS_DOC})")
            print(f"warning: {args.notes[-1]}")
            return
        except model.WeightsError:
            pass
    args.weights = "none"
    args.notes.append(f"{why}: trained from RANDOM INIT (--weights none), not a pretrained result; connect and "
                      f"rerun, or pass --weights PATH or --model {OFFLINE_MODEL} (see {WEIGHTS_DOC})")
    print(f"warning: {args.notes[-1]}")


def runtime_available(runtime, notes):
    """--runtime onnx needs the onnxruntime package; without it, PyTorch scores (said once)."""
    if runtime == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            notes.append("--runtime onnx: onnxruntime is not installed, scored with PyTorch "
                         "(pip install -r requirements.txt)")
            print(f"warning: {notes[-1]}")
            return "torch"
    return runtime


def recorded(args):
    """The configuration to save (args.json, checkpoints): everything but the parse bookkeeping."""
    return {k: v for k, v in vars(args).items() if k != "given"}


# ---------------------------------------------------------------- checkpoints

def take_flags_from_checkpoint(args, saved):
    """--resume: every flag not given comes from the checkpoint; --evaluate_only: what was trained.

    A given flag that contradicts the checkpoint stops the run with one line naming both values,
    except the ones the run may change (RESUME_MAY_CHANGE, EVALUATION_MAY_CHANGE), which are kept.
    """
    if args.evaluate_only:
        own = EVALUATION_OWN | ({"data_root", "max_per_class", "train_extra"} if args.eval_split == "all" else set())
        may_change = EVALUATION_MAY_CHANGE
    else:
        # --resume PATH writes where that run wrote; a bare --resume continues where it found last.pt
        own = set() if (args.resume or args.checkpoint) else {"output_dir"}
        may_change = RESUME_MAY_CHANGE
    saved = {**BEFORE_THE_FLAG, **saved}
    for key, theirs in saved.items():
        if key in OWN or key in own or key not in vars(args):
            continue
        if key not in args.given:
            setattr(args, key, theirs)
        elif getattr(args, key) != theirs:
            if key in may_change:
                print(f"note: --{key} {getattr(args, key)} (the checkpoint ran with {theirs})")
            else:
                what = "resume" if args.resume is not None else "evaluate"
                sys.exit(f"error: --{key} {getattr(args, key)} conflicts with the checkpoint's {theirs}; to {what} "
                         f"it, leave --{key} out" + (" (or start a new run with --output_dir)" if what == "resume"
                                                     else ""))
    args.notes = list(saved.get("notes", []))  # what the checkpoint's run noted (the sample, a fallback)


def checkpoint_to_start_from(args):
    """(path, checkpoint) that --evaluate_only or --resume starts from. --resume takes a path of its own
    (--resume PATH); a bare --resume also accepts --checkpoint PATH, so either spelling works."""
    if args.evaluate_only:
        path, flag = Path(args.checkpoint or Path(args.output_dir) / "checkpoints" / "best.pt"), "--checkpoint"
    else:
        path = Path(args.resume or args.checkpoint or Path(args.output_dir) / "checkpoints" / "last.pt")
        flag = "--resume"
    if not path.is_file():
        sys.exit(f"error: {path}: checkpoint not found; train first (python main.py), or pass {flag} PATH")
    try:
        return path, engine.load_checkpoint(path)
    except engine.CheckpointError as e:
        sys.exit(f"error: {e}")


def check_same_split(saved, samples, root):
    """A resumed or evaluated run must see the split its checkpoint trained on: images added,
    removed or moved since then would put test images into training, or training images into
    the test. Stops with one line saying what changed."""
    if saved is None:
        return
    now = {s.path: s.split for s in samples}
    added, removed = len(now.keys() - saved.keys()), len(saved.keys() - now.keys())
    moved = sum(now[p] != saved[p] for p in now.keys() & saved.keys())
    if added or removed or moved:
        sys.exit(f"error: the images under {root} changed since the checkpoint's run ({added} added, {removed} "
                 f"removed, {moved} in another split): its split no longer holds. Restore the folder, or start a "
                 f"new run (--output_dir); to score every image of a changed folder use --eval_split all")


# ---------------------------------------------------------------- data and output folder

def use_sample_if_no_data(args):
    """A first run with no --data_root and nothing in Dataset/ yet trains on the bundled sample."""
    if "data_root" in args.given:
        return
    if any(p.suffix.lower() in IMAGE_EXTS for p in Path(args.data_root).rglob("*")):
        return  # the user's data, never mixed with the sample
    args.data_root = str(SAMPLE)
    args.notes.append("Dataset/ is empty: trained on the bundled sample (samples/faces, 100 real + 100 fake, for "
                      "trying the pipeline, not for judging a model); put your data in Dataset/, see Dataset/README.md")
    print(f"note: {args.notes[-1]}")


_held = {}  # run folder -> its open lock file, for as long as this process lives

# What a run (or an evaluation) writes besides checkpoints/: removed when --overwrite replaces it, or when
# --resume goes on training (written anew at the end), so that a folder never describes a model it does
# not hold, even after a Ctrl-C.
REPORT_FILES = ("summary.md", "metrics.json", "predictions.csv", "classification_report.txt", *report.PLOTS)
EVALUATION_FILES = ("args.json", "split.csv", *REPORT_FILES)  # everything an evaluation writes
RUN_FILES = (*EVALUATION_FILES, "history.csv", "checkpoints/last.pt", "checkpoints/best.pt")  # and a training
# The list of what this project wrote in a folder (and for which run): the only files --overwrite and
# --resume ever remove. A folder holds a run (or an evaluation) when it holds files of that list.
MANIFEST = "written_by_main.json"
WRITER = "main.py of the deepfake face-image detector"


def hold_output_dir(out):
    """Lock the run folder for this process's lifetime: a second process writing into it at the same
    time is refused. The operating system drops the lock when the process ends, killed or not."""
    out.mkdir(parents=True, exist_ok=True)
    key = str(out.resolve())
    if key in _held:  # this process holds it already (main() called again, as the tests do)
        return
    handle = open(out / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        sys.exit(f"error: another run or evaluation is using {out} (process {handle.read().strip() or '?'}); wait "
                 f"for it to end or pick another --output_dir")
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    _held[key] = handle  # kept open: closing it would release the lock


def run_identity(ckpt):
    """The id of the run a checkpoint belongs to: the one it was made with, or for a checkpoint from before
    ids, a digest of its first epoch (no two runs share their first epoch's losses)."""
    run_id = ckpt.get("args", {}).get("run_id")
    if run_id:
        return run_id
    first = ckpt.get("history") or [ckpt.get("args", {})]
    return "before-ids-" + hashlib.sha1(json.dumps(first[0], sort_keys=True, default=str).encode()).hexdigest()[:16]


def manifest_of(folder):
    """folder's manifest as a dict if this project wrote it (files, run_id), else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and manifest.get("written_by") == WRITER
    return manifest if ok and isinstance(manifest.get("files"), list) and "run_id" in manifest else None


def written_here(folder):
    """(the files this project wrote in folder that are still there, relative paths; the id of their run or
    None). From the folder's manifest; a run from before manifests is known by its checkpoints, and then
    only the files a run writes count as its own."""
    manifest = manifest_of(folder)
    if manifest is not None:
        # only names this project writes: a manifest copied or edited elsewhere can claim nothing else
        files, run_id = [f for f in manifest["files"] if f in RUN_FILES], manifest["run_id"]
    else:  # none, or not ours
        if folder.name == "evaluation":  # an evaluation from before manifests: its run's folder knows it
            ours, run_id = written_here(folder.parent)
            return [f.split("/", 1)[1] for f in ours if f.startswith("evaluation/")], run_id
        checkpoints = [p for p in (folder / "checkpoints" / n for n in ("last.pt", "best.pt")) if p.is_file()]
        if not checkpoints:
            return [], None
        try:
            run_id = run_identity(engine.load_checkpoint(checkpoints[0]))
        except engine.CheckpointError:
            return [], None  # a user's file of that name: not a run of ours
        files = [*RUN_FILES, *(f"evaluation/{f}" for f in EVALUATION_FILES)]  # what such a run wrote, by name
    ours = [f for f in files if (folder / f).is_file()]
    if (folder / "evaluation" / MANIFEST).is_file():  # an evaluation of the run, with its own manifest
        ours += [f"evaluation/{f}" for f in written_here(folder / "evaluation")[0] + [MANIFEST]]
    return ours, run_id


def prepare_output(args, ckpt_path, write=True):
    """The output folder, locked and checked; returns (folder, what of ours to remove before writing).

    Refuses a folder holding files this project did not write under the names it writes (it would write
    over them), a finished run or evaluation unless --overwrite, and a resume into a folder that holds
    another run. Removes nothing: main() calls start_output() once every check that can refuse (the data,
    the split) has passed. An evaluation also holds the lock of the run whose checkpoint it scores, so it
    never reads a best.pt that a training is rewriting. write=False (torchrun's ranks > 0) locks nothing."""
    run = Path(args.output_dir)
    out = run / ("evaluation" if args.evaluate_only else "")
    for folder in (run, out):
        if folder.exists() and not folder.is_dir():
            sys.exit(f"error: --output_dir {folder} is a file, not a folder; pick another --output_dir")
    if write:
        hold_output_dir(out)
        if args.evaluate_only and ckpt_path is not None and ckpt_path.parent.name == "checkpoints":
            try:
                hold_output_dir(ckpt_path.parent.parent)  # the run that wrote it: not while it trains
            except OSError:
                pass  # a folder we may not write to (someone else's checkpoints): no training of ours writes there
    ours, owner = written_here(out)
    planned = EVALUATION_FILES if args.evaluate_only else RUN_FILES
    theirs = [f for f in planned if (out / f).exists() and f not in ours]
    theirs += [MANIFEST] if (out / MANIFEST).exists() and manifest_of(out) is None else []
    if theirs:
        sys.exit(f"error: {out} holds {', '.join(theirs)}, which this project did not write, and a run would write "
                 f"over {'it' if len(theirs) == 1 else 'them'}: move {'it' if len(theirs) == 1 else 'them'} "
                 f"elsewhere or pick another --output_dir")
    # A folder holds a run (or an evaluation) once it holds a checkpoint or a report: what a run that stopped
    # before its first epoch left (args.json, split.csv) is replaced without asking.
    holds = any(f not in ("args.json", "split.csv") for f in ours)
    if args.evaluate_only:
        if holds and not args.overwrite:
            sys.exit(f"{out} already holds an evaluation; pass --overwrite to replace it")
        return out, ours
    if args.resume is None or owner not in (None, args.run_id):
        if holds and not args.overwrite:
            sys.exit(f"{out} already holds a run; continue it with --resume, pick another --output_dir, or replace "
                     f"it with --overwrite" if args.resume is None else
                     f"error: {out} holds another run than the checkpoint {ckpt_path} (a copy, or a run trained "
                     f"there since); resume into another --output_dir, or replace that run with --overwrite")
        return out, ours
    return out, [f for f in ours if f in REPORT_FILES]  # the same run goes on: its report is written anew


def start_output(args, out, stale, ckpt_path):
    """Once nothing can refuse any more: remove what prepare_output() found stale (files this project wrote,
    nothing else), keep the best checkpoint of a run resumed into a new folder, and record in the manifest
    what this run writes."""
    why = ("replacing the evaluation in" if args.evaluate_only else
           "training goes on, the report is written anew when it ends in" if args.resume is not None and
           set(stale) <= set(REPORT_FILES) else "replacing the run in")
    remove(out, stale, f"{why} {out}")
    for folder in (out / "evaluation", out / "checkpoints"):  # a folder of ours left empty (but its lock) goes too
        if (folder.is_dir() and any(f.startswith(folder.name + "/") for f in stale)
                and {p.name for p in folder.iterdir()} <= {".lock"}):
            (folder / ".lock").unlink(missing_ok=True)
            folder.rmdir()
    best = out / "checkpoints" / "best.pt"
    if args.resume is not None and not best.exists() and (ckpt_path.parent / "best.pt").exists():
        best.parent.mkdir(parents=True, exist_ok=True)  # resumed into a new folder: keep the best so far
        shutil.copy2(ckpt_path.parent / "best.pt", best)
    planned = EVALUATION_FILES if args.evaluate_only else RUN_FILES
    report.write_json({"written_by": WRITER, "run_id": args.run_id, "files": list(planned)}, out / MANIFEST)


def remove(folder, names, why):
    """Delete files this project wrote in folder (relative names), saying so once."""
    names = [n for n in names if (folder / n).is_file()]
    for n in names:
        (folder / n).unlink()
    if names:
        print(f"note: {why}: removed {', '.join(names)}")


def single_process_only(args, dist):
    """What a torchrun run cannot do, said before anything starts."""
    if dist.on and args.balance == "sampler":
        sys.exit("error: --balance sampler weighs one process's view of the data; under torchrun use "
                 "--balance oversample")
    if dist.on and args.pseudo_fakes != "none":
        sys.exit("error: --pseudo_fakes keeps each real image and its pseudo-fake in one batch, which torchrun's "
                 "DistributedSampler does not; run it in one process (python main.py)")
    if dist.on and args.unfreeze_at:
        sys.exit("error: --unfreeze_at changes which parameters train mid-run, which DistributedDataParallel "
                 "cannot follow; run it in one process (python main.py)")
