"""VinDr-CXR and ChestX-ray8 boxes in the same pipeline (issue #29), on small files made here.

The files copy the published layouts: VinDr-CXR's ``annotations_test.csv`` (``image_id,
class_name, x_min, y_min, x_max, y_max``; ``No finding`` rows with empty coordinates) with
``<image_id>.dicom`` images, and ChestX-ray8's ``BBox_List_2017.csv`` (header
``Image Index,Finding Label,Bbox [x,y,w,h],,,``) with PNGs. The DICOM path of ``load_image``
(VOI LUT / window) is tested here too.
"""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ldmground.cli import main
from ldmground.datasets._boxes import DEFAULT_TEMPLATE, image_size
from ldmground.datasets.chestxray8 import load_chestxray8
from ldmground.datasets.loader import detect_format, load_dataset
from ldmground.datasets.mscxr import load_mscxr
from ldmground.datasets.vindr import load_vindr
from ldmground.errors import LdmGroundError
from ldmground.method.heatmap import load_image

from .helpers import blob_image, write_dataset

pydicom = pytest.importorskip("pydicom")


def _sid(image_id: str, phrase: str) -> str:
    return f"{image_id}-{hashlib.sha1(phrase.encode()).hexdigest()[:8]}"


def write_dicom(path, arr, photometric="MONOCHROME2", window=None, lut=None, pixel_bytes=None):
    """A 16-bit (12 stored) single-frame DICOM; ``window`` = (center, width); ``lut`` = a
    VOI LUT Sequence's (first mapped value, data)."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if lut is not None:
        first, data = lut
        item = Dataset()
        item.add_new("LUTDescriptor", "US", [len(data), first, 16])  # VRs given: both are ambiguous
        item.add_new("LUTData", "US", [int(v) for v in data])
        ds.VOILUTSequence = Sequence([item])
    ds.PixelData = arr.astype(np.uint16).tobytes() if pixel_bytes is None else pixel_bytes
    ds.save_as(path, enforce_file_format=True)
    return path


def _blob12(width, height, cx, cy):
    return np.round(blob_image(width, height, cx, cy) * 4095).astype(np.uint16)


VINDR_CSV = """image_id,class_name,x_min,y_min,x_max,y_max
img_n,No finding,,,,
img_a,Cardiomegaly,30,30,70,60
img_a,Pleural effusion,5,40,25,75
img_a,Pleural effusion,70,40,90,75
img_a,Pleural effusion,70,40,90,75
img_b,Lung Opacity,10.5,20.25,40.5,50.75
img_b,Nodule/Mass,50,60,40,80
img_b,Atelectasis,10,,30,40
img_x,Cardiomegaly,10,10,30,30
img_a,Aortic enlargement,0,0,5,5
img_a,ILD,40,10,60,30
img_a,Infiltration,20,10,40,30
"""
# line 8: x_max < x_min; line 9: y_min missing; line 10: no image img_x.dicom; line 11: wholly
# left of the centre crop of the 96 x 80 image (its crop starts at x ~ 8); line 6: duplicate.


@pytest.fixture()
def vindr(tmp_path):
    root = tmp_path / "vindr"
    (root / "annotations").mkdir(parents=True)
    (root / "test").mkdir()
    write_dicom(root / "test" / "img_a.dicom", _blob12(96, 80, 50, 45))
    # MONOCHROME1 with a window, as most VinDr-CXR test files carry one
    write_dicom(root / "test" / "img_b.dicom", 4095 - _blob12(80, 96, 25, 35), "MONOCHROME1", window=(2048, 3000))
    csv = root / "annotations" / "annotations_test.csv"
    csv.write_text(VINDR_CSV)
    return csv


CXR8_CSV = """Image Index,Finding Label,Bbox [x,y,w,h],,,
00000001_000.png,Atelectasis,20.5,30.25,25,20
00000001_000.png,Effusion,5,50,20,30
00000001_000.png,Effusion,70,50,20,30
00000002_000.png,Infiltrate,30,20,30,40
00000002_000.png,Mass,40,40,-5,10
00000003_000.png,Nodule,10,10,10,10
00000002_000.png,Pneumonia,30,20,,40
"""
# line 6: w < 0; line 7: no image; line 8: w missing.


@pytest.fixture()
def cxr8(tmp_path):
    root = tmp_path / "cxr8"
    (root / "images").mkdir(parents=True)
    for name, (w, h) in {"00000001_000.png": (96, 96), "00000002_000.png": (100, 90)}.items():
        img = (blob_image(w, h, w * 0.4, h * 0.5) * 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / name)
    csv = root / "BBox_List_2017.csv"
    csv.write_text(CXR8_CSV)
    return csv


# --- VinDr-CXR ------------------------------------------------------------------------------


def test_vindr_rows_to_samples(vindr):
    images = vindr.parent.parent / "test"
    samples, counts = load_vindr(vindr, images, check_files=False)
    assert counts == {
        "rows": 12,
        "no_finding_rows": 1,
        "left_out_rows": 0,
        "duplicate_rows": 1,
        "samples": 8,
        "dropped_boxes": 1,
        "skipped_samples": 1,
        "problem_samples": 3,
    }
    by = {(s.dicom_id, s.category): s for s in samples}
    assert [(s.dicom_id, s.category) for s in samples][:3] == [
        ("img_a", "Cardiomegaly"),
        ("img_a", "Pleural effusion"),
        ("img_b", "Lung Opacity"),
    ]
    pe = by["img_a", "Pleural effusion"]
    assert pe.phrase == "The patient has Pleural effusion"  # the authors' prompt, not lower-cased
    assert pe.boxes == ((5.0, 40.0, 20.0, 35.0), (70.0, 40.0, 20.0, 35.0))  # merged, (x, y, w, h)
    assert pe.path == "img_a.dicom" and (pe.width, pe.height) == (96, 80)  # from the DICOM header
    assert pe.sample_id == _sid("img_a", "The patient has Pleural effusion") and pe.problem == ""
    lo = by["img_b", "Lung Opacity"]
    assert lo.boxes == ((10.5, 20.25, 30.0, 30.5),) and (lo.width, lo.height) == (80, 96)
    assert ("img_a", "Aortic enlargement") not in by  # its only box lies outside the crop
    assert by["img_b", "Nodule/Mass"].problem == (
        "annotations_test.csv line 8: column 'x_max' (40) is not greater than column 'x_min' (50)"
    )
    assert by["img_b", "Atelectasis"].problem == "annotations_test.csv line 9: column 'y_min' is empty"
    missing = by["img_x", "Cardiomegaly"].problem
    assert missing.startswith("annotations_test.csv line 10: no image ") and "img_x.dicom" in missing
    assert "column 'image_id'" in missing
    # check_files=True: one error for the missing image, as for MS-CXR
    with pytest.raises(LdmGroundError, match=r"1 of 8 images are missing .*img_x\.dicom"):
        load_vindr(vindr, images)


def test_vindr_template_and_classes(vindr):
    images = vindr.parent.parent / "test"
    plain, _ = load_vindr(vindr, images, check_files=False)
    lower, _ = load_vindr(vindr, images, template="Findings suggest {class_lower}.", check_files=False)
    assert lower[1].phrase == "Findings suggest pleural effusion."
    assert lower[1].sample_id == _sid("img_a", lower[1].phrase) != plain[1].sample_id  # ids follow the phrase
    for bad, match in [("{finding}", "unknown field"), ("no class here", "names no class"), ("{class", "malformed")]:
        with pytest.raises(LdmGroundError, match=match):
            load_vindr(vindr, images, template=bad, check_files=False)
    authors, counts = load_vindr(vindr, images, classes="authors", check_files=False)
    assert counts["left_out_rows"] == 2  # Nodule/Mass, Aortic enlargement
    pneumonia = next(s for s in authors if s.category == "Pneumonia")  # ILD and Infiltration merged
    assert pneumonia.phrase == "The patient has Pneumonia"
    assert pneumonia.boxes == ((40.0, 10.0, 20.0, 20.0), (20.0, 10.0, 20.0, 20.0))
    assert {s.category for s in authors} == {"Cardiomegaly", "Pleural effusion", "Lung Opacity", "Atelectasis"} | {
        "Pneumonia"
    }
    only, _ = load_vindr(vindr, images, classes="Cardiomegaly, Lung Opacity", check_files=False)
    assert [s.category for s in only] == ["Cardiomegaly", "Lung Opacity", "Cardiomegaly"]
    with pytest.raises(LdmGroundError, match=r"no box .* has a class in \['Edema'\]"):
        load_vindr(vindr, images, classes=["Edema"], check_files=False)
    ids = [plain[0].sample_id, plain[2].sample_id]
    assert [s.sample_id for s in load_vindr(vindr, images, sample_ids=ids, check_files=False)[0]] == ids


def test_sizes_come_from_headers_without_decoding_pixels(tmp_path):
    # pixel data too short for 40 x 30: the header says the size, decoding would fail
    path = write_dicom(tmp_path / "broken.dicom", np.zeros((30, 40)), pixel_bytes=b"\0" * 10)
    assert image_size(path) == (40, 30)
    with pytest.raises(LdmGroundError, match="cannot read DICOM"):
        load_image(path)
    Image.new("L", (70, 50)).save(tmp_path / "x.png")
    assert image_size(tmp_path / "x.png") == (70, 50)
    (tmp_path / "junk.dicom").write_bytes(b"not a dicom")
    with pytest.raises(LdmGroundError, match="Rows/Columns"):
        image_size(tmp_path / "junk.dicom")


# --- ChestX-ray8 ----------------------------------------------------------------------------


def test_chestxray8_rows_to_samples(cxr8):
    images = cxr8.parent / "images"
    samples, counts = load_chestxray8(cxr8, images, check_files=False)
    assert counts == {
        "rows": 7,
        "left_out_rows": 0,
        "duplicate_rows": 0,
        "samples": 6,
        "dropped_boxes": 0,
        "skipped_samples": 0,
        "problem_samples": 3,
    }
    by = {(s.dicom_id, s.category): s for s in samples}
    at = by["00000001_000.png", "Atelectasis"]
    assert at.boxes == ((20.5, 30.25, 25.0, 20.0),) and at.phrase == "The patient has Atelectasis"
    assert at.sample_id == _sid("00000001_000.png", "The patient has Atelectasis")
    assert by["00000001_000.png", "Effusion"].boxes == ((5.0, 50.0, 20.0, 30.0), (70.0, 50.0, 20.0, 30.0))
    inf = by["00000002_000.png", "Infiltrate"]
    assert (inf.width, inf.height) == (100, 90) and inf.path == "00000002_000.png"  # from the PNG header
    assert by["00000002_000.png", "Mass"].problem == "BBox_List_2017.csv line 6: column 'w' (-5) is not positive"
    assert by["00000002_000.png", "Pneumonia"].problem == "BBox_List_2017.csv line 8: column 'w' is empty"
    nodule = by["00000003_000.png", "Nodule"]
    assert "line 7: no image" in nodule.problem and "column 'Image Index'" in nodule.problem
    assert (nodule.width, nodule.height) == (1024, 1024)  # the documented size, for the crop only
    with pytest.raises(LdmGroundError, match="classes='authors' is the authors' VinDr-CXR selection"):
        load_chestxray8(cxr8, images, classes="authors")
    with pytest.raises(LdmGroundError, match=r"1 of 6 images are missing .*00000003_000\.png"):
        load_chestxray8(cxr8, images)


# --- the common entry -----------------------------------------------------------------------


def test_format_detection_and_common_entry(vindr, cxr8, tmp_path):
    mscxr = write_dataset(tmp_path / "mscxr")
    assert detect_format(vindr) == "vindr"
    assert detect_format(cxr8) == "chestxray8"
    assert detect_format(mscxr) == "mscxr"
    assert load_dataset(mscxr) == load_mscxr(mscxr)  # MS-CXR goes through unchanged
    a, _ = load_dataset(vindr, vindr.parent.parent / "test", check_files=False)
    b, _ = load_vindr(vindr, vindr.parent.parent / "test", DEFAULT_TEMPLATE, check_files=False)
    assert [repr(s) for s in a] == [repr(s) for s in b]  # repr: NaN boxes compare unequal
    c, _ = load_dataset(cxr8, cxr8.parent / "images", "chestxray8", "Is there {class_lower}?", check_files=False)
    assert c[0].phrase == "Is there atelectasis?"
    # a header that fits no format exactly goes to the closest, which names what is missing
    pd.read_csv(vindr).drop(columns="y_max").to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(LdmGroundError, match=r"lacks column\(s\) \['y_max'\]; a VinDr-CXR CSV needs"):
        load_dataset(tmp_path / "short.csv")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(LdmGroundError, match="cannot tell the format .* expected one of: mscxr"):
        load_dataset(tmp_path / "other.csv")
    with pytest.raises(LdmGroundError, match="unknown data set format 'kaggle'"):
        load_dataset(vindr, format="kaggle")
    with pytest.raises(LdmGroundError, match="prompt template does not apply to MS-CXR"):
        load_dataset(mscxr, template="The patient has {class}")
    with pytest.raises(LdmGroundError, match="--split applies to MS-CXR only"):
        load_dataset(vindr, split="test")
    with pytest.raises(LdmGroundError, match=r"lacks column\(s\)"):
        load_dataset(mscxr, format="vindr")


# --- end to end -----------------------------------------------------------------------------


def _results(out):
    return pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""])


def test_cli_evaluate_vindr_tiny(vindr, tmp_path, capsys):
    out = tmp_path / "out"
    images = vindr.parent.parent / "test"
    argv = ["evaluate", "--model", "tiny", "--dataset", str(vindr), "--images", str(images), "--out", str(out)]
    code = main([*argv, "--steps", "10", "--quiet"])
    assert code == 1  # three malformed samples failed; the others ran
    assert "5 succeeded, 3 failed" in capsys.readouterr().out
    res = _results(out)
    assert list(zip(res["dicom_id"], res["category"], res["status"], strict=True)) == [
        ("img_a", "Cardiomegaly", "ok"),
        ("img_a", "Pleural effusion", "ok"),
        ("img_b", "Lung Opacity", "ok"),
        ("img_b", "Nodule/Mass", "failed"),
        ("img_b", "Atelectasis", "failed"),
        ("img_x", "Cardiomegaly", "failed"),
        ("img_a", "ILD", "ok"),
        ("img_a", "Infiltration", "ok"),
    ]
    assert res.loc[0, "sample_id"] == _sid("img_a", "The patient has Cardiomegaly")
    assert res.loc[0, "phrase"] == "The patient has Cardiomegaly"
    ok = res[res["status"] == "ok"]
    assert ok[["cnr", "miou", "auc_roc", "pointing"]].notna().all().all() and (ok["unet_evals"] > 0).all()
    failed = res.set_index("category")["message"]
    assert "annotations_test.csv line 8: column 'x_max'" in failed["Nodule/Mass"]
    assert "column 'y_min' is empty" in failed["Atelectasis"]
    assert "img_x.dicom" in res.loc[5, "message"] and "column 'image_id'" in res.loc[5, "message"]
    run = json.loads((out / "run.json").read_text())
    assert run["dataset_format"] == "vindr" and run["dataset_counts"]["no_finding_rows"] == 1


def test_cli_evaluate_chestxray8_tiny(cxr8, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["evaluate", "--model", "tiny", "--dataset", str(cxr8), "--images", str(cxr8.parent / "images")]
    code = main([*argv, "--out", str(out), "--steps", "10", "--quiet", "--dataset-format", "chestxray8"])
    assert code == 1
    assert "3 succeeded, 3 failed" in capsys.readouterr().out
    res = _results(out)
    assert list(zip(res["category"], res["status"], strict=True)) == [
        ("Atelectasis", "ok"),
        ("Effusion", "ok"),
        ("Infiltrate", "ok"),
        ("Mass", "failed"),
        ("Nodule", "failed"),
        ("Pneumonia", "failed"),
    ]
    assert res.loc[3, "message"] == "BBox_List_2017.csv line 6: column 'w' (-5) is not positive"
    assert res.loc[:2, ["cnr", "miou", "auc_roc"]].notna().all().all()


def test_cli_template_classes_and_mscxr_unchanged(vindr, tmp_path, capsys):
    out = tmp_path / "prior"
    images = vindr.parent.parent / "test"
    argv = ["evaluate", "--model", "centre-prior", "--dataset", str(vindr), "--images", str(images), "--quiet"]
    extra = ["--prompt-template", "There is {class_lower}", "--classes", "authors", "--out", str(out)]
    assert main([*argv, *extra]) == 1  # the Atelectasis row lacks y_min, img_x is missing
    res = _results(out)
    assert list(res["phrase"][:3]) == ["There is cardiomegaly", "There is pleural effusion", "There is lung opacity"]
    assert "Pneumonia" in set(res["category"]) and "Nodule/Mass" not in set(res["category"])
    run = json.loads((out / "run.json").read_text())
    assert run["dataset_prompt_template"] == "There is {class_lower}" and run["dataset_classes"] == "authors"
    capsys.readouterr()
    assert main([*argv, "--out", str(out / "x"), "--prompt-template", "{oops}"]) == 2
    assert "unknown field(s) ['oops']" in capsys.readouterr().err
    # MS-CXR through the same entry: detected, same samples, a template refused
    mscxr = write_dataset(tmp_path / "mscxr")
    ms_out = tmp_path / "ms"
    ms_argv = ["evaluate", "--model", "centre-prior", "--dataset", str(mscxr), "--out", str(ms_out), "--quiet"]
    assert main(ms_argv) == 0
    assert len(_results(ms_out)) == 4
    assert json.loads((ms_out / "run.json").read_text())["dataset_format"] == "mscxr"
    capsys.readouterr()
    code = main([*ms_argv, "--prompt-template", "The patient has {class}"])
    assert code == 2 and "does not apply to MS-CXR" in capsys.readouterr().err


# --- DICOM: VOI LUT and window --------------------------------------------------------------


def test_load_image_applies_the_window_then_inverts_monochrome1(tmp_path):
    arr = (np.arange(64, dtype=np.uint16) * 60).reshape(8, 8)  # 0 .. 3780
    center, width = 1000, 801
    path = write_dicom(tmp_path / "w.dicom", arr, "MONOCHROME1", window=(center, width))
    img = load_image(path)
    # DICOM PS3.3 C.11.2.1.2.1 (LINEAR): below c - 0.5 - (w - 1) / 2 -> 0, above c - 0.5 + (w - 1) / 2 -> 1
    x = arr.astype(np.float64)
    expected = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(img, 1.0 - expected, atol=1e-6)  # MONOCHROME1: inverted after the window
    assert img[0, 0] == 1.0 and img[-1, -1] == 0.0 and 0 < img[1, 3] < 1
    plain = load_image(write_dicom(tmp_path / "p.dicom", arr, "MONOCHROME1"))
    np.testing.assert_allclose(plain, 1.0 - x / x.max(), atol=1e-6)  # no window: min-max as before


def test_load_image_applies_a_voi_lut_sequence(tmp_path):
    arr = (np.arange(64, dtype=np.uint16) * 4).reshape(8, 8)  # 0 .. 252
    lut = [i * i for i in range(256)]
    # the LUT wins over a window in the same file (pydicom's prefer_lut)
    path = write_dicom(tmp_path / "l.dcm", arr, "MONOCHROME2", window=(100, 50), lut=(0, lut))
    img = load_image(path)
    x = arr.astype(np.float64)
    np.testing.assert_allclose(img, x**2 / x.max() ** 2, atol=1e-6)
