"""DICOM slides read through highdicom's frame reader: files written by wsidicom (and re-encoded by
pydicom), not by our own writer alone; every offset-table layout (none, basic, extended, empty with
fragmented frames); focal planes and optical paths chosen by name, never mixed; refusals name the file."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_fragments, generate_frames
from pydicom.uid import (JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, ExplicitVRLittleEndian, RLELossless,
                         generate_uid)

from cytoedge.runtime.errors import InputImageError
from cytoedge.runtime.dicom_source import ENCAPSULATED_SYNTAXES
from cytoedge.runtime.sources import DicomSlideSource, open_source
from cytoedge.runtime.synthetic_smear import frames_of, write_wsi_dicom

SYNTAXES = {"native": ExplicitVRLittleEndian, "jpeg": JPEGBaseline8Bit, "jpeg2000": JPEG2000Lossless,
            "jpegls": JPEGLSLossless}


def _slide(rng, w=200, h=150) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], axis=2).astype(np.int16)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def _wsidicom_slide(out: Path, images: dict[tuple[float, str], np.ndarray], codec: str = "native",
                    tile: int = 64, offset_table: str | None = None, um_per_px: float = 0.25) -> Path:
    """One pyramid level written by wsidicom from in-memory planes keyed by (Z in µm, optical path)."""
    wsidicom = pytest.importorskip("wsidicom", reason="wsidicom (the test extra) writes the DICOM WSI under test")
    from wsidicom.codec import Encoder
    from wsidicom.geometry import Size, SizeMm
    from wsidicom.instance import ImageData, WsiDataset, WsiInstance
    from wsidicom.metadata import Equipment, Image, Label, Patient, Pyramid, Series, Slide, Study, WsiMetadata
    from wsidicom.metadata.image import ImageType
    from wsidicom.metadata.optical_path import OpticalPath
    from wsidicom.metadata.sample import SlideSample
    from wsidicom.metadata.schema.dicom.wsi import WsiMetadataDicomSchema
    from wsidicom.source import Source

    syntax = SYNTAXES[codec]
    photometric = "YBR_FULL_422" if codec == "jpeg" else "RGB"
    first = next(iter(images.values()))

    class ArrayImageData(ImageData):
        def __init__(self):
            super().__init__(Encoder.create(syntax, 8, photometric))

        transfer_syntax = property(lambda self: syntax)
        image_size = property(lambda self: Size(first.shape[1], first.shape[0]))
        tile_size = property(lambda self: Size(tile, tile))
        pixel_spacing = property(lambda self: SizeMm(um_per_px / 1000, um_per_px / 1000))
        imaged_size = property(lambda self: None)
        samples_per_pixel = property(lambda self: 3)
        photometric_interpretation = property(lambda self: photometric)
        bits = property(lambda self: 8)
        image_coordinate_system = property(lambda self: None)
        thread_safe = property(lambda self: True)
        lossy_compression = property(lambda self: None)
        transcoder = property(lambda self: None)
        focal_planes = property(lambda self: sorted({z for z, _ in images}))
        optical_paths = property(lambda self: list(dict.fromkeys(p for _, p in images)))

        def get_decoded_tile(self, tile_point, z, path, cache=True):
            out = np.full((tile, tile, 3), 255, np.uint8)
            part = images[(z, path)][tile_point.y * tile:(tile_point.y + 1) * tile,
                                     tile_point.x * tile:(tile_point.x + 1) * tile]
            out[:part.shape[0], :part.shape[1]] = part
            return out

        def get_encoded_tile(self, tile_point, z, path):
            return self.encoder.encode(self.get_decoded_tile(tile_point, z, path))

    metadata = WsiMetadata(
        study=Study(uid=generate_uid()), series=Series(uid=generate_uid()), patient=Patient(),
        equipment=Equipment(), frame_of_reference_uid=generate_uid(), dimension_organization_uids=[generate_uid()],
        slide=Slide(identifier="smear-1", samples=[SlideSample(identifier="blood-1", uid=generate_uid())]),
        pyramid=Pyramid(image=Image(), uid=generate_uid(),
                        optical_paths=[OpticalPath(identifier=p) for p in dict.fromkeys(p for _, p in images)]),
        label=Label())
    base = WsiMetadataDicomSchema().dump(metadata, ImageType.VOLUME)

    class ArraySource(Source):
        def __init__(self):
            super().__init__()
            self._level = WsiInstance.create_instance(ArrayImageData(), base, ImageType.VOLUME, 0)

        base_dataset = property(lambda self: WsiDataset(base))
        level_instances = property(lambda self: [self._level])
        label_instances = overview_instances = thumbnail_instances = annotation_instances = property(lambda self: [])

        def close(self):
            pass

    out.mkdir(parents=True)
    with wsidicom.WsiDicom(ArraySource()) as wsi:
        files = wsi.save(out, offset_table=offset_table, include_thumbnails=False, workers=1)
    assert len(files) == 1
    return Path(str(files[0]))


def _bot_length(path: Path) -> int:
    """Length of the Basic Offset Table item (the first item of encapsulated Pixel Data)."""
    tag_group, tag_elem, length = struct.unpack("<HHI", pydicom.dcmread(path).PixelData[:8])
    assert (tag_group, tag_elem) == (0xFFFE, 0xE000)
    return length


@pytest.mark.parametrize("codec, offset_table", [("native", None), ("jpeg2000", "bot"), ("jpeg2000", "eot"),
                                                 ("jpeg2000", "empty"), ("jpegls", "eot"), ("jpeg", "bot"),
                                                 ("jpeg", "empty")])
def test_a_wsidicom_slide_reads_back_frame_by_frame(tmp_path, rng, codec, offset_table):
    rgb = cv2.GaussianBlur(_slide(rng), (5, 5), 0)
    path = _wsidicom_slide(tmp_path / "out", {(0.0, "brightfield"): rgb}, codec, offset_table=offset_table)
    head = pydicom.dcmread(path, stop_before_pixels=True)
    assert head.file_meta.TransferSyntaxUID == SYNTAXES[codec] and head.DimensionOrganizationType == "TILED_FULL"
    assert ("ExtendedOffsetTable" in head) == (offset_table == "eot")
    if offset_table == "empty":
        assert _bot_length(path) == 0
    elif offset_table == "bot":
        assert _bot_length(path) == 4 * 12
    src = open_source(path)
    assert isinstance(src, DicomSlideSource)
    assert (src.width, src.height, src.n_frames, src.frame_rows) == (200, 150, 12, 64)
    assert src.um_per_px == pytest.approx(0.25)
    assert src.plane["frames_read"] == 12 and src.plane["frames_skipped"] == 0
    assert src.plane["optical_path"] == "brightfield"
    region, covered = src.read_region(0, 0, 200, 150)
    assert covered
    if codec == "jpeg":  # lossy: close to the source image, not equal
        assert np.abs(region.astype(int) - rgb).mean() < 3.0
        return
    np.testing.assert_array_equal(region, rgb)
    np.testing.assert_array_equal(src.read_region(37, 50, 141, 131)[0], rgb[50:131, 37:141])
    owner = np.zeros((150, 200), int)
    for t in src.tiles(64, 10):
        owner[t.core[1]:t.core[3], t.core[0]:t.core[2]] += 1
        h, w = t.rgb.shape[:2]
        np.testing.assert_array_equal(t.rgb, rgb[t.y0:t.y0 + h, t.x0:t.x0 + w])
    assert (owner == 1).all()
    src.close()


def test_rle_frames_encoded_by_pydicom(tmp_path, rng):
    rgb = _slide(rng)
    ds = pydicom.dcmread(_wsidicom_slide(tmp_path / "out", {(0.0, "brightfield"): rgb}))
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(tmp_path / "rle.dcm")
    src = open_source(tmp_path / "rle.dcm")
    np.testing.assert_array_equal(src.read_region(0, 0, 200, 150)[0], rgb)


def test_only_the_frames_a_region_touches_are_decoded(tmp_path, rng):
    rgb = _slide(rng)
    src = open_source(_wsidicom_slide(tmp_path / "out", {(0.0, "brightfield"): rgb}, "jpeg2000"))
    decoded = []
    read_frame = src._reader.read_frame
    src._reader.read_frame = lambda k, **kw: decoded.append(k) or read_frame(k, **kw)
    np.testing.assert_array_equal(src.read_region(70, 10, 120, 60)[0], rgb[10:60, 70:120])
    np.testing.assert_array_equal(src.read_region(64, 0, 128, 64)[0], rgb[:64, 64:128])
    assert decoded == [1]  # the second read came from the cache


@pytest.mark.parametrize("codec", ["jpeg2000", "jpegls", "jpeg"])
@pytest.mark.parametrize("frames", [1, 12])
def test_frames_split_into_fragments_with_an_empty_offset_table(tmp_path, rng, codec, frames):
    """Each frame in three fragments and no Basic Offset Table: the reader finds the frames from the
    fragments' start markers (one frame: all fragments are its own)."""
    rgb = cv2.GaussianBlur(_slide(rng), (5, 5), 0)
    rgb = rgb[:64, :64] if frames == 1 else rgb
    ds = pydicom.dcmread(_wsidicom_slide(tmp_path / "out", {(0.0, "brightfield"): rgb}, codec))
    encoded = list(generate_frames(ds.PixelData, number_of_frames=frames))
    ds.PixelData = encapsulate(encoded, fragments_per_frame=3, has_bot=False)
    ds.save_as(tmp_path / "frag.dcm")
    assert _bot_length(tmp_path / "frag.dcm") == 0
    assert len(list(generate_fragments(pydicom.dcmread(tmp_path / "frag.dcm").PixelData[8:]))) == 3 * frames
    src = open_source(tmp_path / "frag.dcm")
    region = src.read_region(0, 0, rgb.shape[1], rgb.shape[0])[0]
    if codec == "jpeg":
        assert np.abs(region.astype(int) - rgb).mean() < 3.0
    else:
        np.testing.assert_array_equal(region, rgb)


@pytest.mark.parametrize("zs, chosen", [([0.0, 1.0, 2.0], 1), ([0.0, 2.5], 0), ([-1.0, 0.0, 1.0, 2.0, 3.0], 2)])
def test_focal_planes_the_middle_one_is_read_and_said(tmp_path, rng, caplog, zs, chosen):
    base = _slide(rng)
    images = {(z, "brightfield"): np.roll(base, 17 * i, axis=1) for i, z in enumerate(zs)}
    path = _wsidicom_slide(tmp_path / "out", images, "jpeg2000")
    assert int(pydicom.dcmread(path, stop_before_pixels=True).TotalPixelMatrixFocalPlanes) == len(zs)
    with caplog.at_level("WARNING", logger="cytoedge.runtime.dicom_source"):
        src = open_source(path)
    assert src.plane == {"focal_planes": len(zs), "focal_plane_index": chosen, "z_um": pytest.approx(zs[chosen]),
                         "optical_paths": ["brightfield"], "optical_path": "brightfield", "frames_read": 12,
                         "frames_skipped": 12 * (len(zs) - 1)}
    np.testing.assert_array_equal(src.read_region(0, 0, 200, 150)[0], images[(zs[chosen], "brightfield")])
    said = [r.getMessage() for r in caplog.records if r.name == "cytoedge.runtime.dicom_source"]
    assert len(said) == 1 and str(path) in said[0] and f"focal plane {chosen + 1} of {len(zs)}" in said[0]


def test_optical_paths_the_first_listed_is_read_and_said(tmp_path, rng, caplog):
    rgb = _slide(rng)
    images = {(0.0, "white"): rgb, (0.0, "blue"): 255 - rgb}
    path = _wsidicom_slide(tmp_path / "out", images)
    with caplog.at_level("WARNING"):
        src = open_source(path)
    assert src.plane["optical_paths"] == ["white", "blue"] and src.plane["optical_path"] == "white"
    assert (src.plane["frames_read"], src.plane["frames_skipped"]) == (12, 12)
    np.testing.assert_array_equal(src.read_region(0, 0, 200, 150)[0], rgb)
    np.testing.assert_array_equal(src.frame(12), (255 - rgb)[:64, :64])  # the other path's frame, by index
    said = [r.getMessage() for r in caplog.records]
    assert any("optical path 'white' (the first of 2)" in m for m in said)
    assert not any("ICC" in m or "more than one optical path" in m for m in said)  # highdicom's colour notices


def _sparse_planes(tmp_path, rng, zs: list[float], paths: list[str] | None = None) -> tuple[Path, list[np.ndarray]]:
    """A TILED_SPARSE slide (our writer) whose frames are re-labelled with pydicom as several focal planes
    (per-frame Z offsets) and optical paths: plane i holds image i, checkerboard frames only."""
    images = [np.roll(_slide(rng, 256, 256), 31 * i, axis=0) for i in range(len(zs))]
    frames = [(r, c, t) for im in images for r, c, t in frames_of(im, 64) if (r // 64 + c // 64) % 2 == 0]
    path = write_wsi_dicom(tmp_path / "sp.dcm", frames, (256, 256), 64, 0.25, organisation="TILED_SPARSE")
    ds = pydicom.dcmread(path)
    per_plane = len(frames) // len(zs)
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item.PlanePositionSlideSequence[0].ZOffsetInSlideCoordinateSystem = zs[k // per_plane]
        if paths:
            ident = pydicom.Dataset()
            ident.OpticalPathIdentifier = paths[k // per_plane]
            item.OpticalPathIdentificationSequence = [ident]
    if paths:
        listed = []
        for p in dict.fromkeys(paths):
            item = pydicom.Dataset()
            item.OpticalPathIdentifier = p
            listed.append(item)
        ds.OpticalPathSequence = listed
    ds.save_as(path)
    return path, images


def test_tiled_sparse_focal_planes_by_z_not_by_file_order(tmp_path, rng, caplog):
    path, images = _sparse_planes(tmp_path, rng, [2.0, 0.0, 1.0])
    with caplog.at_level("WARNING"):
        src = open_source(path)
    assert src.plane["focal_planes"] == 3 and src.plane["z_um"] == pytest.approx(1.0)
    assert (src.plane["frames_read"], src.plane["frames_skipped"]) == (8, 16)
    region, _ = src.read_region(0, 0, 256, 256)
    for r, c, t in frames_of(images[2], 64):
        want = t if (r // 64 + c // 64) % 2 == 0 else np.full_like(t, 255)
        np.testing.assert_array_equal(region[r:r + 64, c:c + 64], want)
    assert len(list(src.tiles(64, 8))) == 8
    assert any("focal plane 2 of 3 at Z 1 µm" in r.getMessage() for r in caplog.records)


def test_tiled_sparse_optical_paths_first_listed(tmp_path, rng):
    path, images = _sparse_planes(tmp_path, rng, [0.0, 0.0], paths=["fluor", "white"])
    ds = pydicom.dcmread(path)
    ds.OpticalPathSequence = list(reversed(ds.OpticalPathSequence))  # "white" listed first
    ds.save_as(path)
    src = open_source(path)
    assert src.plane["optical_paths"] == ["white", "fluor"] and src.plane["optical_path"] == "white"
    assert src.plane["focal_planes"] == 1 and src.plane["frames_read"] == 8
    np.testing.assert_array_equal(src.read_region(0, 0, 64, 64)[0], images[1][:64, :64])


def test_frames_the_planes_do_not_account_for_are_refused(tmp_path, rng):
    a = _slide(rng)
    doubled = write_wsi_dicom(tmp_path / "d.dcm", list(frames_of(a, 64)) + list(frames_of(255 - a, 64)),
                              (200, 150), 64, 0.25, organisation="TILED_FULL")
    with pytest.raises(InputImageError, match=r"d\.dcm: TILED_FULL with 24 frames.*needs 12"):
        open_source(doubled)  # read before as the first 12 and the rest silently ignored
    ds = pydicom.dcmread(write_wsi_dicom(tmp_path / "s.dcm", frames_of(a, 64), (200, 150), 64, 0.25,
                                         organisation="TILED_FULL"))
    ds.TotalPixelMatrixFocalPlanes = 2
    ds.save_as(tmp_path / "p.dcm")
    with pytest.raises(InputImageError, match=r"p\.dcm: .*2 focal plane\(s\) \(TotalPixelMatrixFocalPlanes\)"):
        open_source(tmp_path / "p.dcm")


def test_tiled_sparse_frames_in_one_place_or_off_the_grid_are_refused(tmp_path, rng):
    path, _ = _sparse_planes(tmp_path, rng, [0.0, 0.0])  # two frames at every place of one plane
    with pytest.raises(InputImageError, match=r"sp\.dcm: frames 1 and 9 are both at row 1, column 1"):
        open_source(path)
    path, _ = _sparse_planes(tmp_path, rng, [0.0, 1.0])
    ds = pydicom.dcmread(path)
    ds.PerFrameFunctionalGroupsSequence[3].PlanePositionSlideSequence[0].RowPositionInTotalImagePixelMatrix = 11
    ds.save_as(path)
    with pytest.raises(InputImageError, match=r"sp\.dcm: frame 4 is at row 11, .* off the 64×64 frame grid"):
        open_source(path)
    ds.PerFrameFunctionalGroupsSequence[3].PlanePositionSlideSequence[0].RowPositionInTotalImagePixelMatrix = 257
    ds.save_as(path)
    with pytest.raises(InputImageError, match=r"sp\.dcm: frame 4 is at row 257, .*outside"):
        open_source(path)


def test_reads_go_through_read_path_and_messages_name_path(tmp_path, rng):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd (the daemon's descriptor links)")
    rgb = _slide(rng)
    real = _wsidicom_slide(tmp_path / "out", {(0.0, "brightfield"): rgb}, "jpeg2000")
    named = tmp_path / "as-submitted.dcm"  # does not exist: only read_path may be opened
    fd = os.open(real, os.O_RDONLY)
    try:
        src = DicomSlideSource(named, f"/proc/self/fd/{fd}")
        assert src.name == str(named)
        np.testing.assert_array_equal(src.read_region(0, 0, 200, 150)[0], rgb)
        src.close()
    finally:
        os.close(fd)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(real.read_bytes()[:-300])
    fd = os.open(cut, os.O_RDONLY)
    try:
        with pytest.raises(InputImageError) as e:
            DicomSlideSource(named, f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    assert str(e.value).startswith(f"{named}: ") and "truncated" in str(e.value) and "/proc/self" not in str(e.value)


def test_a_damaged_frame_is_refused_naming_file_and_frame(tmp_path, rng):
    ds = pydicom.dcmread(_wsidicom_slide(tmp_path / "out", {(0.0, "brightfield"): _slide(rng)}, "jpeg2000"))
    encoded = list(generate_frames(ds.PixelData, number_of_frames=12))
    encoded[4] = encoded[4][:2] + b"\x00" * (len(encoded[4]) - 2)  # start marker kept, codestream gone
    ds.PixelData = encapsulate(encoded)
    ds.save_as(tmp_path / "bad.dcm")
    src = open_source(tmp_path / "bad.dcm")
    src.read_region(0, 0, 64, 64)  # other frames still read
    with pytest.raises(InputImageError, match=r"bad\.dcm: frame 5 cannot be decoded"):
        src.read_region(0, 64, 64, 128)


def test_a_syntax_without_a_decoder_plugin_is_refused_by_name(tmp_path, rng):
    from pydicom.pixels import get_decoder

    missing = [uid for uid in ENCAPSULATED_SYNTAXES if not get_decoder(uid).is_available]
    if not missing:
        pytest.skip("every listed transfer syntax has a pydicom decoder plugin here")
    ds = pydicom.dcmread(_wsidicom_slide(tmp_path / "out", {(0.0, "brightfield"): _slide(rng)}, "jpeg"))
    ds.file_meta.TransferSyntaxUID = missing[0]
    ds.save_as(tmp_path / "x.dcm")
    with pytest.raises(InputImageError, match=rf"x\.dcm: transfer syntax {missing[0]} .*needs a pydicom decoder"):
        open_source(tmp_path / "x.dcm")
