"""Beyond the training data: one-kind folders ranked against the other kind, the columns compare.py
keeps of them, and the inputs and augmentations meant to carry over to generators never seen."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import recipes
import engine
import evaluate
import main
import presets
from model import INPUT_FILTERS, DeepfakeDetector, NeighbourResidual


def test_one_kind_sets_are_ranked_against_the_other_kind():
    scores = lambda labels, probs: {"labels": np.array(labels), "probs": np.array(probs)}  # noqa: E731
    test = scores([0, 0, 1, 1], [0.1, 0.7, 0.6, 0.9])  # the run's own test split
    scored = {"gan": scores([1, 1], [0.8, 0.2]), "photos": scores([0, 0], [0.75, 0.05]),
              "studio": scores([0], [0.3])}
    rows = {r["name"]: r for r in evaluate.pair_rows(scored, test, threshold=0.5)}
    assert set(rows) == {"gan vs test reals", "gan vs photos", "gan vs studio", "gan vs photos+studio",
                         "test fakes vs photos", "test fakes vs studio"}
    # fakes 0.8, 0.2 against reals 0.1, 0.7: 3 of 4 pairs ranked right
    assert rows["gan vs test reals"]["roc_auc"] == 0.75 and rows["gan vs test reals"]["real"] == 2
    assert rows["gan vs photos+studio"]["roc_auc"] == pytest.approx(4 / 6)
    assert rows["gan vs photos+studio"]["reals_called_fake"] == pytest.approx(1 / 3)
    assert rows["gan vs photos+studio"]["fakes_called_fake"] == 0.5
    assert rows["test fakes vs photos"]["roc_auc"] == 0.75  # 0.6, 0.9 against 0.75, 0.05


def copy_split(run, split, label, dest, keep=slice(None)):
    """Copy the files of one class of one split of a finished run into dest; returns their paths there."""
    with open(run / "split.csv", newline="") as f:
        paths = [r["path"] for r in csv.DictReader(f) if r["split"] == split and r["class"] == label][keep]
    dest.mkdir(parents=True)
    return [shutil.copy(p, dest) for p in paths]


def test_a_fake_only_and_a_real_only_folder_get_their_auc(trained_run, tmp_path):
    """Folders holding the run's own test fakes and (split in two) its test reals: every pairing must
    give back the test split's own ranking, image for image."""
    copy_split(trained_run, "test", "fake", tmp_path / "gan" / "fake_data")
    copy_split(trained_run, "test", "real", tmp_path / "photos" / "real_data", slice(0, None, 2))
    copy_split(trained_run, "test", "real", tmp_path / "studio" / "real_data", slice(1, None, 2))
    out = tmp_path / "out"
    metrics = main.main(main.parse_args([
        "--evaluate_only", "--checkpoint", str(trained_run / "checkpoints" / "best.pt"), "--workers", "0",
        "--precision", "fp32", "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
        "--test_sets", *(f"{n}={tmp_path / n}" for n in ("gan", "photos", "studio"))]))
    with open(out / "evaluation" / "predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    prob = {r["path"].rsplit("/", 1)[-1]: float(r["fake_probability"]) for r in preds}
    labels = np.array([r["label"] == "fake" for r in preds], int)
    in_domain = metrics["at_val_threshold"]["roc_auc"]
    assert in_domain == pytest.approx(roc_auc_score(labels, [prob[r["path"].rsplit("/", 1)[-1]] for r in preds]))
    rows = {r["name"]: r for r in json.loads((out / "evaluation" / "metrics.json").read_text())["test_sets"]}
    assert rows["gan"]["kind"] == "fakes" and rows["photos"]["kind"] == "reals"
    assert rows["gan vs test reals"]["roc_auc"] == pytest.approx(in_domain, abs=1e-6)
    assert rows["gan vs photos+studio"]["roc_auc"] == pytest.approx(in_domain, abs=1e-6)
    photos = [prob[p.name] for p in (tmp_path / "photos" / "real_data").iterdir()]
    fakes = [prob[p.name] for p in (tmp_path / "gan" / "fake_data").iterdir()]
    expected = roc_auc_score([0] * len(photos) + [1] * len(fakes), photos + fakes)
    assert rows["gan vs photos"]["roc_auc"] == pytest.approx(expected, abs=1e-6)
    assert rows["test fakes vs photos"]["roc_auc"] == pytest.approx(expected, abs=1e-6)
    threshold = metrics["at_val_threshold"]["threshold"]
    assert rows["gan vs photos+studio"]["reals_called_fake"] == pytest.approx(
        np.mean([prob[r["path"].rsplit("/", 1)[-1]] >= threshold for r in preds if r["label"] == "real"]))
    summary = (out / "evaluation" / "summary.md").read_text()
    with open(trained_run / "split.csv", newline="") as f:
        train = [r["class"] for r in csv.DictReader(f) if r["split"] == "train"]
    assert "## Beyond its training data" in summary
    assert f"The model trained on {train.count('real')} real and {train.count('fake')} fake images" in summary
    assert "| gan | photos+studio |" in summary and "| test fakes | studio |" in summary


def write_run(folder, test_sets):
    """The files recipes.recipe_row reads, as a finished main.py run leaves them."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"best_epoch": 1, "at_val_threshold": {"roc_auc": 0.97},
                                                     "test_sets": test_sets}))
    (folder / "history.csv").write_text("epoch,val_auc,epoch_s,train_img_s\n1,0.95,60,20\n")
    return folder


def test_compare_keeps_the_headline_pairs_and_their_mean(tmp_path):
    rows = [{"name": "test split (in-domain)", "roc_auc": 0.97},
            {"name": "dfdc", "kind": "labelled", "roc_auc": 0.7},
            {"name": "gan", "kind": "fakes", "roc_auc": None}, {"name": "a", "kind": "reals"},
            {"name": "b", "kind": "reals"},
            {"name": "gan vs test reals", "kind": "pair", "fakes": "gan", "reals": "test reals", "roc_auc": 0.6},
            {"name": "gan vs a", "kind": "pair", "fakes": "gan", "reals": "a", "roc_auc": 0.1},
            {"name": "gan vs a+b", "kind": "pair", "fakes": "gan", "reals": "a+b", "roc_auc": 0.8,
             "reals_called_fake": 0.25},
            {"name": "test fakes vs a", "kind": "pair", "fakes": "test fakes", "reals": "a", "roc_auc": 0.3}]
    row = recipes.recipe_row(write_run(tmp_path / "run", rows))
    assert row["sets"] == {"dfdc": 0.7, "gan vs test reals": 0.6, "gan vs a+b": 0.8,
                           recipes.UNSEEN_MEAN: pytest.approx(0.7)}
    assert row["called_fake"] == {"a+b called fake": 0.25}


def test_npr_keeps_only_what_nearest_neighbour_upsampling_cannot_make():
    small = torch.rand(2, 3, 8, 8)
    upsampled = small.repeat_interleave(2, -1).repeat_interleave(2, -2)  # what a nearest 2x up-sampling makes
    assert NeighbourResidual()(upsampled).abs().max() == 0
    assert NeighbourResidual()(torch.rand(2, 3, 16, 16)).abs().mean() > 0.1
    assert INPUT_FILTERS["highpass"]()(torch.full((1, 3, 9, 9), 0.3)).abs().max() < 1e-6


def test_a_checkpoint_keeps_its_input_filter_and_jpeg_step(tmp_path):
    config = {"model": "resnet18", "input_filter": "npr", "image_size": 32, "input_jpeg": 60, "crop_pct": 1}
    model = DeepfakeDetector("resnet18", "none", input_filter="npr").eval()
    engine.save_checkpoint({"model": model.state_dict(), "args": config}, tmp_path / "ckpt.pt")
    detector = engine.load_detector(tmp_path / "ckpt.pt", "cpu", "fp32")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        # atol: the loaded model runs channels_last, whose convolutions round differently
        assert torch.allclose(detector.model(x), model(x), atol=1e-5)
        model.input_filter = INPUT_FILTERS["none"]()
        assert not torch.allclose(detector.model(x), model(x), atol=1e-5)  # the filter changes what the backbone sees
    pixels = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(detector.transform(pixels), presets.eval_transform(32, model.mean, model.std, 1, 60)(pixels))
    assert not torch.equal(detector.transform(pixels), presets.eval_transform(32, model.mean, model.std, 1)(pixels))


def test_input_jpeg_is_the_last_step_of_training_and_evaluation_alike():
    from conftest import sample_face

    pixels = torch.from_numpy(sample_face().copy()).permute(2, 0, 1)
    tf = presets.transforms({"image_size": 256, "crop_pct": 1, "augment": "none", "input_jpeg": 50}, (0.5,) * 3,
                            (0.5,) * 3)
    plain = presets.eval_transform(256, (0.5,) * 3, (0.5,) * 3, crop_pct=1)(pixels)
    assert torch.equal(tf.train(pixels), tf.eval(pixels))
    assert (tf.eval(pixels) - plain).abs().mean() > 0.005  # quality 50 visibly changes a 256-px face


def test_rescale_softens_about_half_the_faces():
    from test_dataset import augmented_face

    def detail(x):
        return float((x[..., 1:] - x[..., :-1]).abs().mean())
    plain, outs = augmented_face("rescale")
    softer = sum(detail(out) < 0.97 * detail(plain) for out in outs)
    assert all(out.shape == plain.shape for out in outs) and 10 <= softer <= 30


def test_pretrained_runs_compress_their_input_and_old_checkpoints_keep_theirs():
    import config
    pretrained, scratch = main.parse_args(["--model", "efficientnet_lite0"]), main.parse_args(["--weights", "none"])
    config.fill_defaults(pretrained)
    config.fill_defaults(scratch)
    assert (pretrained.input_jpeg, scratch.input_jpeg) == (config.PRETRAINED["input_jpeg"], 0)
    assert pretrained.input_jpeg > 0
    given = main.parse_args(["--model", "efficientnet_lite0", "--input_jpeg", "0"])
    config.fill_defaults(given)
    assert given.input_jpeg == 0  # a flag the user passed wins
    # a checkpoint saved before --input_jpeg existed was trained on uncompressed input: it keeps that
    old = main.parse_args(["--evaluate_only"])
    config.take_flags_from_checkpoint(old, {"model": "efficientnet_lite0", "weights": "imagenet"})
    config.fill_defaults(old)
    assert (old.input_jpeg, old.input_filter) == (0, "none")
