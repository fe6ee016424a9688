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
from torchvision.models import vision_transformer

# name -> (builder, ImageNet weights). Every entry's classifier ends in an nn.Linear, and
# that last Linear is what gets replaced (see _last_linear). Where the classifier holds more
# than that Linear, the rest stays in the backbone as pretrained feature layers:
#   efficientnet_*, mobilenet_v2: Dropout, Linear       -> features after the dropout (1280-d)
#   mobilenet_v3_large: Linear(960, 1280), Hardswish, Dropout, Linear -> the first Linear is kept
#       (the standard fine-tuning choice: its 1280-d output is what the ImageNet head read)
#   convnext_tiny: LayerNorm2d, Flatten, Linear          -> normalised 768-d features
#   vit_b_16: heads.head                                 -> the class token (768-d)
# Input size and mean/std come from each weights enum's transforms() (see input_size()).
# Another library's network (e.g. Xception from timm) plugs in the same way: see README.
MODELS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
    "efficientnet_b0": (models.efficientnet_b0, models.EfficientNet_B0_Weights.IMAGENET1K_V1),
    "efficientnet_v2_s": (models.efficientnet_v2_s, models.EfficientNet_V2_S_Weights.IMAGENET1K_V1),
    "mobilenet_v2": (models.mobilenet_v2, models.MobileNet_V2_Weights.IMAGENET1K_V2),
    "mobilenet_v3_large": (models.mobilenet_v3_large, models.MobileNet_V3_Large_Weights.IMAGENET1K_V2),
    "convnext_tiny": (models.convnext_tiny, models.ConvNeXt_Tiny_Weights.IMAGENET1K_V1),
    "vit_b_16": (models.vit_b_16, models.ViT_B_16_Weights.IMAGENET1K_V1),
}
# vision transformers have a fixed input size (their position embeddings), CNNs pool to any size
FIXED_SIZE = {"vit_b_16"}


def input_size(name):
    """The crop size the ImageNet weights were trained at: 224 for most, 384 for efficientnet_v2_s."""
    return MODELS[name][1].transforms().crop_size[0]


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
    except Exception as e:  # torch's text for an unsafe pickle advises weights_only=False: never pass that on
        why = ("it holds Python objects, not only tensors, and is not loaded for safety" if "weights_only" in str(e)
               else f"{type(e).__name__}: {str(e).splitlines()[0]}")
        raise WeightsError(f"{weights}: not an ImageNet {name} state_dict ({why}); download {enum.url} "
                           f"or use --weights none") from None
    return net


def _build(name, weights, image_size):
    """The torchvision network, at `image_size` for the fixed-size ones (ViT)."""
    native = input_size(name)
    if name not in FIXED_SIZE or image_size in (None, native):
        return MODELS[name][0](weights=None) if weights in (None, "none") else _load_pretrained(name, weights)
    if image_size % 16:
        raise ValueError(f"{name} cuts images into 16-px patches: --image_size must be a multiple of 16, "
                         f"got {image_size}")
    net = MODELS[name][0](weights=None, image_size=image_size)
    if weights not in (None, "none"):  # pretrained at 224: resample its position embeddings to the new grid
        state = vision_transformer.interpolate_embeddings(image_size, 16, _load_pretrained(name, weights).state_dict())
        net.load_state_dict(state)
    return net


class FlipAverage(nn.Module):
    """Test-time augmentation: the logits of each image and of its mirror image, averaged.

    Faces are left-right symmetric enough that a detector should say the same of both, so the
    average smooths out a verdict that hangs on one side of the face (--tta flip; it costs
    two forward passes per image).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return (self.model(x) + self.model(x.flip(3))) / 2  # (B, 3, H, W): flip the width


class DeepfakeDetector(nn.Module):
    """Backbone + two-class head.

    Args:
        name: a key of MODELS.
        weights: "imagenet", "none", or a path to the backbone's ImageNet state_dict.
        num_classes: 2 (real, fake).
        freeze_backbone: train the head only (backbone weights and BatchNorm statistics fixed).
        image_size: input size; only fixed-size networks (vit_b_16) are built for it, CNNs
            take any size. Pass the checkpoint's args["image_size"] when rebuilding one.
    """

    def __init__(self, name="resnet18", weights="imagenet", num_classes=2, freeze_backbone=False,
                 image_size=None):
        super().__init__()
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        net = _build(name, weights, image_size)
        if weights in (None, "none"):
            # MobileNetV3 keeps BatchNorm statistics with momentum 0.01 (tuned for
            # hundreds of ImageNet epochs); from random init in a few epochs they would barely move
            # from their start and eval-mode outputs collapse to one constant. Use PyTorch's 0.1.
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = 0.1
        parent, attr, linear = _last_linear(net)
        setattr(parent, attr, nn.Identity())
        self.backbone = net
        self.head = nn.Linear(linear.in_features, num_classes)
        # preprocessing the weights were trained with: used by the data transforms
        preset = MODELS[name][1].transforms()
        self.name, self.mean, self.std = name, tuple(preset.mean), tuple(preset.std)
        self.input_size = image_size or preset.crop_size[0]
        self.backbone_frozen = False
        self.freeze_backbone(freeze_backbone)

    def forward(self, x):
        return self.head(self.backbone(x))  # (B, 3, H, W) -> (B, D) -> (B, num_classes)

    def param_groups(self, lr, backbone_lr_scale=1.0):
        """Optimizer groups: backbone at lr * backbone_lr_scale, head at lr.

        Both groups always hold all their parameters, frozen or not: a frozen parameter
        gets no gradient and AdamW skips it, so the optimizer (and its checkpointed state)
        looks the same before and after unfreezing.
        """
        return [{"params": list(self.backbone.parameters()), "lr": lr * backbone_lr_scale, "name": "backbone",
                 "lr_scale": backbone_lr_scale},
                {"params": list(self.head.parameters()), "lr": lr, "name": "head", "lr_scale": 1.0}]

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
