"""Crop scale (runtime/crop_scale.py): declared sizes are read, estimates pool over one analyser's
crops and follow a resampling, --um-per-px wins, and a crop with nothing to measure is flagged."""
from __future__ import annotations

import numpy as np
import pytest

from cytoedge.runtime.cells import declared_um_per_px, write_image_with_scale
from cytoedge.runtime.crop_scale import CropScaleEstimator


@pytest.fixture(scope="module")
def smear_crops(bundle, ort_backend):
    """Crops cut around the white cells of a drawn smear (red cells 7.5 µm across), at 0.2 µm/px."""
    import cv2

    from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear

    smear = generate_smear(bundle, ort_backend, SmearSpec(n_white=9, ddim_steps=4, seed=3, um_per_px=0.3))
    half = 90  # a 36-µm crop, as PBC's
    field = cv2.copyMakeBorder(cv2.resize(smear.rgb, None, fx=1.5, fy=1.5, interpolation=cv2.INTER_CUBIC),
                               half, half, half, half, cv2.BORDER_REFLECT_101)  # 0.2 µm/px
    crops = []
    for cell in smear.truth:
        x, y = int(cell["centre"][0] * 1.5) + half, int(cell["centre"][1] * 1.5) + half
        crops.append(field[y - half:y + half, x - half:x + half])
    return crops


def pooled(bundle, crops) -> float:
    est = CropScaleEstimator(bundle)
    for k, rgb in enumerate(crops):
        est.add(str(k), rgb)
    scales = {est.scale(str(k)) for k in range(len(crops))}
    assert len(scales) == 1  # one analyser's crops share one pooled scale
    scale = scales.pop()
    assert scale.source == "red-cells" and scale.pooled == len(crops) and not scale.fallback
    return scale.um_per_px


def test_the_pooled_estimate_follows_a_resampling(bundle, smear_crops):
    import cv2

    native = pooled(bundle, smear_crops)
    for factor in (0.5, 2.0):
        resized = [cv2.resize(c, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA if factor < 1
                              else cv2.INTER_CUBIC) for c in smear_crops]
        assert pooled(bundle, resized) == pytest.approx(native / factor, rel=0.08)


def test_user_scale_and_declared_scale_come_first(bundle, smear_crops, tmp_path):
    est = CropScaleEstimator(bundle, user_um_per_px=0.33)
    est.add("a", smear_crops[0], declared=0.1)
    assert (est.scale("a").um_per_px, est.scale("a").source) == (0.33, "user")
    path = tmp_path / "cell.png"
    write_image_with_scale(path, smear_crops[0], 0.25)
    assert declared_um_per_px(path) == pytest.approx(0.25, rel=1e-4)
    est = CropScaleEstimator(bundle)
    est.add("b", smear_crops[0], declared=declared_um_per_px(path))
    assert est.scale("b").source == "file" and est.scale("b").um_per_px == pytest.approx(0.25, rel=1e-4)


def test_a_camera_dpi_is_not_taken_for_a_microscope_scale(smear_crops, tmp_path):
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.fromarray(smear_crops[0]).save(path, dpi=(72, 72))  # 353 µm/px: an editor's default, not a scale
    assert declared_um_per_px(path) is None


def test_a_crop_with_nothing_to_measure_falls_back_and_says_so(bundle):
    est = CropScaleEstimator(bundle)
    est.add("grey", np.full((180, 180, 3), 128, np.uint8))
    scale = est.scale("grey")
    assert scale.fallback and scale.source == "bundle-default"
    assert scale.um_per_px == pytest.approx(bundle.um_per_px / bundle.manifest["input"]["source_px_per_model_px"])
