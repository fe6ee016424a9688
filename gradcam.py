"""Grad-CAM: which pixels pushed the detector towards "fake".

Grad-CAM (Selvaraju et al., 2017) weights the feature maps of a late layer by the
mean gradient of a class logit and keeps the positive part; upsampled, that map
shows where the evidence for the class lies. Written here with hooks, no extra
package, so predict.py, the web demo and the training report share one version.

    from gradcam import GradCAM, overlay
    cam = GradCAM(model)                     # target layer found automatically
    maps = cam(x)                            # x (B, 3, H, W) normalized -> (B, H, W) in [0, 1]
    overlay(face_pil, maps[0], "P(fake) 0.93").save("face_cam.png")

The target layer is the last child of `model.backbone` whose output is a spatial
map: layer4 for ResNets, `features` for EfficientNet/MobileNet/ConvNeXt. For torchvision
ViTs it is the last encoder block's first LayerNorm, whose tokens (B, 1 + h*w, D) are
reshaped to an (h, w) grid after dropping the class token. A backbone with neither raises
GradCAMUnsupported.
"""
import math

import matplotlib

matplotlib.use("Agg")  # files only, never windows (servers, CI)
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

FAKE = 1  # class index of "fake" (labels: 0 real, 1 fake)


class GradCAMUnsupported(ValueError):
    """The model has no layer with a spatial feature map to explain."""


def _as_grid(t):
    """A layer output as a (B, C, h, w) map, or None: ViT tokens (B, 1+h*w, D) become a grid."""
    if not torch.is_tensor(t):
        return None
    if t.dim() == 4 and t.shape[2] * t.shape[3] > 1:
        return t
    if t.dim() == 3:
        for skip in (1, 0):  # with or without a class token in front
            side = math.isqrt(t.shape[1] - skip)
            if side > 1 and side * side == t.shape[1] - skip:
                return t[:, skip:].transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)
    return None


def find_target_layer(model):
    """The last child of model.backbone whose output is a spatial map (probed on a dummy input)."""
    backbone = getattr(model, "backbone", model)
    if hasattr(backbone, "layer4"):  # ResNets: the standard Grad-CAM layer
        return backbone.layer4
    if hasattr(getattr(backbone, "encoder", None), "layers"):
        # torchvision ViT: the head reads the class token only, so later outputs get no gradient
        # on the patch tokens; the input of the last block's attention does (as pytorch-grad-cam uses)
        return backbone.encoder.layers[-1].ln_1
    spatial, hooks = [], []
    for child in backbone.children():
        hooks.append(child.register_forward_hook(
            lambda m, i, o: spatial.append(m) if _as_grid(o) is not None else None))
    size = getattr(model, "input_size", 224)
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=param.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not spatial:
        name = getattr(model, "name", type(backbone).__name__)
        raise GradCAMUnsupported(f"Grad-CAM not supported for {name}: no layer gives a spatial feature map")
    return spatial[-1]


class GradCAM:
    """Callable: x (B, 3, H, W) -> (B, H, W) float maps in [0, 1] for one class logit.

    Runs in fp32 with gradients on, even when called inside torch.inference_mode()
    or autocast, and leaves the model as it was (mode, requires_grad, .grad).
    """

    def __init__(self, model, target_layer=None, class_index=FAKE):
        self.model, self.class_index = model, class_index
        self.layer = target_layer if target_layer is not None else find_target_layer(model)

    def __call__(self, x):
        saved = {}
        hook = self.layer.register_forward_hook(lambda m, i, o: saved.__setitem__("act", o))
        was_training = self.model.training
        device = x.device.type
        try:
            self.model.eval()
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device, enabled=False):
                # a fresh leaf that needs grad: the graph is built even if every weight is frozen
                x = x.detach().clone().float().requires_grad_(True)
                logits = self.model(x)
                act = saved["act"]
                # autograd.grad (not backward) leaves the parameters' .grad untouched
                (grad,) = torch.autograd.grad(logits[:, self.class_index].sum(), act)
        finally:
            hook.remove()
            self.model.train(was_training)
        if _as_grid(act) is None:  # e.g. ResNet's layer4 on a 32 px input is 1x1: nothing to localise
            raise GradCAMUnsupported(f"Grad-CAM needs a spatial feature map; got {tuple(act.shape)} "
                                     f"at input size {tuple(x.shape[2:])}")
        act, grad = _as_grid(act.detach()).float(), _as_grid(grad).float()
        weights = grad.mean(dim=(2, 3), keepdim=True)                 # (B, C, 1, 1): importance per channel
        cam = F.relu((weights * act).sum(1, keepdim=True))            # (B, 1, h, w)
        cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
        lo, hi = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
        # per-map min-max scaling (Grad-CAM values have no absolute unit); a flat map stays 0
        return ((cam - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))).cpu()


def blend(rgb, cam_map, alpha=0.45):
    """uint8 (H, W, 3) image + (h, w) map in [0, 1] -> uint8 (H, W, 3) with a jet heatmap on top."""
    cam = np.asarray(cam_map, dtype=np.float32)
    if cam.shape != rgb.shape[:2]:
        cam = np.asarray(Image.fromarray(cam).resize((rgb.shape[1], rgb.shape[0]), Image.BILINEAR))
    heat = matplotlib.colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255  # (H, W, 3)
    return ((1 - alpha) * rgb + alpha * heat).round().clip(0, 255).astype(np.uint8)


def overlay(image, cam_map, caption="", alpha=0.45):
    """PIL image with the Grad-CAM heatmap blended in and `caption` in a strip below."""
    img = Image.fromarray(blend(np.asarray(image.convert("RGB")), cam_map, alpha))
    if not caption:
        return img
    font = ImageFont.load_default(size=max(11, img.width // 16))
    strip = font.size + 8
    out = Image.new("RGB", (img.width, img.height + strip), "white")
    out.paste(img, (0, 0))
    ImageDraw.Draw(out).text((4, img.height + 3), caption, fill="black", font=font)
    return out


def _denormalize(x, mean, std):
    """Normalized (B, 3, H, W) -> uint8 (B, H, W, 3), to show what the model saw."""
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return ((x.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def save_examples(model, dataset, probs, labels, threshold, path, device, per_category=4):
    """gradcam_examples.png: the most confident right and wrong calls per true class, with heatmaps.

    Returns the path, or None when there is nothing to show or the model has no
    spatial layer (the reason is printed; training reports go on without it).
    """
    probs, labels = np.asarray(probs), np.asarray(labels)
    pred_fake = probs >= threshold
    categories = [("real, called real", (labels == 0) & ~pred_fake), ("real, called fake", (labels == 0) & pred_fake),
                  ("fake, called fake", (labels == 1) & pred_fake), ("fake, called real", (labels == 1) & ~pred_fake)]
    # most confident first: a confident mistake is the most instructive picture
    rows = [(title, sorted(np.flatnonzero(mask), key=lambda i: -abs(probs[i] - threshold))[:per_category])
            for title, mask in categories if mask.any()]
    if not rows:
        return None
    index = [i for _, idx in rows for i in idx]
    x = torch.stack([dataset[i][0] for i in index]).to(device)
    try:
        maps = GradCAM(model)(x).numpy()
    except GradCAMUnsupported as e:
        print(f"skipping {path}: {e}")
        return None
    images = _denormalize(x, model.mean, model.std)
    pictures = dict(zip(index, (blend(im, m) for im, m in zip(images, maps))))
    fig, axes = plt.subplots(len(rows), per_category, figsize=(2.4 * per_category, 2.7 * len(rows)), squeeze=False)
    for r, (title, idx) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(idx):
                ax.imshow(pictures[idx[c]])
                ax.set_title(f"{title}\nP(fake) {probs[idx[c]]:.3f}", fontsize=9)
    fig.suptitle(f"Grad-CAM of the fake logit (red = pushes towards fake); threshold {threshold:.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
