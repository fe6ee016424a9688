"""Compare backbones fairly: same split, seed, decoded images and input size; one table.

    python compare.py --models resnet18,mobilenet_v3_large,efficientnet_b0 \\
        --data_root ../shared/data/faces140k --weights none --epochs 2 --max_per_class 150
    python compare.py --models resnet18,convnext_tiny --data_root Dataset --epochs 5 --overwrite

Every flag except --models is main.py's and is passed to each run unchanged, with
--model NAME and --output_dir <output_dir>/compare/NAME added. --image_size defaults
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
import json
import resource
import subprocess
import sys
from pathlib import Path

import main  # imports report.py, which sets matplotlib's file-only backend before pyplot loads
import matplotlib.pyplot as plt

FAIR_IMAGE_SIZE = 224


def peak_rss_mib():
    """This process's peak resident memory. On Linux read VmHWM: ru_maxrss survives exec, so a
    child started by a big parent (pytest, a notebook) would report the parent's peak instead."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux (bytes on macOS)


def child(argv):
    """Runs inside the subprocess: train and report one model, then record its peak memory."""
    import torch
    baseline = peak_rss_mib()  # after imports
    args = main.parse_args(argv)
    main.main(args)
    memory = {"peak_rss_mib": peak_rss_mib(), "baseline_rss_mib": baseline}
    if torch.cuda.is_available():
        memory["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    (Path(args.output_dir) / "memory.json").write_text(json.dumps(memory, indent=2))


def last_message(log_text):
    """The last meaningful line of a run's output: the error message or exception."""
    lines = [ln.strip() for ln in log_text.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or ln.startswith(("Traceback", "Killed"))]
    return (errors or lines or ["no output"])[-1][:300]


def count_parameters(name, image_size):
    from model import DeepfakeDetector
    return sum(p.numel() for p in DeepfakeDetector(name, "none", image_size=image_size).parameters())


def run_model(name, argv, out):
    """Train and test one model in its own process; returns its table row (with "error" if it failed).

    A subprocess, not a function call: a model that crashes or runs out of memory loses only
    its own row, and getrusage's peak resident memory then belongs to that model alone.
    """
    folder = out / "compare" / name
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *argv, "--model", name,
           "--output_dir", str(folder)]
    print(f"== {name}: training, output in {folder / 'train.log'}", flush=True)
    with open(folder / "train.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        why = last_message((folder / "train.log").read_text(errors="replace"))
        print(f"   failed (exit code {rc}): {why}")
        return {"model": name, "error": f"exit code {rc}: {why}"}
    row = read_row(name, folder)
    print(f"   accuracy {row['accuracy']:.4f}  F1 {row['f1']:.4f}  ROC-AUC {row['roc_auc']:.4f}  "
          f"{row['train_s']:.0f} s  {row['infer_img_s']:.1f} img/s  {row['memory_mib']:.0f} MiB")
    return row


def read_row(name, folder):
    """One table row from the files a finished run left in its folder."""
    metrics = json.loads((folder / "metrics.json").read_text())
    memory = json.loads((folder / "memory.json").read_text())
    with open(folder / "history.csv", newline="") as f:
        train_s = sum(float(r["epoch_s"]) for r in csv.DictReader(f))
    m = metrics["at_val_threshold"]
    return {"model": name, "accuracy": m["accuracy"], "f1": m["f1"], "roc_auc": m["roc_auc"],
            "params_m": count_parameters(name, metrics["checkpoint_args"]["image_size"]) / 1e6,
            "train_s": train_s, "infer_img_s": metrics["inference_img_s"],
            "memory_mib": memory.get("cuda_peak_mib", memory["peak_rss_mib"] - memory["baseline_rss_mib"]),
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
    if not any(a.split("=")[0] == "--image_size" for a in argv):
        argv = [*argv, "--image_size", str(FAIR_IMAGE_SIZE)]
    args = main.parse_args(argv)  # check the shared flags once, before any model trains
    out = Path(args.output_dir)
    md, png = out / "model_comparison.md", out / "model_comparison.png"
    if md.exists() and not args.overwrite:
        sys.exit(f"{md} already holds a comparison; pass --overwrite to replace it (and the runs "
                 f"in {out / 'compare'}), or pick another --output_dir")
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_model(name, argv, out) for name in models]
    import torch
    memory_note = ("torch.cuda.max_memory_allocated of each run" if torch.cuda.is_available() else
                   "growth of the training process's peak resident memory (VmHWM, one "
                   "subprocess per model) over the same process right after importing torch; "
                   "data-loading worker processes not included")
    write_markdown(rows, md, "python " + " ".join(["compare.py", "--models", ",".join(models), *argv]), memory_note)
    if any("error" not in r for r in rows):
        plot(rows, png)
    print(f"wrote {md} and {png}")
    return rows


def parse_args(argv=None):
    """compare.py's own flag; everything else is left for main.py's parser."""
    parser = argparse.ArgumentParser(description="Compare backbones on one split; other flags: python main.py -h")
    parser.add_argument("--models", default="resnet18,mobilenet_v3_large,efficientnet_b0",
                        help="comma-separated backbones, see main.py --model "
                        "(default: resnet18,mobilenet_v3_large,efficientnet_b0)")
    ours, rest = parser.parse_known_args(argv)
    return [m.strip() for m in ours.models.split(",") if m.strip()], rest


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        compare(*parse_args())
