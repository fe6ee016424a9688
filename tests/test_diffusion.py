"""What reads a diffusion trace: native-pixel input (--input_route crop), latent-decoder pseudo-fakes
(--pseudo_fakes taef2), and the line that says what a checkpoint was validated on."""
import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLE, sample_face
from PIL import Image
from test_main import tiny_args

import autoencoder
import dataset
import engine
import main
import predict
import presets
import recipes
import runtime

WEIGHTS = ROOT.parent / "shared" / "weights" / "taef2"
needs_weights = pytest.mark.skipif(not (WEIGHTS / autoencoder.FILES[1]).is_file(),
                                   reason=f"TAEF2 weights not found at {WEIGHTS} (they sit beside the project in CI)")


def big_face(path, side=1024):
    """A bundled face enlarged onto a larger grey picture, saved at path: a face of many pixels."""
    canvas = Image.new("RGB", (side, side), (90, 90, 90))
    canvas.paste(Image.fromarray(sample_face()).resize((side // 2, side // 2)), (side // 4, side // 4))
    canvas.save(path)
    return path


# ---------------------------------------------------------------- native pixels

def test_the_crop_route_keeps_a_large_pictures_own_pixels():
    rgb = np.random.default_rng(0).integers(0, 255, (700, 1024, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    assert np.array_equal(presets.square_pixels(im, 256, "crop"), rgb[222:478, 384:640])
    assert not np.array_equal(presets.square_pixels(im, 256, "resize"), rgb[222:478, 384:640])
    small = Image.fromarray(rgb[:100, :100])  # smaller than the square: enlarged, as the resize route does
    assert np.array_equal(presets.square_pixels(small, 256, "crop"), presets.square_pixels(small, 256, "resize"))


def test_crop_route_trains_on_random_crops_and_scores_the_whole_square():
    tf = presets.transforms({"image_size": 32, "crop_pct": 0.5, "augment": "none", "input_route": "crop"},
                            (0.5,) * 3, (0.5,) * 3)
    img = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    assert tf.cache_size == 64 and tf.eval(img).shape[-1] == 64  # all of it, at its own pixels
    crops = {tuple(tf.train(img).flatten()[:50].tolist()) for _ in range(5)}
    assert tf.train(img).shape[-1] == 32 and len(crops) > 1  # random crops even with --augment none


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("crop") / "run"
    main.main(tiny_args(SAMPLE, out, "--epochs", "1", "--max_per_class", "10", "--input_route", "crop",
                        "--crop_pct", "0.5", "--model", "efficientnet_lite0", "--weights", "none"))
    return out


def test_a_model_trained_with_crops_scores_a_large_face_at_its_own_pixels(crop_run, trained_run, tmp_path):
    face = big_face(tmp_path / "big.png")
    crop_model = predict.Predictor(crop_run / "checkpoints" / "best.pt", device="cpu")
    detector = crop_model.detector
    assert detector.route == "crop"
    crop = crop_model.read(face).crops[0]
    assert min(crop.size) > 256  # the face as found, not resized to 256
    side = detector.cache_size
    left, top = (crop.width - side) // 2, (crop.height - side) // 2
    centre = torch.from_numpy(np.asarray(crop)[top:top + side, left:left + side].copy()).permute(2, 0, 1)
    assert torch.equal(detector.preprocess(crop), detector.transform(centre))  # its own pixels, the middle of it
    resize_model = predict.Predictor(trained_run / "checkpoints" / "best.pt", device="cpu")
    assert resize_model.detector.route == "resize" and resize_model.read(face).crops[0].size == (256, 256)


def test_onnx_runtime_scores_the_whole_square_of_a_crop_route_model(crop_run, tmp_path):
    # the web page scores through ONNX Runtime: its export must take the square the crop route feeds,
    # not --image_size crops (a 1024-px upload was an internal error)
    detector = predict.Predictor(crop_run / "checkpoints" / "best.pt", device="cpu").detector
    batch = detector.preprocess(Image.open(big_face(tmp_path / "big.png"))).unsqueeze(0)
    assert batch.shape[-1] == detector.cache_size > detector.image_size
    in_torch = detector.fake_probs(batch)
    assert isinstance(runtime.choose_scorer(detector, "onnx"), runtime.OnnxScorer)
    assert torch.allclose(detector.fake_probs(batch), in_torch, atol=1e-3)


def test_an_old_checkpoint_keeps_the_resize_route(trained_run, tmp_path):
    ckpt = engine.load_checkpoint(trained_run / "checkpoints" / "best.pt")
    ckpt["args"].pop("input_route", None)  # a checkpoint from before the flag
    engine.save_checkpoint(ckpt, tmp_path / "old.pt")
    detector = engine.load_detector(tmp_path / "old.pt", "cpu")
    assert detector.route == "resize"
    face = Image.fromarray(sample_face()).resize((512, 512))
    expected = detector.transform(torch.from_numpy(presets.resize_square(face, detector.cache_size)).permute(2, 0, 1))
    assert torch.equal(detector.preprocess(face), expected)


# ---------------------------------------------------------------- the autoencoder

@needs_weights
def test_taef2_reconstructs_a_face_closely_but_not_exactly():
    net = autoencoder.load_autoencoder(WEIGHTS)
    face = sample_face()[:250, :250]  # sides that are no multiple of 8: padded and cut back
    made = autoencoder.reconstruct(net, face[None])[0]
    psnr = 10 * np.log10(255**2 / ((made.astype(float) - face) ** 2).mean())
    assert made.shape == face.shape and 25 < psnr < 45, psnr


def test_a_wrong_weights_folder_is_one_clear_error(tmp_path):
    with pytest.raises(autoencoder.AutoencoderError, match="taef2_encoder.pth: not found"):
        autoencoder.load_autoencoder(tmp_path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "taef2_encoder.pth")
    torch.save({"x": torch.zeros(1)}, tmp_path / "taef2_decoder.pth")
    with pytest.raises(autoencoder.AutoencoderError, match="not TAEF2's"):
        autoencoder.load_autoencoder(tmp_path)


@needs_weights
def test_a_reconstruction_is_compressed_as_its_real_file_was(tmp_path):
    """A JPEG real's reconstruction carries that file's own quantisation; a PNG real's is left lossless."""
    jpeg = sorted((SAMPLE / "real_data").glob("*.jpg"))[0]
    png = tmp_path / "face.png"
    Image.open(jpeg).save(png)
    samples = [dataset.Sample(str(jpeg), 0), dataset.Sample(str(png), 0)]
    cache, _ = dataset.build_cache(samples, 64, tmp_path / "cache", workers=0, route="crop")
    store = autoencoder.make_reconstructions(cache, samples, WEIGHTS)
    raw = autoencoder.reconstruct(autoencoder.load_autoencoder(WEIGHTS), cache[[0, 1]])
    stored = [np.asarray(Image.open(store / f"{s.digest}.png")) for s in samples]
    assert np.array_equal(stored[0], autoencoder.compress_like(raw[0], autoencoder.jpeg_tables(jpeg)))
    assert not np.array_equal(stored[0], raw[0]) and np.array_equal(stored[1], raw[1])
    with Image.open(jpeg) as im:
        assert autoencoder.jpeg_tables(jpeg)[0] == im.quantization and autoencoder.jpeg_tables(png) is None


class Same:
    """A pseudo-fake that is its real image unchanged: any difference in a pair comes from the augmentation."""
    def __init__(self, same_augmentation):
        self.same_augmentation = same_augmentation

    def __call__(self, img, row):
        return img


@pytest.mark.parametrize("same", [True, False])
def test_a_real_image_and_its_pseudo_fake_take_the_same_augmentation(same):
    cache = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    tf = presets.transforms({"image_size": 48, "crop_pct": 0.75, "augment": "blur_jpeg_0.5", "input_route": "crop"},
                            (0.5,) * 3, (0.5,) * 3)
    reals = [dataset.Sample(f"r{i}", 0, row=i) for i in range(4)]
    train = dataset.DeepfakeDataset(reals + [dataset.Sample(f"r{i}", 1, row=i, pseudo=True) for i in range(4)],
                                    tf.train, cache, 64, Same(same), "crop")
    torch.manual_seed(0)
    batch = train.__getitems__([0, 4, 1, 5, 2, 6, 3, 7])
    pairs_equal = [torch.equal(batch[k][0], batch[k + 1][0]) for k in range(0, 8, 2)]
    assert all(pairs_equal) if same else not any(pairs_equal)
    assert [label for _, label in batch] == [0, 1] * 4
    assert not torch.equal(batch[0][0], train.__getitems__([0, 4])[0][0])  # a new draw for the next batch


@needs_weights
def test_pseudo_fakes_taef2_trains_and_shows_its_pairs(tmp_path):
    out = tmp_path / "run"
    main.main(tiny_args(SAMPLE, out, "--epochs", "1", "--max_per_class", "6", "--pseudo_fakes", "taef2",
                        "--input_route", "crop", "--latent_weights", str(WEIGHTS)))
    summary = (out / "summary.md").read_text()
    assert "fake, of which 4 TAEF2 reconstructions)" in summary and (out / "pseudo_fakes.png").is_file()
    store = list((tmp_path / "cache").glob("taef2-*"))
    assert len(store) == 1 and len(list(store[0].glob("*.png"))) >= 3
    made = {p: p.stat().st_mtime_ns for p in store[0].glob("*.png")}
    main.main(tiny_args(SAMPLE, tmp_path / "again", "--epochs", "1", "--max_per_class", "6", "--pseudo_fakes",
                        "taef2", "--input_route", "crop", "--latent_weights", str(WEIGHTS)))
    assert {p: p.stat().st_mtime_ns for p in made} == made  # made once: a second run reuses them


@needs_weights
def test_pseudo_fakes_of_the_extra_reals_only(tmp_path):
    extra = tmp_path / "extra" / "real_data"
    extra.mkdir(parents=True)
    for p in sorted((SAMPLE / "real_data").glob("*.jpg"))[-3:]:
        Image.open(p).save(extra / p.name)
    out = tmp_path / "run"
    main.main(tiny_args(SAMPLE, out, "--epochs", "1", "--max_per_class", "6", "--pseudo_fakes", "taef2",
                        "--input_route", "crop", "--latent_weights", str(WEIGHTS), "--train_extra",
                        str(tmp_path / "extra"), "--pseudo_from", "train_extra"))
    summary = (out / "summary.md").read_text()
    assert "fake, of which 3 TAEF2 reconstructions)" in summary and (out / "pseudo_fakes.png").is_file()
    with pytest.raises(SystemExit, match="--pseudo_from train_extra .* no --train_extra folder"):
        main.main(tiny_args(SAMPLE, tmp_path / "none", "--pseudo_fakes", "taef2", "--pseudo_from", "train_extra"))


def test_taef2_without_its_weights_stops_before_training(tmp_path):
    with pytest.raises(SystemExit, match="taef2_encoder.pth, taef2_decoder.pth not found in --latent_weights"):
        main.main(tiny_args(SAMPLE, tmp_path / "run", "--pseudo_fakes", "taef2", "--latent_weights",
                            str(tmp_path / "nothing")))
    assert not (tmp_path / "run" / "split.csv").exists()


# ---------------------------------------------------------------- what a verdict is worth

def test_a_checkpoint_says_what_it_was_validated_on(tmp_path, capsys):
    out = tmp_path / "run"
    fakes = tmp_path / "gen" / "fake_data"
    fakes.mkdir(parents=True)
    for p in sorted((SAMPLE / "fake_data").glob("*.jpg"))[-6:]:
        Image.open(p).save(fakes / p.name)
    main.main(tiny_args(SAMPLE, out, "--epochs", "1", "--max_per_class", "30",
                        "--test_sets", f"gen={tmp_path / 'gen'}"))
    record = engine.load_checkpoint(out / "checkpoints" / "best.pt")["validated_on"]
    assert record["in_domain"]["data"] == str(SAMPLE) and [s["set"] for s in record["sets"]] == ["gen"]
    line = engine.validation_line(record)
    assert line.startswith(f"validated on: {SAMPLE} (in-domain) ROC-AUC") and "never trained on: gen 0." in line
    capsys.readouterr()
    predict.main(predict.get_args_parser().parse_args(["--checkpoint", str(out / "checkpoints" / "best.pt"),
                                                       "--no_crop", "--input", str(fakes)]))
    assert line in capsys.readouterr().out
    assert "its own test split only" in engine.validation_line(None)  # a checkpoint from before the record


def test_group_means_keep_gan_and_diffusion_apart():
    aucs = {"sg3 vs test reals": 0.9, "sg3 vs a+b": 0.7, "sd14 vs test reals": 0.3, "sd14 vs a+b": 0.4, "dfdc": 0.6}
    means = recipes.group_means(aucs, {"gan": ["sg3"], "diffusion": ["sd14"], "swaps": ["dfdc", "videos"]})
    assert means == pytest.approx({"gan mean": 0.8, "diffusion mean": 0.35, "swaps mean": 0.6})
