"""DeepfakeDetector: a torchvision backbone with a two-class head (0 real, 1 fake).

    model = DeepfakeDetector("resnet18", weights="imagenet")   # torchvision's weights API
    model = DeepfakeDetector("resnet18", weights="none")       # random init (offline, tests)
    model = DeepfakeDetector("resnet18", weights="resnet18-f37072fd.pth")  # a file you copied
    logits = model(x)                                          # (B, 3, 224, 224) -> (B, 2)

The backbone's own classifier (the last Linear layer) is replaced by nn.Identity,
so `model.backbone(x)` gives features (B, D) and `model.head` maps them to two
logits. Keeping the two apart is what makes freezing the backbone simple.
"""
import torch
from torch import nn
from torchvision import models

# name -> (builder, ImageNet weights). Every entry's classifier ends in an nn.Linear.
MODELS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
}


class WeightsError(RuntimeError):
    """Pretrained weights could not be loaded; the message lists the ways out."""


def _last_linear(net):
    """(parent module, attribute name, layer) of the network's final nn.Linear."""
    name = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, attr = name.rpartition(".")
    return net.get_submodule(parent_name), attr, net.get_submodule(name)


def _load_pretrained(name, weights):
    """Build the torchvision network with ImageNet weights, downloaded or from a file."""
    builder, enum = MODELS[name]
    if weights == "imagenet":
        try:
            return builder(weights=enum)
        except Exception as e:  # URLError, socket timeout, hash mismatch...: all mean "no weights"
            raise WeightsError(
                f"could not download ImageNet weights for {name} ({type(e).__name__}: {e}).\n"
                f"Three ways out:\n"
                f"  1. connect to the internet and run again (the file is cached after one download);\n"
                f"  2. train from random init: --weights none;\n"
                f"  3. copy the file by hand and pass it: --weights PATH (file: {enum.url})") from None
    net = builder(weights=None)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except FileNotFoundError:
        raise WeightsError(f"{weights}: weights file not found; use --weights imagenet|none|PATH") from None
    except Exception as e:
        raise WeightsError(f"{weights}: not an ImageNet {name} state_dict ({type(e).__name__}: "
                           f"{str(e).splitlines()[0]}); download {enum.url} or use --weights none") from None
    return net


class DeepfakeDetector(nn.Module):
    """Backbone + two-class head.

    Args:
        name: a key of MODELS.
        weights: "imagenet", "none", or a path to the backbone's ImageNet state_dict.
        num_classes: 2 (real, fake).
        freeze_backbone: train the head only (backbone weights and BatchNorm statistics fixed).
    """

    def __init__(self, name="resnet18", weights="imagenet", num_classes=2, freeze_backbone=False):
        super().__init__()
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        net = MODELS[name][0](weights=None) if weights in (None, "none") else _load_pretrained(name, weights)
        parent, attr, linear = _last_linear(net)
        setattr(parent, attr, nn.Identity())
        self.backbone = net
        self.head = nn.Linear(linear.in_features, num_classes)
        # preprocessing the weights were trained with: used by the data transforms
        preset = MODELS[name][1].transforms()
        self.name, self.mean, self.std = name, tuple(preset.mean), tuple(preset.std)
        self.input_size = preset.crop_size[0]
        self.backbone_frozen = False
        self.freeze_backbone(freeze_backbone)

    def forward(self, x):
        return self.head(self.backbone(x))  # (B, 3, H, W) -> (B, D) -> (B, num_classes)

    def freeze_backbone(self, frozen=True):
        for p in self.backbone.parameters():
            p.requires_grad = not frozen
        self.backbone_frozen = frozen
        self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()  # frozen means BatchNorm running statistics stay fixed too
        return self
