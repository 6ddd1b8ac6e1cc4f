"""Detection, scale estimate and stain normalisation on drawn fields with known cells (and, where
../shared/data is present, on BCCD fields)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cytoedge.runtime.detection import detect_cells
from cytoedge.runtime.errors import InputImageError
from cytoedge.runtime.scale import estimate_um_per_px, resolve_scale
from cytoedge.runtime.stain import LabStats, StainNormaliser, lab_stats, reinhard
from cytoedge.runtime.synthetic_smear import PLASMA_RGB, _draw_red_cell

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def drawn_field(um_per_px: float, rng, whites=((60, 60), (160, 90), (90, 160)), lobed=(False, True, False),
                n_red=40, platelets=((30, 150), (170, 30))):
    """A field in µm coordinates: white cells (lilac cytoplasm + purple nucleus, some with 3 lobes),
    red cells, platelets. Returns rgb and the white centres in px."""
    size = int(200 / um_per_px)
    rgb = np.empty((size, size, 3), np.uint8)
    rgb[:] = PLASMA_RGB
    px = 1 / um_per_px
    centres = np.array(whites, float) * px
    placed = 0
    while placed < n_red:
        x, y = rng.uniform(0, size, 2)
        if np.min(np.hypot(centres[:, 0] - x, centres[:, 1] - y)) > 11 * px:
            _draw_red_cell(rgb, x, y, 3.75 * px, rng)
            placed += 1
    for (cx, cy), lobes in zip(centres, lobed):
        cv2.circle(rgb, (int(cx), int(cy)), int(6 * px), (205, 180, 215), -1, cv2.LINE_AA)
        if lobes:
            for a in (0, 2.1, 4.2):
                cv2.circle(rgb, (int(cx + 2.3 * px * np.cos(a)), int(cy + 2.3 * px * np.sin(a))), int(1.6 * px),
                           (95, 60, 150), -1, cv2.LINE_AA)
        else:
            cv2.circle(rgb, (int(cx), int(cy)), int(3.6 * px), (95, 60, 150), -1, cv2.LINE_AA)
    for x, y in platelets:
        cv2.circle(rgb, (int(x * px), int(y * px)), max(1, int(1.1 * px)), (130, 90, 170), -1, cv2.LINE_AA)
    return rgb, centres


@pytest.mark.parametrize("um_per_px", [0.1, 0.25, 0.5])
def test_white_cells_and_platelets_found_at_any_scale(rng, um_per_px):
    rgb, centres = drawn_field(um_per_px, rng)
    det = detect_cells(rgb, um_per_px)
    assert len(det.white) == 3
    found = np.array([[d.cx, d.cy] for d in det.white])
    for c in centres:
        assert np.min(np.hypot(*(found - c).T)) * um_per_px < 1.0  # centre within 1 µm
    for d in det.white:  # the box covers the cell (12 µm across) and not much more
        w_um = (d.bbox[2] - d.bbox[0]) * um_per_px
        assert 9 <= w_um <= 16
    assert len(det.platelets) == 2
    assert 25 <= det.red_cell_count <= 55


def test_widely_spaced_lobes_are_one_cell_and_neighbouring_cells_two(rng):
    """A neutrophil whose lobes are drawn ~3 µm apart edge to edge is one cell (it was two at the old
    1.6-µm merge distance); two cells side by side (nuclei ~5.6 µm apart edge to edge, cytoplasm
    touching) stay two."""
    um_per_px = 0.2
    px = 1 / um_per_px
    rgb = np.empty((int(60 * px), int(60 * px), 3), np.uint8)
    rgb[:] = PLASMA_RGB
    cv2.circle(rgb, (int(15 * px), int(15 * px)), int(6.5 * px), (205, 180, 215), -1, cv2.LINE_AA)
    for a in (0, 2.1, 4.2):  # lobe centres 3.4 µm from the cell's, radius 1.4 µm: gaps of ~3 µm
        cv2.circle(rgb, (int(15 * px + 3.4 * px * np.cos(a)), int(15 * px + 3.4 * px * np.sin(a))), int(1.4 * px),
                   (95, 60, 150), -1, cv2.LINE_AA)
    for cx in (36, 48):  # two touching lymphocyte-like cells, nuclei 12 µm apart centre to centre
        cv2.circle(rgb, (int(cx * px), int(40 * px)), int(6 * px), (205, 180, 215), -1, cv2.LINE_AA)
        cv2.circle(rgb, (int(cx * px), int(40 * px)), int(3.2 * px), (95, 60, 150), -1, cv2.LINE_AA)
    white = detect_cells(rgb, um_per_px).white
    assert len(white) == 3
    lobed = min(white, key=lambda d: np.hypot(d.cx - 15 * px, d.cy - 15 * px))
    assert np.hypot(lobed.cx - 15 * px, lobed.cy - 15 * px) * um_per_px < 1.0


def test_field_of_red_cells_only_has_no_white_cells(rng):
    rgb, _ = drawn_field(0.25, rng, whites=((100, 100),), lobed=(False,), platelets=())
    rgb[int(88 / 0.25):int(112 / 0.25), int(88 / 0.25):int(112 / 0.25)] = PLASMA_RGB
    assert detect_cells(rgb, 0.25).white == []


@pytest.mark.parametrize("um_per_px", [0.12, 0.25])
def test_scale_estimated_from_red_cells(rng, um_per_px):
    rgb, _ = drawn_field(um_per_px, rng, n_red=60)
    est = estimate_um_per_px(rgb)
    assert est.um_per_px == pytest.approx(um_per_px, rel=0.2)
    assert resolve_scale(rgb, 0.3, 0.4, "x").um_per_px == 0.3
    assert resolve_scale(rgb, None, 0.4, "x").source == "dicom"


def test_scale_refused_on_an_empty_field():
    with pytest.raises(InputImageError, match="blank.png.*--um-per-px"):
        estimate_um_per_px(np.full((300, 300, 3), 240, np.uint8), "blank.png")


def test_reinhard_moves_the_field_to_the_reference_statistics(rng):
    rgb, _ = drawn_field(0.25, rng)
    shifted = np.clip(rgb.astype(int) * [0.85, 1.0, 1.1] + [0, 10, -5], 0, 255).astype(np.uint8)
    target = lab_stats(rgb)
    out = reinhard(shifted, lab_stats(shifted), target)
    got = lab_stats(out)
    np.testing.assert_allclose(got.mean, target.mean, atol=2.0)
    np.testing.assert_allclose(got.std, target.std, rtol=0.1)
    glass = np.full((4, 4, 3), 255, np.uint8)
    np.testing.assert_array_equal(reinhard(glass, LabStats((128.0,) * 3, (10.0,) * 3), target), glass)


@pytest.mark.skipif(not (SHARED / "bccd").is_dir(), reason="../shared/data/bccd not present")
def test_bccd_white_cells_recall_on_a_sample():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from eval_detection import eval_bccd

    res = eval_bccd(SHARED, "0.0721", 40)
    assert res["recall"] >= 0.9 and res["precision"] >= 0.9


def test_a_crop_is_normalised_on_its_own_statistics_and_glass_is_left_alone(rng):
    rgb, _ = drawn_field(0.25, rng)
    shifted = np.clip(rgb.astype(int) * [0.85, 1.0, 1.1] + [0, 10, -5], 0, 255).astype(np.uint8)
    normaliser = StainNormaliser("reinhard", lab_stats(rgb))
    np.testing.assert_array_equal(normaliser.normalise(shifted), reinhard(shifted, lab_stats(shifted), lab_stats(rgb)))
    glass = np.full((40, 40, 3), 252, np.uint8)  # too few stained pixels to fit on: left as it is
    np.testing.assert_array_equal(normaliser.normalise(glass), glass)


def test_touching_red_cells_are_separated_one_centre_each():
    """Pale discs with a central pallor, in touching pairs and a chain of three, at 0.2 µm/px (7.5 µm = 37.5 px)."""
    import cv2

    from cytoedge.runtime.detection import detect_red_cells

    rgb = np.full((300, 420, 3), (236, 226, 214), np.uint8)
    r = 18
    truth = [(60, 60), (60 + 2 * r - 3, 60),  # a touching pair
             (60, 200), (60 + 2 * r - 4, 200), (60 + 4 * r - 8, 200),  # a chain of three
             (330, 90), (300, 240)]  # two alone
    for x, y in truth:
        cv2.circle(rgb, (x, y), r, (205, 120, 130), -1)
        cv2.circle(rgb, (x, y), r // 3, (222, 170, 175), -1)  # central pallor
    centres, labels = detect_red_cells(rgb, 0.2)
    assert len(centres) == len(truth)
    for x, y in truth:  # each cell is found within a third of a radius of its centre, and labels it alone
        d = np.hypot(centres[:, 0] - x, centres[:, 1] - y)
        assert d.min() < r / 3 and labels[y, x] == 1 + int(d.argmin())


RED, PLASMA_GLASS = (205, 120, 130), (236, 226, 214)


def _red_field(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Plasma with a little sensor noise, as a camera gives it."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((*shape, 3), np.float64)
    rgb[:] = PLASMA_GLASS
    return np.clip(rgb + rng.normal(0, 2, rgb.shape), 0, 255).astype(np.uint8)


def _matches(centres: np.ndarray, labels: np.ndarray, truth: list[tuple[int, int]], tolerance: float) -> bool:
    """Each true centre has one detected centre within ``tolerance`` px, whose region holds it."""
    if len(centres) != len(truth):
        return False
    for x, y in truth:
        d = np.hypot(centres[:, 0] - x, centres[:, 1] - y)
        if d.min() >= tolerance or labels[y, x] != 1 + int(d.argmin()):
            return False
    return True


@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.25])
def test_touching_and_overlapping_discs_are_split_into_their_count(overlap):
    """A pair, a straight chain of three and a bent one, overlapping by ``overlap`` of a diameter, at
    0.2 µm/px. (Four round a pool of plasma are not: the pool is filled as if it were a pale centre.)"""
    from cytoedge.runtime.detection import detect_red_cells

    r = 18
    step = round(2 * r * (1 - overlap))
    groups = [[(0, 0), (step, 0)], [(0, 0), (step, 0), (2 * step, 0)], [(0, 0), (step, 0), (step, step)]]
    rgb, truth = _red_field((320, 420)), []
    for (gx, gy), group in zip([(40, 40), (200, 40), (60, 170)], groups):
        truth += [(gx + r + x, gy + r + y) for x, y in group]
    for x, y in truth:
        cv2.circle(rgb, (x, y), r, RED, -1)
    centres, labels = detect_red_cells(rgb, 0.2)
    assert _matches(centres, labels, truth, r / 2)


@pytest.mark.parametrize("kind", ["hypochromic", "target"])
def test_a_pale_centred_cell_is_found_once_not_as_a_ring(kind):
    """A hypochromic cell (a thin rim round a centre nearly as pale as the plasma) and a target cell (a
    dark spot inside the pale ring) are each one cell, their whole disc, beside a normal one."""
    from cytoedge.runtime.detection import detect_red_cells

    r = 18
    rgb = _red_field((160, 200))
    truth = [(50, 80), (140, 80)]
    for x, y in truth:
        cv2.circle(rgb, (x, y), r, RED, -1)
    pale = tuple(int(0.8 * p + 0.2 * c) for p, c in zip(PLASMA_GLASS, RED))
    cv2.circle(rgb, truth[0], int(r * 0.7), pale, -1)
    if kind == "target":
        cv2.circle(rgb, truth[0], int(r * 0.3), RED, -1)
    centres, labels = detect_red_cells(rgb, 0.2)
    assert _matches(centres, labels, truth, r / 3)
    disc = np.zeros(labels.shape, np.uint8)
    cv2.circle(disc, truth[0], r, 1, -1)
    assert (labels == labels[truth[0][1], truth[0][0]]).sum() >= 0.9 * disc.sum()


def test_a_fragment_a_third_of_the_diameter_is_found():
    """A schistocyte-sized fragment beside normal cells (which set the threshold) is kept as a cell."""
    from cytoedge.runtime.detection import detect_red_cells

    r = 18
    rgb = _red_field((160, 260))
    truth = [(50, 80), (130, 80), (215, 80)]
    cv2.circle(rgb, truth[0], r, RED, -1)
    cv2.circle(rgb, truth[1], r, RED, -1)
    cv2.circle(rgb, truth[2], r // 3, RED, -1)
    centres, labels = detect_red_cells(rgb, 0.2)
    assert _matches(centres, labels, truth, r / 3)


def test_nothing_is_found_on_blank_glass():
    from cytoedge.runtime.detection import detect_red_cells

    for seed in range(3):
        centres, labels = detect_red_cells(_red_field((240, 320), seed), 0.2)
        assert len(centres) == 0 and not labels.any()
