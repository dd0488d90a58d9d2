import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ldmground.cli import main
from ldmground.runs.evaluation import evaluate, in_shard, make_grounder, summarize
from ldmground.runs.grounders import CentrePriorGrounder

from .helpers import QUICK, write_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def dataset(tmp_path):
    return write_dataset(tmp_path / "data")


def test_centre_prior_numbers(dataset, tmp_path):
    rep = evaluate("centre-prior", dataset, None, tmp_path / "out", QUICK, progress=False)
    assert rep.succeeded == 4 and rep.failed == 0
    res = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(res["status"]) == ["ok"] * 4
    # image 1's box is centred (cx = 0.5 W): the prior's peak is inside it
    assert res.loc[res["phrase"] == "opacity number 1", "pointing"].item() == 1.0
    assert res.loc[res["phrase"] == "opacity number 0", "pointing"].item() == 0.0
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert set(summary["category"]) == {"Pneumonia", "Edema", "macro", "all"}
    macro = summary.set_index("category").loc["macro", "pointing_mean"]
    assert macro == pytest.approx((res.query("category == 'Pneumonia'")["pointing"].mean() + 0.0) / 2)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["model"] == "centre-prior" and run["config_hash"] == QUICK.digest()


def test_tiny_model_evaluate_and_resume(dataset, tmp_path):
    grounder = make_grounder("tiny", QUICK)
    out = tmp_path / "out"
    first = evaluate(grounder, dataset, None, out, QUICK, limit=2, progress=False)
    assert first.succeeded == 2
    again = evaluate(grounder, dataset, None, out, QUICK, progress=False)
    assert again.skipped == 2 and again.succeeded == 2
    res = again.results
    assert len(res) == 4 and res["sample_id"].is_unique
    assert (res["unet_evals"] > 0).all()
    assert res[["cnr", "miou", "auc_roc", "pointing"]].notna().all().all()
    # the run recorded the weights it used
    assert (out / "run.json").is_file()


class FileBackedPrior(CentrePriorGrounder):
    """The centre prior under a fixed spec, with a weights file, like a model folder."""

    def __init__(self, weights):
        super().__init__()
        self.weight_files = [weights]


def test_resume_recomputes_when_the_weights_change(dataset, tmp_path):
    weights = tmp_path / "unet" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"weights, version 1")
    out = tmp_path / "out"
    old_digest = FileBackedPrior(weights).weights_digest
    first = evaluate(FileBackedPrior(weights), dataset, None, out, QUICK, progress=False)
    assert first.succeeded == 4 and first.skipped == 0
    same = evaluate(FileBackedPrior(weights), dataset, None, out, QUICK, progress=False)
    assert same.skipped == 4 and same.succeeded == 0
    weights.write_bytes(b"weights, version 2")  # same spec, new weights: nothing is reused
    changed = evaluate(FileBackedPrior(weights), dataset, None, out, QUICK, progress=False)
    assert changed.skipped == 0 and changed.succeeded == 4
    assert len(changed.results) == 4 and len(pd.read_csv(out / "results.csv")) == 4
    run = json.loads((out / "run.json").read_text())
    assert run["weights_digest"] == FileBackedPrior(weights).weights_digest
    assert len(old_digest) == 12 and run["weights_digest"] != old_digest


def test_shards_partition_images():
    paths = [f"images/{i}.png" for i in range(50)]
    parts = [[p for p in paths if in_shard(p, (i, 3))] for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(paths)
    assert all(parts)


def test_summary_macro_is_mean_of_categories():
    res = pd.DataFrame(
        {
            "category": ["A", "A", "B"],
            "status": ["ok", "ok", "ok"],
            **{m: [1.0, 3.0, 10.0] for m in ["cnr", "cnr_signed", "cnr_union", "miou", "auc_roc", "auc_roc_binned"]},
            "pointing": [1.0, 0.0, 1.0],
        }
    )
    s = summarize(res).set_index("category")
    assert s.loc["A", "cnr_mean"] == 2.0 and s.loc["A", "cnr_std"] == 1.0
    assert s.loc["macro", "cnr_mean"] == 6.0 and s.loc["all", "cnr_mean"] == pytest.approx(14 / 3)


def test_cli_ground_writes_pngs(tmp_path, capsys):
    from PIL import Image

    from .helpers import blob_image

    img = tmp_path / "x.png"
    Image.fromarray((blob_image(80, 64, 30, 30) * 255).astype(np.uint8)).save(img)
    out = tmp_path / "res" / "heat.png"
    code = main(
        [
            "ground",
            "--model",
            "tiny",
            "--image",
            str(img),
            "--phrase",
            "left pneumothorax",
            "--out",
            str(out),
            "--steps",
            "10",
            "--layers",
            "all",
        ]
    )
    assert code == 0
    heat = np.asarray(Image.open(out))
    over = Image.open(tmp_path / "res" / "heat_overlay.png")
    assert heat.shape == (64, 80) and heat.max() == 255
    assert over.mode == "RGB" and over.size == (80, 64)
    assert "UNet evaluations" in capsys.readouterr().out


def test_cli_evaluate_and_config_errors(dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["evaluate", "--model", "centre-prior", "--dataset", str(dataset), "--out", str(out), "--quiet"])
    assert code == 0
    assert "4 succeeded, 0 failed, 0 skipped" in capsys.readouterr().out
    assert main(["evaluate", "--model", "no/such-model-here", "--dataset", str(dataset), "--out", str(out)]) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert main(["evaluate", "--model", "tiny", "--dataset", str(tmp_path / "nope.csv"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


def test_every_model_knows_its_preset(tmp_path, capsys):
    """The demo model grounds with its own preset when none is given; a preset whose layers
    its UNet lacks fails before any compute, naming the layer count and the default."""

    from ldmground.config import get_preset
    from ldmground.errors import LdmGroundError
    from ldmground.method.grounding import ground
    from ldmground.method.heatmap import load_image
    from ldmground.models.folder import default_preset_of, load_pipeline

    assert default_preset_of("demo") == "demo" and default_preset_of("tiny") == "paper"
    assert default_preset_of("random:demo") == "demo"
    pipe = load_pipeline("demo")
    image = load_image(ROOT / "data" / "phantom" / "images" / "phantom-test-00005.png")
    [own] = ground(pipe, image, "Right pleural effusion")
    [named] = ground(pipe, image, "Right pleural effusion", "demo")
    np.testing.assert_array_equal(own.heatmap, named.heatmap)
    with pytest.raises(LdmGroundError, match=r"preset 'paper' reads cross-attention layers \[6, 7\].* has 6 .*'demo'"):
        ground(pipe, image, "Right pleural effusion", "paper")
    csv = ROOT / "data" / "phantom" / "test.csv"
    out = tmp_path / "own"
    args = ["evaluate", "--model", "demo", "--dataset", str(csv), "--limit", "2", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["config"] == get_preset("demo").to_dict()
    bad = tmp_path / "bad"
    code = main(["evaluate", "--model", "demo", "--preset", "paper", "--dataset", str(csv), "--out", str(bad)])
    assert code == 2 and "has 6" in capsys.readouterr().err and not bad.exists()
