"""Nothing lost, nothing silently wrong: changed data on resume, two runs in one folder, extras
(test sets, a faster runtime) that fail without costing the main report."""
import csv
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_main import tiny_args

import engine
import main
import runtime
import utils


def copy_faces(sample_root, dst, n):
    """n bundled real and n fake faces in dst/real_data, dst/fake_data."""
    for cls in ("real_data", "fake_data"):
        (dst / cls).mkdir(parents=True)
        for p in sorted((sample_root / cls).glob("*.jpg"))[:n]:
            shutil.copy(p, dst / cls)
    return dst


@pytest.mark.parametrize("change", ["add", "remove"])
def test_resume_after_the_data_changed_is_refused_with_what_changed(sample_root, tmp_path, change):
    data = copy_faces(sample_root, tmp_path / "data", 12)
    main.main(tiny_args(data, tmp_path / "run", "--epochs", "1"))
    if change == "add":
        for p in sorted((sample_root / "real_data").glob("*.jpg"))[20:25]:
            shutil.copy(p, data / "real_data")
    else:
        next((data / "fake_data").iterdir()).unlink()
    expect = "5 added, 0 removed" if change == "add" else "0 added, 1 removed"
    with pytest.raises(SystemExit, match=f"changed since the checkpoint's run \\({expect}"):
        main.main(main.parse_args(["--resume", "--output_dir", str(tmp_path / "run"), "--epochs", "2",
                                   "--workers", "0"]))
    assert engine.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 0  # untouched


def test_a_second_run_into_a_busy_folder_is_refused_and_a_killed_one_leaves_no_lock(sample_root, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; import config; "
                               f"config.hold_output_dir(Path({str(out)!r})); print('held', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=f"another run or evaluation is using {out} \\(process {holder.pid}\\)"):
            main.main(tiny_args(sample_root, out, "--epochs", "1", "--max_per_class", "8"))
    finally:
        holder.kill()
        holder.wait()
    main.main(tiny_args(sample_root, out, "--epochs", "1", "--max_per_class", "8"))  # killed: the lock is gone
    assert (out / "summary.md").is_file()


def test_a_model_that_does_not_export_is_scored_by_pytorch_with_one_line(trained_run, capsys):
    detector = engine.load_detector(trained_run / "checkpoints" / "best.pt", "cpu", "fp32")

    class NoExport(torch.nn.Module):  # ViT's fused attention fails the same way in torch.onnx.export
        def forward(self, x):
            return torch.ops.aten._native_multi_head_attention(x, x, x, 4, 2, torch.zeros(12, 4), torch.zeros(12),
                                                               torch.zeros(4, 4), torch.zeros(4))[0]
    detector.scorer = NoExport()
    assert runtime.choose_scorer(detector, "onnx") is detector.scorer
    assert "warning: scoring with PyTorch: ONNX Runtime could not take this model" in capsys.readouterr().out


def test_an_export_that_disagrees_with_pytorch_is_not_used(trained_run, capsys, monkeypatch):
    detector = engine.load_detector(trained_run / "checkpoints" / "best.pt", "cpu", "fp32")
    real = runtime.OnnxScorer.forward
    monkeypatch.setattr(runtime.OnnxScorer, "forward", lambda self, x: real(self, x) * -1)  # a broken export
    assert not isinstance(runtime.choose_scorer(detector, "onnx"), runtime.OnnxScorer)
    assert "differs from PyTorch's" in capsys.readouterr().out
    monkeypatch.setattr(runtime.OnnxScorer, "forward", real)
    assert isinstance(runtime.choose_scorer(detector, "onnx"), runtime.OnnxScorer)  # a faithful one is used


def test_without_onnxruntime_the_run_scores_with_pytorch_and_says_so(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    metrics = main.main(main.parse_args(["--evaluate_only", "--checkpoint", str(trained_run / "checkpoints" /
                                                                                "best.pt"),
                                         "--runtime", "onnx", "--workers", "0", "--output_dir", str(tmp_path)]))
    assert "onnxruntime is not installed" in capsys.readouterr().out and metrics["at_val_threshold"]["roc_auc"] >= 0
    assert json.loads((tmp_path / "evaluation" / "args.json").read_text())["runtime"] == "torch"


def test_bad_test_sets_cost_nothing_but_their_row(trained_run, sample_root, tmp_path):
    broken = tmp_path / "broken"
    (broken / "fake_data").mkdir(parents=True)
    for i in range(3):
        (broken / "fake_data" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    mixed = copy_faces(sample_root, tmp_path / "mixed", 4)
    (mixed / "real_data" / "bad.jpg").write_bytes(b"garbage")
    one_class = copy_faces(sample_root, tmp_path / "one", 3)
    shutil.rmtree(one_class / "real_data")
    (one_class / "real_data").mkdir()
    out = tmp_path / "out"
    main.main(main.parse_args([
        "--evaluate_only", "--checkpoint", str(trained_run / "checkpoints" / "best.pt"), "--workers", "0",
        "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
        "--test_sets", f"broken={broken}", f"mixed={mixed}", f"fakes_only={one_class}"]))
    text = (out / "evaluation" / "metrics.json").read_text()
    rows = {r["name"]: r for r in json.loads(text)["test_sets"]}  # strict JSON: NaN would not parse
    assert "NaN" not in text and rows["fakes_only"]["kind"] == "fakes" and "roc_auc" not in rows["fakes_only"]
    assert 0 <= rows["fakes_only vs test reals"]["roc_auc"] <= 1  # one kind: ranked against the test reals
    assert "none of its 3 images could be read" in rows["broken"]["error"]
    assert rows["mixed"]["unreadable"] == 1 and rows["mixed"]["n_images"] == 8
    summary = (out / "evaluation" / "summary.md").read_text()
    assert "1 unreadable skipped" in summary and "## Test metrics" in summary


def test_a_test_set_holding_training_images_is_flagged(trained_run, sample_root, tmp_path, capsys):
    main.main(main.parse_args([
        "--evaluate_only", "--checkpoint", str(trained_run / "checkpoints" / "best.pt"), "--workers", "0",
        "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--test_sets",
        f"self={sample_root}"]))
    row = json.loads((tmp_path / "out" / "evaluation" / "metrics.json").read_text())["test_sets"][1]
    with open(trained_run / "split.csv", newline="") as f:
        split = list(csv.DictReader(f))
    assert row["seen_in_training"] == sum(s["split"] in ("train", "val") for s in split) > 0
    assert "in this run's training or validation split" in capsys.readouterr().out
    assert f"**{row['seen_in_training']} in train/val**" in (tmp_path / "out" / "evaluation" / "summary.md").read_text()


def test_a_crashed_evaluation_does_not_demand_overwrite(trained_run, tmp_path, monkeypatch):
    flags = ["--evaluate_only", "--checkpoint", str(trained_run / "checkpoints" / "best.pt"), "--workers", "0",
             "--output_dir", str(tmp_path)]

    def crash(*args, **kwargs):
        raise RuntimeError("out of memory")
    with monkeypatch.context() as m:
        m.setattr(main.evaluate, "evaluate_and_report", crash)
        with pytest.raises(RuntimeError):
            main.main(main.parse_args(flags))
    assert (tmp_path / "evaluation" / "split.csv").is_file()  # what the crash left: no report, no run
    main.main(main.parse_args(flags))
    assert (tmp_path / "evaluation" / "summary.md").is_file()


def test_a_process_with_no_images_to_score_returns_empty_arrays():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(3, 3, 2, 2),
                                                                        torch.zeros(3, dtype=torch.long)),
                                         sampler=range(3, 3, 2))  # rank 3 of 2... nothing left for it
    out = engine.evaluate(net, torch.nn.CrossEntropyLoss(), loader, utils.choose_precision(torch.device("cpu"),
                                                                                         "fp32"))
    assert out["probs"].shape == (0,) and out["labels"].shape == (0,)
