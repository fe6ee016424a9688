"""predict.py: verdicts agree with training's evaluation, videos, no-face and bad inputs, outputs."""
import csv
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import config
import engine
import main
import predict
import utils
from model import DeepfakeDetector

ROOT = Path(__file__).resolve().parents[1]


def run_predict(*argv):
    return predict.main(predict.get_args_parser().parse_args([str(a) for a in argv]))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ckpt(trained_run):
    return trained_run / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def test_split(trained_run, ckpt):
    """The run's test images and the P(fake) that main.py --evaluate_only computes for them
    (its own functions: flags from the checkpoint, load_detector, load_data, engine.evaluate)."""
    args = main.parse_args(["--evaluate_only", "--checkpoint", str(ckpt), "--workers", "0"])
    config.take_flags_from_checkpoint(args, engine.load_checkpoint(ckpt)["args"])
    detector = engine.load_detector(ckpt)
    ds = main.load_data(args, detector.model, utils.Dist()).datasets["test"]
    out = engine.evaluate(detector.model, nn.CrossEntropyLoss(), engine.make_loader(ds, 16, 0, utils.Dist()),
                          detector.precision)
    return [s.path for s in ds.samples], out["probs"]


def test_no_crop_scores_match_training_evaluation(ckpt, test_split, tmp_path):
    paths, expected = test_split
    out = run_predict("--checkpoint", ckpt, "--input", *paths, "--no_crop", "--output", tmp_path / "p.csv")
    rows = read_csv(tmp_path / "p.csv")
    assert list(rows[0]) == predict.CSV_COLUMNS
    got = {r["input"]: float(r["fake_probability"]) for r in rows}
    # same pixels, same bf16 path: equal up to batch-size effects in the kernels (a skipped
    # resize_square step, by contrast, moves these scores by ~0.007 on average)
    np.testing.assert_allclose([got[p] for p in paths], expected, atol=1e-3)
    threshold = float(rows[0]["threshold"])
    assert threshold == pytest.approx(engine.load_checkpoint(ckpt)["threshold"])
    assert np.std(expected) > 1e-3  # a model that scores every face alike would make this test say nothing
    assert all(r["label"] == ("fake" if float(r["fake_probability"]) >= threshold else "real") for r in rows)
    assert len(out["results"]) == len(paths) and not out["errors"]


def test_video_no_face_and_bad_inputs(ckpt, face_video, tmp_path):
    video = face_video
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.new("RGB", (320, 240), (128, 128, 128)).save(inputs / "gray.png")
    (inputs / "notes.txt").write_text("not media")
    (inputs / "broken.mp4").write_bytes(video.read_bytes()[:4000])  # header cut off mid-way
    (inputs / "random.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    out_dir = tmp_path / "results_path"  # no suffix: a folder, as in the seed project
    out = run_predict("--checkpoint", ckpt, "--input", video, inputs, inputs / "notes.txt", "--frames", "4",
                      "--output", out_dir)
    by_name = {Path(r["input"]).name: r for r in out["results"]}
    vid = by_name[video.name]
    assert vid["kind"] == "video" and vid["frames"] == 4 and 1 <= vid["faces"] <= 4
    assert vid["label"] in ("real", "fake")
    assert vid["fake_probability"] == pytest.approx(predict.video_score([r["fake_probability"] for r in vid["rows"]],
                                                                        predict.DEFAULT_AGGREGATION))
    assert all(len(r["box"]) == 4 for r in vid["rows"])
    gray = by_name["gray.png"]
    assert gray["label"] == predict.NO_FACE and gray["fake_probability"] is None and gray["faces"] == 0
    errors = dict(out["errors"])
    for name in ("notes.txt", "broken.mp4", "random.jpg"):  # each named in its one-line message
        assert any(name in k and name in v and "\n" not in v for k, v in errors.items()), name
    rows = read_csv(out_dir / "predictions.csv")
    frame_rows = [r for r in rows if r["row"] == "frame"]
    assert len(frame_rows) == vid["faces"] and all(r["x1"] and r["input"] == str(video) for r in frame_rows)
    assert {r["label"] for r in rows if r["row"] == "input"} >= {predict.NO_FACE, "error"}
    saved = json.loads((out_dir / "predictions.json").read_text())
    assert saved["threshold"] == pytest.approx(out["results"][0]["threshold"])
    assert [i["input"] for i in saved["inputs"]] == [r["input"] for r in out["results"]]
    with pytest.raises(SystemExit, match="overwrite"):  # earlier results are not replaced silently
        run_predict("--checkpoint", ckpt, "--input", inputs / "gray.png", "--output", out_dir)


def test_gradcam_files_and_refusal_to_overwrite(ckpt, sample_root, tmp_path):
    images = sorted((sample_root / "fake_data").glob("*.jpg"))[:2]
    cams = tmp_path / "cams"
    run_predict("--checkpoint", ckpt, "--input", *images, "--gradcam", cams)
    files = sorted(cams.iterdir())
    assert [f.name for f in files] == [f"{p.stem}_f0000_0_gradcam.png" for p in images]
    with Image.open(files[0]) as im:
        assert im.width == 256 and im.height > 256  # the 256 px face crop plus a caption strip
    with pytest.raises(SystemExit, match="overwrite"):
        run_predict("--checkpoint", ckpt, "--input", *images, "--gradcam", cams)


def test_scoring_one_image_in_a_few_lines(ckpt, sample_root):
    p = predict.Predictor(ckpt, no_crop=True)
    image = sorted((sample_root / "fake_data").glob("*.jpg"))[0]
    found = p.read(image)
    probs = p.score(found.crops)
    assert found.kind == "image" and found.frames == 1 and len(probs) == 1 and 0 <= probs[0] <= 1
    assert p.label(probs.mean()) == p.predict_file(image)["label"] == ("fake" if probs[0] >= p.threshold else "real")


def test_predictor_is_thread_safe_and_returns_the_web_fields(ckpt, sample_root):
    predictor = predict.Predictor(ckpt, no_crop=True)
    images = sorted((sample_root / "real_data").glob("*.jpg"))[:4]
    alone = [predictor.predict_file(p, gradcam=True) for p in images]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: predictor.predict_file(p, gradcam=True), images))
    for a, b in zip(alone, together):
        assert a["fake_probability"] == pytest.approx(b["fake_probability"], abs=1e-6)
        assert len(b["gradcam"]) == len(b["crops"]) == len(b["rows"]) == 1
        assert np.array_equal(np.asarray(a["gradcam"][0]), np.asarray(b["gradcam"][0]))
        assert b["kind"] == "image" and b["rows"][0]["box"] is None and b["frames"] == 1


@pytest.mark.parametrize("kind", ["random bytes", "torchvision state_dict", "mismatched weights", "unknown model"])
def test_wrong_checkpoint_gives_one_clear_line(ckpt, tmp_path, kind):
    bad = tmp_path / "bad.pt"
    if kind == "random bytes":
        bad.write_bytes(np.random.default_rng(0).bytes(1000))
    elif kind == "torchvision state_dict":
        torch.save(DeepfakeDetector("resnet18", "none").backbone.state_dict(), bad)
    else:
        state = engine.load_checkpoint(ckpt)
        if kind == "mismatched weights":
            weights = next(k for k, v in state["model"].items() if v.ndim == 2)  # the head's Linear, by shape
            state["model"][weights] = torch.zeros(3, 7)
        else:
            state["args"]["model"] = "no_such_net"
        torch.save(state, bad)
    with pytest.raises(engine.CheckpointError) as err:
        predict.Predictor(bad)
    message = str(err.value)
    assert str(bad) in message and "\n" not in message


def test_exit_code_when_nothing_could_be_scored(ckpt, tmp_path):
    (tmp_path / "a.txt").write_text("x")
    cmd = [sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(ckpt), "--no_crop", "--input"]
    bad = subprocess.run(cmd + [str(tmp_path / "a.txt"), str(tmp_path / "missing.jpg")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1
    lines = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and "a.txt: not an image or video" in lines[0] and "missing.jpg: file not found" in lines[1]
    with pytest.raises(SystemExit, match="none.pt: checkpoint not found"):  # sys.exit(message): code 1
        run_predict("--checkpoint", tmp_path / "none.pt", "--input", tmp_path / "a.txt")


def test_an_existing_file_as_output_folder_is_one_clear_error(ckpt, tmp_path):
    (tmp_path / "foo.jpg").write_bytes(b"an earlier picture")
    with pytest.raises(SystemExit, match="--output .*foo.jpg is an existing file"):
        run_predict("--checkpoint", ckpt, "--input", tmp_path / "foo.jpg", "--output", tmp_path / "foo.jpg")
    assert (tmp_path / "foo.jpg").read_bytes() == b"an earlier picture"


def test_degenerate_and_oversized_pictures(ckpt, tmp_path):
    Image.new("RGB", (1, 5000), (120, 90, 80)).save(tmp_path / "sliver.png")
    Image.new("1", (7000, 7000)).save(tmp_path / "bomb.png")  # a few KB on disk, 49 MP decoded
    out = run_predict("--checkpoint", ckpt, "--input", tmp_path / "sliver.png", tmp_path / "bomb.png",
                      "--max_pixels", "40000000")
    [sliver] = out["results"]
    assert sliver["label"] == predict.NO_FACE and sliver["faces"] == 0
    [(path, message)] = out["errors"]
    assert path.endswith("bomb.png") and "7000x7000" in message and "--max_pixels" in message


def test_a_truncated_video_is_scored_on_what_decodes_and_says_so(ckpt, tmp_path):
    import av
    from conftest import face_scene
    frames, whole = face_scene(8), tmp_path / "whole.mp4"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as out:  # the frame index up front
        stream = out.add_stream("mpeg4", rate=10)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for rgb in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    data = whole.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 6 // 10])  # a download that stopped
    out = run_predict("--checkpoint", ckpt, "--input", tmp_path / "cut.mp4", whole, "--frames", "8")
    cut, full = out["results"]
    assert 1 <= cut["frames"] < 8 and "truncated" in cut["warning"] and cut["label"] in ("real", "fake")
    assert full["frames"] == 8 and "warning" not in full


def test_video_score_rules():
    few_confident = [0.95, 0.9, 0.92, 0.3, 0.2, 0.35, 0.3]  # 3 of 7 frames clearly fake
    assert predict.video_score(few_confident, "mean") == pytest.approx(np.mean(few_confident))
    assert predict.video_score(few_confident, "confident") == pytest.approx(np.mean([0.95, 0.9, 0.92]))
    calm = [0.05] * 19 + [0.6]
    assert predict.video_score(calm, "confident") == pytest.approx(0.05)
    mixed = [0.5, 0.6, 0.4, 0.9]
    assert predict.video_score(mixed, "confident") == predict.video_score(mixed, "mean") == pytest.approx(0.6)
