import numpy as np
import pytest
from PIL import Image

from ldmground.config import GroundingConfig, get_preset
from ldmground.errors import LdmGroundError
from ldmground.geometry import Geometry
from ldmground.method.heatmap import load_image, postprocess, preprocess


def test_geometry_landscape_round_trip():
    geo = Geometry(width=10, height=6, size=3)  # short side 6 -> 3, crop columns 2..7
    assert geo.scale == pytest.approx(0.5)
    assert geo.crop_origin == (2.0, 0.0)
    hm = np.arange(9, dtype=np.float32).reshape(3, 3)
    out = geo.to_original(hm)
    assert out.shape == (6, 10)
    assert np.isnan(out[:, :2]).all() and np.isnan(out[:, 8:]).all()
    assert out[0, 2] == 0 and out[5, 7] == 8 and out[2, 4] == 4  # nearest resize x2


def test_geometry_odd_margin_floor_ceil():
    geo = Geometry(width=6, height=9, size=2)  # short 6, vertical margin 3 -> 1 top, 2 bottom
    out = geo.to_original(np.ones((2, 2), dtype=np.float32))
    assert np.isnan(out[0]).all() and np.isfinite(out[1:7]).all() and np.isnan(out[7:]).all()


def test_box_to_model_clips_and_drops():
    geo = Geometry(width=1000, height=800, size=512)  # crop x in [100, 900)
    assert geo.box_to_model((0, 0, 50, 50)) is None
    x, y, w, h = geo.box_to_model((50, 100, 150, 200))
    assert x == pytest.approx(0) and w == pytest.approx(100 * 0.64) and y == pytest.approx(64)


def test_preprocess_shape_range_and_centre_crop():
    img = np.zeros((40, 80), dtype=np.float32)
    img[:, 20:60] = 1.0  # exactly the centre square
    out, geo = preprocess(img, 16)
    assert out.shape == (16, 16) and out.min() >= 0 and out.max() <= 1
    assert out.mean() == pytest.approx(1.0, abs=1e-6)
    assert geo.crop_origin == (20.0, 0.0)


def test_postprocess_switches():
    rng = np.random.default_rng(0)
    raw = rng.random((64, 64))
    raw[20:40, 20:40] += 3
    plain = postprocess(raw, GroundingConfig(sigma=0, otsu=False))
    assert plain.min() == 0 and plain.max() == 1
    assert np.allclose(plain, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)
    blurred = postprocess(raw, GroundingConfig(sigma=20, otsu=False))
    assert np.abs(np.diff(blurred, axis=0)).mean() < np.abs(np.diff(plain, axis=0)).mean()
    masked = postprocess(raw, get_preset("paper"))
    assert (masked == 0).mean() > 0.5  # Otsu keeps the bright square only
    assert masked[30, 30] > 0.5


def test_postprocess_constant_map_is_zero():
    assert postprocess(np.ones((8, 8)), get_preset("paper")).max() == 0


def test_load_image_variants(tmp_path):
    a8 = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(a8).save(tmp_path / "g8.png")
    Image.fromarray(np.stack([a8] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(a8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    g8, rgb, g16 = (load_image(tmp_path / n) for n in ["g8.png", "rgb.png", "g16.png"])
    assert g8.dtype == np.float32 and g8.max() == pytest.approx(252 / 255)
    assert np.allclose(rgb, g8, atol=1 / 255)
    assert np.allclose(g16, g8, atol=1e-6)


def test_load_image_errors(tmp_path):
    with pytest.raises(LdmGroundError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(LdmGroundError, match="cannot read image"):
        load_image(tmp_path / "bad.png")


def test_load_dicom(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    arr = np.arange(16, dtype=np.uint16).reshape(4, 4) * 100
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.PixelData = arr.tobytes()
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    img = load_image(tmp_path / "x.dcm")
    assert img.shape == (4, 4)
    assert img[0, 0] == pytest.approx(1.0) and img[3, 3] == pytest.approx(0.0)  # MONOCHROME1 inverted
    assert pydicom is not None


def test_resize_crop_geometry_matches_torchvision_and_monai_rules():
    """Short side to S, long side int(S * long / short); crop at L // 2 - S // 2 (MONAI)."""
    geo = Geometry(width=2544, height=3056, size=512)
    assert geo.resized == (512, int(512 * 3056 / 2544)) == (512, 615)
    assert geo.crop_start == (0, 615 // 2 - 256) == (0, 51)
    assert geo.crop_origin == pytest.approx((0.0, 51 * 3056 / 615))
    odd = Geometry(width=613, height=540, size=512, resize="crop-resize")
    assert odd.crop_start == (36, 0)  # floor(73 / 2): the same side the map is padded back on
    out = odd.to_original(np.ones((512, 512), dtype=np.float32))
    assert np.isnan(out[:, :36]).all() and np.isfinite(out[:, 36:576]).all() and np.isnan(out[:, 576:]).all()


@pytest.mark.parametrize("short", [256, 300, 512, 1024, 2544, 3000])
def test_to_original_nearest_index_equals_torch(short):
    import torch
    import torch.nn.functional as F

    geo = Geometry(width=short, height=short + 7, size=512)
    hm = np.arange(512 * 512, dtype=np.float32).reshape(512, 512)
    want = F.interpolate(torch.from_numpy(hm)[None, None], size=(short, short), mode="nearest")[0, 0].numpy()
    got = geo.to_original(hm)
    np.testing.assert_array_equal(got[3 : 3 + short], want)


def test_preprocess_methods_differ_when_downsampling():
    rng = np.random.default_rng(0)
    big = rng.random((600, 500)).astype(np.float32)
    a, ga = preprocess(big, 100, "resize-crop")
    b, gb = preprocess(big, 100, "crop-resize")
    assert a.shape == b.shape == (100, 100)
    assert np.abs(a - b).mean() > 0.05  # no antialiasing: the noise survives the 5x downsampling
    assert a.std() > 2 * b.std()
    with pytest.raises(LdmGroundError, match="resize method"):
        preprocess(big, 100, "crop")
