import pandas as pd
import pytest

from ldmground.datasets.mscxr import load_mscxr
from ldmground.errors import LdmGroundError

from .helpers import write_dataset


def test_merge_rows_into_samples(tmp_path):
    csv = write_dataset(tmp_path)
    samples, counts = load_mscxr(csv)
    assert counts["rows"] == 5 and counts["samples"] == 4
    haze = next(s for s in samples if s.phrase == "bilateral haze")
    assert haze.boxes == ((10.0, 20.0, 20.0, 30.0), (60.0, 20.0, 20.0, 30.0))
    assert haze.category == "Edema" and haze.width == 96 and haze.height == 80
    assert len({s.sample_id for s in samples}) == 4


def test_v100_without_split_and_duplicates(tmp_path):
    csv = write_dataset(tmp_path)
    df = pd.read_csv(csv).drop(columns="split")
    df = pd.concat([df, df.iloc[[0]]])
    df.to_csv(csv, index=False)
    samples, counts = load_mscxr(csv)
    assert counts["duplicate_rows"] == 1 and counts["samples"] == 4
    with pytest.raises(LdmGroundError, match="no 'split' column"):
        load_mscxr(csv, split="test")


def test_boxes_outside_crop_dropped_and_samples_skipped(tmp_path):
    csv = write_dataset(tmp_path, size=(160, 80))  # crop x in [40, 120)
    df = pd.read_csv(csv)
    df.loc[0, ["x", "w"]] = [0, 30]  # wholly left of the crop: the only box of sample 0
    df.to_csv(csv, index=False)
    samples, counts = load_mscxr(csv)
    # also the first edema box (x 10..30) lies left of the crop; its second box stays
    assert counts["dropped_boxes"] == 2 and counts["skipped_samples"] == 1
    assert len(samples) == 3
    assert next(s for s in samples if s.category == "Edema").boxes == ((60.0, 20.0, 20.0, 30.0),)


def test_missing_files_one_clear_error(tmp_path):
    csv = write_dataset(tmp_path)
    for p in (tmp_path / "images").glob("img[12].png"):
        p.unlink()
    with pytest.raises(LdmGroundError, match=r"2 of 4 images are missing .*img1.png"):
        load_mscxr(csv)


def test_missing_columns(tmp_path):
    csv = write_dataset(tmp_path)
    pd.read_csv(csv).drop(columns=["w", "h"]).to_csv(csv, index=False)
    with pytest.raises(LdmGroundError, match=r"lacks column\(s\) \['w', 'h'\]"):
        load_mscxr(csv)
