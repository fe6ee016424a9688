"""Scoring a trained detector: the test split, the extra --test_sets, and the report files.

main.py calls evaluate_and_report() after training and for --evaluate_only. Under torchrun
every process scores its share of the images and rank 0 writes the files.
"""
import sys
from pathlib import Path

from torch import nn

import dataset
import engine
import gradcam
import report
import runtime
import utils


def evaluate_and_report(args, detector, data, out, history, dist):
    """Score the test split (or every image) with a loaded detector; rank 0 writes every report file."""
    split = "test" if args.eval_split == "test" else "all"
    test = data.datasets["test"]
    ds = test if split == "test" else dataset.DeepfakeDataset(data.samples, test.transform, test.cache, test.size)
    loader = engine.make_loader(ds, args.batch_size, args.workers, dist)
    runtime.choose_scorer(detector, args.runtime, len(ds))
    te = engine.evaluate(detector.scorer, nn.CrossEntropyLoss(), loader, detector.precision, desc=split)
    in_domain = {"name": f"{split} split (in-domain)", "path": args.data_root,
                 **report.compute_metrics(te["labels"], te["probs"], detector.threshold),
                 "real": int((te["labels"] == 0).sum()), "fake": int((te["labels"] == 1).sum()),
                 "called_fake": float((te["probs"] >= detector.threshold).mean())}
    test_sets = score_test_sets(args, detector, in_domain, data, dist)
    if not dist.main:
        return None
    metrics = report.write_test_report(out, te["labels"], te["probs"], detector.threshold, split)
    report.write_predictions([s.path for s in ds.samples], te["labels"], te["probs"], detector.threshold,
                             out / "predictions.csv")
    if len(ds):  # heatmaps of right and wrong calls; written before summary.md, which shows it
        gradcam.save_examples(detector.model, ds, te["probs"], te["labels"], detector.threshold,
                              out / "gradcam_examples.png", detector.precision.device)
    if history:
        report.plot_training_curves(history, out / "training_curves.png")
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
                               "test_sets": test_sets})
    m = metrics["at_val_threshold"]
    print(f"{split}: accuracy {m['accuracy']:.4f}  F1 {m['f1']:.4f}  ROC-AUC {m['roc_auc']:.4f}  "
          f"EER {m['eer']:.4f} at threshold {detector.threshold:.3f}  ->  {out / 'summary.md'}")
    return metrics


def score_test_sets(args, detector, in_domain, data, dist):
    """Rows of the cross-dataset table: the in-domain test first, then every --test_sets folder.
    AUC where a set holds both classes, else the share called fake at the chosen threshold. Each
    row counts its unreadable files and its images that the run trained or validated on."""
    rows = [in_domain] if args.test_sets else []
    seen = {s.digest for s in data.samples if s.split in ("train", "val") and s.digest}
    for name, path in (item.split("=", 1) for item in args.test_sets):
        try:
            with utils.main_rank_first(dist):
                ds, labelled, unreadable = dataset.prepare_test_set(
                    path, detector.image_size, detector.model.mean, detector.model.std, args.cache_dir, args.workers,
                    detector.crop_pct)
        except dataset.DatasetError as e:  # one bad folder: say so, score the others
            print(f"error: {e}")
            rows.append({"name": name, "path": path, "error": str(e)})
            continue
        loader = engine.make_loader(ds, args.batch_size, args.workers, dist)
        te = engine.evaluate(detector.scorer, nn.CrossEntropyLoss(), loader,
                             detector.precision, desc=name)
        row = report.compute_metrics(te["labels"], te["probs"], detector.threshold) if labelled else {}
        rows.append({"name": name, "path": path, **row, "n_images": len(ds),
                     "real": int((te["labels"] == 0).sum()) if labelled else None,
                     "fake": int((te["labels"] == 1).sum()) if labelled else None,
                     "called_fake": float((te["probs"] >= detector.threshold).mean()),
                     "unreadable": len(unreadable), "seen_in_training": sum(s.digest in seen for s in ds.samples)})
        print(f"test set {name}: {len(ds)} images, ROC-AUC {row.get('roc_auc', float('nan')):.4f}, "
              f"called fake {rows[-1]['called_fake']:.3f}")
        if unreadable:
            print(f"warning: test set {name}: skipped {len(unreadable)} unreadable file(s), "
                  f"e.g. {next(iter(unreadable))}")
        if rows[-1]["seen_in_training"]:
            print(f"warning: test set {name}: {rows[-1]['seen_in_training']} of its images are in this run's "
                  f"training or validation split: not held out")
    return rows
