"""Verdicts on new media: real, fake or "uncertain (no face)" for images, folders and videos.

    python predict.py --checkpoint results/checkpoints/best.pt --input photo.jpg clip.mp4 some_folder/
    python predict.py --checkpoint results/checkpoints/best.pt --input ../shared/data/videos --output preds.csv
    python predict.py --checkpoint results/checkpoints/best.pt --input crops/ --no_crop --gradcam cams/
    python predict.py --checkpoint results/checkpoints/best.pt --input video.mp4 --output results_path
    python predict.py --checkpoint none --input ../shared/data/faces140k --benchmark 256   # speed table

Faces are cut exactly as the training data was made (faces.crop_faces with its default
margin and size, largest face per frame), then resized and normalized exactly like the
training cache + eval transform (dataset.resize_square to cache_size_for(image_size),
dataset.eval_transform). --no_crop skips detection for inputs that already are face crops,
so its scores match `main.py --evaluate_only` on the same images.

Verdict: every face gets P(fake); a video's P(fake) is the MEAN over the faces of its
sampled frames (--frames, evenly spaced). The label is fake when that mean >= the threshold
stored in the checkpoint (chosen on the validation split at the EER point; 0.5 when the
checkpoint has none, and the output says so). No face anywhere -> "uncertain (no face)".

--output FILE.csv has one row per input (row=input) and, for videos, one per scored face
(row=frame). Columns: input, kind (image|video), row (input|frame), frame (index in the
video, 0 for images), face (0 = largest), label (real|fake|uncertain (no face)|error),
fake_probability (mean for input rows), threshold, frames (frames read), faces (faces
scored), x0, y0, x1, y1 (face box in source pixels, empty with --no_crop), error.
--output FILE.json holds the same as {"checkpoint", "threshold", "threshold_source",
"aggregation", "inputs": [{..., "rows": [...]}], "errors": [...]}. An --output without a
.csv/.json suffix is a folder that gets predictions.csv and predictions.json.

Exit code: 0 when at least one input got a verdict (an unreadable input is reported on one
line and skipped), 1 when none did or the checkpoint cannot be used.
"""
import argparse
import copy
import csv
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dataset
import engine
import faces
import gradcam
from main import _positive  # the same flag check as training
from model import MODELS, DeepfakeDetector

NO_FACE = "uncertain (no face)"
CSV_COLUMNS = ["input", "kind", "row", "frame", "face", "label", "fake_probability", "threshold", "frames",
               "faces", "x0", "y0", "x1", "y1", "error"]


def to_input(pil, image_size, transform):
    """PIL face crop -> normalized (3, S, S), exactly as the training cache + eval transform."""
    pixels = dataset.resize_square(pil, dataset.cache_size_for(image_size))  # (s, s, 3) uint8, as cached
    return transform(torch.from_numpy(pixels).permute(2, 0, 1))


@torch.inference_mode()
def fake_probs(model, x, amp_dtype=None):
    """P(fake) of a batch, computed like engine.evaluate (autocast forward, fp32 softmax)."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(x).float()
    return logits.softmax(1)[:, 1].cpu()


class Predictor:
    """A checkpoint loaded once; predict_file() may be called from several threads."""

    def __init__(self, checkpoint, device="auto", precision="auto", detector="yunet", frames=32,
                 no_crop=False, batch_size=32):
        self.device = engine.get_device(device)
        ckpt = engine.load_checkpoint(checkpoint, "cpu")  # CheckpointError names the file
        cargs = ckpt["args"] if isinstance(ckpt["args"], dict) else {}
        name = cargs.get("model")
        if name not in MODELS:
            raise engine.CheckpointError(f"{checkpoint}: trained for model {name!r}, which model.py does not "
                                         f"know (known: {', '.join(MODELS)})")
        self.model = DeepfakeDetector(name, "none", freeze_backbone=bool(cargs.get("freeze_backbone")),
                                      image_size=cargs.get("image_size"))  # ViT's position grid depends on it
        try:
            self.model.load_state_dict(ckpt["model"])
        except Exception as e:  # wrong shapes or keys: another architecture's weights
            raise engine.CheckpointError(f"{checkpoint}: its weights do not fit a {name} DeepfakeDetector "
                                         f"({str(e).splitlines()[0][:150]})") from None
        self.model.eval().to(self.device)
        self.amp = engine.autocast_dtype(self.device, precision)
        self.channels_last = self.amp is not None  # as in training: NHWC is what bf16 conv kernels want
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.image_size = cargs.get("image_size") or self.model.input_size
        self.transform = dataset.eval_transform(self.image_size, self.model.mean, self.model.std)
        self.classes = list(ckpt.get("classes") or dataset.CLASSES)
        self.threshold, self.threshold_source = ckpt.get("threshold"), "checkpoint (val EER point)"
        if self.threshold is None:
            self.threshold, self.threshold_source = 0.5, "0.5 default (checkpoint has no threshold)"
        self.frames, self.no_crop, self.batch_size = frames, no_crop, batch_size
        self.detect = None if no_crop else faces.load_detector(detector)
        # one forward (or Grad-CAM) at a time: hooks and timing counters are shared state
        self._model_lock, self._detect_lock = threading.Lock(), threading.Lock()
        self._cam, self.gradcam_error = None, None
        self.model_seconds, self.model_images = 0.0, 0

    def preprocess(self, pil):
        return to_input(pil, self.image_size, self.transform)

    def score(self, tensors):
        """P(fake) per preprocessed face, in batches of batch_size (fast path: bf16 + channels_last)."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        probs = []
        for i in range(0, len(tensors), self.batch_size):
            x = torch.stack(tensors[i:i + self.batch_size]).to(self.device, memory_format=fmt)
            with self._model_lock:
                start = time.perf_counter()
                probs.append(fake_probs(self.model, x, self.amp))
                self.model_seconds += time.perf_counter() - start
                self.model_images += len(x)
        return torch.cat(probs).numpy() if probs else np.zeros(0)

    def _read(self, path):
        """(kind, [(frame, face, PIL crop, box)], frames read, warning); MediaError if unreadable."""
        path = Path(path)
        if not path.is_file():
            raise faces.MediaError(f"{path}: file not found")
        if faces.is_video(path):
            kind, frames = "video", faces.sample_frames(path, self.frames)
        elif faces.is_image(path):
            rgb = faces.load_image(path)  # training's loader: any mode, EXIF-rotated; MediaError if broken
            if self.no_crop:  # preprocess() centre-crops it to a square exactly as the training cache did
                return "image", [(0, 0, Image.fromarray(rgb), None)], 1, None
            kind, frames = "image", [(0, rgb)]
        else:
            raise faces.MediaError(f"{path}: not an image or video (extensions: "
                                   f"{' '.join(sorted(faces.IMAGE_EXTS | faces.VIDEO_EXTS))})")
        items, read, warning = [], 0, None
        try:
            for index, rgb in frames:
                read += 1
                if self.no_crop:  # a video of face crops: each frame is the crop
                    items.append((index, 0, Image.fromarray(rgb), None))
                    continue
                with self._detect_lock:
                    found = faces.crop_faces(rgb, self.detect)  # training's margin and size
                items += [(index, k, crop, [int(v) for v in box[:4]]) for k, (crop, box) in enumerate(found)]
        except faces.MediaError as e:
            if not read:
                raise
            warning = f"decoding stopped early, kept {read} frames ({e})"
        return kind, items, read, warning

    def predict_file(self, path, gradcam=False):
        """Verdict for one image or video; see the module docstring for the dict's keys."""
        [(_, result)] = self.predict_many([path], gradcam)
        if isinstance(result, Exception):
            raise result
        return result

    def predict_many(self, paths, gradcam=False):
        """Yield (path, result dict or the MediaError/ValueError/OSError it raised) in input order.

        Faces of consecutive inputs share batches: a folder of photos is scored batch_size at a
        time instead of one image per forward pass.
        """
        pending, n_faces = [], 0
        for path in paths:
            try:
                read = self._read(path)
                n_faces += len(read[1])
            except (faces.MediaError, ValueError, OSError) as e:
                read = e
            pending.append((path, read))
            if n_faces >= self.batch_size:
                yield from self._finish(pending, gradcam)
                pending, n_faces = [], 0
        yield from self._finish(pending, gradcam)

    def _finish(self, pending, gradcam):
        """Score the faces of the pending inputs together, then build one result per input."""
        tensors = [self.preprocess(crop) for _, read in pending if not isinstance(read, Exception)
                   for _, _, crop, _ in read[1]]
        probs = self.score(tensors)
        maps = self.gradcam_maps(tensors) if gradcam else None
        i = 0
        for path, read in pending:
            if isinstance(read, Exception):
                yield path, read
                continue
            kind, items, n_read, warning = read
            p, q = (float(probs[i:i + len(items)].mean()) if items else None), probs[i:i + len(items)]
            result = {"input": str(path), "kind": kind, "fake_probability": p, "threshold": self.threshold,
                      "label": NO_FACE if p is None else self.classes[int(p >= self.threshold)],  # mean rule
                      "frames": n_read, "faces": len(items), "crops": [crop for _, _, crop, _ in items],
                      "rows": [{"frame": f, "face": k, "fake_probability": float(x), "box": box}
                               for (f, k, _, box), x in zip(items, q)]}
            if warning:
                result["warning"] = f"{path}: {warning}"
            if gradcam:
                result["gradcam"] = [] if maps is None else self.overlays(result, maps[i:i + len(items)])
            i += len(items)
            yield path, result

    def gradcam_maps(self, tensors):
        """(N, S, S) Grad-CAM maps of the fake logit, or None (and gradcam_error set) if unsupported."""
        with self._model_lock:
            if self._cam is None and self.gradcam_error is None:
                try:
                    self._cam = gradcam.GradCAM(self.model)
                except gradcam.GradCAMUnsupported as e:
                    self.gradcam_error = str(e)
            if self._cam is None:
                return None
            return torch.cat([self._cam(torch.stack(tensors[i:i + self.batch_size]).to(self.device))
                              for i in range(0, len(tensors), self.batch_size)] or [torch.zeros(0)])

    def overlays(self, result, maps):
        """One heatmap overlay per face of a result, captioned with its score and verdict."""
        captions = [(f"frame {r['frame']}  " if result["kind"] == "video" else "") + f"P(fake) "
                    f"{r['fake_probability']:.3f} {self.classes[int(r['fake_probability'] >= self.threshold)]}"
                    for r in result["rows"]]
        return [gradcam.overlay(c, m.numpy(), text) for c, m, text in zip(result["crops"], maps, captions)]


# ----------------------------------------------------------------------------- command line
def find_inputs(paths):
    """Files as given (checked later, one message each) and folders searched recursively."""
    files, problems = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and (faces.is_image(f) or faces.is_video(f)))
            files += found
            if not found:
                problems.append(f"{p}: no images or videos inside")
        else:
            files.append(p)
    return list(dict.fromkeys(files)), problems


def output_paths(output):
    """--output FILE.csv / FILE.json, or a folder (seed-project style) with both."""
    if not output:
        return []
    out = Path(output)
    return [out] if out.suffix.lower() in (".csv", ".json") else [out / "predictions.csv", out / "predictions.json"]


def write_outputs(results, errors, paths, predictor, checkpoint):
    rows = []
    for r in results:
        rows.append({**r, "row": "input", "frame": 0 if r["kind"] == "image" else "", "face": ""})
        if r["kind"] == "video":
            rows += [{**f, "input": r["input"], "kind": "video", "row": "frame", "threshold": r["threshold"],
                      "label": predictor.classes[int(f["fake_probability"] >= r["threshold"])]} for f in r["rows"]]
        elif r["rows"]:  # an image's one face: its box goes on the input row
            rows[-1].update(face=0, box=r["rows"][0]["box"])
    rows += [{"input": path, "row": "input", "label": "error", "error": msg} for path, msg in errors]
    for row in rows:
        row.update(zip(("x0", "y0", "x1", "y1"), row.pop("box", None) or [""] * 4))
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".csv":
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
        else:
            keep = [{k: v for k, v in r.items() if k not in ("crops", "gradcam")} for r in results]
            path.write_text(json.dumps({"checkpoint": str(checkpoint), "threshold": predictor.threshold,
                                        "threshold_source": predictor.threshold_source,
                                        "aggregation": "mean P(fake) over the scored faces of an input",
                                        "inputs": keep, "errors": [{"input": p, "error": m} for p, m in errors]},
                                       indent=2) + "\n")
        print(f"wrote {path}")


def save_gradcams(result, folder, stem):
    for row, picture in zip(result["rows"], result.get("gradcam", [])):
        picture.save(folder / f"{stem}_f{row['frame']:04d}_{row['face']}_gradcam.png")


def main(args):
    """Score every input; returns {"results", "errors"}. Refuses to overwrite earlier outputs."""
    if args.benchmark:
        return benchmark_inference(args.checkpoint, find_inputs(args.input)[0][:args.benchmark], args.batch_size,
                                   args.device)
    outputs = output_paths(args.output)
    gradcam_dir = Path(args.gradcam) if args.gradcam else None
    if not args.overwrite:
        for p in [p for p in outputs if p.exists()] + ([gradcam_dir] if gradcam_dir and gradcam_dir.is_dir()
                                                       and any(gradcam_dir.iterdir()) else []):
            sys.exit(f"{p} already exists (not empty); pass --overwrite to replace it or choose another path")
    try:
        predictor = Predictor(args.checkpoint, args.device, args.precision, args.detector, args.frames,
                              args.no_crop, args.batch_size)
    except (engine.CheckpointError, ImportError) as e:  # ImportError: the face detector's package is missing
        sys.exit(f"error: {e}")
    if predictor.threshold_source.startswith("0.5"):
        print(f"note: {args.checkpoint} stores no threshold (interrupted training?); using 0.5", file=sys.stderr)
    files, problems = find_inputs(args.input)
    errors = [(p.split(":")[0], p) for p in problems]
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if gradcam_dir:
        gradcam_dir.mkdir(parents=True, exist_ok=True)
    stems, clashes = set(), {f.stem for f in files if sum(g.stem == f.stem for g in files) > 1}
    results, start = [], time.perf_counter()
    for path, r in predictor.predict_many(files, gradcam=gradcam_dir is not None):
        if isinstance(r, Exception):  # one line, then the next input
            print(f"error: {r}", file=sys.stderr)
            errors.append((str(path), str(r)))
            continue
        results.append(r)
        p = "-" if r["fake_probability"] is None else f"{r['fake_probability']:.3f}"
        print(f"{r['label']:<20} P(fake) {p:>5}  {r['kind']}, {r['frames']} frame(s) read, "
              f"{r['faces']} face(s) scored  {path}")
        if r.get("warning"):
            print(f"warning: {r['warning']}", file=sys.stderr)
        if gradcam_dir:
            save_gradcams(r, gradcam_dir, faces.unique_stem(path, clashes, stems))
    seconds = time.perf_counter() - start
    if gradcam_dir and predictor.gradcam_error:
        print(f"note: no heatmaps written: {predictor.gradcam_error}", file=sys.stderr)
    n_faces = sum(r["faces"] for r in results)
    model_speed = predictor.model_images / predictor.model_seconds if predictor.model_seconds else float("nan")
    print(f"{len(results)} of {len(files)} input(s) scored, {n_faces} face(s) in {seconds:.1f} s "
          f"({n_faces / max(seconds, 1e-9):.1f} faces/s end to end incl. decoding and detection; model "
          f"{model_speed:.1f} img/s, {predictor.amp or 'fp32'}); threshold {predictor.threshold:.3f} "
          f"from {predictor.threshold_source}")
    write_outputs(results, errors, outputs, predictor, args.checkpoint)
    return {"results": results, "errors": errors}


# ----------------------------------------------------------------------------- speed
def benchmark_inference(checkpoint, images, batch_size=32, device="auto", image_size=224, repeats=2):
    """Print model img/s of the default path vs plain fp32 eager, on the same face crops, in one run.

    checkpoint "none" (or None) builds resnet18 with random weights (speed does not depend on
    the weights) at image_size. Times the model only: crops are decoded and preprocessed once.
    Rows: fp32 eager one image at a time (torch.no_grad, contiguous tensors: the plain way a
    script scores a file), fp32 eager with the same batch, and predict.py's default (bf16
    autocast where the CPU/GPU has it, channels_last, inference_mode, --batch_size). Best of
    `repeats` passes. Returns {row name: img/s}.
    """
    device = engine.get_device(device)
    if checkpoint in (None, "none"):
        model = DeepfakeDetector("resnet18", "none").eval().to(device)
    else:
        predictor = Predictor(checkpoint, device, "fp32", no_crop=True)
        model, image_size = predictor.model, predictor.image_size
    transform = dataset.eval_transform(image_size, model.mean, model.std)
    x = torch.stack([to_input(dataset.load_rgb(p), image_size, transform) for p in images]).to(device)
    amp = engine.autocast_dtype(device, "auto")
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last) if amp is not None else model

    def plain(batch):
        with torch.no_grad():
            model(batch).float().softmax(1)

    def default(batch):
        fake_probs(fast, batch.contiguous(memory_format=torch.channels_last) if amp is not None else batch, amp)

    rows = [("fp32 eager, 1 image at a time", plain, 1), (f"fp32 eager, batch {batch_size}", plain, batch_size),
            (f"default: {amp or 'fp32'} + {'channels_last' if amp else 'contiguous'} + inference_mode, "
             f"batch {batch_size}", default, batch_size)]
    print(f"{len(x)} face crops at {image_size} px on {device} ({torch.get_num_threads()} threads); model only")
    print(f"{'path':<64} {'img/s':>8} {'vs first':>8}")
    speeds = dict.fromkeys([name for name, _, _ in rows], 0.0)
    for name, fn, bs in rows:
        fn(x[:bs])  # warm-up: first calls pick kernels and allocate
    for _ in range(repeats):  # rows take turns, so a busy moment on the machine hits all of them
        for name, fn, bs in rows:
            start = time.perf_counter()
            for i in range(0, len(x), bs):
                fn(x[i:i + bs])
            speeds[name] = max(speeds[name], len(x) / (time.perf_counter() - start))
    base = speeds[rows[0][0]]
    for name, speed in speeds.items():
        print(f"{name:<64} {speed:8.1f} {speed / base:7.2f}x")
    return speeds


def get_args_parser():
    p = argparse.ArgumentParser(description="Real/fake verdicts for images, folders and videos. A video's "
                                "P(fake) is the mean over the faces of its sampled frames; the label uses "
                                "the checkpoint's threshold (0.5 if it has none).")
    p.add_argument("--checkpoint", default="results/checkpoints/best.pt",
                   help="checkpoint written by main.py (default: results/checkpoints/best.pt)")
    p.add_argument("--input", nargs="+", required=True,
                   help="images, videos, or folders (searched recursively) to score")
    p.add_argument("--output", default=None, help="FILE.csv or FILE.json for per-input and per-frame rows; any "
                   "other path is a folder that gets predictions.csv and predictions.json (default: none, "
                   "stdout only)")
    p.add_argument("--frames", type=_positive(int), default=32, help="frames sampled evenly per video (default: 32)")
    p.add_argument("--no_crop", action="store_true", help="inputs already are face crops: skip face detection "
                   "(default: off, detect and crop like faces.py)")
    p.add_argument("--detector", choices=["yunet", "dlib"], default="yunet", help="face detector (default: yunet)")
    p.add_argument("--gradcam", default=None, metavar="DIR", help="write a Grad-CAM overlay per scored face "
                   "into DIR; refuses a non-empty DIR without --overwrite (default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --output files and write into "
                   "a non-empty --gradcam DIR (default: off)")
    p.add_argument("--batch_size", type=_positive(int), default=32, help="faces per forward pass (default: 32)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast + channels_last where the hardware has bf16, else fp32 "
                   "(default: auto)")
    p.add_argument("--benchmark", type=int, default=0, metavar="N", help="only print model img/s of the "
                   "default path vs plain fp32 on the first N images of --input; --checkpoint none uses a "
                   "random 224 px resnet18 (default: 0 = off)")
    return p


if __name__ == "__main__":
    out = main(get_args_parser().parse_args())
    sys.exit(0 if "results" not in out or out["results"] else 1)
