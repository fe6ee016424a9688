"""app.py: routes, bad uploads, concurrency (Flask test client), and one real headless browser run."""
import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image, ImageFile

import app as webapp

ROOT = Path(__file__).resolve().parents[1]


def _encoded(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, fmt)
    return buf.getvalue()


def _png_with_bad_crc():
    data = bytearray(_encoded("PNG"))
    data[data.index(b"IDAT") + 6] ^= 0xFF  # one flipped byte inside the pixel data
    return bytes(data)


PNG_BAD_CRC = _png_with_bad_crc()


@pytest.fixture(scope="module")
def predictor(trained_run):
    """The real Predictor on the tiny trained checkpoint; 4 frames per video keep the tests fast."""
    from predict import Predictor
    return Predictor(trained_run / "checkpoints" / "best.pt", frames=4)


@pytest.fixture(scope="module")
def client(predictor):
    return webapp.create_app(predictor, "ckpt.pt").test_client()


@pytest.fixture(scope="module")
def face_jpg(sample_root):
    return sorted((sample_root / "real_data").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def blank_png():
    """A plain grey picture: a valid image with no face in it."""
    buf = io.BytesIO()
    Image.new("RGB", (200, 200), (128, 128, 128)).save(buf, "PNG")
    return buf.getvalue()


def post(client, data, name):
    return client.post("/api/predict", data={"file": (io.BytesIO(data), name)}, content_type="multipart/form-data")


def decode(data_url):
    head, b64 = data_url.split(",", 1)
    assert head == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_health_and_page(client, predictor):
    health = client.get("/health").get_json()
    assert health == {"status": "ok", "model": predictor.model.name, "checkpoint": "ckpt.pt",
                      "threshold": predictor.threshold}
    page = client.get("/")
    assert page.status_code == 200 and b'id="analyze"' in page.data and b"static/app.js" in page.data
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert client.get("/nope").get_json()["error"].startswith("404")


def test_create_app_from_checkpoint_path(trained_run, predictor):
    ckpt = trained_run / "checkpoints" / "best.pt"
    health = webapp.create_app(ckpt).test_client().get("/health").get_json()
    assert health["checkpoint"] == "best.pt" and health["threshold"] == predictor.threshold  # no server paths


def test_face_image_scored_by_predict_file(client, predictor, face_jpg):
    r = post(client, face_jpg.read_bytes(), "my face.jpg")
    assert r.status_code == 200, r.get_json()
    a = r.get_json()
    direct = predictor.predict_file(face_jpg)  # one code path: the API answers what Predictor says
    assert a["kind"] == "image" and a["label"] == direct["label"] and a["name"] == "my face.jpg"
    assert a["fake_probability"] == pytest.approx(direct["fake_probability"], abs=1e-6)
    assert a["threshold"] == predictor.threshold and a["faces"] == len(a["rows"]) >= 1
    assert len(a["images"]) == len(a["rows"])
    crop, cam = decode(a["images"][0]["crop"]), decode(a["images"][0]["gradcam"])
    assert crop.size[0] > 16 and cam.size[0] > 16


def test_video_rows_and_image_cap(predictor, face_video):
    client = webapp.create_app(predictor, max_images=2).test_client()
    r = post(client, face_video.read_bytes(), "clip.mov")
    a = r.get_json()
    assert r.status_code == 200, a
    assert a["kind"] == "video" and a["frames"] > 1 and a["images_total"] == len(a["rows"])
    assert len(a["images"]) == min(2, len(a["rows"]))
    assert [r["frame"] for r in a["rows"]] == sorted(r["frame"] for r in a["rows"])


def test_spread_keeps_first_and_last():
    assert webapp.spread(3, 8) == [0, 1, 2]
    assert webapp.spread(33, 5) == [0, 8, 16, 24, 32]
    assert webapp.spread(10, 1) == [0]


@pytest.mark.parametrize("data, name, status, words", [
    (b"hello, I am a text file and not a photo\n" * 20, "face.jpg", 415, "neither an image nor a video"),
    (_encoded("ICO"), "face.jpg", 415, "ICO images are not supported"),
    (PNG_BAD_CRC, "face.png", 422, "damaged PNG image"),
    (b"\x00\x00\x00\x18ftypmp42" + bytes(500), "clip.mp4", 422, "damaged video"),
])
def test_bad_content_gets_clear_error(client, data, name, status, words):
    r = post(client, data, name)
    assert r.status_code == status and words in r.get_json()["error"] and name in r.get_json()["error"]


def test_truncated_jpeg_is_422_and_server_goes_on(client, face_jpg):
    data = face_jpg.read_bytes()
    r = post(client, data[: len(data) // 3], "cut.jpg")
    assert r.status_code == 422 and "cut.jpg" in r.get_json()["error"]
    assert post(client, data, "whole.jpg").status_code == 200


def _png(mode, size):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def test_pixel_bomb_is_refused_from_its_header_before_decoding(client, monkeypatch):
    bomb = _png("1", (13000, 13000))  # 20 KB on disk, under Pillow's own limit, 1.7 GB once decoded
    assert len(bomb) < 100_000

    def no_decoding(self, *args):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    r = post(client, bomb, "bomb.png")
    assert r.status_code == 413 and "bomb.png: 13000x13000" in r.get_json()["error"]
    assert "--max_pixels" in r.get_json()["error"]


def test_a_sliver_of_an_image_is_a_clear_422(client):
    r = post(client, _png("RGB", (1, 5000)), "sliver.png")
    assert r.status_code == 422 and "too small to hold a face" in r.get_json()["error"]


def test_an_animated_gif_is_scored_like_training_reads_it(client, face_jpg):
    face = Image.open(face_jpg)
    buf = io.BytesIO()
    face.save(buf, "GIF", save_all=True, append_images=[face.rotate(90)])
    r = post(client, buf.getvalue(), "face.gif")
    assert r.status_code == 200 and r.get_json()["kind"] == "image" and r.get_json()["faces"] == 1


def test_missing_file_field(client):
    r = client.post("/api/predict", data={}, content_type="multipart/form-data")
    assert r.status_code == 400 and "'file'" in r.get_json()["error"]


def test_size_limits(predictor, face_jpg):
    data = face_jpg.read_bytes()
    kb = len(data) / 2**10
    small_images = webapp.create_app(predictor, max_image_mb=kb / 2 / 1024, max_video_mb=1).test_client()
    r = post(small_images, data, "face.jpg")  # under the request cap, over the per-kind limit
    assert r.status_code == 413 and "limit for images" in r.get_json()["error"]
    tiny = webapp.create_app(predictor, max_image_mb=kb / 4 / 1024, max_video_mb=kb / 4 / 1024).test_client()
    r = post(tiny, data + bytes(2**17), "face.jpg")  # over MAX_CONTENT_LENGTH (limit + 64 KB): not even read
    assert r.status_code == 413 and "request limit" in r.get_json()["error"]


def test_no_face_is_200_uncertain(client, blank_png):
    r = post(client, blank_png, "wall.png")
    a = r.get_json()
    assert r.status_code == 200 and a["label"] == "uncertain (no face)" and a["fake_probability"] is None
    assert "No face found in wall.png" in a["message"] and a["images"] == []


def test_uploads_never_left_behind_nor_named_by_client(client, face_jpg, tmp_path, monkeypatch):
    monkeypatch.setattr(webapp.tempfile, "tempdir", str(tmp_path))
    seen = []
    real_sniff = webapp.sniff
    monkeypatch.setattr(webapp, "sniff", lambda path, *rest: seen.append(path) or real_sniff(path, *rest))
    assert post(client, face_jpg.read_bytes(), "../../evil.jpg").status_code == 200
    assert post(client, b"junk" * 100, "x.png").status_code == 415
    assert len(seen) == 2 and all(Path(p).parent == tmp_path and "evil" not in p for p in seen)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_requests_get_their_own_answers(client, sample_root, blank_png):
    paths = (sorted((sample_root / "real_data").glob("*.jpg"))[:2]
             + sorted((sample_root / "fake_data").glob("*.jpg"))[:1])
    uploads = [(p.read_bytes(), p.name) for p in paths] + [(blank_png, "blank.png")]
    expected = [post(client, d, n).get_json() for d, n in uploads]
    results = [None] * len(uploads)

    def work(i):
        results[i] = post(webapp_client(client), *uploads[i]).get_json()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(uploads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want, (_, name) in zip(results, expected, uploads):
        assert got["name"] == name and got["label"] == want["label"]
        assert got["fake_probability"] == want["fake_probability"] and got["rows"] == want["rows"]


def webapp_client(client):
    return client.application.test_client()  # one client per thread, one shared app and model


def test_twenty_parallel_worst_case_uploads_keep_memory_bounded(trained_run, tmp_path):
    """The real server (python app.py) under 20 uploads at once of the largest picture it accepts:
    each decodes to ~110 MB of RGB; two at a time (--max_concurrent 2) keep the peak far below 20x."""
    import socket
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor
    worst = _png("1", (6000, 6000))  # 36 MP: just under the 40 MP limit, a few KB on disk
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--checkpoint",
                               str(trained_run / "checkpoints" / "best.pt"), "--port", str(port),
                               "--max_concurrent", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def peak_mib():
        status = Path(f"/proc/{server.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024

    def upload(i):
        body = (b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
                b"Content-Type: image/png\r\n\r\n" + worst + b"\r\n--x--\r\n")
        req = urllib.request.Request(f"{url}/api/predict", data=body,
                                     headers={"Content-Type": "multipart/form-data; boundary=x"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    try:
        for _ in range(240):  # wait for the server (importing torch takes seconds)
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        before = peak_mib()
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(upload, range(20)))
        grown = peak_mib() - before
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert all(status == 200 and a["label"] == "uncertain (no face)" for status, a in answers)
    print(f"peak memory grew {grown:.0f} MiB under 20 parallel 36 MP uploads")
    assert grown < 1500, f"peak memory grew {grown:.0f} MiB: uploads are not bounded"


def test_cli_bad_checkpoint_exits_2_in_one_line(tmp_path):
    missing, garbage = tmp_path / "missing.pt", tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    runs = [(ckpt, subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--checkpoint", str(ckpt), "--port", "0"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path))
            for ckpt in (missing, garbage)]  # side by side: each spends seconds importing torch
    for ckpt, proc in runs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "Traceback" not in err
        assert err.strip().count("\n") == 0 and err.startswith(f"error: {ckpt}")


# ----------------------------------------------------------------------------- real browser
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# a mark, not a skip inside the fixture: it skips before the session's training run is set up
needs_chromium = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                    reason=f"{CHROMIUM} or {CHROMEDRIVER} missing: "
                                    "apt-get install chromium chromium-driver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver path below: Selenium Manager downloads nothing
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--window-size=1280,900"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(predictor):
    """The real app on a free localhost port, served by werkzeug in a thread (threaded, as app.py runs it)."""
    from werkzeug.serving import make_server
    srv = make_server("127.0.0.1", 0, webapp.create_app(predictor, "best.pt"), threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.port}"
    srv.shutdown()


def save_screenshot(driver, path):
    """Whole page (also below the fold) as PNG, through Chrome's DevTools protocol."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    png = driver.execute_cdp_cmd("Page.captureScreenshot",
                                 {"format": "png", "captureBeyondViewport": True, "clip": clip})
    path.write_bytes(base64.b64decode(png["data"]))
    if os.environ.get("APP_SCREENSHOT_DIR"):  # for people to look at: APP_SCREENSHOT_DIR=/tmp/app_screens
        keep = Path(os.environ["APP_SCREENSHOT_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        (keep / path.name).write_bytes(path.read_bytes())


def analyze(driver, path):
    """Choose a file in the page, press Analyze, wait for a verdict or an error."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver.find_element(By.ID, "file").send_keys(str(path))
    driver.find_element(By.ID, "analyze").click()
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "result").is_displayed()
                                    or d.find_element(By.ID, "error").is_displayed())


@needs_chromium
def test_browser_upload_shows_verdict_bar_heatmap(browser, server, predictor, face_jpg, tmp_path):
    from selenium.webdriver.common.by import By
    browser.get(server)
    assert "Deepfake detector" in browser.title
    analyze(browser, face_jpg)
    want = predictor.predict_file(face_jpg)
    assert browser.find_element(By.ID, "verdict").text.lower() == want["label"]
    fill = browser.execute_script("return document.getElementById('bar-fill').style.width")
    assert float(fill.rstrip("%")) == pytest.approx(100 * want["fake_probability"], abs=0.06)
    assert browser.find_element(By.ID, "bar-threshold").is_displayed()
    heatmaps = browser.find_elements(By.CSS_SELECTOR, "#faces img.gradcam")
    assert heatmaps and all(browser.execute_script("return arguments[0].naturalWidth", h) > 0 for h in heatmaps)
    save_screenshot(browser, tmp_path / "desktop_image.png")

    # a phone-sized screen: same page, nothing wider than the screen
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    try:
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
        save_screenshot(browser, tmp_path / "phone_image.png")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert (tmp_path / "phone_image.png").stat().st_size > 10_000


@needs_chromium
def test_browser_garbage_upload_shows_message_then_works_again(browser, server, face_jpg, tmp_path):
    from selenium.webdriver.common.by import By
    browser.get(server)
    garbage = tmp_path / "holiday.jpg"
    garbage.write_text("this is a text file with a .jpg name\n" * 10)
    analyze(browser, garbage)
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and "holiday.jpg: neither an image nor a video" in error.text
    assert not browser.find_element(By.ID, "result").is_displayed()
    save_screenshot(browser, tmp_path / "desktop_garbage.png")
    analyze(browser, face_jpg)  # the server kept serving
    assert browser.find_element(By.ID, "result").is_displayed() and not error.is_displayed()
