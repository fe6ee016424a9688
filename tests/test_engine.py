"""engine.py's loops and report.py's metrics against numbers worked out by hand."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import engine
import presets
import report
import utils
from media import load_rgb
from model import DeepfakeDetector

CPU = utils.Precision(torch.device("cpu"))


class FixedLogits(nn.Module):
    """Returns the logits stored as the input itself: the loss of every image is known in advance."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # an optimizer needs something to hold

    def forward(self, x):
        return x + 0 * self.unused


def test_loops_average_over_images_when_the_last_batch_is_smaller():
    # 5 images in batches of 2, 2, 1; the lone last image has a huge loss, the others small ones
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0], [0.0, 8.0]])
    labels = torch.tensor([0, 1, 0, 1, 0])  # the last one is wrong, with loss ~8
    per_image = nn.functional.cross_entropy(logits, labels, reduction="none")
    loader = DataLoader(TensorDataset(logits, labels), batch_size=2)
    model = FixedLogits()
    stats = engine.evaluate(model, nn.CrossEntropyLoss(), loader, CPU)
    assert stats["loss"] == pytest.approx(per_image.mean().item())  # not the mean of the 3 batch means
    assert stats["acc"] == pytest.approx(4 / 5)
    np.testing.assert_allclose(stats["probs"], logits.softmax(1)[:, 1].numpy(), rtol=1e-6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train = engine.train_one_epoch(model, nn.CrossEntropyLoss(), optimizer, loader, CPU, epoch=0)
    assert train["loss"] == pytest.approx(per_image.mean().item()) and train["acc"] == pytest.approx(4 / 5)


def test_train_one_epoch_drives_the_loss_down_on_a_tiny_real_batch(sample_root):
    """8 real + 8 fake faces, random init, the engine's own loop: the model and loss are wired right."""
    torch.manual_seed(0)
    paths = (sorted((sample_root / "real_data").glob("*.jpg"))[:8]
             + sorted((sample_root / "fake_data").glob("*.jpg"))[:8])
    model = DeepfakeDetector("resnet18", weights="none")
    tf = presets.eval_transform(64, model.mean, model.std)
    x = torch.stack([tf(torch.from_numpy(presets.resize_square(load_rgb(p), 73)).permute(2, 0, 1)) for p in paths])
    loader = DataLoader(TensorDataset(x, torch.tensor([0] * 8 + [1] * 8)), batch_size=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = [engine.train_one_epoch(model, nn.CrossEntropyLoss(), optimizer, loader, CPU, e)["loss"]
              for e in range(40)]
    assert losses[0] > 0.5 and losses[-1] < 0.05
    assert engine.evaluate(model, nn.CrossEntropyLoss(), loader, CPU)["acc"] == 1.0


def test_weight_average_is_the_decay_weighted_mean_of_the_weights_and_batchnorm_statistics():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    average, decay = engine.weight_average(model, decay=0.9), 0.9
    start = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for step in range(4):  # weights and running statistics at start + 0, 1, 2, 3 in turn
        with torch.no_grad():
            for k, v in start.items():
                model.state_dict()[k].copy_(v + step)
        average.update_parameters(model)
    weights = decay ** np.arange(3, -1, -1)  # 0.9**3 for the first step seen ... 1 for the last
    expected = (weights * np.arange(4)).sum() / weights.sum()  # no trace of anything before the first
    for k, v in start.items():
        torch.testing.assert_close(average.module.state_dict()[k], v + expected, msg=k)
    assert average.module[1].num_batches_tracked == model[1].num_batches_tracked
    x = torch.randn(4, 2)
    model.eval(), average.eval()
    assert not torch.allclose(average.module(x), model(x))  # scoring uses the average, not the model


# six images worked out by hand: sorted by P(fake) they are .9 fake, .8 fake, .7 real, .3 fake, .2 real, .1 real
LABELS = np.array([0, 0, 0, 1, 1, 1])
PROBS = np.array([0.1, 0.2, 0.7, 0.3, 0.8, 0.9])


def test_metrics_match_a_hand_computation():
    m = report.compute_metrics(LABELS, PROBS, threshold=0.5)
    assert m["roc_auc"] == pytest.approx(8 / 9)  # 8 of the 9 (fake, real) pairs are ordered right
    assert m["average_precision"] == pytest.approx((1 + 1 + 3 / 4) / 3)  # precision at each fake found
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # fake is the positive class: scoring real as positive would give 1/9 and another precision
    assert report.roc_auc(LABELS, PROBS) == pytest.approx(8 / 9)
    assert report.compute_metrics(LABELS, PROBS, threshold=0.75)["precision"] == pytest.approx(1.0)


def test_eer_threshold_is_where_miss_and_false_alarm_rates_meet():
    # at 0.7: 1 of 3 real called fake (FPR 1/3) and 1 of 3 fakes missed (FNR 1/3)
    threshold, eer = report.eer_threshold(LABELS, PROBS)
    assert threshold == pytest.approx(0.7) and eer == pytest.approx(1 / 3)
    threshold, eer = report.eer_threshold(np.array([1, 1]), np.array([0.2, 0.9]))  # one class: no ROC curve
    assert threshold == 0.5 and np.isnan(eer)


def test_one_loss_trains_validates_and_scores_and_names_the_plot(sample_root, tmp_path, monkeypatch):
    from test_main import tiny_args

    import main
    calls = []

    class HalfLoss(nn.CrossEntropyLoss):  # what a student's own loss looks like
        def forward(self, logits, labels):
            calls.append(torch.is_grad_enabled())  # True in a training step, False in validation and scoring
            return super().forward(logits, labels) / 2
    monkeypatch.setattr(engine, "make_criterion", lambda config: HalfLoss())
    main.main(tiny_args(sample_root, tmp_path / "run", "--epochs", "1", "--max_per_class", "8"))
    assert True in calls and False in calls  # training, and validation + test scoring
    assert engine.loss_name(HalfLoss()) == "Half loss" and engine.loss_name(nn.CrossEntropyLoss()) == \
        "Cross entropy loss"


def test_history_keeps_rows_from_before_a_new_column(tmp_path):
    report.write_history_csv([{"epoch": 1, "val_auc": 0.8}, {"epoch": 2, "val_auc": 0.9, "val_precision": 0.7}],
                             tmp_path / "history.csv")
    assert (tmp_path / "history.csv").read_text().splitlines() == [
        "epoch,val_auc,val_precision", "1,0.8,", "2,0.9,0.7"]


def test_a_frozen_backbone_caches_features_only_when_training_images_never_change(sample_root, tmp_path,
                                                                                 monkeypatch, capsys):
    from test_main import tiny_args
    from torchvision.transforms import v2

    import main
    flags = ["--epochs", "1", "--max_per_class", "8", "--freeze_backbone", "--augment", "none"]
    main.main(tiny_args(sample_root, tmp_path / "cached", *flags))
    assert "computing features of" in capsys.readouterr().out
    monkeypatch.setitem(presets.AUGMENTATIONS, "none", (False, [v2.RandomRotation(10)]))  # a student's new step
    main.main(tiny_args(sample_root, tmp_path / "rotated", *flags))
    said = capsys.readouterr().out
    assert "computing features of" not in said and "the training images change every epoch" in said
