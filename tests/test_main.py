"""The real entry point: a small run writes every report, resumes exactly, and refuses bad input."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import engine
import main

REPORT_FILES = ["classification_report.txt", "confusion_matrix.png", "training_curves.png", "roc_curve.png",
                "history.csv", "metrics.json", "args.json", "split.csv", "summary.md",
                "checkpoints/last.pt", "checkpoints/best.pt"]


def tiny_args(data_root, out, *extra):
    return main.parse_args(["--data_root", str(data_root), "--weights", "none", "--image_size", "32",
                            "--batch_size", "8", "--workers", "0", "--output_dir", str(out),
                            "--cache_dir", str(out.parent / "cache"), *extra])


def test_end_to_end_run_writes_every_report(trained_run):
    for name in REPORT_FILES:
        assert (trained_run / name).is_file(), name
    for png in trained_run.glob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for at in ("at_0.5", "at_val_threshold"):
        assert {"accuracy", "precision", "recall", "f1", "roc_auc", "average_precision", "eer",
                "threshold"} <= set(metrics[at])
    assert metrics["at_0.5"]["threshold"] == 0.5
    summary = (trained_run / "summary.md").read_text()
    assert "![Confusion matrix](confusion_matrix.png)" in summary and "ROC-AUC" in summary
    report = (trained_run / "classification_report.txt").read_text()
    assert "real" in report and "fake" in report and "threshold 0.5" in report
    with open(trained_run / "split.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 80 and len({r["path"] for r in rows}) == 80
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    history = list(csv.DictReader(open(trained_run / "history.csv")))
    assert [int(h["epoch"]) for h in history] == [1, 2]
    ckpt = engine.load_checkpoint(trained_run / "checkpoints" / "best.pt")
    assert ckpt["classes"] == ["real", "fake"] and 0 <= ckpt["threshold"] <= 1


def test_evaluate_only_reproduces_the_test_metrics(trained_run, faces_root):
    args = main.parse_args(["--evaluate_only", "--data_root", str(faces_root), "--output_dir", str(trained_run),
                            "--cache_dir", str(trained_run / "cache"), "--workers", "0"])
    again = main.main(args)
    first = json.loads((trained_run / "metrics.json").read_text())
    assert again["at_val_threshold"]["roc_auc"] == pytest.approx(first["at_val_threshold"]["roc_auc"], abs=1e-6)
    assert (trained_run / "evaluation" / "summary.md").is_file()
    with pytest.raises(SystemExit, match="--overwrite"):  # a second evaluation does not clobber the first
        main.main(args)


def test_interrupted_run_resumes_to_the_same_weights(faces_root, tmp_path, monkeypatch):
    # two loader workers: their augmentation RNG must follow the per-epoch seed too
    common = ("--epochs", "3", "--max_per_class", "12", "--precision", "fp32", "--workers", "2")
    main.main(tiny_args(faces_root, tmp_path / "straight", *common))
    straight = engine.load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")

    real_train = engine.train_one_epoch

    def ctrl_c_in_third_epoch(*args, **kwargs):
        result = real_train(*args, **kwargs)
        if args[5] == 2:  # the epoch argument: Ctrl-C after its optimizer steps, before it is saved
            raise KeyboardInterrupt
        return result
    monkeypatch.setattr(engine, "train_one_epoch", ctrl_c_in_third_epoch)
    with pytest.raises(SystemExit) as e:
        main.main(tiny_args(faces_root, tmp_path / "resumed", *common))
    assert e.value.code == 130
    assert engine.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(engine, "train_one_epoch", real_train)
    main.main(tiny_args(faces_root, tmp_path / "resumed", *common, "--resume"))
    resumed = engine.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert resumed["epoch"] == straight["epoch"] == 2
    for k, v in straight["model"].items():
        assert torch.allclose(v.float(), resumed["model"][k].float(), atol=1e-6), k
    assert len(resumed["history"]) == 3


def test_ctrl_c_in_the_first_epoch_keeps_the_partial_model(faces_root, tmp_path, monkeypatch):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "train_one_epoch", ctrl_c)
    with pytest.raises(SystemExit):
        main.main(tiny_args(faces_root, tmp_path / "run", "--epochs", "2", "--max_per_class", "8"))
    assert engine.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == -1


def test_resume_into_a_new_folder_keeps_the_data_and_best_checkpoint(faces_root, tmp_path):
    main.main(tiny_args(faces_root, tmp_path / "a", "--epochs", "1", "--max_per_class", "8"))
    args = main.parse_args(["--resume", str(tmp_path / "a" / "checkpoints" / "last.pt"), "--epochs", "1",
                            "--output_dir", str(tmp_path / "b"), "--cache_dir", str(tmp_path / "cache"),
                            "--workers", "0"])  # no --data_root: it comes from the checkpoint
    main.main(args)
    assert args.data_root == str(faces_root) and (tmp_path / "b" / "summary.md").is_file()


def test_an_earlier_run_is_not_overwritten(faces_root, tmp_path):
    main.main(tiny_args(faces_root, tmp_path / "run", "--epochs", "1", "--max_per_class", "8"))
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(SystemExit, match="--resume.*--overwrite"):
        main.main(tiny_args(faces_root, tmp_path / "run", "--epochs", "1", "--max_per_class", "8"))
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before


def test_corrupt_files_are_listed_in_the_summary_and_training_goes_on(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in (("real_data", 12), ("fake_data", 12)):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.jpg")
    (tmp_path / "data" / "fake_data" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.warns(UserWarning, match="broken.jpg"):
        main.main(tiny_args(tmp_path / "data", tmp_path / "run", "--epochs", "1"))
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "unreadable files skipped: 1" in summary and "broken.jpg" in summary


def test_nothing_left_to_train_on_stops_cleanly(tmp_path):
    for cls in ("real_data", "fake_data"):
        (tmp_path / "data" / cls).mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(tmp_path / "data" / "real_data" / "ok.jpg")
    (tmp_path / "data" / "fake_data" / "broken.jpg").write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(SystemExit, match="no readable images left in fake_data"):
        main.main(tiny_args(tmp_path / "data", tmp_path / "run", "--epochs", "1"))


def test_missing_data_folder_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="data folder not found.*real_data"):
        main.main(tiny_args(tmp_path / "nowhere", tmp_path / "run"))


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--lr", "0"], ["--lr", "-1e-3"], ["--batch_size", "0"],
                                   ["--val_fraction", "0.6", "--test_fraction", "0.5"], ["--test_fraction", "1.2"]])
def test_impossible_flag_values_are_argparse_errors(flags, capsys):
    with pytest.raises(SystemExit) as e:
        main.parse_args(flags)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


def test_evaluate_only_without_a_checkpoint_is_one_clear_error(faces_root, tmp_path):
    with pytest.raises(SystemExit, match="error: .*best.pt: checkpoint not found"):
        main.main(main.parse_args(["--evaluate_only", "--data_root", str(faces_root),
                                   "--output_dir", str(tmp_path / "nothing")]))


def test_evaluate_only_scores_every_image_of_a_small_heldout_folder(trained_run, faces_root, tmp_path):
    import shutil
    for cls, n in (("real_data", 5), ("fake_data", 3)):
        (tmp_path / "held" / cls).mkdir(parents=True)
        for p in sorted((faces_root / cls).glob("*.jpg"))[-n:]:
            shutil.copy(p, tmp_path / "held" / cls)
    metrics = main.main(main.parse_args([
        "--evaluate_only", "--checkpoint", str(trained_run / "checkpoints" / "best.pt"), "--eval_split", "all",
        "--data_root", str(tmp_path / "held"), "--output_dir", str(tmp_path / "out"),
        "--cache_dir", str(tmp_path / "cache"), "--workers", "0"]))
    assert metrics["at_0.5"]["n_images"] == 8  # not the training run's --max_per_class subset, no split needed
