"""Faces from videos and photos into a training folder.

A deepfake detector looks at faces, not at whole frames, so every video or photo
is turned into square face crops first.  For each source this script samples
frames evenly, finds faces, cuts a square with some margin around each face and
saves it as a JPEG, plus a manifest that says where every crop came from.

Examples (from the project root):

    # crops of fake videos into the training folder (32 frames per video)
    python faces.py --input ../shared/data/videos/uadfv_0017_fake.mp4 --output Dataset/fake_data
    # a whole folder, every face per frame, with a contact sheet to check by eye
    python faces.py --input ../shared/data/videos --output /tmp/x --all_faces --preview
    # frames/s of both detectors: python benchmark.py faces

Outputs in --output:
    <stem>_f<frame:04d>_<face>.jpg   crops; <stem> identifies the source (unique per source)
    manifest.csv   file,source,frame,face,x0,y0,x1,y1,score,detector (one row per crop,
                   box = detected face box in source pixels).  Training keeps all crops
                   of one `source` in the same train/val/test split.
    no_faces.csv   source,frame,reason for every frame without a face and every unreadable file
    sources.csv    what was processed with which settings, so a re-run skips it
    preview.png    (--preview) sampled frames with the crop squares drawn, next to the crop taken
"""
import argparse
import csv
import glob
import math
import multiprocessing as mp
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from cli import DEFAULT_WORKERS, positive
from detect import DEFAULT_MIN_SCORE, crop_faces, crop_square, load_detector
from media import MediaError, crop_name, crop_source, find_media, is_video, load_rgb, sample_frames, unique_stem

MANIFEST_COLUMNS = ["file", "source", "frame", "face", "x0", "y0", "x1", "y1", "score", "detector"]
NO_FACE_COLUMNS = ["source", "frame", "reason"]
STATE_COLUMNS = ["source", "path", "size", "mtime", "settings", "stem", "status", "frames", "crops"]
PREVIEW_TILES, PREVIEW_PER_SOURCE = 48, 4
# ----------------------------------------------------------------------------- per-source work
_detector = None  # one per process: each worker loads its own


def _init_worker(name, min_score, lock=None):
    global _detector
    if lock is not None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per worker, no oversubscription
        tqdm.set_lock(lock)
    _detector = load_detector(name, min_score)


def process_source(job: dict) -> dict:
    """Crop faces from one video or photo; write the JPEGs, return rows for the CSVs."""
    src, stem, out = job["source"], job["stem"], Path(job["output"])
    res = dict(job, status="ok", frames=0, rows=[], no_face=[], error=None, tiles=[])
    frames = sample_frames(src, job["frames"]) if is_video(src) else None
    bar = None if frames is None else tqdm(total=job["frames"], desc=Path(src).name[:30], unit="fr",
                                           leave=False, position=job.get("slot", 1))
    tile_every = max(1, job["frames"] // PREVIEW_PER_SOURCE)
    try:
        for index, rgb in frames if frames is not None else [(0, np.asarray(load_rgb(src)))]:
            crops = crop_faces(rgb, _detector, job["margin"], job["size"], job["all_faces"])
            for face, (img, (x0, y0, x1, y1, score)) in enumerate(crops):
                name = crop_name(stem, index, face)
                img.save(out / name, quality=95)
                res["rows"].append(dict(file=name, source=src, frame=index, face=face, x0=x0, y0=y0, x1=x1,
                                        y1=y1, score=f"{score:.3f}", detector=job["detector"]))
            if not crops:
                res["no_face"].append(index)
            if job["preview"] and res["frames"] % tile_every == 0 and len(res["tiles"]) < PREVIEW_PER_SOURCE:
                res["tiles"].append(_tile(rgb, crops, job["margin"], f"{stem} f{index}"))
            res["frames"] += 1
            if bar:
                bar.update()
    except MediaError as e:  # unreadable from the start, or a truncated video: keep what was decoded
        res["status"], res["error"] = ("partial" if res["frames"] else "unreadable"), str(e)
    except Exception as e:  # anything else odd in one file: report it, go on; a re-run retries it
        res["status"], res["error"] = "unreadable", f"{src}: {type(e).__name__}: {e}"
    finally:
        if bar:
            bar.close()
    if res["status"] == "ok" and not res["rows"]:
        res["status"] = "noface"
    return res


def _tile(rgb, crops, margin, label, h=160) -> Image.Image:
    """Preview tile: the frame with crop squares drawn, the largest crop beside it, a label."""
    frame = Image.fromarray(rgb)
    fw, fh = frame.size
    frame = frame.resize((min(round(fw * h / fh), 2 * h), h))  # very wide frames get squeezed
    sx, sy = frame.width / fw, h / fh
    draw = ImageDraw.Draw(frame)
    for i, (_, box) in enumerate(crops):
        x0, y0, x1, y1 = crop_square(box, fw, fh, margin)
        draw.rectangle([x0 * sx, y0 * sy, x1 * sx, y1 * sy], outline="lime" if i == 0 else "yellow", width=2)
    tile = Image.new("RGB", (frame.width + h, h + 18), "white")
    tile.paste(frame, (0, 0))
    if crops:
        tile.paste(crops[0][0].resize((h, h)), (frame.width, 0))
    ImageDraw.Draw(tile).text((2, h + 2), label + ("" if crops else "  NO FACE"), fill="black" if crops else "red",
              font=ImageFont.load_default(size=13))
    return tile


def save_preview(tiles: list[Image.Image], path: Path, columns: int = 4) -> None:
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    sheet = Image.new("RGB", (columns * w, math.ceil(len(tiles) / columns) * h), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % columns) * w, (i // columns) * h))
    sheet.save(path)


# ----------------------------------------------------------------------------- bookkeeping
def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, columns, rows, append: bool = False) -> None:
    new = not (append and path.exists())
    with open(path, "w" if new else "a", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def plan_jobs(sources, out: Path, settings: str, args, paths) -> tuple[list[dict], list[str]]:
    """Jobs for sources not yet done with these settings; forget old results of sources redone.

    Decided from path, size, mtime and settings alone, so done sources cost no decoding.
    """
    manifest, no_faces = read_csv(paths[0]), read_csv(paths[1])
    state = {r["path"]: r for r in read_csv(paths[2])}  # later rows win
    taken = {r["stem"] for r in state.values()} | {crop_source(r["file"]) for r in manifest}
    clashes = {stem for stem, n in Counter(p.stem for p in sources).items() if n > 1}
    todo, skipped, redo = [], [], set()
    for p in sources:
        st, key = p.stat(), str(p.resolve())
        old = state.get(key)
        if (old and not args.overwrite and old["status"] != "unreadable" and old["settings"] == settings
                and old["size"] == str(st.st_size) and old["mtime"] == str(st.st_mtime_ns)):
            skipped.append(str(p))
            continue
        if old:  # redo (--overwrite, new settings, changed file): delete its old crops first
            redo.add(old["source"])
            for f in out.glob(f"{glob.escape(old['stem'])}_f*_*.jpg"):
                if crop_source(f) == old["stem"]:
                    f.unlink()
        todo.append(dict(source=str(p), path=key, file_size=st.st_size, mtime=st.st_mtime_ns, settings=settings,
                         stem=old["stem"] if old else unique_stem(p, clashes, taken), output=str(out),
                         frames=args.frames, margin=args.margin, size=args.size, detector=args.detector,
                         all_faces=args.all_faces, preview=args.preview))
    write_csv(paths[0], MANIFEST_COLUMNS, [r for r in manifest if r["source"] not in redo])
    write_csv(paths[1], NO_FACE_COLUMNS, [r for r in no_faces if r["source"] not in redo])
    write_csv(paths[2], STATE_COLUMNS, [r for r in state.values() if r["source"] not in redo])
    return todo, skipped


def run_jobs(todo: list[dict], args, min_score: float) -> Iterator[dict]:
    """Results of process_source, in completion order; a process pool when --workers > 1."""
    workers = max(1, min(args.workers, len(todo)))
    if workers == 1:
        _init_worker(args.detector, min_score)
        yield from map(process_source, todo)
        return
    # "spawn", not fork: a forked child of a process that already ran yuface (OpenMP) hangs.
    ctx = mp.get_context("spawn")
    lock = ctx.RLock()  # shared by all progress bars, so lines of two processes do not interleave
    tqdm.set_lock(lock)
    for i, job in enumerate(todo):
        job["slot"] = 1 + i % workers  # bar line of the job; a guess, as jobs finish out of order
    with ctx.Pool(workers, _init_worker, (args.detector, min_score, lock)) as pool:
        yield from pool.imap_unordered(process_source, todo)


def main(args) -> dict:
    out = Path(args.output)
    if any(Path(given).resolve() == out.resolve() for given in args.input):
        raise SystemExit(f"error: --output {out} is also an --input: its videos and photos would be skipped as "
                         f"this run's own crops; write the crops to another folder")
    sources, problems = find_media(args.input, skip=out)  # not the crops of an --output inside an --input
    for _, message in problems:
        print(f"WARNING: skipping {message}", file=sys.stderr)
    try:
        load_detector(args.detector)  # fail here, in one line, not in every worker
    except ImportError as e:
        raise SystemExit(f"error: {e}")
    out.mkdir(parents=True, exist_ok=True)
    min_score = DEFAULT_MIN_SCORE[args.detector] if args.min_score is None else args.min_score
    settings = (f"frames={args.frames} margin={args.margin} size={args.size} detector={args.detector} "
                f"all_faces={int(args.all_faces)} min_score={min_score}")
    paths = [out / "manifest.csv", out / "no_faces.csv", out / "sources.csv"]
    todo, skipped = plan_jobs(sources, out, settings, args, paths)

    summary = dict(processed=0, skipped=skipped, frames=0, crops=0, no_face_frames=0, no_face_sources=[],
                   unreadable=[path for path, _ in problems], partial=[])
    tiles = {}
    for res in tqdm(run_jobs(todo, args, min_score), total=len(todo), desc="sources", unit="src",
                    position=0, disable=not todo):
        src = res["source"]
        if res["error"]:
            tqdm.write(f"WARNING: {res['error']}" + (" (kept frames decoded before)" if res["frames"] else ""),
                       file=sys.stderr)
        # Only this process writes the CSVs, one source at a time: no garbled rows, and an
        # interrupted run keeps the record of every source finished so far.
        write_csv(paths[0], MANIFEST_COLUMNS, res["rows"], append=True)
        missing = [dict(source=src, frame=i, reason="no_face") for i in res["no_face"]]
        if res["status"] == "unreadable":
            missing.append(dict(source=src, frame="", reason=f"unreadable: {res['error']}"))
        write_csv(paths[1], NO_FACE_COLUMNS, missing, append=True)
        write_csv(paths[2], STATE_COLUMNS, [dict(res, size=res["file_size"], crops=len(res["rows"]))], append=True)
        summary["frames"] += res["frames"]
        summary["crops"] += len(res["rows"])
        if res["status"] == "unreadable":
            summary["unreadable"].append(src)
            continue
        summary["processed"] += 1
        summary["no_face_frames"] += len(res["no_face"])
        if res["status"] == "noface":
            summary["no_face_sources"].append(src)
        if res["status"] == "partial":
            summary["partial"].append(src)
        tiles[src] = res["tiles"]

    preview = args.preview and any(tiles.values())  # covers the sources processed in this run
    if preview:
        picked = []  # round-robin over sources, so every source shows before the tile cap
        for i in range(PREVIEW_PER_SOURCE):
            picked += [ts[i] for ts in tiles.values() if i < len(ts)]
        save_preview(picked[:PREVIEW_TILES], out / "preview.png")
    print(f"\nsources processed {summary['processed']}, skipped (already done) {len(skipped)}, "
          f"frames read {summary['frames']}, crops written {summary['crops']}, "
          f"frames without a face {summary['no_face_frames']}, unreadable {len(summary['unreadable'])}")
    for label, items in [("no face at all", summary["no_face_sources"]), ("unreadable", summary["unreadable"]),
                         ("decoding stopped early", summary["partial"])]:
        if items:
            print(f"  {label}: " + ", ".join(items))
    print(f"  output: {out}  (manifest.csv, no_faces.csv{', preview.png' if preview else ''})")
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Crop faces from videos and photos into a training folder.")
    p.add_argument("--input", nargs="+", required=True,
                   help="required: video files, image files or folders of them (folders are searched recursively)")
    p.add_argument("--output", required=True,
                   help="required: folder for the crops, manifest.csv, no_faces.csv and sources.csv")
    p.add_argument("--frames", type=positive(int), default=32,
                   help="frames sampled evenly per video; every frame if the video is shorter (default: 32)")
    p.add_argument("--margin", type=positive(float), default=1.3,
                   help="crop side = margin x the larger side of the face box, as in FaceForensics++ (default: 1.3)")
    p.add_argument("--size", type=positive(int), default=256,
                   help="side in pixels of the saved square crops (default: 256)")
    p.add_argument("--detector", choices=["yunet", "dlib"], default="yunet",
                   help="yunet: small CNN, fast, finds turned faces; dlib: HOG, frontal faces only (default: yunet)")
    p.add_argument("--all_faces", action="store_true",
                   help="save every face of a frame, not only the largest (default: off)")
    p.add_argument("--min_score", type=float, default=None,
                   help="drop detections scoring lower; yunet scores are 0-1, dlib scores are SVM margins "
                        "(default: 0.6 for yunet, 0.0 for dlib)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo sources already done in --output instead of skipping them (default: off)")
    p.add_argument("--preview", action="store_true",
                   help="write preview.png, sampled frames with crop squares next to the crops (default: off)")
    p.add_argument("--workers", type=positive(int), default=DEFAULT_WORKERS,
                   help="processes working on different sources at once; 1 runs inline "
                        "(default: min(2, CPU cores))")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
