import pandas as pd
import pytest

from ldmground.datasets.mscxr import load_mscxr, read_sample_ids
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


def test_prompt_column_and_sample_id_list(tmp_path):
    csv = write_dataset(tmp_path)
    df = pd.read_csv(csv)
    df["prompt"] = "The patient has " + df["category_name"].str.lower()
    df.to_csv(csv, index=False)
    samples, _ = load_mscxr(csv)
    rewritten, _ = load_mscxr(csv, prompt_column="prompt")
    assert [s.sample_id for s in rewritten] == [s.sample_id for s in samples]  # ids keep label_text's
    assert next(s for s in rewritten if s.category == "Edema").phrase == "The patient has edema"
    # an id list in each accepted form
    keep = [samples[1].sample_id, samples[3].sample_id]
    (tmp_path / "ids.txt").write_text("\n".join(keep) + "\n")
    pairs = pd.DataFrame({"dicom_id": [samples[1].dicom_id], "label_text": [samples[1].phrase]})
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    assert [s.sample_id for s in load_mscxr(csv, sample_ids=read_sample_ids(tmp_path / "ids.txt"))[0]] == keep
    assert [s.sample_id for s in load_mscxr(csv, sample_ids=read_sample_ids(tmp_path / "pairs.csv"))[0]] == keep[:1]
    with pytest.raises(LdmGroundError, match=r"1 of 2 listed sample ids match no sample .*d9-"):
        load_mscxr(csv, sample_ids=[keep[0], "d9-00000000"])
    with pytest.raises(LdmGroundError, match="no column 'rewritten'"):
        load_mscxr(csv, prompt_column="rewritten")
    df.loc[2, "prompt"] = "something else"  # the second box of the edema pair
    df.to_csv(csv, index=False)
    with pytest.raises(LdmGroundError, match="'prompt' differs between the boxes"):
        load_mscxr(csv, prompt_column="prompt")
