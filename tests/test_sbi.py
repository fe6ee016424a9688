"""Self-blended images: the mask, the blend, and that they are reproducible from torch's seed."""
import numpy as np
import pytest
import torch
from conftest import sample_face
from PIL import Image, ImageDraw
from scipy.spatial import ConvexHull

import detect
import sbi

# box corners, eyes, nose tip, mouth corners of sample_face(0), as YuNet reports them
GEOMETRY = sbi.find_geometry(sample_face()[None], [0])[0]


def test_yunet_finds_the_face_geometry():
    assert not np.isnan(GEOMETRY).any()
    (x0, y0), (x1, y1) = GEOMETRY[:2]
    assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
    for x, y in GEOMETRY[2:]:  # landmarks inside the box
        assert x0 <= x <= x1 and y0 <= y <= y1
    assert np.isnan(sbi.find_geometry(np.zeros((1, 64, 64, 3), np.uint8), [0])[0]).all()


def test_mask_covers_the_inner_face_and_not_the_corners():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = sbi.face_mask(256, GEOMETRY, rng)
        nose = GEOMETRY[4].round().astype(int)
        assert mask.shape == (256, 256) and mask.min() >= 0 and mask.max() <= 1
        assert mask[nose[1], nose[0]] >= 0.2  # the blend ratio is at least 0.25
        assert mask[:10, :10].max() == 0 and mask[-10:, -10:].max() == 0


def _dlib_landmarks():
    try:
        detect.shape_predictor_file()
    except ImportError as e:
        pytest.skip(f"optional package missing: {e}")
    return sbi.find_geometry(sample_face()[None], [0], "hull")[0]


def test_hull_mask_follows_the_68_landmarks():
    points = _dlib_landmarks()
    assert points.shape == (68, 2) and not np.isnan(points).any()
    (x0, y0), (x1, y1) = GEOMETRY[:2]  # dlib's jaw, brows and mouth lie about YuNet's box
    assert abs(points[:, 0].min() - x0) < 0.25 * (x1 - x0) and abs(points[:, 0].max() - x1) < 0.25 * (x1 - x0)
    assert (points[:, 1] > y0).all() and points[8, 1] > points[57, 1] > points[30, 1]  # chin under mouth under nose
    hull = Image.new("L", (256, 256), 0)
    ImageDraw.Draw(hull).polygon([tuple(p) for p in points[ConvexHull(points).vertices]], fill=1)
    hull = np.asarray(hull, bool)

    def overlap(mask):  # intersection over union of the blended region with the landmark hull
        covered = mask >= 0.5 * mask.max()
        return (covered & hull).sum() / (covered | hull).sum()
    rng = np.random.default_rng(0)
    hulls = [overlap(sbi.face_mask(256, points, rng)) for _ in range(30)]
    ellipses = [overlap(sbi.face_mask(256, GEOMETRY, rng)) for _ in range(30)]
    # the blended region is the hull, grown or shrunk a little, and closer to it than the ellipse is
    assert min(hulls) > 0.7 and np.mean(hulls) > np.mean(ellipses) + 0.1
    assert np.isnan(sbi.find_geometry(np.zeros((1, 64, 64, 3), np.uint8), [0], "hull")[0]).all()


def test_self_blend_changes_the_face_and_leaves_no_black_borders():
    img = torch.from_numpy(sample_face()).permute(2, 0, 1)
    rng = np.random.default_rng(1)
    changed = 0
    for _ in range(20):
        blended, mask = sbi.self_blend(img, GEOMETRY, rng)
        assert blended.shape == img.shape and blended.dtype == torch.uint8
        changed += (blended.int() - img.int()).abs().float().mean() > 1
        for edge in (blended[:, :3], blended[:, -3:], blended[:, :, :3], blended[:, :, -3:]):
            assert (edge.sum(0) > 0).float().mean() > 0.9  # the shifted copy never shows outside the mask
    assert changed >= 15


def test_self_blends_follow_the_torch_seed():
    blend = sbi.SelfBlend({0: GEOMETRY})
    img = torch.from_numpy(sample_face()).permute(2, 0, 1)
    torch.manual_seed(3)
    a = blend(img, 0)
    torch.manual_seed(3)
    assert torch.equal(a, blend(img, 0))


def test_grayscale_faces_stay_grayscale_so_colour_is_no_shortcut():
    gray = torch.from_numpy(sample_face()).permute(2, 0, 1).float().mean(0).round().to(torch.uint8).expand(3, -1, -1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        blended = sbi.self_blend(gray, GEOMETRY, rng)[0].int()
        assert (blended.max(0).values - blended.min(0).values).max() <= sbi.GRAY_SPREAD
    colour = torch.from_numpy(sample_face()).permute(2, 0, 1)  # a colour face still gets tinted
    tints = [sbi.alter_look(colour, np.random.default_rng(i)).float().mean((1, 2)) - colour.float().mean((1, 2))
             for i in range(10)]
    assert max(float(t.max() - t.min()) for t in tints) > 5


def test_each_real_face_and_its_self_blend_share_a_batch():
    from dataset import DeepfakeDataset, Sample
    from engine import PairedBatchSampler
    from sbi import with_pseudo_fakes
    samples = [Sample(f"r{i}.jpg", 0, row=i) for i in range(7)] + [Sample(f"f{i}.jpg", 1, row=7 + i) for i in range(5)]
    train = with_pseudo_fakes(DeepfakeDataset(samples, blend=None), blend=object())
    sampler = PairedBatchSampler(train, batch_size=6)
    torch.manual_seed(0)
    batches = list(sampler)
    assert len(batches) == len(sampler) and all(len(b) <= 6 for b in batches)
    seen = sorted(i for b in batches for i in b)  # every image at most once; of 5 singles, one waits an epoch
    assert len(seen) == len(set(seen)) == len(train) - 1 and set(range(len(train))) - set(seen) <= set(sampler.singles)
    for b in batches:
        rows = [train.samples[i] for i in b]
        for s in rows:
            if s.pseudo or s.label == 0:  # a real face and its blend: both here
                assert {(r.row, r.pseudo) for r in rows} >= {(s.row, True), (s.row, False)}
    torch.manual_seed(0)
    assert list(sampler) == batches  # the order follows torch's seed (exact resume)
