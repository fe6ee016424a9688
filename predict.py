"""Verdicts on new media: real, fake or "uncertain (no face)" for images, folders and videos.

    python predict.py --checkpoint results/checkpoints/best.pt --input photo.jpg clip.mp4 some_folder/
    python predict.py --checkpoint results/checkpoints/best.pt --input ../shared/data/videos --output preds.csv
    python predict.py --checkpoint results/checkpoints/best.pt --input crops/ --no_crop --gradcam cams/
    python predict.py --checkpoint results/checkpoints/best.pt --input video.mp4 --output results_path

Faces are cut exactly as the training data was made (detect.crop_faces with its default
margin and size, largest face per frame), then resized and normalized exactly like the
training cache + eval transform (engine.Detector.preprocess). --no_crop skips detection for
inputs that already are face crops, so its scores match `main.py --evaluate_only` on them.

Verdict: every face gets P(fake); a video's P(fake) joins the faces of its sampled frames
(--frames, evenly spaced) by --aggregation: the DFDC winner's confident-frames rule (default),
or their mean (video_score()). The label is fake when that score >= the threshold
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
import csv
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import detect
import engine
import gradcam
import runtime
from cli import add_machine_flags, interruptible, positive
from dataset import CLASSES
from media import (
    IMAGE_EXTS,
    MAX_PIXELS,
    VIDEO_EXTS,
    MediaError,
    find_media,
    is_image,
    is_video,
    load_rgb,
    sample_frames,
    unique_stem,
)

NO_FACE = "uncertain (no face)"
AGGREGATIONS = {
    "mean": "mean P(fake) over the scored faces of an input",
    "confident": "the DFDC winner's confident-frames rule over the scored faces (predict.video_score)",
}
CONFIDENT = 0.8  # P(fake) above this (or below 1 - this) counts as a confident frame
# measured on the labelled clips (docs/experiments.md#video-verdicts): never below the mean's clip AUC, above it twice
DEFAULT_AGGREGATION = "confident"


def video_score(probs, aggregation):
    """One P(fake) from the P(fake) of a video's faces (one face: itself).

    mean: their average. confident: the rule of the DFDC winner (Seferbekov, 2020): when more
    than 40% of the faces are confidently fake (above CONFIDENT), the mean of those, since a face
    swap often shows in some frames only; when over 90% are confidently real, the mean of those;
    else the plain mean."""
    probs = np.asarray(probs, dtype=np.float64)
    if aggregation == "confident":
        fake, real = probs[probs > CONFIDENT], probs[probs < 1 - CONFIDENT]
        if len(fake) > len(probs) / 2.5:
            return float(fake.mean())
        if len(real) > 0.9 * len(probs):
            return float(real.mean())
    return float(probs.mean())


CSV_COLUMNS = ["input", "kind", "row", "frame", "face", "label", "fake_probability", "threshold", "frames",
               "faces", "x0", "y0", "x1", "y1", "error"]


@dataclass
class Faces:
    """The faces found in one input file."""
    kind: str                                   # "image" or "video"
    crops: list = field(default_factory=list)   # PIL face crops, largest face of each frame
    rows: list = field(default_factory=list)    # per crop: {"frame", "face", "box"}
    frames: int = 0                             # frames read
    warning: str = ""                           # e.g. a video whose decoding stopped early


class Predictor:
    """A checkpoint loaded once. Score one image:

        p = Predictor("best.pt")
        found = p.read("face.jpg")              # Faces: crops, boxes, frames read
        probs = p.score(found.crops)            # P(fake) per face
        label = p.label(probs.mean())           # "real" or "fake"

    predict_file() does all three; read() and score() may be called from several threads.
    """

    def __init__(self, checkpoint, device="auto", precision="auto", detector="yunet", frames=32,
                 no_crop=False, batch_size=32, max_pixels=MAX_PIXELS, aggregation=DEFAULT_AGGREGATION):
        self.detector = engine.load_detector(checkpoint, device, precision)  # CheckpointError names the file
        self.model, self.threshold = self.detector.model, self.detector.threshold
        self.frames, self.no_crop, self.batch_size, self.max_pixels = frames, no_crop, batch_size, max_pixels
        self.aggregation = aggregation
        self.detect = None if no_crop else detect.load_detector(detector)
        # one forward or Grad-CAM at a time: Grad-CAM's hooks live on the shared model
        self._model_lock, self._detect_lock = threading.Lock(), threading.Lock()
        self._cam, self.gradcam_error = None, None

    def label(self, p):
        return NO_FACE if p is None else CLASSES[int(p >= self.threshold)]

    def read(self, path):
        """Faces of one image or video (the whole picture with --no_crop); MediaError if unreadable."""
        path = Path(path)
        if not path.is_file():
            raise MediaError(f"{path}: file not found")
        if is_video(path):
            found, frames = Faces("video"), sample_frames(path, self.frames, self.max_pixels)
        elif is_image(path):
            found, frames = Faces("image"), [(0, np.asarray(load_rgb(path, self.max_pixels)))]
        else:
            raise MediaError(f"{path}: not an image or video (extensions: "
                             f"{' '.join(sorted(IMAGE_EXTS | VIDEO_EXTS))})")
        try:
            for index, rgb in frames:
                found.frames += 1
                for k, (crop, box) in enumerate(self.find_faces(rgb)):
                    found.crops.append(crop)
                    found.rows.append({"frame": index, "face": k, "box": box})
        except MediaError as e:  # a truncated video: keep what decoded
            if not found.frames:
                raise
            found.warning = f"{path}: decoding stopped early, kept {found.frames} frames ({e})"
        return found

    def find_faces(self, rgb):
        """[(PIL crop, box)]: the largest face cut as in training, or the whole picture with --no_crop."""
        if self.no_crop:  # preprocess() centre-crops it to a square exactly as the training cache did
            return [(Image.fromarray(rgb), None)]
        # a model trained on native pixels (--input_route crop) scores the face at the picture's own pixels
        size = None if self.detector.route == "crop" else detect.FACE_SIZE
        with self._detect_lock:
            return [(crop, [int(v) for v in box[:4]]) for crop, box in detect.crop_faces(rgb, self.detect, size=size)]

    def score(self, crops):
        """P(fake) per face crop, batch_size faces per forward pass."""
        x = [self.detector.preprocess(c) for c in crops]
        with self._model_lock:
            probs = [self.detector.fake_probs(torch.stack(x[i:i + self.batch_size]))
                     for i in range(0, len(x), self.batch_size)]
        return torch.cat(probs).numpy() if probs else np.zeros(0)

    def gradcam_maps(self, crops):
        """(N, S, S) Grad-CAM maps of the fake logit, or None (and gradcam_error set) if unsupported."""
        with self._model_lock:
            if self._cam is None and self.gradcam_error is None:
                try:
                    self._cam = gradcam.GradCAM(self.model)
                except gradcam.GradCAMUnsupported as e:
                    self.gradcam_error = str(e)
            if self._cam is None or not crops:
                return None
            x = torch.stack([self.detector.preprocess(c) for c in crops]).to(self.detector.precision.device)
            try:
                return torch.cat([self._cam(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)])
            except gradcam.GradCAMUnsupported as e:  # e.g. a 1x1 last feature map at --image_size 32
                self._cam, self.gradcam_error = None, str(e)  # verdicts without heatmaps from here on
                return None

    def verdict(self, path, found, probs):
        """The result dict of one input: label, P(fake) (video_score of its faces), one row per face."""
        p = video_score(probs, self.aggregation) if len(probs) else None
        rows = [dict(r, fake_probability=float(q)) for r, q in zip(found.rows, probs)]
        result = {"input": str(path), "kind": found.kind, "fake_probability": p, "threshold": self.threshold,
                  "label": self.label(p), "frames": found.frames, "faces": len(rows), "crops": found.crops,
                  "rows": rows}
        if found.warning:
            result["warning"] = found.warning
        return result

    def overlays(self, result, maps):
        """One Grad-CAM picture per face of a result, captioned with its score and verdict ([] without maps)."""
        if maps is None:
            return []
        return [gradcam.overlay(crop, m.numpy(), (f"frame {r['frame']}  " if result["kind"] == "video" else "")
                                + f"P(fake) {r['fake_probability']:.3f} {self.label(r['fake_probability'])}")
                for crop, m, r in zip(result["crops"], maps, result["rows"])]

    def predict_file(self, path, gradcam=False):
        """Verdict for one image or video (see verdict()); MediaError if it cannot be read."""
        found = self.read(path)
        result = self.verdict(path, found, self.score(found.crops))
        if gradcam:
            result["gradcam"] = self.overlays(result, self.gradcam_maps(found.crops))
        return result

    def predict_many(self, paths, gradcam=False):
        """Yield (path, result, error message) in input order; result is None when the file is unreadable.

        Faces of consecutive inputs share forward passes: a folder of photos is scored batch_size
        at a time instead of one image per pass.
        """
        pending = []
        for i, path in enumerate(paths):
            try:
                pending.append((path, self.read(path), None))
            except (MediaError, OSError) as e:
                pending.append((path, None, str(e)))
            if i + 1 == len(paths) or sum(len(f.crops) for _, f, _ in pending if f) >= self.batch_size:
                crops = [c for _, f, _ in pending if f for c in f.crops]
                probs, maps = self.score(crops), (self.gradcam_maps(crops) if gradcam else None)
                at = 0
                for path, found, error in pending:
                    result, n = None, len(found.crops) if found else 0
                    if found:
                        result = self.verdict(path, found, probs[at:at + n])
                        if gradcam:
                            result["gradcam"] = self.overlays(result, None if maps is None else maps[at:at + n])
                    yield path, result, error
                    at += n
                pending = []


# ----------------------------------------------------------------------------- command line
def output_paths(output):
    """--output FILE.csv / FILE.json, or a folder (seed-project style) with both."""
    if not output:
        return []
    out = Path(output)
    if out.suffix.lower() in (".csv", ".json"):
        return [out]
    if out.exists() and not out.is_dir():
        sys.exit(f"error: --output {out} is an existing file, not a folder; give FILE.csv, FILE.json or a folder")
    return [out / "predictions.csv", out / "predictions.json"]


def output_rows(results, errors):
    """CSV rows: one per input, one per face of a video, one per unreadable input."""
    rows = []
    for r in results:
        rows.append({**r, "row": "input", "frame": 0 if r["kind"] == "image" else "", "face": ""})
        if r["kind"] == "video":
            rows += [{**f, "input": r["input"], "kind": "video", "row": "frame", "threshold": r["threshold"],
                      "label": CLASSES[int(f["fake_probability"] >= r["threshold"])]} for f in r["rows"]]
        elif r["rows"]:  # an image's one face: its box goes on the input row
            rows[-1].update(face=0, box=r["rows"][0]["box"])
    rows += [{"input": path, "row": "input", "label": "error", "error": msg} for path, msg in errors]
    for row in rows:
        row.update(zip(("x0", "y0", "x1", "y1"), row.pop("box", None) or [""] * 4))
    return rows


def check_writable(path, flag, folder=False):
    """Stop with one line, before anything is scored, where `path` (a file, or a folder) cannot be written:
    a file in the way of a folder, a folder where a file goes, a folder without write permission."""
    for parent in ([path] if folder else []) + list(path.parents):
        if parent.exists() and not parent.is_dir():
            sys.exit(f"error: {flag} {path}: {parent} is a file, not a folder; pick another path")
    if not folder and path.is_dir():
        sys.exit(f"error: {flag} {path} is a folder; give a file name (FILE.csv, FILE.json)")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
        sys.exit(f"error: {flag} {path}: {existing} cannot be written to; pick another path")


def write_outputs(results, errors, paths, predictor, checkpoint):
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".csv":
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
                w.writeheader()
                w.writerows(output_rows(results, errors))
        else:
            keep = [{k: v for k, v in r.items() if k not in ("crops", "gradcam")} for r in results]
            path.write_text(json.dumps({"checkpoint": str(checkpoint), "threshold": predictor.threshold,
                                        "threshold_source": predictor.detector.threshold_source,
                                        "aggregation": AGGREGATIONS[predictor.aggregation],
                                        "inputs": keep, "errors": [{"input": p, "error": m} for p, m in errors]},
                                       indent=2) + "\n")
        print(f"wrote {path}")


def main(args):
    """Score every input; returns {"results", "errors"}. Refuses to overwrite earlier outputs."""
    outputs = output_paths(args.output)
    gradcam_dir = Path(args.gradcam) if args.gradcam else None
    for path in outputs:
        check_writable(path, "--output")
    if gradcam_dir:
        check_writable(gradcam_dir, "--gradcam", folder=True)
    if not args.overwrite:
        for p in [p for p in outputs if p.exists()] + ([gradcam_dir] if gradcam_dir and gradcam_dir.is_dir()
                                                       and any(gradcam_dir.iterdir()) else []):
            sys.exit(f"{p} already exists (not empty); pass --overwrite to replace it or choose another path")
    try:
        predictor = Predictor(args.checkpoint, args.device, args.precision, args.detector, args.frames,
                              args.no_crop, args.batch_size, args.max_pixels, args.aggregation)
    except (engine.CheckpointError, ImportError) as e:  # ImportError: the face detector's package is missing
        sys.exit(f"error: {e}")
    if predictor.detector.threshold_source.startswith(str(engine.DEFAULT_THRESHOLD)):
        print(f"note: {args.checkpoint} stores no threshold (interrupted training?); using "
              f"{engine.DEFAULT_THRESHOLD}", file=sys.stderr)
    files, errors = find_media(args.input)
    runtime.choose_scorer(predictor.detector, args.runtime, sum(args.frames if is_video(f) else 1 for f in files))
    for _, message in errors:
        print(f"error: {message}", file=sys.stderr)
    if gradcam_dir:
        gradcam_dir.mkdir(parents=True, exist_ok=True)
    stems, clashes = set(), {f.stem for f in files if sum(g.stem == f.stem for g in files) > 1}
    results, start, stopped = [], time.perf_counter(), False
    try:
        for path, r, error in predictor.predict_many(files, gradcam=gradcam_dir is not None):
            if error:  # one line, then the next input
                print(f"error: {error}", file=sys.stderr)
                errors.append((str(path), error))
                continue
            results.append(r)
            p = "-" if r["fake_probability"] is None else f"{r['fake_probability']:.3f}"
            print(f"{r['label']:<20} P(fake) {p:>5}  {r['kind']}, {r['frames']} frame(s) read, "
                  f"{r['faces']} face(s) scored  {path}")
            if r.get("warning"):
                print(f"warning: {r['warning']}", file=sys.stderr)
            if gradcam_dir:
                stem = unique_stem(path, clashes, stems)
                for row, picture in zip(r["rows"], r.get("gradcam", [])):
                    picture.save(gradcam_dir / f"{stem}_f{row['frame']:04d}_{row['face']}_gradcam.png")
    except KeyboardInterrupt:  # Ctrl-C: keep what was scored
        stopped = True
        print(f"\ninterrupted: writing the {len(results)} input(s) scored so far", file=sys.stderr)
    if gradcam_dir and predictor.gradcam_error:
        print(f"note: no heatmaps written: {predictor.gradcam_error}", file=sys.stderr)
    seconds, n_faces = time.perf_counter() - start, sum(r["faces"] for r in results)
    print(engine.validation_line(predictor.detector.validated_on))
    print(f"{len(results)} of {len(files)} input(s) scored, {n_faces} face(s) in {seconds:.1f} s "
          f"({n_faces / max(seconds, 1e-9):.1f} faces/s incl. decoding and detection, "
          f"{runtime.describe(predictor.detector)}); threshold {predictor.threshold:.3f} "
          f"from {predictor.detector.threshold_source}")
    write_outputs(results, errors, outputs, predictor, args.checkpoint)
    if stopped:
        sys.exit(130)
    return {"results": results, "errors": errors}


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
    p.add_argument("--frames", type=positive(int), default=32, help="frames sampled evenly per video (default: 32)")
    p.add_argument("--no_crop", action="store_true", help="inputs already are face crops: skip face detection "
                   "(default: off, detect and crop like faces.py)")
    p.add_argument("--detector", choices=["yunet", "dlib"], default="yunet", help="face detector (default: yunet)")
    p.add_argument("--gradcam", default=None, metavar="DIR", help="write a Grad-CAM overlay per scored face "
                   "into DIR; refuses a non-empty DIR without --overwrite (default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --output files and write into "
                   "a non-empty --gradcam DIR (default: off)")
    p.add_argument("--aggregation", choices=sorted(AGGREGATIONS), default=DEFAULT_AGGREGATION,
                   help="a video's P(fake) from its faces': mean, or confident (the DFDC winner's rule: the mean of "
                   f"the confidently fake frames when there are enough of them) (default: {DEFAULT_AGGREGATION})")
    p.add_argument("--batch_size", type=positive(int), default=32, help="faces per forward pass (default: 32)")
    p.add_argument("--max_pixels", type=positive(int), default=MAX_PIXELS, help="refuse pictures and video "
                   f"frames larger than this, before decoding them (default: {MAX_PIXELS:,}, about 120 MB as RGB)")
    add_machine_flags(p)
    return p


if __name__ == "__main__":
    out = interruptible(main, get_args_parser().parse_args())
    sys.exit(0 if out["results"] else 1)
