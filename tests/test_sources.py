"""Slide sources: DICOM WSI frames from our writer (native, JPEG, JPEG 2000; TILED_FULL and TILED_SPARSE)
read back frame by frame, tiles with overlap whose cores partition the slide, and bad inputs named. Files
written by wsidicom, offset tables, fragments, focal planes and optical paths: test_dicom_sources.py."""
from __future__ import annotations

import cv2
import numpy as np
import pydicom
import pytest

from cytoedge.runtime.errors import InputImageError
from cytoedge.runtime.limits import InputLimitError
from cytoedge.runtime.sources import DicomSlideSource, FolderSource, ImageFieldSource, open_source
from cytoedge.runtime.synthetic_smear import frames_of, write_wsi_dicom


def _slide(rng, w=200, h=150) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], axis=2).astype(np.int16)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("codec", ["native", "jpeg2000"])
def test_tiled_full_reads_back_exactly(tmp_path, rng, codec):
    rgb = _slide(rng)
    path = write_wsi_dicom(tmp_path / "s.dcm", frames_of(rgb, 64), (200, 150), 64, 0.25, codec=codec,
                           organisation="TILED_FULL")
    src = open_source(path)
    assert isinstance(src, DicomSlideSource)
    assert (src.width, src.height, src.n_frames) == (200, 150, 12)
    assert src.um_per_px == pytest.approx(0.25)
    region, covered = src.read_region(0, 0, 200, 150)
    assert covered
    np.testing.assert_array_equal(region, rgb)
    np.testing.assert_array_equal(src.read_region(37, 50, 141, 131)[0], rgb[50:131, 37:141])


def test_jpeg_frames_decode_close_to_the_original(tmp_path, rng):
    rgb = cv2.GaussianBlur(_slide(rng), (5, 5), 0)
    path = write_wsi_dicom(tmp_path / "j.dcm", frames_of(rgb, 64), (200, 150), 64, 0.25, codec="jpeg",
                           organisation="TILED_FULL")
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    region, _ = open_source(path).read_region(0, 0, 200, 150)
    assert np.abs(region.astype(int) - rgb).mean() < 3.0


@pytest.mark.parametrize("frame, tile_px, overlap", [(32, 64, 10), (64, 40, 6)])
def test_tiles_cores_partition_the_slide_and_overlap_reads_neighbours(tmp_path, rng, frame, tile_px, overlap):
    """Tiles larger or smaller than a frame (the scorer asks for small ones at coarse scales): the cores
    partition the slide and each tile holds its core plus the overlap read from the neighbours."""
    rgb = _slide(rng)
    src = open_source(write_wsi_dicom(tmp_path / "s.dcm", frames_of(rgb, frame), (200, 150), frame, 0.5,
                                      organisation="TILED_FULL"))
    owner = np.zeros((150, 200), int)
    for tile in src.tiles(tile_px, overlap):
        x0, y0, x1, y1 = tile.core
        assert x1 - x0 <= tile_px and y1 - y0 <= tile_px
        owner[y0:y1, x0:x1] += 1
        h, w = tile.rgb.shape[:2]
        np.testing.assert_array_equal(tile.rgb, rgb[tile.y0:tile.y0 + h, tile.x0:tile.x0 + w])
        assert tile.x0 == max(x0 - overlap, 0) and tile.y0 == max(y0 - overlap, 0)
    assert (owner == 1).all()


def test_tiled_sparse_skips_absent_frames_and_fills_background(tmp_path, rng):
    rgb = _slide(rng, 256, 256)
    present = [(r, c, t) for r, c, t in frames_of(rgb, 64) if (r // 64 + c // 64) % 2 == 0]
    src = open_source(write_wsi_dicom(tmp_path / "sp.dcm", present, (256, 256), 64, 0.25, organisation="TILED_SPARSE"))
    region, _ = src.read_region(0, 0, 256, 256)
    for r, c, t in frames_of(rgb, 64):
        want = t if (r // 64 + c // 64) % 2 == 0 else np.full_like(t, 255)
        np.testing.assert_array_equal(region[r:r + 64, c:c + 64], want)
    cores = [tile.core for tile in src.tiles(64, 8)]
    assert len(cores) == 8 and all(((c[0] // 64 + c[1] // 64) % 2 == 0) for c in cores)


def test_truncated_dicom_is_refused_naming_the_file(tmp_path, rng):
    path = write_wsi_dicom(tmp_path / "t.dcm", frames_of(_slide(rng), 64), (200, 150), 64, 0.25,
                           organisation="TILED_FULL")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 5000])
    with pytest.raises(InputImageError, match=r"t\.dcm.*truncated"):
        open_source(path)


def test_jpeg_fragment_truncated_is_refused(tmp_path, rng):
    path = write_wsi_dicom(tmp_path / "tj.dcm", frames_of(_slide(rng), 64), (200, 150), 64, 0.25, codec="jpeg",
                           organisation="TILED_FULL")
    path.write_bytes(path.read_bytes()[:-700])
    with pytest.raises(InputImageError, match=r"tj\.dcm"):
        open_source(path)


def test_not_a_slide_and_unsupported_syntax_are_refused(tmp_path, rng):
    path = write_wsi_dicom(tmp_path / "ct.dcm", frames_of(_slide(rng), 64), (200, 150), 64, 0.25,
                           organisation="TILED_FULL")
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image
    ds.save_as(tmp_path / "ct2.dcm", enforce_file_format=True)
    with pytest.raises(InputImageError, match=r"ct2\.dcm.*not a slide"):
        open_source(tmp_path / "ct2.dcm")
    jpeg = write_wsi_dicom(tmp_path / "j.dcm", frames_of(_slide(rng), 64), (200, 150), 64, 0.25, codec="jpeg",
                           organisation="TILED_FULL")
    ds = pydicom.dcmread(jpeg)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG-2
    ds.save_as(tmp_path / "mpeg.dcm")
    with pytest.raises(InputImageError, match=r"mpeg\.dcm.*transfer syntax"):
        open_source(tmp_path / "mpeg.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x01\x02" * 10)
    with pytest.raises(InputImageError, match=r"junk\.dcm"):
        open_source(tmp_path / "junk.dcm")


def test_image_fields_and_folders(tmp_path, rng):
    rgb = _slide(rng)
    cv2.imwrite(str(tmp_path / "a.png"), rgb[..., ::-1])
    cv2.imwrite(str(tmp_path / "b.tif"), rgb[..., ::-1])
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    field = open_source(tmp_path / "a.png", um_per_px=0.3)
    assert isinstance(field, ImageFieldSource) and field.um_per_px == 0.3
    np.testing.assert_array_equal(next(field.tiles(4096, 0)).rgb, rgb)
    folder = open_source(tmp_path)
    assert isinstance(folder, FolderSource)
    tiles = list(folder.tiles(4096, 0))
    assert [t.field for t in tiles] == [str(tmp_path / "a.png"), str(tmp_path / "b.tif")]
    assert len(folder.failures) == 1 and "c.jpg" in folder.failures[0]["error"]
    with pytest.raises(InputImageError, match="no such file"):
        open_source(tmp_path / "missing.png")


def test_vl_microscopic_image_with_pixel_spacing(tmp_path, rng):
    rgb = _slide(rng, 120, 90)
    path = write_wsi_dicom(tmp_path / "w.dcm", [(0, 0, rgb)], (120, 90), 128, 0.5, organisation="TILED_FULL")
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 90, 120, 1
    ds.PixelData = rgb.tobytes()
    del ds.SharedFunctionalGroupsSequence
    ds.PixelSpacing = [0.0004, 0.0004]
    ds.save_as(tmp_path / "vl.dcm", enforce_file_format=True)
    src = open_source(tmp_path / "vl.dcm")
    assert (src.width, src.height) == (120, 90) and src.um_per_px == pytest.approx(0.4)
    np.testing.assert_array_equal(src.read_region(0, 0, 120, 90)[0], rgb)


@pytest.mark.parametrize("keyword, value", [("Rows", 0), ("Columns", 0), ("TotalPixelMatrixRows", 0),
                                            ("TotalPixelMatrixColumns", 2_000_000)])
def test_zero_or_huge_dicom_dimensions_are_refused_naming_the_attribute(tmp_path, rng, keyword, value):
    path = write_wsi_dicom(tmp_path / "s.dcm", frames_of(_slide(rng), 64), (200, 150), 64, 0.25,
                           organisation="TILED_FULL")
    ds = pydicom.dcmread(path)
    setattr(ds, keyword, value)
    ds.save_as(tmp_path / "bad.dcm")
    with pytest.raises(InputImageError, match=rf"bad\.dcm: DICOM attribute {keyword} is {value}"):
        open_source(tmp_path / "bad.dcm")


def test_a_dicom_frame_over_the_decoded_image_limit_is_refused(tmp_path, rng):
    path = write_wsi_dicom(tmp_path / "s.dcm", frames_of(_slide(rng), 64), (200, 150), 64, 0.25,
                           organisation="TILED_FULL")
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 13000
    ds.save_as(tmp_path / "big.dcm")
    with pytest.raises(InputLimitError, match=r"big\.dcm: DICOM frames of 13000×13000 px are over"):
        open_source(tmp_path / "big.dcm")
