"""Scoring through ONNX Runtime: the fast path for inference on CPUs that compute in fp32.

On an AVX2-only CPU without native bf16, ONNX Runtime runs the exported detector 1.35x
faster than PyTorch's channels_last fp32 and 1.55x faster than plain NCHW eager (benchmark.py
predict, 2-core AMD EPYC), with the same P(fake) to within 1e-6. The export takes a few
seconds, so it is done only where it pays back: a server at start-up, a folder of many images.

    scorer = runtime.choose_scorer(detector, "auto", n_images=len(files))  # model or OnnxScorer
    logits = scorer(batch)                                                  # like model(batch)

--runtime auto picks ONNX Runtime on a CPU running fp32 for at least EXPORT_PAYS_AT images;
CUDA and CPUs with native bf16 keep PyTorch (autocast is faster there). --runtime torch
turns it off; --runtime onnx asks for it whatever the device.
"""
import copy
import io
import warnings

import torch
from torch import nn

from cli import one_line

# 1-3 s to export and load; saves ~10 ms per 224-px image on a 2-core AVX2 CPU (benchmark.py predict)
EXPORT_PAYS_AT = 200
AGREE = 1e-3  # largest P(fake) difference between the export and PyTorch that passes without a word


class OnnxScorer(nn.Module):
    """A module whose forward runs an exported copy of `module` in ONNX Runtime on the CPU:
    (B, 3, S, S) float -> (B, num_classes) logits, any batch size. Thread-safe, like
    onnxruntime.InferenceSession.run. The weights are frozen at export time."""

    def __init__(self, module, image_size, threads=None):
        super().__init__()
        import onnxruntime  # only the inference paths need it

        graph = io.BytesIO()  # in memory: nothing written next to the user's checkpoint
        example = torch.zeros(1, 3, image_size, image_size)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter
            torch.onnx.export(copy.deepcopy(module).float().cpu().eval(), example, graph, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                              dynamo=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(graph.getvalue(), options, providers=["CPUExecutionProvider"])

    def forward(self, images):
        x = images.detach().float().cpu().contiguous().numpy()  # ONNX Runtime reads NCHW
        return torch.from_numpy(self.session.run(None, {"images": x})[0]).to(images.device)


def pays_off(runtime, precision, n_images=None):
    """Whether to score through ONNX Runtime: see the module docstring. n_images None: a server."""
    if runtime == "onnx":
        return True
    if runtime == "torch" or precision.device.type != "cpu" or precision.amp_dtype is not None:
        return False
    return n_images is None or n_images >= EXPORT_PAYS_AT


def choose_scorer(detector, runtime="auto", n_images=None):
    """Set detector.scorer to an OnnxScorer where that pays off (see pays_off); returns the scorer.
    detector.model stays the PyTorch module, for Grad-CAM. A model that does not export, or whose
    export disagrees with PyTorch by more than AGREE, keeps scoring in PyTorch, and says so once."""
    if not pays_off(runtime, detector.precision, n_images) or isinstance(detector.scorer, OnnxScorer):
        return detector.scorer
    try:
        onnx = OnnxScorer(detector.scorer, detector.input_side)
    except Exception as e:  # not installed, or an operator the exporter lacks (ViT's fused attention)
        print(f"warning: scoring with PyTorch: ONNX Runtime could not take this model "
              f"({one_line(e)})")
        return detector.scorer
    gap = disagreement(detector, onnx)
    if gap > AGREE:
        print(f"warning: scoring with PyTorch: the ONNX export's P(fake) differs from PyTorch's by {gap:.2g} "
              f"(more than {AGREE:g}) on a test batch")
        return detector.scorer
    detector.scorer = onnx
    return onnx


@torch.inference_mode()
def disagreement(detector, onnx, n=4):
    """Largest |P(fake)| difference between PyTorch (in fp32) and the export on n random images."""
    x = torch.randn(n, 3, detector.input_side, detector.input_side, generator=torch.Generator().manual_seed(0))
    scorer = detector.scorer
    mine = scorer(x.to(next(scorer.parameters()).device)).float().softmax(1)[:, 1].cpu()
    return float((mine - onnx(x).softmax(1)[:, 1]).abs().max())


def describe(detector):
    """What scores, for the logs: 'ONNX Runtime (cpu, fp32)' or the PyTorch precision."""
    return "ONNX Runtime (cpu, fp32)" if isinstance(detector.scorer, OnnxScorer) else f"PyTorch {detector.precision}"
