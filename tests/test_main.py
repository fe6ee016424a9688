"""The real entry point: a small run writes every report, resumes exactly, and refuses bad input."""
import csv
import json
from collections import Counter

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


def make_folder(root, counts, size=40, seed=0):
    """real_data/ and fake_data/ with distinct random images: {"real_data": n, "fake_data": m}."""
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_end_to_end_run_writes_every_report(trained_run):
    for name in REPORT_FILES:
        assert (trained_run / name).is_file(), name
    for png in trained_run.glob("*.png"):
        with Image.open(png) as im:
            pixels = np.asarray(im.convert("L"))
        assert im.size[0] > 300 and im.size[1] > 200
        assert (pixels < 128).mean() > 0.01, f"{png.name} is (nearly) blank"  # text, axes and bars are dark
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
    assert ckpt["best_val_auc"] == max(float(h["val_auc"]) for h in history)


def test_evaluate_only_reproduces_the_test_metrics(trained_run, sample_root):
    args = main.parse_args(["--evaluate_only", "--output_dir", str(trained_run),
                            "--cache_dir", str(trained_run / "cache"), "--workers", "0"])  # data_root: the checkpoint's
    again = main.main(args)
    first = json.loads((trained_run / "metrics.json").read_text())
    assert args.data_root == str(sample_root)
    assert again["at_val_threshold"]["roc_auc"] == pytest.approx(first["at_val_threshold"]["roc_auc"], abs=1e-6)
    assert (trained_run / "evaluation" / "summary.md").is_file()
    with pytest.raises(SystemExit, match="--overwrite"):  # a second evaluation does not clobber the first
        main.main(args)


def test_evaluate_only_refuses_flags_that_contradict_the_checkpoint(trained_run, tmp_path):
    args = main.parse_args(["--evaluate_only", "--checkpoint", str(trained_run / "checkpoints" / "best.pt"),
                            "--image_size", "96", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--image_size 96 conflicts with the checkpoint's 64"):
        main.main(args)


def interrupt_in_epoch(monkeypatch, epoch_to_stop):
    """Make engine.train_one_epoch raise KeyboardInterrupt after the steps of (0-based) epoch_to_stop."""
    real = engine.train_one_epoch

    def ctrl_c(*args, **kwargs):
        result = real(*args, **kwargs)
        if args[5] == epoch_to_stop:  # the epoch argument: Ctrl-C after its optimizer steps, before it is saved
            raise KeyboardInterrupt
        return result
    monkeypatch.setattr(engine, "train_one_epoch", ctrl_c)
    return real


@pytest.mark.parametrize("average", [[], ["--ema_decay", "0.9"]], ids=["plain", "weight_average"])
def test_interrupted_run_resumed_by_the_printed_hint_matches_an_uninterrupted_one(sample_root, tmp_path,
                                                                                   monkeypatch, capsys, average):
    # non-default flags everywhere: the hint `--resume --output_dir R` must bring all of them back;
    # two loader workers: their augmentation RNG must follow the per-epoch seed too; with a weight
    # average, both the average and the weights training goes on from must come back
    flags = ["--data_root", str(sample_root), "--weights", "none", "--epochs", "3", "--image_size", "48",
             "--batch_size", "4", "--lr", "3e-4", "--max_per_class", "10", "--precision", "fp32", "--workers", "2",
             "--cache_dir", str(tmp_path / "cache"), *average]
    main.main(main.parse_args(flags + ["--output_dir", str(tmp_path / "straight")]))
    real = interrupt_in_epoch(monkeypatch, 1)
    with pytest.raises(SystemExit) as e:
        main.main(main.parse_args(flags + ["--output_dir", str(tmp_path / "resumed")]))
    assert e.value.code == 130
    hint = [line for line in capsys.readouterr().out.splitlines() if line.startswith("continue with:")][0]
    assert engine.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["epoch"] == 0
    monkeypatch.setattr(engine, "train_one_epoch", real)
    main.main(main.parse_args(hint.split("python main.py ")[1].split()))

    straight = engine.load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = engine.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert resumed["epoch"] == straight["epoch"] == 2 and len(resumed["history"]) == 3
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    if average:  # "model" (what predicts) is the average, apart from the weights training goes on from
        assert resumed.keys() >= {"train_model", "average_steps"}
        assert not all(torch.equal(v, straight["train_model"][k]) for k, v in straight["model"].items()
                       if v.is_floating_point())
        for k, v in straight["train_model"].items():
            assert torch.equal(v, resumed["train_model"][k]), k
    used = {run: json.loads((tmp_path / run / "args.json").read_text()) for run in ("straight", "resumed")}
    for run in used.values():  # what differs is only how each run was started
        for key in ("output_dir", "resume", "run_id"):  # run_id: two runs, two names
            run.pop(key)
    assert used["resumed"] == used["straight"]


def test_resume_refuses_a_changed_model_and_announces_more_epochs(sample_root, tmp_path, capsys):
    main.main(tiny_args(sample_root, tmp_path / "run", "--epochs", "1", "--max_per_class", "8"))
    resume = ["--resume", "--output_dir", str(tmp_path / "run"), "--workers", "0"]
    with pytest.raises(SystemExit, match=r"--model resnet50 conflicts with the checkpoint's resnet18"):
        main.main(main.parse_args(resume + ["--model", "resnet50"]))
    with pytest.raises(SystemExit, match=r"--batch_size 16 conflicts with the checkpoint's 8"):
        main.main(main.parse_args(resume + ["--batch_size", "16"]))
    capsys.readouterr()
    main.main(main.parse_args(resume + ["--epochs", "2"]))
    assert "note: --epochs 2 (the checkpoint ran with 1)" in capsys.readouterr().out
    ckpt = engine.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["args"]["epochs"] == 2 and ckpt["args"]["image_size"] == 32


def test_ctrl_c_in_the_first_epoch_keeps_the_partial_model(sample_root, tmp_path, monkeypatch):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "train_one_epoch", ctrl_c)
    with pytest.raises(SystemExit):
        main.main(tiny_args(sample_root, tmp_path / "run", "--epochs", "2", "--max_per_class", "8"))
    assert engine.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == -1


def test_resume_into_a_new_folder_keeps_the_data_and_best_checkpoint(sample_root, tmp_path):
    main.main(tiny_args(sample_root, tmp_path / "a", "--epochs", "1", "--max_per_class", "8"))
    args = main.parse_args(["--resume", str(tmp_path / "a" / "checkpoints" / "last.pt"), "--epochs", "1",
                            "--output_dir", str(tmp_path / "b"), "--workers", "0"])  # no --data_root: the checkpoint's
    main.main(args)
    assert args.data_root == str(sample_root) and (tmp_path / "b" / "summary.md").is_file()
    assert (tmp_path / "b" / "checkpoints" / "best.pt").is_file()


def test_an_earlier_run_is_not_overwritten(sample_root, tmp_path):
    main.main(tiny_args(sample_root, tmp_path / "run", "--epochs", "1", "--max_per_class", "8"))
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(SystemExit, match="--resume.*--overwrite"):
        main.main(tiny_args(sample_root, tmp_path / "run", "--epochs", "1", "--max_per_class", "8"))
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("balance", ["sampler", "oversample"])
def test_balance_makes_training_batches_balanced_and_leaves_val_test_alone(tmp_path, monkeypatch, balance):
    root = make_folder(tmp_path / "data", {"real_data": 40, "fake_data": 10})
    seen = {"train": Counter(), "val": Counter()}
    real_train, real_eval = engine.train_one_epoch, engine.evaluate

    def count(split, real):
        def wrapped(model, criterion, optimizer_or_loader, *rest, **kw):
            loader = optimizer_or_loader if split == "val" else rest[0]
            if split == "train" or kw.get("desc") == "val":  # not the final test pass
                for _, labels in loader:
                    seen[split].update(labels.tolist())
            return real(model, criterion, optimizer_or_loader, *rest, **kw)
        return wrapped
    monkeypatch.setattr(engine, "train_one_epoch", count("train", real_train))
    monkeypatch.setattr(engine, "evaluate", count("val", real_eval))
    main.main(tiny_args(root, tmp_path / "run", "--epochs", "3", "--balance", balance))
    fake_share = seen["train"][1] / sum(seen["train"].values())
    assert 0.4 < fake_share < 0.6, seen["train"]  # 10 of 50 images are fake: 0.2 without balancing
    with open(tmp_path / "run" / "split.csv") as f:
        val = Counter(int(r["label"]) for r in csv.DictReader(f) if r["split"] == "val")
    assert val[0] > 2 * val[1]  # the folder's 4:1, untouched
    assert seen["val"] == Counter({label: 3 * n for label, n in val.items()})  # each val image once per epoch


def test_corrupt_files_are_listed_in_the_summary_and_training_goes_on(tmp_path, capsys):
    root = make_folder(tmp_path / "data", {"real_data": 12, "fake_data": 12})
    (root / "fake_data" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    main.main(tiny_args(root, tmp_path / "run", "--epochs", "1"))
    assert "warning: skipped 1 unreadable image(s)" in capsys.readouterr().out
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "unreadable files skipped: 1" in summary and "broken.jpg" in summary


def test_an_image_in_both_classes_is_left_out_and_listed(tmp_path, capsys):
    root = make_folder(tmp_path / "data", {"real_data": 12, "fake_data": 12})
    (root / "fake_data" / "same.png").write_bytes((root / "real_data" / "3.png").read_bytes())
    main.main(tiny_args(root, tmp_path / "run", "--epochs", "1"))
    assert "warning: left out 2 file(s) whose bytes are in both real_data and fake_data" in capsys.readouterr().out
    with open(tmp_path / "run" / "split.csv") as f:
        paths = {r["path"] for r in csv.DictReader(f)}
    assert str(root / "real_data" / "3.png") not in paths and str(root / "fake_data" / "same.png") not in paths
    assert len(paths) == 23
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "files in both real_data and fake_data, left out: 2" in summary and "same.png" in summary


def test_nothing_left_to_train_on_stops_cleanly(tmp_path):
    for cls in ("real_data", "fake_data"):
        (tmp_path / "data" / cls).mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(tmp_path / "data" / "real_data" / "ok.jpg")
    (tmp_path / "data" / "fake_data" / "broken.jpg").write_bytes(b"nope")
    with pytest.raises(SystemExit, match="no readable images left in fake_data"):
        main.main(tiny_args(tmp_path / "data", tmp_path / "run", "--epochs", "1"))


def test_missing_data_folder_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="data folder not found.*real_data"):
        main.main(tiny_args(tmp_path / "nowhere", tmp_path / "run"))


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--lr", "0"], ["--lr", "-1e-3"], ["--batch_size", "0"],
                                   ["--val_fraction", "0.6", "--test_fraction", "0.5"], ["--test_fraction", "1.2"],
                                   ["--image_size", "1"], ["--image_size", "31"], ["--max_per_class", "-5"],
                                   ["--workers", "-1"], ["--weight_decay", "-0.1"]])
def test_impossible_flag_values_are_argparse_errors(flags, capsys):
    with pytest.raises(SystemExit) as e:
        main.parse_args(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and (f"argument {flags[0]}" in err or "--val_fraction + --test_fraction" in err)


def test_evaluate_only_without_a_checkpoint_is_one_clear_error(sample_root, tmp_path):
    with pytest.raises(SystemExit, match="error: .*best.pt: checkpoint not found"):
        main.main(main.parse_args(["--evaluate_only", "--data_root", str(sample_root),
                                   "--output_dir", str(tmp_path / "nothing")]))


def test_evaluate_only_scores_every_image_of_a_small_heldout_folder(trained_run, sample_root, tmp_path):
    import shutil
    for cls, n in (("real_data", 5), ("fake_data", 3)):
        (tmp_path / "held" / cls).mkdir(parents=True)
        for p in sorted((sample_root / cls).glob("*.jpg"))[-n:]:
            shutil.copy(p, tmp_path / "held" / cls)
    metrics = main.main(main.parse_args([
        "--evaluate_only", "--checkpoint", str(trained_run / "checkpoints" / "best.pt"), "--eval_split", "all",
        "--data_root", str(tmp_path / "held"), "--output_dir", str(tmp_path / "out"),
        "--cache_dir", str(tmp_path / "cache"), "--workers", "0"]))
    assert metrics["at_0.5"]["n_images"] == 8  # not the training run's --max_per_class subset, no split needed


def test_first_run_on_an_empty_dataset_folder_trains_on_the_bundled_sample(sample_root, tmp_path, monkeypatch, capsys):
    (tmp_path / "Dataset").mkdir()
    (tmp_path / "Dataset" / "README.md").write_text("put your data here")
    monkeypatch.chdir(tmp_path)
    main.main(main.parse_args(["--weights", "none", "--epochs", "1", "--image_size", "32", "--max_per_class", "10",
                               "--workers", "0"]))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("note: Dataset/ is empty: trained on the bundled sample")
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert "Dataset/ is empty: trained on the bundled sample" in summary
    assert json.loads((tmp_path / "results" / "args.json").read_text())["data_root"] == str(sample_root)


def test_data_in_the_dataset_folder_is_used_alone(tmp_path, monkeypatch, capsys):
    make_folder(tmp_path / "Dataset", {"real_data": 12, "fake_data": 12})
    monkeypatch.chdir(tmp_path)
    main.main(main.parse_args(["--weights", "none", "--epochs", "1", "--image_size", "32", "--workers", "0"]))
    assert "bundled sample" not in capsys.readouterr().out
    with open(tmp_path / "results" / "split.csv") as f:
        paths = [r["path"] for r in csv.DictReader(f)]
    assert len(paths) == 24 and all(p.startswith("Dataset") for p in paths)


def test_a_local_weights_file_trains_and_evaluates_with_its_normalisation(sample_root, tmp_path):
    from torchvision import models
    torch.save(models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    out = tmp_path / "run"
    main.main(main.parse_args(["--data_root", str(sample_root), "--weights", str(tmp_path / "resnet18.pth"),
                               "--epochs", "1", "--image_size", "32", "--max_per_class", "10", "--workers", "0",
                               "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache")]))
    assert json.loads((out / "args.json").read_text())["augment"] == "blur_jpeg"  # pretrained defaults
    detector = engine.load_detector(out / "checkpoints" / "best.pt")
    normalize = detector.transform.transforms[-1]
    imagenet = models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    assert list(normalize.mean) == list(imagenet.mean) and list(normalize.std) == list(imagenet.std)


def test_pseudo_fakes_go_into_training_only_with_their_picture(sample_root, tmp_path):
    for mode, fakes in (("sbi", 2), ("sbi_only", 1)):  # fakes per real image in the training split
        out = tmp_path / mode
        main.main(tiny_args(sample_root, out, "--epochs", "1", "--max_per_class", "20", "--image_size", "64",
                            "--pseudo_fakes", mode))
        summary = (out / "summary.md").read_text()
        train_line = next(line for line in summary.splitlines() if line.startswith("- train images"))
        real = int(train_line.split("(")[1].split(" real")[0])
        assert f"{fakes * real} fake, of which {real} self-blended" in train_line
        assert "- val images: 6 (3 real, 3 fake)" in summary  # real data only
        with Image.open(out / "pseudo_fakes.png") as im:
            assert im.height > 600 and np.asarray(im.convert("L")).std() > 20


def test_self_blends_of_the_extra_reals_only(sample_root, tmp_path):
    extra = tmp_path / "extra" / "real_data"
    extra.mkdir(parents=True)
    for p in sorted((sample_root / "real_data").glob("*.jpg"))[-3:]:
        Image.open(p).save(extra / p.name)
    out = tmp_path / "run"
    main.main(tiny_args(sample_root, out, "--epochs", "1", "--max_per_class", "10", "--image_size", "64",
                        "--pseudo_fakes", "sbi", "--train_extra", str(tmp_path / "extra"), "--pseudo_from",
                        "train_extra"))
    assert "fake, of which 3 self-blended" in (out / "summary.md").read_text()
    assert (out / "pseudo_fakes.png").is_file()  # shows the reals that were blended, not the others


def test_test_sets_add_a_cross_dataset_table(trained_run, sample_root, tmp_path):
    import shutil
    (tmp_path / "fakes").mkdir()
    for p in sorted((sample_root / "fake_data").glob("*.jpg"))[:5]:
        shutil.copy(p, tmp_path / "fakes")
    metrics = main.main(main.parse_args([
        "--evaluate_only", "--checkpoint", str(trained_run / "checkpoints" / "best.pt"), "--workers", "0",
        "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
        "--test_sets", f"labelled={sample_root}", f"one_kind={tmp_path / 'fakes'}"]))
    rows = {r["name"]: r for r in metrics["test_sets"]}
    assert rows["labelled"]["real"] == rows["labelled"]["fake"] == 100 and 0 <= rows["labelled"]["roc_auc"] <= 1
    assert rows["one_kind"]["n_images"] == 5 and "roc_auc" not in rows["one_kind"]
    assert 0 <= rows["one_kind"]["called_fake"] <= 1
    summary = (tmp_path / "out" / "evaluation" / "summary.md").read_text()
    assert "| labelled | itself | 100 / 100 |" in summary
    assert "| one_kind | (labels unknown: no ROC-AUC) | 5 (unlabelled, called fake" in summary
