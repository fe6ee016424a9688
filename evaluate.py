"""Scoring a trained detector: the test split, the extra --test_sets, and the report files.

main.py calls evaluate_and_report() after training and for --evaluate_only. Under torchrun
every process scores its share of the images and rank 0 writes the files.
"""
import sys
from pathlib import Path

import numpy as np

import dataset
import engine
import gradcam
import report
import runtime
import utils


def evaluate_and_report(args, detector, data, out, history, dist, record_in=None):
    """Score the test split (or every image) with a loaded detector; rank 0 writes every report file, and
    stores in the checkpoint file record_in (the one just trained) what it was validated on."""
    split = "test" if args.eval_split == "test" else "all"
    test = data.datasets["test"]
    ds = test if split == "test" else dataset.DeepfakeDataset(data.samples, test.transform, test.cache, test.size,
                                                              route=test.route)
    loader = engine.make_loader(ds, args.batch_size, args.workers, dist)
    runtime.choose_scorer(detector, args.runtime, len(ds))
    criterion = engine.make_criterion(detector.args)  # the loss it trained with
    te = engine.evaluate(detector.scorer, criterion, loader, detector.precision, desc=split)
    in_domain = {"name": f"{split} split (in-domain)", "path": args.data_root, "kind": "in-domain",
                 **report.compute_metrics(te["labels"], te["probs"], detector.threshold),
                 **class_counts(te["labels"]), **called_fake(te["labels"], te["probs"], detector.threshold)}
    test_sets = score_test_sets(args, detector, criterion, in_domain, te, data, dist)
    if not dist.main:
        return None
    if record_in is not None:  # predict.py and the web page say it beside every verdict
        engine.record_validation(record_in, engine.validation_record(in_domain, test_sets or [in_domain]))
    metrics = report.write_test_report(out, te["labels"], te["probs"], detector.threshold, split)
    report.draw_plots({"history": history, "labels": te["labels"], "probs": te["probs"], "split": split,
                       "threshold": detector.threshold, "loss": engine.loss_name(criterion)}, out)
    report.write_predictions([s.path for s in ds.samples], te["labels"], te["probs"], detector.threshold,
                             out / "predictions.csv")
    if len(ds):  # heatmaps of right and wrong calls; written before summary.md, which shows it
        gradcam.save_examples(detector.model, ds, te["probs"], te["labels"], detector.threshold,
                              out / "gradcam_examples.png", detector.precision.device)
    notes = args.notes  # with --evaluate_only these include what the checkpoint's run noted
    metrics.update(inference_img_s=te["img_s"], best_epoch=detector.epoch + 1,
                   checkpoint_args=detector.args, test_sets=test_sets, notes=notes,
                   weights=detector.args.get("weights"),
                   peak_memory_mib=utils.peak_memory_mib(detector.precision.device))
    report.write_json(metrics, out / "metrics.json")
    training = {"best epoch (by val ROC-AUC)": detector.epoch + 1, "epochs run": len(history),
                "training time": f"{sum(h['epoch_s'] for h in history) / 60:.1f} min",
                "machine": args.machine,
                "device / precision": str(detector.precision),
                "scored with": runtime.describe(detector),
                "inference speed on this split": f"{te['img_s']:.1f} img/s"} if history else None
    report.write_summary(out, {"title": f"{detector.args['model']} on {args.data_root}", "notes": notes,
                               "command": " ".join(["python", Path(sys.argv[0]).name, *sys.argv[1:]]),
                               "metrics": metrics, "data": report.data_story(data), "training": training,
                               "trained_on": report.trained_on(data, args.data_root),
                               "test_sets": test_sets})
    m = metrics["at_val_threshold"]
    print(f"{split}: accuracy {m['accuracy']:.4f}  F1 {m['f1']:.4f}  ROC-AUC {m['roc_auc']:.4f}  "
          f"EER {m['eer']:.4f} at threshold {detector.threshold:.3f}  ->  {out / 'summary.md'}")
    return metrics


def score_test_sets(args, detector, criterion, in_domain, test, data, dist):
    """Rows of the "beyond its training data" table: the in-domain test first, then every --test_sets
    folder, then its pairs. A folder of one kind has no ROC-AUC of its own, so it is ranked against the
    other kind: fakes against the run's own test reals and against every real-only folder named (one by
    one and pooled), reals against the test fakes (pair_rows). Each folder's row counts its unreadable
    files and its images that the run trained or validated on."""
    if not args.test_sets:
        return []
    rows, scored = [in_domain], {}
    seen = {s.digest for s in data.samples if s.split in ("train", "val") and s.digest}
    for name, path in (item.split("=", 1) for item in args.test_sets):
        try:
            with utils.main_rank_first(dist):
                ds, labelled, unreadable = dataset.prepare_test_set(path, detector.transform, detector.cache_size,
                                                                    args.cache_dir, args.workers, detector.route)
        except dataset.DatasetError as e:  # one bad folder: say so, score the others
            print(f"error: {e}")
            rows.append({"name": name, "path": path, "error": str(e)})
            continue
        loader = engine.make_loader(ds, args.batch_size, args.workers, dist)
        te = engine.evaluate(detector.scorer, criterion, loader, detector.precision, desc=name)
        kind = set_kind(te["labels"]) if labelled else "unlabelled"
        row = report.compute_metrics(te["labels"], te["probs"], detector.threshold) if kind == "labelled" else {}
        rows.append({"name": name, "path": path, "kind": kind, **row, "n_images": len(ds),
                     **(class_counts(te["labels"]) if labelled else {"real": None, "fake": None}),
                     **called_fake(te["labels"] if labelled else None, te["probs"], detector.threshold),
                     "unreadable": len(unreadable), "seen_in_training": sum(s.digest in seen for s in ds.samples)})
        if kind != "unlabelled":
            scored[name] = te
        auc = (f"ROC-AUC {row['roc_auc']:.4f}" if row else "labels unknown (no real_data/ or fake_data/ inside): "
               "no ROC-AUC" if kind == "unlabelled" else "one kind: ranked against the other kind below")
        print(f"test set {name}: {len(ds)} images ({kind}), {auc}, called fake {rows[-1]['called_fake']:.3f}")
        if unreadable:
            print(f"warning: test set {name}: skipped {len(unreadable)} unreadable file(s), "
                  f"e.g. {next(iter(unreadable))}")
        if rows[-1]["seen_in_training"]:
            print(f"warning: test set {name}: {rows[-1]['seen_in_training']} of its images are in this run's "
                  f"training or validation split: not held out")
    for row in pair_rows(scored, test, detector.threshold, "test" if args.eval_split == "test" else "all"):
        rows.append(row)
        print(f"  {row['name']}: ROC-AUC {row['roc_auc']:.4f} ({row['fake']} fakes, {row['real']} reals)")
    return rows


def set_kind(labels):
    """'labelled' (both classes), 'fakes' or 'reals' (one kind only)."""
    present = set(labels.tolist())
    return "labelled" if len(present) == 2 else "fakes" if present == {1} else "reals"


def class_counts(labels):
    return {"real": int((labels == 0).sum()), "fake": int((labels == 1).sum())}


def called_fake(labels, probs, threshold):
    """Shares called fake at the stored threshold: of all images, of the fakes (recall) and of the reals
    (false-positive rate); None where a class is absent or the labels are unknown."""
    share = lambda keep: float((probs[keep] >= threshold).mean()) if keep.any() else None  # noqa: E731
    known = labels is not None
    return {"called_fake": float((probs >= threshold).mean()),
            "fakes_called_fake": share(labels == 1) if known else None,
            "reals_called_fake": share(labels == 0) if known else None}


def pair_rows(scored, test, threshold, split="test"):
    """ROC-AUC of each one-kind set against the other kind. scored: {name: evaluate()'s dict} of the
    labelled --test_sets; test: the in-domain split's. A fakes-only set meets the test reals, each
    reals-only set, and (with two or more) all of those pooled; a reals-only set meets the test fakes."""
    part = lambda scores, label: scores["probs"][scores["labels"] == label]  # noqa: E731

    fakes = {n: part(s, 1) for n, s in scored.items() if set_kind(s["labels"]) == "fakes"}
    reals = {n: part(s, 0) for n, s in scored.items() if set_kind(s["labels"]) == "reals"}
    opponents = {f"{split} reals": part(test, 0), **reals}
    if len(reals) > 1:
        opponents["+".join(reals)] = np.concatenate(list(reals.values()))
    pairs = [(f, r, probs, opponents[r]) for f, probs in fakes.items() for r in opponents]
    pairs += [(f"{split} fakes", r, part(test, 1), probs) for r, probs in reals.items()]
    rows = []
    for fake, real, fake_probs, real_probs in pairs:
        if not len(fake_probs) or not len(real_probs):
            continue  # e.g. a test split without reals (--eval_split all on a fake-only folder)
        labels = np.r_[np.zeros(len(real_probs), int), np.ones(len(fake_probs), int)]
        probs = np.r_[real_probs, fake_probs]
        rows.append({"name": f"{fake} vs {real}", "kind": "pair", "fakes": fake, "reals": real,
                     **report.compute_metrics(labels, probs, threshold), **class_counts(labels),
                     **called_fake(labels, probs, threshold)})
    return rows
