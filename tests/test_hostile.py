"""Hostile input and Ctrl-C: one clear line instead of a traceback, and a results folder that never
describes a model it does not hold (issue 28's cases that have no other home)."""
import csv
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_main import interrupt_in_epoch, make_folder, tiny_args

import cli
import dataset
import engine
import main
import predict
import presets


def test_an_output_dir_that_is_a_file_is_one_clear_error(sample_root, tmp_path):
    (tmp_path / "taken").write_text("a file of the user's")
    with pytest.raises(SystemExit, match="--output_dir .*taken is a file, not a folder"):
        main.main(tiny_args(sample_root, tmp_path / "taken", "--epochs", "1", "--max_per_class", "8"))
    assert (tmp_path / "taken").read_text() == "a file of the user's"


def test_overwrite_then_ctrl_c_leaves_nothing_of_the_old_run(sample_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    main.main(tiny_args(sample_root, out, "--epochs", "1", "--max_per_class", "12", "--seed", "1"))
    main.main(main.parse_args(["--evaluate_only", "--output_dir", str(out), "--workers", "0"]))
    assert (out / "summary.md").is_file() and (out / "evaluation" / "summary.md").is_file()
    interrupt_in_epoch(monkeypatch, 1)
    with pytest.raises(SystemExit):  # a new run over the old one, stopped in its second epoch
        main.main(tiny_args(sample_root, out, "--epochs", "3", "--max_per_class", "12", "--overwrite"))
    left = {p.name for p in out.iterdir()}
    assert not left & {"summary.md", "metrics.json", "predictions.csv", "classification_report.txt",
                       "confusion_matrix.png", "roc_curve.png", "training_curves.png", "evaluation"}, left
    assert engine.load_checkpoint(out / "checkpoints" / "last.pt")["args"]["seed"] == 0  # the new run's
    monkeypatch.undo()
    main.main(main.parse_args(["--evaluate_only", "--output_dir", str(out), "--workers", "0"]))  # not blocked


def train_count(root, tmp_path):
    """How many training images main.py's split of root (default fractions and seed) holds."""
    tf = presets.transforms({"image_size": 32}, (0.5,) * 3, (0.5,) * 3)
    return len(dataset.prepare_data(root, tf, cache_dir=tmp_path / "cache", workers=0).datasets["train"])


def test_a_last_training_batch_of_one_image_is_dropped(tmp_path):
    root = make_folder(tmp_path / "data", {"real_data": 30, "fake_data": 30})
    batch = train_count(root, tmp_path) - 1  # one image left over: BatchNorm on a 1x1 map at 32 px cannot take it
    for augment in ("flip", "video"):
        main.main(tiny_args(root, tmp_path / augment, "--epochs", "1", "--batch_size", str(batch), "--augment",
                            augment))
        assert (tmp_path / augment / "summary.md").is_file()


def test_self_blend_batches_never_hold_one_image():
    from dataset import DeepfakeDataset, Sample
    from sbi import with_pseudo_fakes
    samples = [Sample(f"r{i}", 0, row=i) for i in range(3)] + [Sample(f"f{i}", 1, row=10 + i) for i in range(5)]
    train = with_pseudo_fakes(DeepfakeDataset(samples, blend=None), blend=object())  # 3 pairs + 5 single fakes
    sampler = engine.PairedBatchSampler(train, batch_size=2)  # one unit per batch
    left_out = set()
    for seed in range(20):
        torch.manual_seed(seed)
        batches = list(sampler)
        assert min(map(len, batches)) >= 2 and len(batches) == len(sampler)
        seen = [i for b in batches for i in b]
        assert len(seen) == len(set(seen)) == len(train) - 1  # 5 single fakes: the odd one waits an epoch
        left_out |= set(range(len(train))) - set(seen)
    assert left_out <= set(sampler.singles) and len(left_out) > 1  # never a pair's half; not always the same


def test_pseudo_fakes_from_pictures_without_faces_are_counted(tmp_path, capsys):
    root = make_folder(tmp_path / "data", {"real_data": 12, "fake_data": 12}, size=64)  # noise: no face in any
    main.main(tiny_args(root, tmp_path / "run", "--epochs", "1", "--image_size", "64", "--pseudo_fakes", "sbi"))
    with open(tmp_path / "run" / "split.csv", newline="") as f:
        n = sum(r["split"] == "train" and r["class"] == "real" for r in csv.DictReader(f))
    assert f"warning: --pseudo_fakes: no face found in {n} of {n} real training images" in capsys.readouterr().out
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert f"of which {n} self-blended, {n} of them from faces not found (a mask in the middle)" in summary


def test_resume_takes_checkpoint_as_well_as_its_own_path(sample_root, tmp_path, monkeypatch):
    interrupt_in_epoch(monkeypatch, 1)
    with pytest.raises(SystemExit):
        main.main(tiny_args(sample_root, tmp_path / "run", "--epochs", "2", "--max_per_class", "8"))
    monkeypatch.undo()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    main.main(main.parse_args(["--resume", "--checkpoint", str(last), "--workers", "0"]))
    assert engine.load_checkpoint(last)["epoch"] == 1 and (tmp_path / "run" / "summary.md").is_file()
    with pytest.raises(SystemExit, match="gone.pt: checkpoint not found; .* pass --resume PATH"):
        main.main(main.parse_args(["--resume", str(tmp_path / "gone.pt")]))


def test_ctrl_c_in_predict_keeps_the_rows_scored_and_exits_130(trained_run, sample_root, tmp_path, monkeypatch):
    real = predict.Predictor.predict_many

    def stopped_after_two(self, paths, gradcam=False):
        for k, item in enumerate(real(self, paths, gradcam)):
            if k == 2:
                raise KeyboardInterrupt
            yield item
    monkeypatch.setattr(predict.Predictor, "predict_many", stopped_after_two)
    out = tmp_path / "preds.csv"
    with pytest.raises(SystemExit) as e:
        predict.main(predict.get_args_parser().parse_args([
            "--checkpoint", str(trained_run / "checkpoints" / "best.pt"), "--no_crop", "--batch_size", "1",
            "--input", str(sample_root / "real_data"), "--output", str(out)]))
    assert e.value.code == 130
    with open(out, newline="") as f:
        assert [r["row"] for r in csv.DictReader(f)] == ["input", "input"]  # the two inputs scored before Ctrl-C


def test_ctrl_c_anywhere_in_an_entry_script_is_one_line_and_code_130(capsys):
    def stopped():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cli.interruptible(stopped)
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_evaluate_only_refuses_a_checkpoint_that_a_training_is_writing(trained_run, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained_run / "checkpoints" / "best.pt", run / "checkpoints")
    holder = subprocess.Popen([sys.executable, "-c", "import time; from pathlib import Path; import config; "
                               f"config.hold_output_dir(Path({str(run)!r})); print('held', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:  # a training writing to the run folder holds its lock
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=f"another run or evaluation is using {run} "):
            main.main(main.parse_args(["--evaluate_only", "--checkpoint", str(run / "checkpoints" / "best.pt"),
                                       "--output_dir", str(tmp_path / "eval"), "--workers", "0"]))
    finally:
        holder.kill()
        holder.wait()


def test_weights_that_are_no_state_dict_are_one_line_through_main(sample_root, tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(SystemExit, match="list.pt: not .*it holds list"):
        main.main(main.parse_args(["--data_root", str(sample_root), "--weights", str(tmp_path / "list.pt"),
                                   "--output_dir", str(tmp_path / "run"), "--workers", "0"]))
