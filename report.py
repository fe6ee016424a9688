"""Metrics and the files a grader opens in results/.

Everything here is built from what the loops returned (history rows, labels,
P(fake) per image); nothing re-runs the model.
"""
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files, never open windows (servers, CI)
import matplotlib.pyplot as plt
import numpy as np
from sklearn import metrics as skm

from dataset import CLASSES  # label order: 0 real, 1 fake


def eer_threshold(labels, probs):
    """Threshold where false-positive and false-negative rates are equal, and that rate (the EER).

    Hand-written: scikit-learn gives the ROC curve but no EER function.
    """
    if len(np.unique(labels)) < 2:
        return 0.5, float("nan")
    fpr, tpr, thresholds = skm.roc_curve(labels, probs)
    fnr = 1 - tpr
    i = int(np.nanargmin(np.abs(fnr - fpr)))
    return float(np.clip(thresholds[i], 0.0, 1.0)), float((fpr[i] + fnr[i]) / 2)


def roc_auc(labels, probs):
    """ROC-AUC with fake as the positive class; nan when only one class is present."""
    return float(skm.roc_auc_score(labels, probs)) if len(np.unique(labels)) == 2 else float("nan")


def compute_metrics(labels, probs, threshold=0.5):
    """Accuracy, precision/recall/F1 of the fake class, ROC-AUC, AP and EER at `threshold`."""
    preds = (probs >= threshold).astype(int)
    both = len(np.unique(labels)) == 2  # AUC and EER need both classes present
    p, r, f1, _ = skm.precision_recall_fscore_support(labels, preds, average="binary", zero_division=0)
    return {
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(labels, preds)),
        "precision": float(p), "recall": float(r), "f1": float(f1),
        "roc_auc": roc_auc(labels, probs),
        "average_precision": float(skm.average_precision_score(labels, probs)) if both else float("nan"),
        "eer": eer_threshold(labels, probs)[1],
        "n_images": int(len(labels)),
    }


def write_predictions(paths, labels, probs, threshold, path):
    """predictions.csv: one row per scored image (its P(fake) and the call at the chosen threshold)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "fake_probability", "called"])
        for p, label, prob in zip(paths, labels, probs):
            w.writerow([p, CLASSES[int(label)], repr(float(prob)), CLASSES[int(prob >= threshold)]])


def write_history_csv(history, path):
    """history.csv: one row per epoch. The columns are every key any row has, in order of first use, so a
    run resumed after a new column was added writes its older rows with that column blank."""
    columns = list(dict.fromkeys(key for row in history for key in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(history)


# ---------------------------------------------------------------- plots
# Each plot draws from `run`, the dict evaluate.py builds: "history" (the epoch rows, empty for an
# evaluation), "labels" and "probs" (the scored split), "threshold", "split" (its name), "loss" (the
# loss's name). It returns False where the run lacks its numbers, and then draws nothing.

def plot_training_curves(run, path):
    """Train/val loss and accuracy per epoch, side by side."""
    history = run["history"]
    if not history:
        return False
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("loss", "acc")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", label="val")
        ax.set(xlabel="epoch", ylabel=key, title={"loss": run["loss"], "acc": "Accuracy"}[key])
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)


def plot_confusion_matrix(run, path):
    """Counts and row-normalised rates at the stored threshold, side by side."""
    labels, preds = run["labels"], (run["probs"] >= run["threshold"]).astype(int)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, norm, fmt in ((axes[0], None, "d"), (axes[1], "true", ".2f")):
        skm.ConfusionMatrixDisplay.from_predictions(labels, preds, labels=[0, 1], display_labels=CLASSES,
                                                    normalize=norm, values_format=fmt, cmap="Blues",
                                                    ax=ax, colorbar=False)
        ax.set_title("counts" if norm is None else "normalised by true class")
    fig.suptitle(f"{run['split']} split, threshold {run['threshold']:.3f} (n={len(labels)})")
    return save(fig, path)


def plot_roc(run, path):
    """ROC curve with AUC, and the precision-recall curve with AP (both classes needed)."""
    labels, probs = run["labels"], run["probs"]
    if len(np.unique(labels)) < 2:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    skm.RocCurveDisplay.from_predictions(labels, probs, name="detector", ax=axes[0], plot_chance_level=True)
    skm.PrecisionRecallDisplay.from_predictions(labels, probs, name="detector", ax=axes[1],
                                                plot_chance_level=True)
    axes[0].set_title("ROC (positive = fake)")
    axes[1].set_title("Precision-recall (positive = fake)")
    fig.suptitle(f"{run['split']} split (n={len(labels)})")
    return save(fig, path)


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# The pictures of a run, in the order summary.md shows them: file -> (title, how it is drawn). A new plot
# is a function above and a line here; evaluate.py draws them all and summary.md shows each file written.
# None: drawn elsewhere, from the model or the data (gradcam.py, sbi.py), and shown when present.
PLOTS = {
    "training_curves.png": ("Training curves", plot_training_curves),
    "confusion_matrix.png": ("Confusion matrix", plot_confusion_matrix),
    "roc_curve.png": ("ROC and precision-recall", plot_roc),
    "gradcam_examples.png": ("Grad-CAM examples", None),
    "pseudo_fakes.png": ("Pseudo-fakes (self-blends or reconstructions)", None),
}


def draw_plots(run, out):
    """Every plot of PLOTS that the run has numbers for. A plot that fails costs only itself: said once."""
    for file, (title, draw) in PLOTS.items():
        if draw is None:
            continue
        try:
            draw(run, Path(out) / file)
        except Exception as e:  # an extra picture must never cost the report
            plt.close("all")
            print(f"warning: {file} ({title}) not drawn: {type(e).__name__}: {e}")


def write_test_report(out, labels, probs, threshold, name="test"):
    """classification_report.txt; returns the metrics at 0.5 and at `threshold`."""
    at_half, at_thr = compute_metrics(labels, probs, 0.5), compute_metrics(labels, probs, threshold)
    text = []
    for m in (at_half, at_thr):
        preds = (probs >= m["threshold"]).astype(int)
        text.append(f"{name} split, threshold {m['threshold']:.4f} "
                    f"({'default' if m is at_half else 'chosen on val at the EER point'})\n"
                    + skm.classification_report(labels, preds, labels=[0, 1], target_names=CLASSES,
                                                digits=4, zero_division=0))
    (Path(out) / "classification_report.txt").write_text("\n".join(text))
    return {"at_0.5": at_half, "at_val_threshold": at_thr}


def write_summary(out, info):
    """summary.md: one page with the numbers, the data story and the pictures inline."""
    out = Path(out)
    m, t = info["metrics"]["at_val_threshold"], info["metrics"]["at_0.5"]
    lines = [f"# Deepfake detector: {info['title']}", ""]
    lines += [f"**Note:** {note}" for note in info.get("notes", [])] + ([""] if info.get("notes") else [])
    lines += [f"Command: `{info['command']}`", ""]
    lines += ["## Test metrics", "",
              "| threshold | accuracy | precision | recall | F1 | ROC-AUC | AP | EER |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row, label in ((t, "0.5"), (m, f"{m['threshold']:.3f} (val EER point)")):
        lines.append(f"| {label} | {row['accuracy']:.4f} | {row['precision']:.4f} | {row['recall']:.4f} | "
                     f"{row['f1']:.4f} | {row['roc_auc']:.4f} | {row['average_precision']:.4f} | "
                     f"{row['eer']:.4f} |")
    lines += ["", "Positive class = fake. Precision/recall/F1 are for the fake class; "
              "per-class numbers are in [classification_report.txt](classification_report.txt).", ""]
    if info.get("test_sets"):
        lines += beyond_training(info["test_sets"], m["threshold"], info.get("trained_on", ""))
    lines += ["## Data", ""] + [f"- {k}: {v}" for k, v in info["data"].items()] + [""]
    if info.get("training"):
        lines += ["## Training", ""] + [f"- {k}: {v}" for k, v in info["training"].items()] + [""]
    for image, (title, _) in PLOTS.items():
        if (out / image).is_file():
            lines += [f"## {title}", "", f"![{title}]({image})", ""]
    lines += ["## Files", "", "`metrics.json` (all numbers), `predictions.csv` (P(fake) of every test image), "
              "`history.csv` (per epoch), `args.json` (every flag), `split.csv` (which image went where), "
              "`checkpoints/` (last.pt, best.pt).", ""]
    (out / "summary.md").write_text("\n".join(lines))


def beyond_training(rows, threshold, trained_on):
    """The summary.md section on data the model never trained on: one row per --test_sets folder and per
    pairing of a one-kind folder with the other kind (evaluate.pair_rows)."""
    share = lambda row, key: "-" if row.get(key) is None else f"{row[key]:.3f}"  # noqa: E731
    lines = ["## Beyond its training data", "", f"{trained_on} Below: how it does on other folders. ROC-AUC is "
             "threshold-free and needs both kinds: a folder of one kind is ranked against the other kind (a "
             "fake-only folder against this run's test reals and against each real-only folder named; a real-only "
             "folder against the test fakes). The shares called fake are at the stored threshold "
             f"{threshold:.3f}, chosen on the in-domain validation split.", "",
             "| set | against | images (real / fake) | ROC-AUC | fakes called fake | reals called fake |",
             "| --- | --- | --- | --- | --- | --- |"]
    notes = []
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | not scored: {row['error']} | | | | |")
            continue
        name, against = (row["fakes"], row["reals"]) if row.get("kind") == "pair" else (row["name"], "itself")
        if row.get("kind") in ("fakes", "reals"):
            against = "(one kind: paired below)"
        elif row.get("kind") == "unlabelled":
            against = "(labels unknown: no ROC-AUC)"
        counts = f"{row['real']} / {row['fake']}" if row.get("real") is not None else \
            f"{row['n_images']} (unlabelled, called fake {row['called_fake']:.3f})"
        auc = f"{row['roc_auc']:.4f}" if row.get("roc_auc") is not None and row["roc_auc"] == row["roc_auc"] else "-"
        lines.append(f"| {name} | {against} | {counts} | {auc} | {share(row, 'fakes_called_fake')} | "
                     f"{share(row, 'reals_called_fake')} |")
        if row.get("unreadable"):
            notes.append(f"- {row['name']}: {row['unreadable']} unreadable skipped")
        if row.get("seen_in_training"):
            notes.append(f"- {row['name']}: **{row['seen_in_training']} in train/val**: its images are in this "
                         f"run's training or validation split, so it is not held out")
    return lines + [""] + notes + ([""] if notes else [])


def trained_on(data, root):
    """One plain sentence: what the model learned real and fake from."""
    ds = data.datasets["train"]
    train = ds.samples
    blends, extra = sum(s.pseudo for s in train), sum(s.extra for s in train)
    real, fake = sum(s.label == 0 for s in train), sum(s.label == 1 for s in train)
    return (f"The model trained on {real} real and {fake} fake images from `{root}`"
            + (f" ({blends} of the fakes {ds.blend.made} made from its reals)" if blends else "")
            + (f", {extra} of them from --train_extra folders" if extra else "") + ", and on nothing else.")


def data_story(data):
    """The facts about the data that belong in summary.md."""
    counts = {split: f"{len(ds)} ({sum(t == 0 for t in ds.targets)} real, {sum(t == 1 for t in ds.targets)} fake"
                     + (f", of which {sum(s.pseudo for s in ds.samples)} {ds.blend.made}" if ds.blend else "")
                     + (f", {ds.blend.no_face} of them from faces not found (a mask in the middle)"
                        if ds.blend and ds.blend.no_face else "") + ")"
              for split, ds in data.datasets.items()}
    story = {"layout": "pre-split folders" if data.presplit else "one pool, split here (stratified, grouped, seeded)",
             **{f"{k} images": v for k, v in counts.items()},
             "byte-identical duplicates found (kept in one split)": data.duplicates,
             "groups of several files (video frames or copies), each kept in one split": data.multi_file_groups,
             "unreadable files skipped": len(data.corrupt),
             "files in both real_data and fake_data, left out": len(data.conflicts)}
    extra = sum(s.extra for s in data.datasets["train"].samples)
    if extra:
        story["training images from --train_extra (training only)"] = extra
    extra_out = data.dropped_extra
    if extra_out.get("copies"):
        story["--train_extra copies of --data_root files, left out"] = (
            f"{extra_out['copies']} ({extra_out['copies_held_out']} of them copies of val/test images)")
    if extra_out.get("same_video_held_out"):
        story["--train_extra frames (or copies) of val/test videos, left out"] = extra_out["same_video_held_out"]
    if data.dropped_copies:
        story["val/test copies of train files removed"] = data.dropped_copies
    if data.corrupt:
        story["unreadable files"] = ", ".join(f"`{p}`" for p in list(data.corrupt)[:10])
    if data.conflicts:
        story["left out as both real and fake"] = ", ".join(f"`{p}`" for p in data.conflicts[:10])
    return story


def _json_safe(obj):
    """NaN (an AUC of a one-class set) -> None: JSON has no NaN, and null is what readers expect."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(obj, path):
    """Strict JSON (no NaN), anything else that is not JSON written as its str()."""
    Path(path).write_text(json.dumps(_json_safe(obj), indent=2, default=str, allow_nan=False) + "\n")
