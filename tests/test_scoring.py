"""The one scoring path (anomon.scoring): paths, PIL images and arrays give the same verdicts as the
detector's own predict, one record per item in order, and a bad item never fails the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomon.detector import Detector
from anomon.scoring import as_image, score_items
from conftest import TinyModel


@pytest.fixture(scope="module")
def det(tiny_bundle: Path) -> Detector:
    return Detector.load(tiny_bundle, device="cpu")


def test_paths_images_and_arrays_agree_with_predict(det: Detector, tiny_model: TinyModel, tmp_path: Path) -> None:
    normal = tiny_model.normal_png(tmp_path / "n.png", 0)
    anomalous = tiny_model.anomalous_png(tmp_path / "a.png", 0)
    img = Image.open(anomalous)
    items = [normal, str(anomalous), img, np.asarray(img), np.asarray(img, dtype=np.float32) / 255.0]
    recs = list(score_items(det, items))
    assert [r.error for r in recs] == [None] * 5
    assert [r.anomalous for r in recs] == [False, True, True, True, True]
    assert recs[1].score == pytest.approx(recs[2].score) == pytest.approx(recs[3].score)
    assert recs[4].score == pytest.approx(recs[3].score, rel=1e-4)
    X = np.stack([det.preprocess(Image.open(p)) for p in (normal, anomalous)])
    assert [int(r.anomalous) for r in recs[:2]] == list(det.predict(X))
    assert [r.p_value for r in recs[:2]] == pytest.approx(list(det.p_values(det.score_samples(X))))
    assert {r.model_id for r in recs} == {det.model_id} and {r.threshold for r in recs} == {det.threshold_}


def test_bad_items_get_a_reason_and_the_rest_are_scored_in_order(det: Detector, tiny_model: TinyModel,
                                                                   tmp_path: Path) -> None:
    good = [tiny_model.normal_png(tmp_path / f"n{i}.png", i) for i in range(3)]
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    items = [good[0], tmp_path / "missing.png", good[1], tmp_path / "notes.png", tmp_path / "folder.png",
             np.zeros((4, 4, 7)), good[2]]
    recs = list(score_items(det, items, batch_size=2))  # batch edges between good and bad items
    assert [r.error for r in recs] == [None, "vanished", None, "not_image", "unreadable", "not_image", None]
    assert [r.source for r in recs[:3]] == [str(good[0]), str(tmp_path / "missing.png"), str(good[1])]
    one_batch = list(score_items(det, [good[0], good[1], good[2]]))
    # float sums differ slightly with the batch's make-up (as in the daemon): same to 1e-3
    assert [r.score for r in recs if r.error is None] == pytest.approx([r.score for r in one_batch], rel=1e-3)
    assert recs[1].to_dict() == {"source": str(tmp_path / "missing.png"), "error": "vanished",
                                 "message": recs[1].message, "model_id": det.model_id}


def test_heat_maps_only_on_request(det: Detector, tiny_model: TinyModel, tmp_path: Path) -> None:
    p = tiny_model.anomalous_png(tmp_path / "a.png", 1)
    plain, = score_items(det, [p])
    with_map, = score_items(det, [p], heatmaps=True)
    assert plain.heatmap is None and plain.image is None
    assert with_map.heatmap.shape == det.input_shape and with_map.image.size == Image.open(p).size


def test_arrays_as_images() -> None:
    assert as_image(np.full((5, 6), 0.5, dtype=np.float64)).getpixel((0, 0)) == 128
    assert as_image(np.zeros((5, 6, 1), dtype=np.uint8)).size == (6, 5)
    assert as_image(np.zeros((5, 6, 3), dtype=np.uint8)).mode == "RGB"
    from anomon.images import ImageError

    for bad in (np.zeros((5,)), np.zeros((5, 6, 2)), np.array([[np.nan]]), np.zeros((0, 3))):
        with pytest.raises(ImageError):
            as_image(bad)
