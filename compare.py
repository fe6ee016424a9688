"""Compare training runs fairly: backbones on one split, or training recipes over several seeds.

    python compare.py --models resnet18,mobilenet_v3_large,efficientnet_b0 \\
        --data_root ../shared/data/faces140k --weights none --epochs 2 --max_per_class 150
    python compare.py --models resnet18,convnext_tiny --data_root Dataset --epochs 5 --overwrite
    python compare.py --recipes experiments/from_scratch.txt --seeds 0 1 2 \\
        --data_root ../shared/data/faces140k --weights none --output_dir results/from_scratch

--recipes FILE: recipes.py runs every `name: main.py flags` line of FILE once per --seed and
tabulates them (its docstring says how).

--models: every flag except --models is main.py's and is passed to each `python main.py` run
unchanged, with --model NAME and --output_dir <output_dir>/compare/NAME added. --image_size defaults
to 224 for every model (not each model's own preset: efficientnet_v2_s would get 384,
which is no fair race), so all models read the same cached pixels. Every flag is checked by
main.py's parser before the first run.

Writes <output_dir>/model_comparison.md and .png: test accuracy, F1, ROC-AUC (at the
threshold chosen on val), parameters, training time (sum of the epochs' train + val
time), inference images/s on the test split, and peak memory. Each model's full
report stays in its own folder, with the run's output in train.log.
"""
import argparse
import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never windows
import matplotlib.pyplot as plt

import engine
from cli import at_least, interruptible
from model import check_name
from recipes import MAIN, compare_recipes, refused_flags, run_main, shared_flags

FAIR_IMAGE_SIZE = 224


def bare_torch_memory_mib():
    """Peak resident memory of a Python process that only imports torch and torchvision."""
    code = "import torch, torchvision, utils; print(utils.peak_memory_mib())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=MAIN.parent)
    return float(done.stdout.strip() or 0)


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
    refused = refused_flags([[*argv, "--model", "resnet18"]])[0]
    if refused:  # a shared flag is wrong for every model: stop before the first run
        sys.exit(f"error: main.py refused the flags: {refused}")
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


def get_args_parser():
    """compare.py's own flags; every other flag is passed to main.py."""
    parser = argparse.ArgumentParser(description="Compare backbones on one split, or recipes over seeds; "
                                     "other flags go to main.py (python main.py -h)")
    parser.add_argument("--models", default="resnet18,mobilenet_v3_large,efficientnet_b0",
                        help="comma-separated backbones, see main.py --model "
                        "(default: resnet18,mobilenet_v3_large,efficientnet_b0)")
    parser.add_argument("--recipes", default=None, metavar="FILE", help="compare the recipes in FILE "
                        "(`name: main.py flags` per line) instead of backbones (default: off)")
    parser.add_argument("--seeds", type=at_least(int, 0, maximum=2**32 - 1), nargs="+", default=[0, 1, 2],
                        help="with --recipes: one run per seed (default: 0 1 2)")
    parser.add_argument("--groups", nargs="+", default=[], metavar="NAME=SET,SET",
                        help="with --recipes: a 'NAME mean' column per group of --test_sets names, e.g. gan=sg3 "
                        "diffusion=sd14 swaps=dfdc,videos, so that one kind of fake's failure is not averaged "
                        "away by another's success (default: none, only the unseen mean of all)")
    return parser


def parse_args(argv=None):
    """(models, main.py flags) for a backbone comparison."""
    ours, rest = get_args_parser().parse_known_args(argv)
    return [m.strip() for m in ours.models.split(",") if m.strip()], rest


def main():
    ours, rest = get_args_parser().parse_known_args()
    if ours.recipes:
        groups = {}
        for item in ours.groups:
            name, eq, sets = item.partition("=")
            if not (name and eq and sets):
                sys.exit(f"error: --groups takes NAME=SET,SET items (e.g. diffusion=sd14), got {item!r}")
            groups[name] = sets.split(",")
        failed = [r for row in compare_recipes(ours.recipes, ours.seeds, rest, groups).values() for r in row["runs"]
                  if "error" in r]
    else:
        failed = [r for r in compare(*parse_args()) if "error" in r]
    if failed:  # the table has every row; the exit code says that some of them failed
        sys.exit(f"{len(failed)} run(s) failed: see the 'failed' cells of the table")


if __name__ == "__main__":
    # Ctrl-C: one line, no traceback; every finished row is in the table, and the same command again keeps
    # the finished runs and resumes the interrupted one
    interruptible(main)
