"""A careless or hostile user: their own files are never lost or written over, and every refusal comes as
one line before anything is scored or removed."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from test_main import make_folder, tiny_args

import compare
import engine
import gradcam
import main
import predict
import recipes
from media import MediaError, load_rgb

REPORT_NAMES = ("summary.md", "history.csv", "split.csv", "args.json", "predictions.csv", "metrics.json")


def snapshot(folder):
    """{relative path: sha1} of every file under folder."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def users_folder(path):
    """A folder of a user's own files: some named as the report's, some not, and a sub-folder."""
    (path / "evaluation").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "summary.md").write_text("# my own summary")
    (path / "evaluation" / "notes.txt").write_text("my evaluation notes")
    return path


def test_overwrite_never_deletes_a_folder_of_the_users_files(sample_root, tmp_path, capsys):
    out = users_folder(tmp_path / "U")
    before = snapshot(out)
    for extra in ([], ["--overwrite"]):  # not "already holds a run": it holds none
        with pytest.raises(SystemExit, match="summary.md, which this project did not write"):
            main.main(tiny_args(sample_root, out, "--epochs", "1", "--max_per_class", "8", *extra))
    after = snapshot(out)
    assert {k: after.get(k) for k in before} == before and set(after) - set(before) <= {".lock"}
    assert "removed" not in capsys.readouterr().out


@pytest.mark.parametrize("name", REPORT_NAMES[1:])
def test_a_new_run_never_writes_over_a_users_file_of_the_same_name(sample_root, tmp_path, name):
    out = tmp_path / "U"
    out.mkdir()
    (out / name).write_text("the user's own")
    with pytest.raises(SystemExit, match=f"{name}, which this project did not write"):
        main.main(tiny_args(sample_root, out, "--epochs", "1", "--max_per_class", "8"))
    assert (out / name).read_text() == "the user's own"


def test_overwrite_and_resume_remove_only_what_the_project_wrote(tmp_path):
    """A run folder with the user's files beside the run's: a refused resume, a resume and an --overwrite
    leave every one of the user's files byte for byte."""
    data = make_folder(tmp_path / "data", {"real_data": 12, "fake_data": 12})
    out = tmp_path / "run"
    main.main(tiny_args(data, out, "--epochs", "1"))
    main.main(main.parse_args(["--evaluate_only", "--output_dir", str(out), "--workers", "0"]))
    (out / "my notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "summary.md").write_text("mine too")
    (out / "evaluation" / "my_plot.png").write_bytes(b"not the project's")
    (out / "checkpoints" / "my_copy.pt").write_bytes(b"a backup of mine")
    users = {k: v for k, v in snapshot(out).items() if "mine" in k or "my" in k}
    report = snapshot(out)

    Image.new("RGB", (40, 40)).save(data / "real_data" / "new.png")  # the split no longer holds
    with pytest.raises(SystemExit, match="changed since the checkpoint's run"):
        main.main(main.parse_args(["--resume", "--output_dir", str(out), "--epochs", "2", "--workers", "0"]))
    assert snapshot(out) == report  # refused before anything was removed: the finished report is all there
    (data / "real_data" / "new.png").unlink()

    main.main(main.parse_args(["--resume", "--output_dir", str(out), "--epochs", "2", "--workers", "0"]))
    main.main(tiny_args(data, out, "--epochs", "1", "--seed", "3", "--overwrite"))
    after = snapshot(out)
    assert {k: after.get(k) for k in users} == users
    assert engine.load_checkpoint(out / "checkpoints" / "last.pt")["args"]["seed"] == 3
    assert not (out / "evaluation" / "summary.md").exists()  # the old run's evaluation went with it


def test_resume_from_a_copy_refuses_a_folder_that_holds_another_run(sample_root, tmp_path):
    out = tmp_path / "runF"
    main.main(tiny_args(sample_root, out, "--epochs", "1", "--max_per_class", "8"))
    backup = tmp_path / "BACKUP.pt"
    shutil.copy(out / "checkpoints" / "last.pt", backup)
    main.main(tiny_args(sample_root, out, "--epochs", "1", "--max_per_class", "8", "--seed", "3", "--overwrite"))
    before = snapshot(out)
    with pytest.raises(SystemExit, match="holds another run than the checkpoint"):
        main.main(main.parse_args(["--resume", str(backup), "--epochs", "2", "--workers", "0"]))
    assert snapshot(out) == before
    main.main(main.parse_args(["--resume", str(backup), "--epochs", "2", "--workers", "0",
                               "--output_dir", str(tmp_path / "elsewhere")]))  # into a folder of its own: fine
    assert engine.load_checkpoint(tmp_path / "elsewhere" / "checkpoints" / "last.pt")["epoch"] == 1


def test_a_run_that_stopped_before_its_first_epoch_is_no_run_to_protect(sample_root, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def broken(*args, **kwargs):
        raise RuntimeError("stopped before the first epoch")
    monkeypatch.setattr(main.training, "fit", broken)
    with pytest.raises(RuntimeError):
        main.main(tiny_args(sample_root, out, "--epochs", "1", "--max_per_class", "8"))
    assert (out / "split.csv").is_file() and not (out / "checkpoints").exists()
    monkeypatch.undo()
    main.main(tiny_args(sample_root, out, "--epochs", "1", "--max_per_class", "8"))  # no --overwrite needed
    assert (out / "summary.md").is_file()


def test_an_output_folder_inside_the_data_is_refused(tmp_path):
    root = make_folder(tmp_path / "data", {"real_data": 10, "fake_data": 10})
    with pytest.raises(SystemExit, match="is inside .*real_data, where the images are read from"):
        main.main(tiny_args(root, root / "real_data" / "run", "--epochs", "1"))
    assert sum(1 for _ in (root / "real_data").rglob("*.png")) == 10


# ---------------------------------------------------------------- refusals that come in time

def test_gradcam_on_a_one_pixel_feature_map_gives_verdicts_without_heatmaps(sample_root, tmp_path, capsys):
    out = tmp_path / "run32"
    main.main(tiny_args(sample_root, out, "--epochs", "1", "--max_per_class", "8"))  # resnet18 at 32 px: 1x1
    cams = tmp_path / "cams"
    result = predict.main(predict.get_args_parser().parse_args([
        "--checkpoint", str(out / "checkpoints" / "best.pt"), "--no_crop", "--gradcam", str(cams),
        "--input", *map(str, sorted((sample_root / "real_data").glob("*.jpg"))[:2])]))
    assert len(result["results"]) == 2 and all(r["label"] in ("real", "fake") for r in result["results"])
    assert "no heatmaps written: Grad-CAM needs a spatial feature map" in capsys.readouterr().err
    assert not any(cams.iterdir())


def test_the_web_page_answers_a_face_at_32_px_without_a_heatmap(sample_root, tmp_path):
    import app
    out = tmp_path / "run32"
    main.main(tiny_args(sample_root, out, "--epochs", "1", "--max_per_class", "8"))
    client = app.create_app(str(out / "checkpoints" / "best.pt")).test_client()
    face = sorted((sample_root / "real_data").glob("*.jpg"))[0]
    with open(face, "rb") as f:
        answer = client.post("/api/predict", data={"file": (f, "face.jpg")}, content_type="multipart/form-data")
    assert answer.status_code == 200, answer.get_json()
    assert all(img["gradcam"] is None for img in answer.get_json()["images"])


def test_an_image_over_pillows_own_limit_meets_the_projects_limit(tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(huge)  # 400 MP in a few KB: Pillow would refuse it while opening
    with pytest.raises(MediaError, match=r"20000x20000 is 400 MP, over the 40 MP limit \(--max_pixels\)"):
        load_rgb(huge, max_pixels=40_000_000)
    with pytest.raises(MediaError, match="over the"):
        load_rgb(huge)  # no --max_pixels: still refused, by Pillow's own threshold
    import app
    with pytest.raises(app.UploadError) as e:
        app.sniff(str(huge), "huge.png")
    assert e.value.status == 413 and "--max_pixels" in str(e.value)


@pytest.mark.parametrize("where", ["under_a_file", "csv_folder", "gradcam_file"])
def test_predict_refuses_an_output_it_cannot_write_before_scoring(trained_run, sample_root, tmp_path, where,
                                                                   monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "x.csv").mkdir()
    flags = {"under_a_file": ["--output", str(tmp_path / "notes.txt" / "p.csv")],
             "csv_folder": ["--output", str(tmp_path / "x.csv"), "--overwrite"],
             "gradcam_file": ["--gradcam", str(tmp_path / "notes.txt")]}[where]
    monkeypatch.setattr(predict.Predictor, "__init__", lambda *a, **k: pytest.fail("scored before refusing"))
    with pytest.raises(SystemExit, match="error: --(output|gradcam) .*(is a file, not a folder|is a folder)"):
        predict.main(predict.get_args_parser().parse_args([
            "--checkpoint", str(trained_run / "checkpoints" / "best.pt"), "--no_crop",
            "--input", str(sample_root / "real_data"), *flags]))
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- compare.py

GRID = "quick: --weights none --image_size 32 --epochs 3 --batch_size 8 --max_per_class 8 --workers 0\n"


def test_ctrl_c_in_compare_is_one_line_and_the_same_command_resumes_the_run(sample_root, tmp_path):
    (tmp_path / "grid.txt").write_text(GRID.replace("--epochs 3", "--epochs 40"))  # long enough to stop mid-way
    command = [sys.executable, "compare.py", "--recipes", str(tmp_path / "grid.txt"), "--seeds", "0",
               "--data_root", str(sample_root), "--output_dir", str(tmp_path / "out"),
               "--cache_dir", str(tmp_path / "cache")]
    run = tmp_path / "out" / "recipes" / "quick" / "seed0"
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.pt").is_file() and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(child.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, as in a terminal
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130 and "Traceback" not in err, err
    assert not (run / "metrics.json").exists()  # stopped mid-run (else the machine was too fast to catch it)
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "(resumed)" in again.stdout and "failed" not in again.stdout
    log = (run / "train.log").read_text()
    assert "resumed at epoch" in log and log.count("running on") == 2  # the first run's lines are kept


def test_compare_refuses_a_seed_given_twice_and_a_recipe_that_sets_its_own(tmp_path):
    (tmp_path / "grid.txt").write_text(GRID)
    with pytest.raises(SystemExit, match="names a seed twice"):
        recipes.compare_recipes(tmp_path / "grid.txt", [0, 0], ["--output_dir", str(tmp_path / "out")])
    (tmp_path / "seeded.txt").write_text(GRID.replace("--workers 0", "--workers 0 --seed 5"))
    with pytest.raises(SystemExit, match=r"line 1 \(quick\): sets --seed, but the seeds come from"):
        recipes.compare_recipes(tmp_path / "seeded.txt", [0], ["--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        compare.get_args_parser().parse_args(["--seeds", "-1"])


def test_a_hash_inside_quotes_or_a_word_is_no_comment_in_a_recipe_file(tmp_path):
    (tmp_path / "grid.txt").write_text('a: --test_sets "x=dir/with #hash" y=path#2  # a real comment\n# all\n')
    assert recipes.read_recipes(tmp_path / "grid.txt") == {"a": ["--test_sets", "x=dir/with #hash", "y=path#2"]}


# ---------------------------------------------------------------- flags

@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "--seed: must be >= 0, got -1"),
    (["--seed", str(2**32)], "--seed: must be <= 4294967295"),
    (["--input_jpeg", "7.5"], "--input_jpeg: expected an integer, got '7.5'"),
    (["--epochs", "abc"], "--epochs: expected an integer, got 'abc'"),
    (["--lr", "fast"], "--lr: expected a number, got 'fast'"),
])
def test_a_bad_number_says_what_was_expected(flags, message, capsys):
    with pytest.raises(SystemExit):
        main.parse_args(flags)
    assert message in capsys.readouterr().err


def test_a_test_set_given_as_a_bare_folder_is_a_folder(tmp_path, capsys):
    folder = tmp_path / "dir" / "eq=sign"
    folder.mkdir(parents=True)
    assert main.parse_args(["--test_sets", str(folder)]).test_sets == [f"eq_sign={folder}"]
    assert main.parse_args(["--test_sets", f"x={folder}"]).test_sets == [f"x={folder}"]
    with pytest.raises(SystemExit):
        main.parse_args(["--test_sets", str(tmp_path / "dir" / "gone=here")])
    assert "no folder, and" in capsys.readouterr().err


def test_an_unlabelled_test_set_promises_no_pairing(trained_run, sample_root, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    for p in sorted((sample_root / "fake_data").glob("*.jpg"))[:4]:
        shutil.copy(p, plain)
    main.main(main.parse_args(["--evaluate_only", "--checkpoint", str(trained_run / "checkpoints" / "best.pt"),
                               "--output_dir", str(tmp_path / "eval"), "--workers", "0",
                               "--cache_dir", str(tmp_path / "cache"), "--test_sets", f"plain={plain}"]))
    printed = capsys.readouterr().out
    assert "test set plain: 4 images (unlabelled), labels unknown" in printed and "ranked against" not in printed
    summary = (tmp_path / "eval" / "evaluation" / "summary.md").read_text()
    assert "| plain | (labels unknown: no ROC-AUC) |" in summary and "| plain | itself" not in summary


def test_gradcam_unsupported_is_raised_at_call_time_at_32_px():
    """What the two tests above rely on: resnet18's last map at 32 px is 1x1, and Grad-CAM says so."""
    from model import DeepfakeDetector
    cam = gradcam.GradCAM(DeepfakeDetector("resnet18", "none").eval())
    with pytest.raises(gradcam.GradCAMUnsupported):
        cam(torch.from_numpy(np.zeros((1, 3, 32, 32), np.float32)))
