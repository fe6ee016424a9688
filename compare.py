"""Compare training runs fairly: backbones on one split, or training recipes over several seeds.

    python compare.py --models resnet18,mobilenet_v3_large,efficientnet_b0 \\
        --data_root ../shared/data/faces140k --weights none --epochs 2 --max_per_class 150
    python compare.py --models resnet18,convnext_tiny --data_root Dataset --epochs 5 --overwrite
    python compare.py --recipes experiments/from_scratch.txt --seeds 0 1 2 \\
        --data_root ../shared/data/faces140k --weights none --output_dir results/from_scratch

--recipes FILE holds one `name: main.py flags` per line. Every recipe runs once per --seed
(the seed sets the split, the initial weights and the batches), each in its own folder
<output_dir>/recipes/<name>/seed<k>/, and <output_dir>/<FILE's name>.md tabulates validation and test ROC-AUC
as mean +/- std over the seeds, --test_sets AUCs, training minutes and img/s. Pick a recipe
by its validation AUC: the test column is the report, not a knob. Started again with the same
flags (after a stop, or with more recipes or seeds), it keeps the runs that finished.

Every flag except --models is main.py's and is passed to each `python main.py` run
unchanged, with --model NAME and --output_dir <output_dir>/compare/NAME added. --image_size defaults
to 224 for every model (not each model's own preset: efficientnet_v2_s would get 384,
which is no fair race), so all models read the same cached pixels.

Writes <output_dir>/model_comparison.md and .png: test accuracy, F1, ROC-AUC (at the
threshold chosen on val), parameters, training time (sum of the epochs' train + val
time), inference images/s on the test split, and peak memory. Each model's full
report stays in its own folder, with the run's output in train.log.
"""
import argparse
import csv
import hashlib
import itertools
import json
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never windows
import matplotlib.pyplot as plt

import engine
from model import check_name

FAIR_IMAGE_SIZE = 224
QUALITY = 0.90  # time to quality: the minutes of training until validation ROC-AUC first reached this
UNSEEN_MEAN = "unseen mean"  # the mean ROC-AUC over the --test_sets columns: data the model never trained on
MAIN = Path(__file__).resolve().with_name("main.py")


def last_message(log_text):
    """The last meaningful line of a run's output: the error message or exception."""
    lines = [ln.strip() for ln in log_text.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or ln.startswith(("Traceback", "Killed"))]
    return (errors or lines or ["no output"])[-1][:300]


def bare_torch_memory_mib():
    """Peak resident memory of a Python process that only imports torch and torchvision."""
    code = "import torch, torchvision, utils; print(utils.peak_memory_mib())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=MAIN.parent)
    return float(done.stdout.strip() or 0)


def without_overwrite(flags):
    """The flags that decide a run's result: --overwrite only lets it replace an earlier one."""
    return [f for f in flags if f != "--overwrite"]


def finished(argv, folder):
    """True if `folder` holds a completed run of exactly these flags (a grid started again after a stop
    keeps its finished runs; delete a folder to run it anew)."""
    command, metrics = folder / "command.json", folder / "metrics.json"
    if not (command.is_file() and metrics.is_file() and metrics.stat().st_mtime >= command.stat().st_mtime):
        return False
    if without_overwrite(json.loads(command.read_text())) != without_overwrite(argv):
        return False
    print(f"== {' '.join(argv)}: kept the finished run in {folder} (delete it to run it again)")
    return True


def run_main(argv, folder):
    """python main.py ARGV --output_dir FOLDER, its output in FOLDER/train.log; None, or why it failed.

    A subprocess, not a function call: a run that crashes or runs out of memory loses only its
    own row, and the peak memory main.py records then belongs to that run alone."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "command.json").write_text(json.dumps(argv))  # what finished() compares a later grid's flags with
    print(f"== {' '.join(argv)}: output in {folder / 'train.log'}", flush=True)
    with open(folder / "train.log", "w") as log:
        rc = subprocess.run([sys.executable, str(MAIN), *argv, "--output_dir", str(folder)],
                            stdout=log, stderr=subprocess.STDOUT).returncode
    if rc == 0:
        return None
    why = f"exit code {rc}: {last_message((folder / 'train.log').read_text(errors='replace'))}"
    print(f"   failed ({why})")
    if rc == 2:  # argparse: a shared flag is wrong, and would be wrong for every run
        sys.exit(f"error: main.py refused the flags: {why.split(': ', 1)[1]}")
    return why


def run_model(name, argv, out):
    """Train and test one model with main.py; returns its table row (with "error" if it failed)."""
    folder = out / "compare" / name
    error = run_main([*argv, "--model", name], folder)
    if error:
        return {"model": name, "error": error}
    row = read_row(name, folder)
    print(f"   accuracy {row['accuracy']:.4f}  F1 {row['f1']:.4f}  ROC-AUC {row['roc_auc']:.4f}  "
          f"{row['train_s']:.0f} s  {row['infer_img_s']:.1f} img/s  {row['peak_mib']:.0f} MiB")
    return row


def read_row(name, folder):
    """One table row from the files a finished run left in its folder."""
    metrics = json.loads((folder / "metrics.json").read_text())
    with open(folder / "history.csv", newline="") as f:
        train_s = sum(float(r["epoch_s"]) for r in csv.DictReader(f))
    model = engine.load_detector(folder / "checkpoints" / "best.pt", "cpu", "fp32").model
    m = metrics["at_val_threshold"]
    return {"model": name, "accuracy": m["accuracy"], "f1": m["f1"], "roc_auc": m["roc_auc"],
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "train_s": train_s, "infer_img_s": metrics["inference_img_s"], "peak_mib": metrics["peak_memory_mib"],
            "split_sha1": hashlib.sha1((folder / "split.csv").read_bytes()).hexdigest()}


def write_markdown(rows, path, command, memory_note):
    ok = [r for r in rows if "error" not in r]
    same_split = len({r["split_sha1"] for r in ok}) <= 1
    lines = ["# Model comparison", "", f"Command: `{command}`", "",
             "| model | test accuracy | F1 | ROC-AUC | parameters (M) | training time (s) | "
             "inference (img/s) | peak memory (MiB) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error'].replace('|', '/')} | | | | | | |")
        else:
            lines.append(f"| {r['model']} | {r['accuracy']:.4f} | {r['f1']:.4f} | {r['roc_auc']:.4f} | "
                         f"{r['params_m']:.1f} | {r['train_s']:.0f} | {r['infer_img_s']:.1f} | "
                         f"{r['memory_mib']:.0f} |")
    lines += ["", "Metrics are on the test split at the threshold chosen on val (the EER point). "
              "Training time sums the epochs' train + validation time; inference is the test pass "
              "(batch as trained, same precision).",
              f"Peak memory: {memory_note}",
              f"Same data split for every model (identical split.csv): {'yes' if same_split else 'NO'}.",
              "", "![comparison](model_comparison.png)", ""]
    path.write_text("\n".join(lines))


def plot(rows, path):
    """Four panels of bars: quality, training time, inference speed, memory; failed models marked."""
    names = [f"{r['model']}\n{r['params_m']:.1f}M" if "error" not in r else f"{r['model']}\n(failed)" for r in rows]
    x = range(len(rows))
    get = lambda key: [r.get(key, 0.0) for r in rows]  # noqa: E731  (failed rows draw no bar)
    fig, axes = plt.subplots(1, 4, figsize=(4.2 * 4, 4.4))
    for i, (key, label) in enumerate((("accuracy", "accuracy"), ("f1", "F1"), ("roc_auc", "ROC-AUC"))):
        axes[0].bar([xi + (i - 1) * 0.27 for xi in x], get(key), 0.27, label=label)
    axes[0].set(title="test quality (higher is better)", ylim=(0, 1.2), yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes[0].legend(loc="upper center", ncols=3, fontsize=8)
    for ax, key, title in ((axes[1], "train_s", "training time, s (lower is better)"),
                           (axes[2], "infer_img_s", "inference, images/s (higher is better)"),
                           (axes[3], "memory_mib", "peak memory, MiB (lower is better)")):
        bars = ax.bar(x, get(key), color="tab:gray")
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title)
    for ax in axes:
        ax.set_xticks(list(x), names, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(models, argv):
    """Train every model with the same main.py flags; write the table and the figure. Returns the rows."""
    shared, _ = shared_flags().parse_known_args(argv)
    if shared.image_size is None:
        argv = [*argv, "--image_size", str(FAIR_IMAGE_SIZE)]
    out = Path(shared.output_dir)
    md, png = out / "model_comparison.md", out / "model_comparison.png"
    if md.exists() and not shared.overwrite:
        sys.exit(f"{md} already holds a comparison; pass --overwrite to replace it (and the runs "
                 f"in {out / 'compare'}), or pick another --output_dir")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in models:
        try:
            check_name(name)
        except ValueError as e:
            print(f"== {name}: not a model of model.py, skipped")
            rows.append({"model": name, "error": str(e)})
            continue
        rows.append(run_model(name, argv, out))
    import torch
    bare = bare_torch_memory_mib()
    for r in rows:
        if "peak_mib" in r:  # on a GPU main.py records CUDA allocations, on a CPU resident memory
            r["memory_mib"] = r["peak_mib"] - (0 if torch.cuda.is_available() else bare)
    memory_note = ("torch.cuda.max_memory_allocated of each run" if torch.cuda.is_available() else
                   f"growth of the training process's peak resident memory (VmHWM, one process per model) "
                   f"over a process that only imports torch ({bare:.0f} MiB); data-loading workers not included")
    write_markdown(rows, md, "python " + " ".join(["compare.py", "--models", ",".join(models), *argv]), memory_note)
    if any("error" not in r for r in rows):
        plot(rows, png)
    print(f"wrote {md} and {png}")
    return rows


RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # it names a folder: no path separators


def read_recipes(path):
    """{name: [main.py flags]} from lines `name: flags` ('#' starts a comment). A bad file stops
    with one line naming the line: no colon, a name that is no plain folder name, a name used
    twice, an unclosed quote, or no recipe at all."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        sys.exit(f"error: {path}: cannot read the recipes file ({e.strerror})")
    recipes = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, colon, flags = (part.strip() for part in line.partition(":"))
        where = f"error: {path}, line {number}"
        if not colon:
            sys.exit(f"{where}: expected 'name: main.py flags', got {line!r}")
        if not RECIPE_NAME.fullmatch(name):
            sys.exit(f"{where}: recipe name {name!r} names a folder: use letters, digits and _ . + -")
        if name in recipes:
            sys.exit(f"{where}: recipe {name!r} is already defined above")
        try:
            recipes[name] = shlex.split(flags)
        except ValueError as e:  # shlex: "No closing quotation"
            sys.exit(f"{where}: {e}")
    if not recipes:
        sys.exit(f"error: {path}: no recipes in it (one 'name: main.py flags' per line)")
    return recipes


def mean_std(values):
    values = [v for v in values if v is not None and v == v]  # drop NaN and null (JSON's NaN)
    if not values:
        return "-"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 \
        else f"{values[0]:.4f}"


def reached(runs):
    """'mean minutes (k of n seeds)' until validation AUC first reached QUALITY; '-' if no seed did."""
    times = [r["to_quality"] for r in runs if r["to_quality"] is not None]
    return f"{statistics.mean(times):.1f} ({len(times)} of {len(runs)})" if times else "-"


def beyond_training_columns(test_sets):
    """({column: ROC-AUC}, {column: share of reals called fake}) of a run's --test_sets rows: every labelled
    folder, and every fake-only folder against the test reals and against the real-only folders named (pooled).
    The other pairings (each real-only folder alone) stay in the run's summary.md, to keep the table narrow."""
    rows = [r for r in test_sets[1:] if "error" not in r]
    named_fakes = {r["name"] for r in rows if r.get("kind") == "fakes"}
    named_reals = [r["name"] for r in rows if r.get("kind") == "reals"]
    pooled = "+".join(named_reals)
    aucs, false_alarms = {}, {}
    for r in rows:
        if r.get("kind") in ("labelled", None) and r.get("roc_auc") is not None:  # None: before pairing existed
            aucs[r["name"]] = r["roc_auc"]
        elif r.get("kind") == "pair" and r["fakes"] in named_fakes and r["reals"] in ("test reals", pooled):
            aucs[r["name"]] = r["roc_auc"]
            if r["reals"] == pooled:
                false_alarms[f"{pooled} called fake"] = r["reals_called_fake"]
    return aucs, false_alarms


def recipe_row(folder):
    """What one finished recipe run left: val/test AUC, the AUCs beyond its training data and their mean,
    minutes, img/s."""
    metrics = json.loads((folder / "metrics.json").read_text())
    with open(folder / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    best = history[metrics["best_epoch"] - 1]
    elapsed = itertools.accumulate(float(h["epoch_s"]) / 60 for h in history)
    hits = [m for h, m in zip(history, elapsed) if float(h["val_auc"]) >= QUALITY]
    aucs, false_alarms = beyond_training_columns(metrics.get("test_sets", []))
    known = [v for v in aucs.values() if v is not None and v == v]
    return {"val_auc": float(best["val_auc"]), "test_auc": metrics["at_val_threshold"]["roc_auc"],
            "to_quality": hits[0] if hits else None,  # None: validation never reached QUALITY
            "sets": {**aucs, UNSEEN_MEAN: statistics.mean(known) if known else float("nan")},
            "called_fake": false_alarms,
            "minutes": sum(float(h["epoch_s"]) for h in history) / 60,
            "img_s": statistics.mean(float(h["train_img_s"]) for h in history)}


def compare_recipes(recipes_file, seeds, argv):
    """Run every recipe once per seed; write <recipes file name>.md (mean +/- std over seeds). Returns the rows."""
    recipes = read_recipes(recipes_file)  # a bad line stops here, before any run
    shared, _ = shared_flags().parse_known_args(argv)
    out = Path(shared.output_dir)
    md = out / f"{Path(recipes_file).stem}.md"  # several recipe files can share one output folder and its runs
    if md.exists() and not shared.overwrite:
        sys.exit(f"{md} already holds a comparison; pass --overwrite to replace it, or pick another --output_dir")
    rows = {}
    for name, flags in recipes.items():
        runs = []
        for seed in seeds:
            folder = out / "recipes" / name / f"seed{seed}"
            run_argv = [*argv, *flags, "--seed", str(seed)]
            error = None if finished(run_argv, folder) else run_main(run_argv, folder)
            runs.append({"error": error} if error else recipe_row(folder))
        rows[name] = {"flags": " ".join(flags), "runs": runs}
        ok = [r for r in runs if "error" not in r]
        unseen = [r["sets"][UNSEEN_MEAN] for r in ok if UNSEEN_MEAN in r["sets"]]
        print(f"   {name}: test ROC-AUC {mean_std([r['test_auc'] for r in ok])}"
              + (f", {UNSEEN_MEAN} {mean_std(unseen)}" if unseen else "") + f" over {len(ok)} seed(s)")
    ok_runs = [r for row in rows.values() for r in row["runs"] if "error" not in r]
    sets = list(dict.fromkeys(s for r in ok_runs for s in r["sets"] if s != UNSEEN_MEAN))
    sets += [UNSEEN_MEAN] if sets else []
    alarms = list(dict.fromkeys(c for r in ok_runs for c in r["called_fake"]))
    lines = ["# Training recipes", "", f"Command: `python compare.py --recipes {recipes_file} --seeds "
             f"{' '.join(map(str, seeds))} {' '.join(argv)}`", "",
             "| recipe | flags | val ROC-AUC | test ROC-AUC | " + "".join(f"{s} ROC-AUC | " for s in sets)
             + "".join(f"{c} | " for c in alarms)
             + f"minutes to val AUC {QUALITY} | training minutes | train img/s | seeds |",
             "| --- | --- | --- | --- | " + "--- | " * (len(sets) + len(alarms)) + "--- | --- | --- | --- |"]
    for name, row in rows.items():
        ok = [r for r in row["runs"] if "error" not in r]
        failed = "; ".join(r["error"] for r in row["runs"] if "error" in r).replace("|", "/")
        cells = [name, f"`{row['flags']}`", mean_std([r["val_auc"] for r in ok]), mean_std([r["test_auc"] for r in ok]),
                 *(mean_std([r["sets"].get(s, float("nan")) for r in ok]) for s in sets),
                 *(mean_std([r["called_fake"].get(c, float("nan")) for r in ok]) for c in alarms),
                 reached(ok),
                 f"{statistics.mean(r['minutes'] for r in ok):.1f}" if ok else "-",
                 f"{statistics.mean(r['img_s'] for r in ok):.1f}" if ok else "-",
                 f"{len(ok)}" + (f" (failed: {failed})" if failed else "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± standard deviation over the seeds; each seed has its own split, initial weights and "
              "batches. Validation AUC is the best epoch's (the one kept); test AUC is that checkpoint on the test "
              "split, at the threshold chosen on validation. Choose by validation, report test. The --test_sets "
              "columns are folders the model never trained on (a fake-only folder ranked against the test reals "
              f"and against the real-only folders named, pooled); {UNSEEN_MEAN} is their mean per run. Once recipes "
              "are chosen by them, they are validation for that choice, no longer a test. \"called fake\": the "
              "share of those reals called fake at the stored threshold. Minutes to val AUC: "
              f"training time (train + validation) until the first epoch whose validation ROC-AUC >= {QUALITY}, "
              "averaged over the seeds that got there.", ""]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines))
    print(f"wrote {md}")
    return rows


def shared_flags():
    """The few main.py flags compare.py itself needs; main.py checks all of them."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_dir", default="results")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--image_size", default=None)
    return parser


def get_args_parser():
    """compare.py's own flags; every other flag is passed to main.py."""
    parser = argparse.ArgumentParser(description="Compare backbones on one split, or recipes over seeds; "
                                     "other flags go to main.py (python main.py -h)")
    parser.add_argument("--models", default="resnet18,mobilenet_v3_large,efficientnet_b0",
                        help="comma-separated backbones, see main.py --model "
                        "(default: resnet18,mobilenet_v3_large,efficientnet_b0)")
    parser.add_argument("--recipes", default=None, metavar="FILE", help="compare the recipes in FILE "
                        "(`name: main.py flags` per line) instead of backbones (default: off)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="with --recipes: one run per seed (default: 0 1 2)")
    return parser


def parse_args(argv=None):
    """(models, main.py flags) for a backbone comparison."""
    ours, rest = get_args_parser().parse_known_args(argv)
    return [m.strip() for m in ours.models.split(",") if m.strip()], rest


if __name__ == "__main__":
    ours, rest = get_args_parser().parse_known_args()
    if ours.recipes:
        compare_recipes(ours.recipes, ours.seeds, rest)
    else:
        compare(*parse_args())
