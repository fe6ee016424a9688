"""runtime.py: ONNX Runtime scores like eager fp32 PyTorch, and --runtime auto uses it only where it pays."""
import csv

import numpy as np
import pytest
import torch

import engine
import predict
import runtime
import utils

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ckpt(trained_run):
    return trained_run / "checkpoints" / "best.pt"


def scores(ckpt, images, tmp_path, *flags):
    out = tmp_path / f"{'_'.join(flags)}.csv"
    predict.main(predict.get_args_parser().parse_args(["--checkpoint", str(ckpt), "--input", *map(str, images),
                                                       "--no_crop", "--output", str(out), *flags]))
    with open(out, newline="") as f:
        return {r["input"]: float(r["fake_probability"]) for r in csv.DictReader(f)}


def test_predict_through_onnx_runtime_matches_eager_fp32(ckpt, trained_run, tmp_path):
    with open(trained_run / "split.csv", newline="") as f:
        test = [r["path"] for r in csv.DictReader(f) if r["split"] == "test"]
    eager = scores(ckpt, test, tmp_path, "--runtime", "torch", "--precision", "fp32", "--device", "cpu")
    onnx = scores(ckpt, test, tmp_path, "--runtime", "onnx", "--device", "cpu")
    assert len(eager) == len(test) and np.std(list(eager.values())) > 1e-3  # scores that say something
    np.testing.assert_allclose([onnx[p] for p in test], [eager[p] for p in test], atol=1e-3)


def test_the_exported_scorer_is_used_and_keeps_the_model_for_gradcam(ckpt):
    detector = engine.load_detector(ckpt, "cpu", "fp32")
    x = torch.randn(5, 3, detector.image_size, detector.image_size)
    before = detector.fake_probs(x)
    scorer = runtime.choose_scorer(detector, "onnx")
    assert isinstance(scorer, runtime.OnnxScorer) and detector.scorer is scorer
    assert not isinstance(detector.model, runtime.OnnxScorer)  # Grad-CAM needs gradients
    with torch.no_grad():  # a changed PyTorch model no longer changes the scores: they come from the export
        for p in detector.model.head.parameters():  # whatever the head is (a Linear, or Dropout + Linear)
            p.add_(10.0)
    torch.testing.assert_close(detector.fake_probs(x), before, atol=1e-5, rtol=0)
    assert runtime.describe(detector).startswith("ONNX Runtime")


@pytest.mark.parametrize("asked, precision, n_images, expected", [
    ("auto", utils.Precision(CPU), runtime.EXPORT_PAYS_AT, True),        # a folder of many images
    ("auto", utils.Precision(CPU), runtime.EXPORT_PAYS_AT - 1, False),   # too few to pay back the export
    ("auto", utils.Precision(CPU), None, True),                          # a server
    ("auto", utils.Precision(CPU, torch.bfloat16, True), None, False),   # native bf16: autocast is faster
    ("auto", utils.Precision(torch.device("cuda")), None, False),        # GPUs stay with PyTorch
    ("torch", utils.Precision(CPU), None, False),                        # turned off
    ("onnx", utils.Precision(CPU, torch.bfloat16, True), 1, True),       # asked for
])
def test_auto_exports_only_where_it_pays(asked, precision, n_images, expected):
    assert runtime.pays_off(asked, precision, n_images) is expected
