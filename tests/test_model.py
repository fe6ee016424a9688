"""DeepfakeDetector: shapes, freezing, weights loading, and that it can learn."""
import urllib.error

import pytest
import torch
from torch import nn
from torchvision import models

import dataset
from model import DeepfakeDetector, WeightsError


def test_output_is_two_logits_per_image():
    model = DeepfakeDetector("resnet18", weights="none")
    assert model(torch.randn(3, 3, 64, 64)).shape == (3, 2)
    assert model.input_size == 224 and len(model.mean) == 3


def test_frozen_backbone_gets_no_gradient_and_keeps_bn_statistics():
    model = DeepfakeDetector("resnet18", weights="none", freeze_backbone=True)
    model.train()
    bn_before = model.backbone.bn1.running_mean.clone()
    nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 0, 1])).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    assert torch.equal(model.backbone.bn1.running_mean, bn_before)
    model.freeze_backbone(False)
    model.train()
    assert model.backbone.training and all(p.requires_grad for p in model.parameters())


def test_weights_from_a_local_file(tmp_path):
    reference = models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = DeepfakeDetector("resnet18", weights=str(tmp_path / "resnet18.pth"))
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    torch.save({"something": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="bad.pth"):
        DeepfakeDetector("resnet18", weights=str(tmp_path / "bad.pth"))
    with pytest.raises(WeightsError, match="not found"):
        DeepfakeDetector("resnet18", weights=str(tmp_path / "missing.pth"))


def test_offline_download_failure_lists_three_ways_out(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as e:
        DeepfakeDetector("resnet18", weights="imagenet")
    text = str(e.value)
    assert "--weights none" in text and "--weights PATH" in text and "resnet18-f37072fd.pth" in text


def test_tiny_model_overfits_a_small_real_batch(faces_root):
    """8 real + 8 fake faces, random init: the loss must go to ~0 (the model and loss are wired right)."""
    torch.manual_seed(0)
    paths = sorted((faces_root / "real_data").glob("*.jpg"))[:8] + sorted((faces_root / "fake_data").glob("*.jpg"))[:8]
    tf = dataset.eval_transform(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x = torch.stack([tf(torch.from_numpy(dataset.resize_square(dataset.load_rgb(p), 73)).permute(2, 0, 1))
                     for p in paths])
    y = torch.tensor([0] * 8 + [1] * 8)
    model = DeepfakeDetector("resnet18", weights="none")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).all()
    assert loss.item() < 0.05
