"""A web page to try the detector: upload a face photo or a short video, see the verdict and a heatmap.

    python app.py --checkpoint results/checkpoints/best.pt          # then open http://127.0.0.1:7860
    python app.py --checkpoint results/checkpoints/best.pt --host 0.0.0.0 --port 8080 --max_video_mb 100
    curl -F file=@face.jpg http://127.0.0.1:7860/api/predict         # the JSON API the page uses
    curl http://127.0.0.1:7860/health

The page (templates/index.html, static/app.js, static/style.css) and the API share one code
path: every upload is scored by predict.Predictor.predict_file, like `python predict.py`.
Uploads are identified by their content (Pillow for images, PyAV for videos), never by
their name; they are written to a temporary file with a random name and removed afterwards.
Memory stays bounded whatever is sent: a picture's (or video frame's) pixel count is read from
its header and refused over --max_pixels before anything is decoded, and at most
--max_concurrent uploads are decoded and scored at once (the others wait their turn).

API answers:
    200 {label, fake_probability, threshold, kind, frames, faces, rows, images, images_total}
        a photo or video without a face is a 200 too: label "uncertain (no face)",
        fake_probability null and a "message" for the user (the upload was fine, the
        detector just has nothing to judge)
    400 no file in the request       413 over the size or pixel limit
    415 neither an image nor a video 422 an image/video that cannot be decoded (corrupt), or too
                                         small to hold a face
    every error is {"error": "..."}; the server keeps serving.
"""
import argparse
import base64
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flask import Flask, jsonify, render_template, request
from PIL import Image, UnidentifiedImageError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

import engine
import runtime
from cli import add_machine_flags, positive
from detect import DETECT_MIN_SIDE
from media import IMAGE_EXTS, MAX_PIXELS, MediaError, check_pixels
from predict import NO_FACE, Predictor

# FFmpeg demuxer name (PyAV's container.format.name) -> the extension predict.py reads as a video
VIDEO_EXTS = {"mov,mp4,m4a,3gp,3g2,mj2": ".mp4", "matroska,webm": ".mkv", "avi": ".avi",
              "mpeg": ".mpg", "flv": ".flv", "asf": ".wmv"}
# first bytes of those containers: tells a broken video (422) from something else (415)
VIDEO_MAGIC = ((4, b"ftyp"), (0, b"\x1a\x45\xdf\xa3"), (8, b"AVI "), (0, b"\x00\x00\x01\xba"),
               (0, b"FLV"), (0, b"\x30\x26\xb2\x75"))


class UploadError(Exception):
    """A bad upload: the HTTP status and a message for the person who sent it."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def image_extension(fmt):
    """The extension predict.py reads a Pillow format under (media.IMAGE_EXTS), or None if it reads none."""
    fmt = {"MPO": "JPEG"}.get(fmt, fmt)  # multi-picture JPEGs from cameras open as MPO
    return next((ext for ext, f in sorted(Image.registered_extensions().items())
                 if f == fmt and ext in IMAGE_EXTS), None)


def sniff(path, name, max_pixels=MAX_PIXELS):
    """('image' | 'video', safe extension) from the file's first bytes, its header and a structure check."""
    fmt = None
    try:
        with Image.open(path) as im:  # reads the header only: size and format, no pixels
            fmt = im.format
            try:
                check_pixels(name, im.width, im.height, max_pixels)
            except MediaError as e:
                raise UploadError(413, str(e)) from None
            if min(im.size) < DETECT_MIN_SIDE:
                raise UploadError(422, f"{name}: {im.width}x{im.height} pixels is too small to hold a face "
                                  f"(at least {DETECT_MIN_SIDE} px a side)")
            im.verify()  # structure checks (PNG CRCs...); a truncated JPEG fails later, in predict
    except UnidentifiedImageError:
        fmt = None  # not an image Pillow knows: maybe a video
    except UploadError:
        raise
    except Exception as e:  # Pillow raises many types for damaged files
        raise UploadError(422, f"{name}: a damaged {fmt + ' ' if fmt else ''}image ({e}); "
                               f"try re-saving it as JPEG or PNG")
    if fmt is not None:
        if image_extension(fmt) is None:
            raise UploadError(415, f"{name}: {fmt} images are not supported; use JPEG, PNG, WebP, BMP, GIF or TIFF")
        return "image", image_extension(fmt)
    import av  # imported here: only uploads that are not images need it
    try:
        with av.open(str(path)) as container:
            fmt, has_video = container.format.name, bool(container.streams.video)
    except av.FFmpegError:
        with open(path, "rb") as f:
            head = f.read(12)
        if any(head[at:at + len(magic)] == magic for at, magic in VIDEO_MAGIC):
            raise UploadError(422, f"{name}: a damaged video that cannot be opened; try re-encoding it "
                              "as MP4 (H.264)") from None
        raise UploadError(415, f"{name}: neither an image nor a video; upload a face photo "
                          "(JPEG, PNG...) or a short video (MP4, WebM...)") from None
    if not has_video or fmt not in VIDEO_EXTS:
        raise UploadError(415, f"{name}: not a supported video (format {fmt}, "
                          f"{'with' if has_video else 'no'} video stream); use MP4, WebM, MKV or AVI")
    return "video", VIDEO_EXTS[fmt]


def data_url(image, quality=88):
    """A PIL image as an inline 'data:image/jpeg;base64,...' string the page can show."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def spread(n, k):
    """Up to k indices spread evenly over range(n): which faces of a long video to show."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def to_json(result, name, max_images):
    """predict_file's dict -> the API answer: plain numbers, crops and heatmaps as data URLs."""
    rows = [{"frame": r["frame"], "face": r["face"], "fake_probability": r["fake_probability"],
             "box": r.get("box")} for r in result["rows"]]
    cams = result.get("gradcam") or []  # empty when the backbone has no layer Grad-CAM can explain
    images = [dict(rows[i], crop=data_url(result["crops"][i]), gradcam=data_url(cams[i]) if cams else None)
              for i in spread(len(rows), max_images)]
    answer = {k: result[k] for k in ("label", "fake_probability", "threshold", "kind", "frames", "faces")}
    answer.update(name=name, rows=rows, images=images, images_total=len(rows))
    if result.get("warning"):  # e.g. a video whose decoding stopped early: say it, keep the verdict
        answer["warning"] = result["warning"].split(": ", 1)[-1]
    if result["label"] == NO_FACE:
        answer["message"] = (f"No face found in {name} ({result['frames']} frame(s) searched). The detector "
                             "judges faces only: try a photo or video where a face is clearly visible.")
    return answer


def create_app(predictor, checkpoint=None, max_image_mb=10.0, max_video_mb=50.0, max_images=8,
               max_concurrent=2):
    """The Flask app around one loaded Predictor (or a checkpoint path to load one from)."""
    if isinstance(predictor, (str, Path)):
        checkpoint, predictor = predictor, Predictor(predictor)
    # Uploads are decoded and scored by this many worker threads, the others queue. Always the same
    # threads: the memory a decode frees stays with its thread's allocator and is reused by the next,
    # where one thread per request would each keep some. Together this bounds the server's memory.
    scorers = ThreadPoolExecutor(max_concurrent, thread_name_prefix="scorer")
    app = Flask(__name__)
    # hard cap for the whole request (the biggest kind + room for the multipart wrapping);
    # the per-kind limit is checked once the content is known
    app.config["MAX_CONTENT_LENGTH"] = int(max(max_image_mb, max_video_mb) * 2**20) + 2**16
    limits = {"image": max_image_mb, "video": max_video_mb}
    info = {"model": predictor.model.name, "checkpoint": Path(checkpoint).name if checkpoint else None,
            "threshold": predictor.threshold}  # the file name only: the server's folders are nobody's business

    @app.get("/")
    def index():
        return render_template("index.html", info=info, limits=limits)

    @app.get("/health")
    def health():
        return jsonify(status="ok", **info)

    @app.post("/api/predict")
    def api_predict():
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            raise UploadError(400, "no file uploaded: send it as the multipart form field 'file'")
        name = Path(upload.filename.replace("\\", "/")).name[:100]  # shown in messages, never a path
        fd, raw = tempfile.mkstemp(prefix="upload-", suffix=".part")
        os.close(fd)
        path = None
        try:
            upload.save(raw)
            kind, ext = sniff(raw, name, predictor.max_pixels)
            size_mb = os.path.getsize(raw) / 2**20
            if size_mb > limits[kind]:
                raise UploadError(413, f"{name}: {size_mb:.1f} MB is over the {limits[kind]:g} MB limit for "
                                  f"{kind}s (app.py --max_{kind}_mb)")
            path = raw[:-len(".part")] + ext  # same random name, an extension predict.py dispatches on
            os.replace(raw, path)
            start = time.perf_counter()
            try:
                result = scorers.submit(predictor.predict_file, path, gradcam=True).result()
            except MediaError as e:  # decodes badly (truncated JPEG, broken video stream), or a huge frame
                detail = str(e).replace(path, "").lstrip(": ")  # our temp name means nothing to the user
                status = 413 if "--max_pixels" in detail else 422
                raise UploadError(status, f"{name}: cannot be decoded: {detail}") from None
            answer = to_json(result, name, max_images)
            answer["seconds"] = round(time.perf_counter() - start, 2)
            answer["validated_on"] = engine.validation_line(predictor.detector.validated_on)
            return jsonify(answer)
        finally:
            for p in (raw, path):
                if p and os.path.exists(p):
                    os.remove(p)

    @app.errorhandler(UploadError)
    def upload_error(e):
        return jsonify(error=str(e)), e.status

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(e):
        return jsonify(error=f"upload over the {app.config['MAX_CONTENT_LENGTH'] / 2**20:.0f} MB request "
                       f"limit (images up to {max_image_mb:g} MB, videos up to {max_video_mb:g} MB)"), 413

    @app.errorhandler(Exception)
    def unexpected(e):
        if isinstance(e, HTTPException):  # 404, 405...: keep the status, answer in JSON
            return jsonify(error=f"{e.code} {e.name}: {e.description}"), e.code
        app.logger.exception("prediction failed")  # full traceback in the server log only
        return jsonify(error=f"internal error ({type(e).__name__}: {e}); the server keeps running"), 500

    return app


def get_args_parser():
    parser = argparse.ArgumentParser(description="Web demo of the deepfake detector", add_help=True)
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", default="results/checkpoints/best.pt",
                   help="checkpoint written by main.py (default: results/checkpoints/best.pt)")
    add_machine_flags(g)
    g.add_argument("--detector", default="yunet", choices=["yunet", "dlib"], help="face detector (default: yunet)")
    g.add_argument("--frames", type=positive(int), default=16, help="frames sampled per video; fewer than predict.py's "
                   "32 so a CPU answers in seconds (default: 16)")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for your network "
                   "(default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    g.add_argument("--max_image_mb", type=positive(float), default=10, help="largest image upload in MB (default: 10)")
    g.add_argument("--max_video_mb", type=positive(float), default=50, help="largest video upload in MB (default: 50)")
    g.add_argument("--max_pixels", type=positive(int), default=MAX_PIXELS, help="largest picture or video frame in "
                   f"pixels, checked before decoding (default: {MAX_PIXELS:,}, about 120 MB as RGB)")
    g.add_argument("--max_concurrent", type=positive(int), default=2, help="uploads decoded and scored at "
                   "once; the others wait (default: 2)")
    g.add_argument("--max_images", type=positive(int), default=8, help="face crops + heatmaps returned per upload, "
                   "spread over the video (default: 8)")
    return parser


def main(args):
    try:
        predictor = Predictor(args.checkpoint, device=args.device, precision=args.precision,
                              detector=args.detector, frames=args.frames, max_pixels=args.max_pixels)
    except (engine.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # the detector's package is missing (yuface has no wheel for every Python)
        print(f"error: {e}", file=sys.stderr)
        return 2
    runtime.choose_scorer(predictor.detector, args.runtime)  # at start-up, not on the first request
    print(f"scoring with {runtime.describe(predictor.detector)}")
    app = create_app(predictor, args.checkpoint, args.max_image_mb, args.max_video_mb, args.max_images,
                     args.max_concurrent)
    print(f"serving {args.checkpoint} on http://{args.host}:{args.port} (Ctrl-C to stop)")
    # never debug mode: its console runs any code a visitor types. A taken port or unknown
    # host is reported by werkzeug itself on one line (exit code 1).
    app.run(host=args.host, port=args.port, debug=False, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
