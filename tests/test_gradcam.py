"""Grad-CAM maps: right size and range, informative, model left untouched, any backbone."""
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import gradcam
import presets
from media import load_rgb
from predict import Predictor


class Wrapped(nn.Module):
    """A torchvision network shaped like DeepfakeDetector (backbone without classifier + head)."""

    def __init__(self, net, size):
        super().__init__()
        linear = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
        for name, m in net.named_modules():  # the classifier's last Linear becomes an identity, as in model.py
            if m is linear:
                parent, _, attr = name.rpartition(".")
                setattr(net.get_submodule(parent), attr, nn.Identity())
        self.backbone, self.head, self.input_size = net, nn.Linear(linear.in_features, 2), size

    def forward(self, x):
        return self.head(self.backbone(x))


@pytest.fixture(scope="module")
def trained(trained_run, sample_root):
    """The tiny trained model and four faces at 128 px (a 4x4 map at layer4; at its 64 px, 2x2)."""
    predictor = Predictor(trained_run / "checkpoints" / "best.pt", no_crop=True)
    model = predictor.model
    to_input = presets.eval_transform(128, model.mean, model.std)
    paths = (sorted((sample_root / "real_data").glob("*.jpg"))[:2]
             + sorted((sample_root / "fake_data").glob("*.jpg"))[:2])
    x = torch.stack([to_input(torch.from_numpy(presets.resize_square(load_rgb(p), 146)).permute(2, 0, 1))
                     for p in paths])
    return predictor, x


def test_maps_have_image_size_range_and_structure(trained):
    predictor, x = trained
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # as predict calls it
        maps = gradcam.GradCAM(predictor.model)(x)
    assert maps.shape == (len(x), x.shape[2], x.shape[3]) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert all(m.std() > 0.01 for m in maps), "a heatmap is flat"
    # maps depend on the image: four different faces do not all get the same heatmap
    assert max((maps[0] - m).abs().max() for m in maps[1:]) > 0.05


def test_frozen_backbone_and_training_mode_are_restored(trained):
    predictor, x = trained
    net = predictor.model
    net.freeze_backbone(True)
    net.train()
    try:
        before = {n: p.requires_grad for n, p in net.named_parameters()}
        maps = gradcam.GradCAM(net)(x[:1])
        assert maps.std() > 0  # gradients reached the frozen backbone's feature map
        assert {n: p.requires_grad for n, p in net.named_parameters()} == before
        assert all(p.grad is None for p in net.parameters())
        assert net.training and not net.backbone.training  # frozen backbone keeps BatchNorm in eval
    finally:
        net.freeze_backbone(False)
        net.eval()


@pytest.mark.parametrize("build,size,layer_type", [
    (lambda: torchvision.models.mobilenet_v3_small(), 64, nn.Sequential),
    (lambda: torchvision.models.efficientnet_b0(), 64, nn.Sequential),
    (lambda: torchvision.models.VisionTransformer(32, 8, 1, 2, 16, 32), 32, nn.LayerNorm),
])
def test_target_layer_found_for_other_backbones(build, size, layer_type):
    torch.manual_seed(0)
    net = Wrapped(build(), size).eval()
    cam = gradcam.GradCAM(net)
    assert isinstance(cam.layer, layer_type)
    maps = cam(torch.randn(2, 3, size, size))
    assert maps.shape == (2, size, size) and torch.isfinite(maps).all()
    assert maps.std() > 0


def test_backbone_without_spatial_map_is_refused():
    net = Wrapped(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8), nn.ReLU(), nn.Linear(8, 8)), 16)
    with pytest.raises(gradcam.GradCAMUnsupported, match="not supported"):
        gradcam.GradCAM(net)


def test_overlay_keeps_the_picture_and_adds_a_caption():
    face = Image.new("RGB", (80, 80), (128, 128, 128))
    cam = np.zeros((20, 20), np.float32)
    cam[5:10, 5:10] = 1.0
    out = gradcam.overlay(face, cam, "P(fake) 0.900")
    assert out.width == 80 and out.height > 80  # caption strip below
    top = np.asarray(out)[:80].astype(int)
    # the hot square is tinted red, a cold corner blue: the map is placed where it belongs
    assert top[30, 30, 0] > top[30, 30, 2] and top[75, 75, 2] > top[75, 75, 0]
    assert gradcam.overlay(face, cam).size == face.size


def test_training_run_writes_gradcam_examples(trained_run):
    path = trained_run / "gradcam_examples.png"
    assert path.is_file()
    with Image.open(path) as im:
        assert im.width > 400 and im.height > 200
        assert np.asarray(im.convert("L")).std() > 20  # a picture, not a blank page
    assert "gradcam_examples.png" in (trained_run / "summary.md").read_text()
