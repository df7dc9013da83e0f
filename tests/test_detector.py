"""The detector's contract: sklearn-style API, scores grow with abnormality, one trustworthy bundle."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import anomalous_array, normal_array

from anomon.detector import BundleError, Detector, NotFittedError


def _stack(arrs: list[np.ndarray]) -> np.ndarray:
    return (np.stack(arrs)[:, None].astype(np.float32)) / 255.0


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    train = _stack([normal_array(rng) for _ in range(200)])
    normal = _stack([normal_array(rng) for _ in range(100)])
    anomalous = _stack([anomalous_array(rng) for _ in range(40)])
    return train, normal, anomalous


@pytest.fixture(scope="module")
def fitted(data) -> Detector:
    return Detector(image_size=32, channels=1, epochs=10, batch_size=32, device="cpu").fit(data[0], progress=False)


def test_scores_grow_with_abnormality(fitted: Detector, data) -> None:
    _, normal, anomalous = data
    sn, sa = fitted.score_samples(normal), fitted.score_samples(anomalous)
    assert np.median(sa) > np.max(sn)  # the big square is far outside normal
    assert fitted.predict(anomalous).mean() > 0.9
    assert fitted.predict(normal).mean() < 0.2  # target 0.05 with 20 held-out images
    np.testing.assert_allclose(fitted.decision_function(anomalous), sa - fitted.threshold_)
    assert set(np.unique(fitted.predict(normal))) <= {0, 1}


def test_maps_point_at_the_defect(fitted: Detector, data) -> None:
    _, maps = fitted.score_with_maps(data[2][:10])
    assert maps.shape == (10, 32, 32)
    s = 32 // 3
    for m in maps:  # the hottest point lies in (or right next to) the square
        y, x = np.unravel_index(np.argmax(m), m.shape)
        assert s - 3 <= y < 2 * s + 3 and s - 3 <= x < 2 * s + 3


def test_p_values_small_for_anomalies(fitted: Detector, data) -> None:
    p = fitted.p_values(fitted.score_samples(data[2]))
    assert np.all((p > 0) & (p <= 1)) and np.median(p) <= 1.0 / (fitted.calibration_scores_.numel() + 1) + 1e-9


def test_bundle_round_trip(fitted: Detector, data, tmp_path: Path) -> None:
    path = tmp_path / "m.anomon"
    model_id = fitted.save(path)
    loaded = Detector.load(path, device="cpu")
    assert loaded.model_id == model_id == fitted.model_id
    assert loaded.threshold_ == fitted.threshold_
    # 32 px: a dense code, so the latent view and its statistics travel in the bundle too
    assert fitted.view_mean_.numel() == 3 and loaded.latent_precision_ is not None
    np.testing.assert_array_equal(loaded.latent_mean_.numpy(), fitted.latent_mean_.numpy())
    np.testing.assert_allclose(loaded.score_samples(data[1]), fitted.score_samples(data[1]), rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write cleaned up


def test_same_seed_same_model(data) -> None:
    a = Detector(image_size=32, epochs=3, batch_size=16, seed=7, device="cpu").fit(data[0][:40], progress=False)
    b = Detector(image_size=32, epochs=3, batch_size=16, seed=7, device="cpu").fit(data[0][:40], progress=False)
    c = Detector(image_size=32, epochs=3, batch_size=16, seed=8, device="cpu").fit(data[0][:40], progress=False)
    assert a.model_id == b.model_id
    assert a.model_id != c.model_id


def test_recalibration_changes_threshold_and_id(fitted: Detector, data) -> None:
    det = Detector.from_bytes(fitted.to_bytes(), device="cpu")
    old_id, old_t = det.model_id, det.threshold_
    det.calibrate(det.score_samples(data[1]), target_fpr=0.25)
    assert det.threshold_ != old_t and det.model_id != old_id


def test_unfitted_detector_refuses() -> None:
    with pytest.raises(NotFittedError):
        Detector().score_samples(np.zeros((1, 1, 28, 28), np.float32))


def _rewrite_meta(data: bytes, change) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["anomon"])
    change(meta)
    header["__metadata__"]["anomon"] = json.dumps(meta, sort_keys=True)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def test_bad_bundles_give_one_clear_error(fitted: Detector, tmp_path: Path) -> None:
    good = fitted.to_bytes()
    flipped = bytearray(good)
    flipped[-100] ^= 0xFF  # a weight byte
    threshold_edit = _rewrite_meta(good, lambda m: m.__setitem__("threshold", 1e9))
    newer = _rewrite_meta(good, lambda m: m.__setitem__("format", 99))
    cases = {
        "missing": (None, "not found"),
        "garbage": (b"\x00\x01garbage" * 50, "not an anomon model bundle"),
        "empty": (b"", "not an anomon model bundle"),
        "truncated": (good[: len(good) // 2], "corrupt model bundle"),
        "flipped": (bytes(flipped), "integrity check"),
        "threshold": (threshold_edit, "integrity check"),
        "newer": (newer, "newer than this anomon"),
        "pickle": (b"\x80\x04\x95" + b"x" * 100, "not an anomon model bundle"),
    }
    for name, (content, expected) in cases.items():
        p = tmp_path / f"{name}.anomon"
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(BundleError) as e:
            Detector.load(p)
        assert expected in str(e.value), (name, str(e.value))
        assert "\n" not in str(e.value)


def _each_kind_separates(det: Detector, normal: np.ndarray, anomalous: np.ndarray, kinds: tuple[str, ...]) -> None:
    """Scored with each kind alone, the median anomaly lies above 90% of the normal images."""
    try:
        for kind in kinds:
            det.score = kind
            assert np.median(det.score_samples(anomalous)) > np.quantile(det.score_samples(normal), 0.9), kind
    finally:
        det.score = "all"


def test_latent_view_sees_a_code_no_normal_image_needs(fitted: Detector, data) -> None:
    """Each view alone separates the big-square defect; "all" is what the default scores with."""
    _, normal, anomalous = data
    _each_kind_separates(fitted, normal, anomalous, ("mean", "local", "latent", "mean+local"))



# ---------------------------------------------------------------- large, non-square photos
def _stripes(rng: np.random.Generator, n: int, h: int = 80, w: int = 112) -> np.ndarray:
    """Unregistered texture: diagonal stripes at a random phase, a little noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        phase = rng.uniform(0, 2 * np.pi)
        img = 0.5 + 0.25 * np.sin((xx + yy) / 4.0 + phase) + rng.normal(0, 0.02, (h, w))
        out.append(img)
    return np.clip(np.stack(out)[:, None], 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def photo_detector() -> tuple[Detector, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    train, normal = _stripes(rng, 60), _stripes(rng, 20)
    anomalous = _stripes(rng, 20)
    anomalous[:, :, 30:42, 60:70] = 0.05  # a dark pit, off-centre
    det = Detector(image_size=(80, 112), channels=1, max_steps=120, device="cpu").fit(train, progress=False)
    return det, normal, anomalous


def test_non_square_photos_keep_their_shape(photo_detector) -> None:
    det, normal, anomalous = photo_detector
    assert det.input_shape == (80, 112) and det.size_label == "112x80"
    assert det.views_ == ["mean", "local", "gradient", "code"]
    scores, maps = det.score_with_maps(anomalous)
    assert maps.shape == (20, 80, 112)
    assert np.median(scores) > np.max(det.score_samples(normal))
    for m in maps[:5]:  # the heat map's peak is on the pit
        y, x = np.unravel_index(np.argmax(m), m.shape)
        assert 26 <= y < 46 and 56 <= x < 74, (y, x)


def test_photo_score_is_local_gradient_and_code(photo_detector) -> None:
    """Large images score gradient and code at half weight each, local at a quarter; the others
    can be scored alone."""
    det, normal, anomalous = photo_detector
    assert det.view_weights_.tolist() == [0.0, 0.25, 0.5, 0.5]
    _each_kind_separates(det, normal, anomalous, ("mean", "local", "gradient", "mean+local"))


def test_photo_bundle_round_trip(photo_detector, data) -> None:
    det, normal, _ = photo_detector
    loaded = Detector.from_bytes(det.to_bytes(), device="cpu")
    assert loaded.input_shape == (80, 112) and loaded.views_ == det.views_
    np.testing.assert_array_equal(loaded.code_bank_.numpy(), det.code_bank_.numpy())
    np.testing.assert_allclose(loaded.score_samples(normal), det.score_samples(normal), rtol=1e-5, atol=1e-5)
    from PIL import Image

    img = Image.fromarray((normal[0, 0] * 255).astype(np.uint8)).resize((224, 160))
    assert loaded.preprocess(img).shape == (1, 80, 112)


def test_small_non_square_size_is_refused() -> None:
    with pytest.raises(ValueError, match="both sides above 64"):
        Detector(image_size=(32, 80), channels=1).fit(np.zeros((20, 1, 32, 80), np.float32))


def test_bundles_without_view_names_still_load(fitted: Detector, data) -> None:
    """Bundles written before the views were named (format 1 as shipped) keep their scores."""
    old = _rewrite_meta(fitted.to_bytes(), lambda m: m["score"].pop("views"))
    with pytest.raises(BundleError, match="integrity"):
        Detector.from_bytes(old)  # the id covers the metadata, so a rewrite must re-sign it
    det = Detector.from_bytes(fitted.to_bytes(), device="cpu")
    meta, tensors = det._meta(), det._tensors()
    meta["score"].pop("views")
    det2 = Detector._from_parts(meta, tensors, "x", "cpu")
    assert det2.views_ == ["mean", "local", "latent"]
    np.testing.assert_allclose(det2.score_samples(data[1]), fitted.score_samples(data[1]), rtol=1e-5, atol=1e-6)


def test_auto_image_size_keeps_elongated_photos_elongated() -> None:
    from anomon.detector import auto_image_size

    assert auto_image_size([(28, 28)] * 5, 256) == 28
    assert auto_image_size([(160, 160)] * 5, 256) == 160
    assert auto_image_size([(512, 512), (520, 500)] * 3, 256) == 256
    assert auto_image_size([(500, 1260)] * 3, 256) == (400, 160)  # (height, width): tall commutators
    assert auto_image_size([(1130, 460)] * 3, 256) == (160, 400)  # wide ball screws
    assert auto_image_size([(40, 100)] * 3, 256) == 100  # too small to keep the aspect: square


@pytest.mark.parametrize("shape, k", [((3, 1, 50, 70), 5), ((2, 1, 64, 64), 33), ((1, 1, 40, 100), 21),
                                      ((2, 1, 7, 9), 15), ((1, 1, 5, 5), 1)])
def test_box_filter_is_the_k_by_k_mean_of_the_pixels_inside(shape: tuple[int, ...], k: int) -> None:
    """The running-sum box filter equals one k x k average pool that counts only pixels inside the
    image, also with a hot corner (rounding must not leak along the row) and k beyond the image."""
    import torch

    from anomon.detector import box_filter

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 10
    x[..., :2, :2] += 1e4
    ref = _window_mean(x.double(), k)
    got = box_filter(x, k)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.allclose(got.double(), ref, rtol=1e-6, atol=1e-3)


def _window_mean(x, k):  # the definition, pixel by pixel
    import torch

    r = k // 2
    out = torch.empty_like(x)
    for i in range(x.shape[-2]):
        for j in range(x.shape[-1]):
            out[..., i, j] = x[..., max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].mean((-2, -1))
    return out


def test_gradient_magnitude_is_the_sobel_magnitude_of_the_channel_mean() -> None:
    import torch
    import torch.nn.functional as F

    from anomon.detector import gradient_magnitude

    x = torch.rand(2, 3, 17, 23, generator=torch.Generator().manual_seed(1))
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4
    g = F.conv2d(F.pad(x.mean(1, keepdim=True), (1, 1, 1, 1), mode="replicate"), torch.stack([k, k.T])[:, None])
    assert torch.allclose(gradient_magnitude(x), g.pow(2).sum(1).add(1e-12).sqrt(), atol=1e-6)
