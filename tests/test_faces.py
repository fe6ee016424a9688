"""faces.py and detect.py: frame sampling, detection, cropping, manifest, bad inputs and re-runs.

Uses small videos written here from the bundled faces, and the shared labelled clips in
../shared/data where present.  Run: python -m pytest -q tests/test_faces.py
"""
import csv
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import ROOT, face_scene, sample_face, write_video
from PIL import Image

import detect
import faces
from media import crop_source, is_image, is_video

DATA = ROOT.parent / "shared" / "data"
VIDEOS = DATA / "videos"
LABELLED = ["real_facenet_example.mp4", "real_hamilton_clip.mp4", "uadfv_0017_fake.mp4", "dfdc_widuwuoiur_fake.mp4"]


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (expected next to the project folder)")
    return path


def run(inputs, output, *extra):
    args = faces.get_args_parser().parse_args(
        ["--input", *map(str, inputs), "--output", str(output), "--workers", "1", *extra])
    return faces.main(args)


def manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    write_video(d / "face.mp4", face_scene(12))
    write_video(d / "blank.mp4", [np.full((120, 160, 3), 128, np.uint8)] * 8)
    Image.new("RGB", (200, 150), "white").save(d / "blank_photo.png")
    Image.fromarray(sample_face(1)).save(d / "photo.jpg")
    (d / "random.mp4").write_bytes(np.random.default_rng(0).bytes(20000))
    (d / "truncated.mp4").write_bytes((d / "face.mp4").read_bytes()[:3000])
    (d / "notes.txt").write_text("not media")
    (d / "broken.jpg").write_bytes((d / "photo.jpg").read_bytes()[:200])  # header only
    return d


def test_sample_frames_count_spread_and_content(tmp_path):
    # frame i has brightness 5*i, so we can check the index is the frame actually returned
    frames = [np.full((48, 64, 3), 5 * i, np.uint8) for i in range(40)]
    # mkv stores no frame count (duration x rate is used); raw m4v has neither (packets are counted)
    for ext in ("mp4", "mkv", "m4v"):
        video = write_video(tmp_path / f"ramp.{ext}", frames, fmt="m4v" if ext == "m4v" else None)
        got = list(faces.sample_frames(video, 5))
        assert [i for i, _ in got] == [0, 10, 20, 29, 39]
        for i, rgb in got:
            assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
            assert abs(float(rgb.mean()) - 5 * i) < 4
        # a video shorter than the request gives every frame once
        assert [i for i, _ in faces.sample_frames(video, 100)] == list(range(40))
    for ext in ("mkv", "m4v"):
        with av.open(str(tmp_path / f"ramp.{ext}")) as c:
            assert c.streams.video[0].frames == 0
    with av.open(str(tmp_path / "ramp.m4v")) as c:
        assert c.duration is None


def test_sample_frames_corrupt_raises(media):
    for name in ("random.mp4", "truncated.mp4"):
        with pytest.raises(faces.MediaError, match=name):
            list(faces.sample_frames(media / name, 4))


def test_crop_faces_box_inside_face_and_largest_first():
    face = sample_face()
    rgb = np.full((600, 900, 3), 60, np.uint8)
    rgb[50:306, 500:756] = face  # large face
    small = np.asarray(Image.fromarray(face).resize((128, 128)))
    rgb[400:528, 100:228] = small  # small face
    det = detect.load_detector("yunet")
    crops = detect.crop_faces(rgb, det, margin=1.3, size=64, all_faces=True)
    assert len(crops) == 2
    (img0, b0), (_, b1) = crops
    assert img0.size == (64, 64)
    assert 500 <= b0[0] < b0[2] <= 756 and 50 <= b0[1] < b0[3] <= 306  # box on the big face
    assert 100 <= b1[0] < b1[2] <= 228 and 400 <= b1[1] < b1[3] <= 528
    assert len(detect.crop_faces(rgb, det)) == 1  # default: the largest face only
    # a face at the image border: the square is shifted inside, so no black padding appears
    edge = np.ascontiguousarray(rgb[0:400, 560:900])  # face cut at the left: ideal square starts at x<-60
    [(img, box)] = detect.crop_faces(edge, det, size=100)
    assert img.size == (100, 100) and 0 <= box[0] and box[2] <= edge.shape[1]
    crop = np.asarray(img).astype(float)
    assert crop.mean(axis=(1, 2)).min() > 20 and crop.mean(axis=(0, 2)).min() > 20


def test_crop_square_stays_inside_the_image():
    assert detect.crop_square((40, 40, 60, 60, 1.0), 100, 100, margin=2) == (30, 30, 70, 70)  # centred
    assert detect.crop_square((0, 10, 20, 30, 1.0), 100, 100, margin=2) == (0, 0, 40, 40)  # shifted in
    assert detect.crop_square((0, 0, 80, 60, 1.0), 100, 60, margin=1.3) == (10, 0, 70, 60)  # shrunk to fit


def test_detector_boxes_map_to_full_resolution():
    # 2000 px wide: detection runs on an 800 px copy, boxes must come back in full-size pixels
    rgb = np.full((1000, 2000, 3), 60, np.uint8)
    rgb[400:912, 1200:1712] = np.asarray(Image.fromarray(sample_face()).resize((512, 512)))
    for name in ("yunet", "dlib"):
        [(x0, y0, x1, y1, score)] = detect.load_detector(name)(rgb)[:1]
        assert 1200 <= x0 < x1 <= 1712 and 400 <= y0 < y1 <= 912, name
        assert (x1 - x0) > 200, name


def test_labelled_clips_yield_crops_and_manifest_matches_disk(tmp_path):
    clips = [need(VIDEOS / c) for c in LABELLED]
    out = tmp_path / "out"
    summary = faces.main(faces.get_args_parser().parse_args(
        ["--input", *map(str, clips), "--output", str(out), "--frames", "4", "--size", "128", "--workers", "2"]))
    assert summary["processed"] == len(clips) and not summary["unreadable"]
    rows = manifest(out)
    with open(out / "manifest.csv") as f:
        assert f.readline().strip() == "file,source,frame,face,x0,y0,x1,y1,score,detector"
    assert {r["file"] for r in rows} == {p.name for p in out.glob("*.jpg")}
    assert len(rows) == len({r["file"] for r in rows})
    for clip in clips:
        mine = [r for r in rows if r["source"] == str(clip)]
        assert len(mine) >= 3, clip  # a face is visible in (nearly) every sampled frame
        assert all(r["file"].startswith(clip.stem + "_f") for r in mine)
    for r in rows:
        assert Image.open(out / r["file"]).size == (128, 128)
        assert crop_source(r["file"]) == Path(r["source"]).stem
        assert int(r["x0"]) < int(r["x1"]) and int(r["y0"]) < int(r["y1"]) and float(r["score"]) >= 0.6
        assert r["detector"] == "yunet"


def test_bad_and_faceless_inputs_are_reported_and_others_processed(media, tmp_path, capsys):
    out = tmp_path / "out"
    inputs = [media / "random.mp4", media / "truncated.mp4", media / "notes.txt", media / "missing.mp4",
              media / "broken.jpg",
              media / "face.mp4", media / "blank.mp4", media / "blank_photo.png", media / "photo.jpg"]
    s = run(inputs, out, "--frames", "4", "--preview")
    err = capsys.readouterr().err
    for name in ("random.mp4", "truncated.mp4", "notes.txt", "missing.mp4", "broken.jpg"):
        assert name in err
        assert any(name in u for u in s["unreadable"])
    assert s["processed"] == 4
    assert sorted(Path(p).name for p in s["no_face_sources"]) == ["blank.mp4", "blank_photo.png"]
    assert s["no_face_frames"] == 4 + 1
    listed = list(csv.DictReader(open(out / "no_faces.csv")))
    assert sum(r["source"].endswith("blank.mp4") and r["reason"] == "no_face" for r in listed) == 4
    assert any(r["source"].endswith("blank_photo.png") and r["frame"] == "0" for r in listed)
    assert any(r["source"].endswith("random.mp4") and r["reason"].startswith("unreadable") for r in listed)
    files = {r["file"] for r in manifest(out)}
    assert "photo_f0000_0.jpg" in files and sum(f.startswith("face_f") for f in files) == 4
    assert (out / "preview.png").exists()


def test_rerun_does_no_work_and_settings_change_redoes(media, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    inputs = [media / "face.mp4", media / "photo.jpg", media / "blank.mp4"]
    first = run(inputs, out, "--frames", "3")
    assert first["processed"] == 3
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def boom(*a, **k):
        raise AssertionError("decoded a source that was already done")
    monkeypatch.setattr(faces, "sample_frames", boom)
    monkeypatch.setattr(faces, "load_rgb", boom)
    again = run(inputs, out, "--frames", "3")
    assert again["processed"] == 0 and len(again["skipped"]) == 3
    assert "skipped (already done) 3" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".jpg"} == \
        {k: v for k, v in before.items() if k.endswith(".jpg")}
    monkeypatch.undo()

    # other settings replace the crops of that source instead of mixing two versions
    redo = run(inputs[:1], out, "--frames", "2")
    assert redo["processed"] == 1
    rows = manifest(out)
    assert sum(r["source"] == str(inputs[0]) for r in rows) == 2
    assert {r["file"] for r in rows} == {p.name for p in out.glob("*.jpg")}
    assert run(inputs[:1], out, "--frames", "2", "--overwrite")["processed"] == 1
    assert len(manifest(out)) == len(rows)


def test_crop_names_recover_source_and_same_stems_get_unique_names(media, tmp_path):
    assert crop_source("clip_f0003_0.jpg") == "clip"
    assert crop_source("my_f1_video_f0120_2.jpg") == "my_f1_video"
    assert crop_source("clip.jpg") == ""
    for sub in ("a", "b"):  # two different videos both called face.mp4
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "face.mp4").write_bytes((media / "face.mp4").read_bytes())
    out = tmp_path / "out"
    run([tmp_path / "a", tmp_path / "b"], out, "--frames", "2")
    rows = manifest(out)
    by_stem = {}
    for r in rows:
        by_stem.setdefault(crop_source(r["file"]), set()).add(r["source"])
    assert len(by_stem) == 2 and all(len(s) == 1 for s in by_stem.values())
    assert sorted(by_stem) == ["a_face", "b_face"]
    # a later run with another face.mp4 must not overwrite the crops already there
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "face.mp4").write_bytes((media / "face.mp4").read_bytes())
    run([tmp_path / "c" / "face.mp4"], out, "--frames", "2")
    stems = {crop_source(r["file"]) for r in manifest(out)}
    assert len(stems) == 3 and len(manifest(out)) == 6


def test_is_video_is_image():
    assert is_video("x/clip.MP4") and not is_video("x/a.jpg")
    assert is_image("a.JPEG") and is_image("a.gif") and not is_image("a.mov")


@pytest.mark.parametrize("flags", [["--frames", "0"], ["--size", "-3"], ["--margin", "0"], ["--workers", "0"]])
def test_impossible_flags_are_argparse_errors(flags, capsys):
    with pytest.raises(SystemExit) as e:
        faces.get_args_parser().parse_args(["--input", "x", "--output", "y", *flags])
    assert e.value.code == 2 and f"argument {flags[0]}" in capsys.readouterr().err


def test_output_equal_to_input_is_refused_in_one_line(media, tmp_path):
    (tmp_path / "face.mp4").write_bytes((media / "face.mp4").read_bytes())
    with pytest.raises(SystemExit, match="--output .* is also an --input"):
        run([tmp_path], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["face.mp4"]


def test_a_sliver_of_a_picture_has_no_face_and_no_error():
    for name in ("yunet", "dlib"):
        assert detect.load_detector(name)(np.full((1, 5000, 3), 90, np.uint8)) == []
        assert detect.load_detector(name)(np.full((5000, 12, 3), 90, np.uint8)) == []


def test_output_folder_inside_input_folder_is_not_read_back(media, tmp_path):
    (tmp_path / "face.mp4").write_bytes((media / "face.mp4").read_bytes())
    (tmp_path / "readme.txt").write_text("ignored inside folders")
    first = run([tmp_path], tmp_path / "crops", "--frames", "2")
    assert first["processed"] == 1 and not first["unreadable"]
    again = run([tmp_path], tmp_path / "crops", "--frames", "2")  # crops must not become sources
    assert again["processed"] == 0 and len(again["skipped"]) == 1


def test_unexpected_error_in_one_file_is_reported_and_retried(media, tmp_path, monkeypatch, capsys):
    def weird(path):
        raise RuntimeError("odd decoder state")
    monkeypatch.setattr(faces, "load_rgb", weird)
    out = tmp_path / "out"
    s = run([media / "photo.jpg", media / "face.mp4"], out, "--frames", "2")
    assert s["processed"] == 1 and s["unreadable"] == [str(media / "photo.jpg")]
    assert "RuntimeError: odd decoder state" in capsys.readouterr().err
    monkeypatch.undo()
    again = run([media / "photo.jpg", media / "face.mp4"], out, "--frames", "2")
    assert again["processed"] == 1 and again["skipped"] == [str(media / "face.mp4")]
    assert "photo_f0000_0.jpg" in {r["file"] for r in manifest(out)}


def test_missing_yuface_package_names_the_way_out(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "yuface", None)  # as on Python 3.12+, where yuface has no wheel
    with pytest.raises(ImportError, match="--detector dlib"):
        detect.load_detector("yunet")
    assert callable(detect.load_detector("dlib"))


def test_training_on_a_faces_py_folder_keeps_each_video_in_one_split(tmp_path):
    """faces.py -> main.py: every crop of one source video lands in the same split."""
    import shutil

    import main
    videos = []
    for label in ("real", "fake"):
        photos = tmp_path / f"{label}_photos"
        photos.mkdir()
        for p in sorted((ROOT / "samples" / "faces" / f"{label}_data").glob("*.jpg"))[:16]:
            shutil.copy(p, photos)
        clips = [write_video(tmp_path / f"{label}_clip{k}.mp4",
                             face_scene(8, face=sample_face(20 + k, f"{label}_data")))
                 for k in range(2)]  # four videos in all, of four different faces
        videos += [c.stem for c in clips]
        run(clips + [photos], tmp_path / "data" / f"{label}_data", "--frames", "6")
    main.main(main.parse_args(["--data_root", str(tmp_path / "data"), "--weights", "none", "--epochs", "1",
                               "--image_size", "32", "--workers", "0", "--val_fraction", "0.25",
                               "--test_fraction", "0.25", "--output_dir", str(tmp_path / "run"),
                               "--cache_dir", str(tmp_path / "cache")]))
    with open(tmp_path / "run" / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    splits_of = {}
    for r in rows:
        stem = Path(r["path"]).name.rsplit("_f", 1)[0]
        splits_of.setdefault(stem, set()).add(r["split"])
    assert all(v in splits_of for v in videos)
    assert all(len(splits_of[v]) == 1 for v in videos), {v: splits_of[v] for v in videos}
    assert {s for splits in splits_of.values() for s in splits} == {"train", "val", "test"}
