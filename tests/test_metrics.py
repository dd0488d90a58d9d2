import numpy as np
import pytest

from ldmground.metrics import auc_roc, box_mask, cnr, miou, pointing_game


def test_box_mask_pixels():
    m = box_mask((4, 5), (1, 1, 2, 3))
    assert m.sum() == 6
    assert m[1:4, 1:3].all()


def test_cnr_hand_computed():
    hm = np.zeros((4, 4))
    hm[0, 0], hm[0, 1] = 1.0, 3.0  # box = first two pixels of row 0
    # inside: [1, 3] mean 2 var 1; outside: 14 zeros mean 0 var 0 -> |2 - 0| / sqrt(1) = 2
    assert cnr(hm, [(0, 0, 2, 1)]) == pytest.approx(2.0)
    # signed: heatmap higher inside -> positive; lower inside -> negative
    assert cnr(-hm, [(0, 0, 2, 1)], signed=True) == pytest.approx(-2.0)


def test_cnr_paper_blanks_previous_box():
    hm = np.zeros((2, 4))
    hm[:, 0] = 2.0
    hm[0, 1] = 1.0
    hm[1, 1] = 3.0
    b1, b2 = (0, 0, 1, 2), (1, 0, 1, 2)
    # box 1: in [2, 2] (mean 2, var 0); out [1, 3, 0, 0, 0, 0] mean 2/3, var = mean(x^2) - m^2 = 10/6 - 4/9
    out = np.array([1, 3, 0, 0, 0, 0.0])
    c1 = (2 - out.mean()) / np.sqrt(out.var())
    # box 2 after box 1 is blanked: in [1, 3] mean 2 var 1; out [0, 0, 0, 0] -> 2 / 1
    c2 = 2.0
    assert cnr(hm, [b1, b2]) == pytest.approx((c1 + c2) / 2)
    # union variant: in [2, 2, 1, 3] mean 2 var 0.5; out zeros -> 2 / sqrt(0.5)
    assert cnr(hm, [b1, b2], variant="union") == pytest.approx(2 / np.sqrt(0.5))


def test_cnr_nan_aware_and_zero_for_undefined():
    hm = np.full((3, 3), np.nan)
    hm[0, 0], hm[1, 1] = 1.0, 0.0
    assert cnr(hm, [(0, 0, 1, 1)]) == 0.0  # both variances 0 -> NaN -> 0
    hm[2, 2] = 1.0  # out = [0, 1]: mean .5 var .25 -> |1 - .5| / .5 = 1
    assert cnr(hm, [(0, 0, 1, 1)]) == pytest.approx(1.0)


def test_miou_thresholds():
    hm = np.zeros((10, 10))
    hm[0:5, 0:5] = 0.35  # above 0.1, 0.2, 0.3, below 0.4, 0.5
    box = (0, 0, 5, 10)  # 50 pixels; prediction 25 pixels inside it
    assert miou(hm, [box]) == pytest.approx((0.5 * 3 + 0 + 0) / 5)


def test_miou_ignores_nan():
    hm = np.ones((4, 4))
    hm[:, 2:] = np.nan
    assert miou(hm, [(0, 0, 2, 4)]) == pytest.approx(1.0)


def test_auc_exact_and_binned():
    hm = np.array([[0.9, 0.8, 0.1, 0.2]])
    box = (0, 0, 2, 1)
    assert auc_roc(hm, [box]) == pytest.approx(1.0)
    assert auc_roc(1 - hm, [box]) == pytest.approx(0.0)
    hm2 = np.array([[0.9, 0.3, 0.6, 0.1]])  # positives 0.9, 0.3; negatives 0.6, 0.1 -> 3 of 4 pairs
    assert auc_roc(hm2, [box]) == pytest.approx(0.75)
    # binned on {0,.25,.5,.75,1}: ROC points (1,1),(1,1),(.5,.5),(.5,0)... -> coarse but in [0, 1]
    b = auc_roc(hm2, [box], binned=True)
    assert 0.5 <= b <= 1.0
    assert np.isnan(auc_roc(hm, [(0, 0, 4, 1)]))  # one class only


def test_binned_auc_matches_exact_on_coarse_scores():
    rng = np.random.default_rng(0)
    hm = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=(20, 20))
    hm[5:12, 5:12] = np.minimum(hm[5:12, 5:12] + 0.5, 1.0)
    assert auc_roc(hm, [(5, 5, 7, 7)], binned=True) == pytest.approx(auc_roc(hm, [(5, 5, 7, 7)]), abs=1e-9)


def test_pointing_game():
    hm = np.zeros((5, 5))
    hm[4, 1] = 1.0
    assert pointing_game(hm, [(0, 3, 2, 2)]) == 1.0
    assert pointing_game(hm, [(3, 0, 2, 2)]) == 0.0
    assert pointing_game(np.full((3, 3), np.nan), [(0, 0, 1, 1)]) == 0.0


def test_oracle_at_a_layer_resolution_keeps_the_box_mass_and_blurs_its_edges():
    from ldmground.geometry import Geometry
    from ldmground.runs.baselines import oracle_at, oracle_boxes

    geo = Geometry(128, 128, 64)  # boxes in 128-px original pixels, model frame 64 px
    boxes = [(20.0, 36.0, 40.0, 24.0)]  # x 10-30, y 18-30 in the model frame
    exact = oracle_boxes(geo, boxes)
    assert exact.sum() == 20 * 12
    np.testing.assert_array_equal(oracle_at(geo, boxes, 64), exact)  # full resolution: the oracle itself
    coarse = oracle_at(geo, boxes, 8)
    assert coarse.shape == (64, 64) and 0 < coarse.max() < 1  # no 8-px cell lies wholly in the box
    assert coarse.sum() == pytest.approx(exact.sum(), rel=0.05)  # averaging and upsampling keep the mass
    y, x = np.unravel_index(coarse.argmax(), coarse.shape)
    assert 10 <= x < 30 and 18 <= y < 30  # its peak still lies in the box


def test_cnr_mixed_signs_paper_vs_abs_of_mean():
    """The authors average the per-box |CNR|; the old definition took |mean of signed CNRs|."""
    hm = np.zeros((2, 4))
    hm[:, 0] = 2.0  # box 1 brighter than the rest
    hm[:, 1] = -2.0  # box 2 darker than the rest (box 1 already blanked)
    b1, b2 = (0, 0, 1, 2), (1, 0, 1, 2)
    out1 = np.array([-2, -2, 0, 0, 0, 0.0])
    c1 = (2 - out1.mean()) / np.sqrt(out1.var())
    # box 2: inside constant -2, outside all zeros: both variances 0 -> NaN -> counts as 0
    assert cnr(hm, [b1, b2]) == pytest.approx(abs(c1) / 2)
    hm[0, 3] = 1.0  # give the outside of box 2 some variance: its CNR is negative
    out2 = np.array([0, 0, 1, 0.0])
    c2 = (-2 - out2.mean()) / np.sqrt(out2.var())
    out1 = np.array([-2, -2, 0, 0, 1, 0.0])
    c1 = (2 - out1.mean()) / np.sqrt(out1.var())
    assert c1 > 0 > c2
    assert cnr(hm, [b1, b2]) == pytest.approx((abs(c1) + abs(c2)) / 2)
    assert cnr(hm, [b1, b2], signed=True) == pytest.approx((c1 + c2) / 2)
    assert cnr(hm, [b1, b2], variant="abs-of-mean") == pytest.approx(abs(c1 + c2) / 2)
    with pytest.raises(ValueError, match="abs-of-mean"):
        cnr(hm, [b1], variant="mean")


def test_miou_keeps_box_pixels_in_the_padding():
    """The authors' ground truth is the box on the whole image, NaN padding included."""
    hm = np.ones((4, 4))
    hm[:, 2:] = np.nan
    box = (0, 0, 4, 4)  # half of it in the padding, never predicted
    assert miou(hm, [box]) == pytest.approx(0.5)
    assert miou(hm, [box], field_of_view_only=True) == pytest.approx(1.0)


def test_binned_auc_one_class_is_one_half_like_torcheval():
    hm = np.full((3, 3), 0.5)
    hm[:, 2] = np.nan
    assert auc_roc(hm, [(2, 0, 1, 3)], binned=True) == 0.5  # the box lies in the padding
    assert np.isnan(auc_roc(hm, [(2, 0, 1, 3)]))
