"""Exact-value tests for calbench.metrics.

Two kinds of checks:
* hand-computed pins on a 5-sample toy set (the arithmetic is in the comments);
* agreement with reference implementations (netcal for ECE/MCE, scikit-learn for
  NLL, Brier and macro-F1) on random inputs.

Note on netcal's bin convention: netcal bins with numpy.histogramdd / scipy's
binned_statistic_dd, i.e. left-closed bins [i/n, (i+1)/n) (last bin closed), and it
clips confidences to [eps, 1 - eps]. calbench uses right-closed bins (i/n, (i+1)/n].
The two agree whenever no confidence lies exactly on an interior edge, which holds
with probability 1 for the random inputs below; the edge case is pinned separately
(see test_netcal_uses_left_closed_bins_we_use_right_closed).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from netcal.metrics import ECE, MCE
from sklearn.metrics import brier_score_loss, f1_score, log_loss

from calbench import metrics as M

TOL = 1e-12

# --------------------------------------------------------------------------- toy set
# 5 samples, 3 classes. The first sample's confidence is exactly 0.5, on a bin edge.
#
#  i  probs                 label  pred  conf  hit  top-label bin (i/10,(i+1)/10]
#  0  [0.50, 0.30, 0.20]    0      0     0.50  1    4  (0.4, 0.5]   <- on the edge
#  1  [0.45, 0.35, 0.20]    1      0     0.45  0    4  (0.4, 0.5]
#  2  [0.10, 0.85, 0.05]    1      1     0.85  1    8  (0.8, 0.9]
#  3  [0.15, 0.10, 0.75]    0      2     0.75  0    7  (0.7, 0.8]
#  4  [0.02, 0.03, 0.95]    2      2     0.95  1    9  (0.9, 1.0]
TOY_PROBS = np.array(
    [
        [0.50, 0.30, 0.20],
        [0.45, 0.35, 0.20],
        [0.10, 0.85, 0.05],
        [0.15, 0.10, 0.75],
        [0.02, 0.03, 0.95],
    ]
)
TOY_LABELS = np.array([0, 1, 1, 0, 2])

# accuracy: hits [1,0,1,0,1] -> 3/5
TOY_ACCURACY = 0.6

# ECE (10 bins):
#   bin 4: {0.50 hit, 0.45 miss}: acc 1/2, conf 0.475 -> gap 0.025, weight 2
#   bin 7: {0.75 miss}          : gap 0.75,  weight 1
#   bin 8: {0.85 hit}           : gap 0.15,  weight 1
#   bin 9: {0.95 hit}           : gap 0.05,  weight 1
#   ECE = (2*0.025 + 0.75 + 0.15 + 0.05) / 5 = 1.0 / 5 = 0.2
# (with left-closed bins 0.5 would sit alone in [0.5, 0.6): gaps 0.5 and 0.45 -> ECE 1.9/5 = 0.38)
TOY_ECE = 0.2
# MCE = max(0.025, 0.75, 0.15, 0.05) = 0.75
TOY_MCE = 0.75

# adaptive ECE: sorted conf 0.45(m) 0.50(h) 0.75(m) 0.85(h) 0.95(h)
#   n_bins=2 -> array_split sizes [3, 2]:
#     {0.45,0.50,0.75}: acc 1/3, conf 1.7/3 -> gap 0.7/3, weight 3 -> 0.7
#     {0.85,0.95}     : acc 1,   conf 0.9   -> gap 0.1,   weight 2 -> 0.2
#     -> (0.7 + 0.2) / 5 = 0.18
#   n_bins=3 -> sizes [2, 2, 1]:
#     {0.45,0.50}: acc .5 conf .475 -> .025*2 = .05
#     {0.75,0.85}: acc .5 conf .8   -> .3*2   = .6
#     {0.95}     : .05
#     -> 0.7 / 5 = 0.14
#   n_bins=10 (> N) -> min(10, 5) = 5 singleton chunks: sum |hit - conf|
#     = .45 (0.45 miss) + .5 (0.50 hit) + .75 + .15 + .05 = 1.9 -> 1.9 / 5 = 0.38
TOY_ADAPTIVE = {2: 0.18, 3: 0.14, 10: 0.38}

# class-wise ECE (10 bins), per class c: bins of p[:, c] against 1[y == c]
#   class 0: p = [.5, .45, .1, .15, .02], y==0 = [1,0,0,1,0]
#     (0.4,0.5]: {.5:1, .45:0} acc .5 conf .475 -> .025*2 = .05
#     (0.0,0.1]: {.1:0, .02:0} (0.1 on the edge) conf .06 -> .06*2 = .12
#     (0.1,0.2]: {.15:1}       -> .85
#     sum 1.02 / 5 = .204
#   class 1: p = [.3, .35, .85, .1, .03], y==1 = [0,1,1,0,0]
#     (0.2,0.3]: {.3:0} (edge)  -> .3
#     (0.3,0.4]: {.35:1}        -> .65
#     (0.8,0.9]: {.85:1}        -> .15
#     (0.0,0.1]: {.1:0, .03:0}  conf .065 -> .13
#     sum 1.23 / 5 = .246
#   class 2: p = [.2, .2, .05, .75, .95], y==2 = [0,0,0,0,1]
#     (0.1,0.2]: {.2:0, .2:0} (edge) -> .2*2 = .4
#     (0.0,0.1]: {.05:0} -> .05
#     (0.7,0.8]: {.75:0} -> .75
#     (0.9,1.0]: {.95:1} -> .05
#     sum 1.25 / 5 = .25
#   classwise ECE = (.204 + .246 + .25) / 3 = .7 / 3
TOY_CLASSWISE = 0.7 / 3

# NLL: -mean log p_y with p_y = [.5, .35, .85, .15, .95]
TOY_NLL = -(math.log(0.5) + math.log(0.35) + math.log(0.85) + math.log(0.15) + math.log(0.95)) / 5

# Brier: per row sum_c (p_c - y_c)^2
#   r0: .25 + .09 + .04        = .38
#   r1: .2025 + .4225 + .04    = .665
#   r2: .01 + .0225 + .0025    = .035
#   r3: .7225 + .01 + .5625    = 1.295
#   r4: .0004 + .0009 + .0025  = .0038
#   mean = 2.3788 / 5 = .47576
TOY_BRIER = 0.47576

# macro-F1: pred [0,0,1,2,2], labels [0,1,1,0,2]
#   class 0: tp 1, #pred 2, #true 2 -> 2/4 = 1/2
#   class 1: tp 1, #pred 1, #true 2 -> 2/3
#   class 2: tp 1, #pred 2, #true 1 -> 2/3
#   mean = (1/2 + 4/3) / 3 = 11/18
TOY_MACRO_F1 = 11 / 18

EXPECTED_KEYS = ["accuracy", "ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier", "macro_f1"]


def test_toy_accuracy():
    assert M.accuracy(TOY_PROBS, TOY_LABELS) == pytest.approx(TOY_ACCURACY, abs=TOL)


def test_toy_ece_pins_right_closed_bin_edge():
    assert M.ece(TOY_PROBS, TOY_LABELS) == pytest.approx(TOY_ECE, abs=TOL)
    assert M.ece(TOY_PROBS, TOY_LABELS, n_bins=10) == pytest.approx(TOY_ECE, abs=TOL)
    # the left-closed convention would give 0.38; make sure we are not there
    assert abs(M.ece(TOY_PROBS, TOY_LABELS) - 0.38) > 0.1


def test_toy_ece_other_bin_counts():
    # n_bins=2, bins (0, .5], (.5, 1]:
    #   (0,.5]: {.5 hit, .45 miss}: gap .025 * 2 = .05
    #   (.5,1]: {.85 h, .75 m, .95 h}: acc 2/3, conf 2.55/3 = .85 -> gap |2/3 - .85| * 3 = .55
    #   ECE = (.05 + .55)/5 = .12; MCE = |2/3 - .85| = .85 - 2/3
    assert M.ece(TOY_PROBS, TOY_LABELS, n_bins=2) == pytest.approx(0.12, abs=TOL)
    assert M.mce(TOY_PROBS, TOY_LABELS, n_bins=2) == pytest.approx(0.85 - 2 / 3, abs=TOL)
    # n_bins=1: acc .6, conf 3.5/5 = .7 -> ECE = MCE = .1
    assert M.ece(TOY_PROBS, TOY_LABELS, n_bins=1) == pytest.approx(0.1, abs=TOL)
    assert M.mce(TOY_PROBS, TOY_LABELS, n_bins=1) == pytest.approx(0.1, abs=TOL)


def test_toy_mce():
    assert M.mce(TOY_PROBS, TOY_LABELS) == pytest.approx(TOY_MCE, abs=TOL)


def test_mce_ignores_empty_bins_and_uses_unweighted_max():
    # one sample per used bin except bin 4 (two samples). Gaps: bin 4 .025 (weight 2), bin 7 .75.
    # MCE is the plain max, not weighted by counts -> .75 (a weighted max would be .75/5 = .15)
    assert M.mce(TOY_PROBS, TOY_LABELS) == pytest.approx(0.75, abs=TOL)
    # a single perfectly-calibrated bin: empty bins (gap 0 by construction) don't matter either
    probs = np.array([[0.75, 0.25]] * 4)
    assert M.mce(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0, abs=TOL)


@pytest.mark.parametrize("n_bins", [2, 3, 10])
def test_toy_adaptive_ece(n_bins):
    assert M.adaptive_ece(TOY_PROBS, TOY_LABELS, n_bins=n_bins) == pytest.approx(TOY_ADAPTIVE[n_bins], abs=TOL)


def test_adaptive_ece_uses_array_split_sizes():
    # 7 samples, 3 bins -> np.array_split sizes [3, 2, 2] (the larger chunk first, lowest confidences)
    conf = np.array([0.40, 0.45, 0.55, 0.60, 0.70, 0.80, 0.90])
    hits = np.array([1, 1, 0, 0, 1, 0, 1])
    # top-label probs for 2 classes; label = pred when hit else the other class
    probs = np.stack([conf, 1 - conf], axis=1)
    # conf < .5 rows: pred is class 1 with prob 1 - conf; make every row's top class 0 instead
    probs = np.where(conf[:, None] >= 0.5, probs, probs[:, ::-1])
    top = probs.max(axis=1)
    pred = probs.argmax(axis=1)
    labels = np.where(hits == 1, pred, 1 - pred)
    # sorted top conf: .55 .55 .6 .6 .7 .8 .9 (0.40->.6, 0.45->.55)
    order = np.argsort(top, kind="stable")
    assert np.allclose(top[order], [0.55, 0.55, 0.6, 0.6, 0.7, 0.8, 0.9])
    h = hits[order]  # [1(0.45), 0(0.55), 1(0.40), 0(0.60), 1, 0, 1]
    assert list(h) == [1, 0, 1, 0, 1, 0, 1]
    # chunk sizes [3, 2, 2]:
    #   {.55,.55,.6}: acc 2/3, conf 1.7/3 -> |2 - 1.7| = .3 (weighted: 3 * gap = .3)
    #   {.6,.7}     : acc 1/2, conf .65   -> 2 * .15 = .3
    #   {.8,.9}     : acc 1/2, conf .85   -> 2 * .35 = .7
    #   -> 1.3 / 7
    assert M.adaptive_ece(probs, labels, n_bins=3) == pytest.approx(1.3 / 7, abs=TOL)


def test_toy_classwise_ece():
    assert M.classwise_ece(TOY_PROBS, TOY_LABELS) == pytest.approx(TOY_CLASSWISE, abs=TOL)


def test_toy_nll_brier_macro_f1():
    assert M.nll(TOY_PROBS, TOY_LABELS) == pytest.approx(TOY_NLL, abs=TOL)
    assert TOY_NLL == pytest.approx(0.7708, abs=1e-4)  # paper: (.6931+1.0498+.1625+1.8971+.0513)/5 = 3.8538/5
    assert M.brier(TOY_PROBS, TOY_LABELS) == pytest.approx(TOY_BRIER, abs=TOL)
    assert M.macro_f1(TOY_PROBS, TOY_LABELS) == pytest.approx(TOY_MACRO_F1, abs=TOL)


def test_nll_clips_zero_probability():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    # -(log(1e-12) + log .5) / 2
    expected = -(math.log(1e-12) + math.log(0.5)) / 2
    assert M.nll(probs, np.array([1, 0])) == pytest.approx(expected, abs=1e-9)


def test_reliability_bins_on_toy():
    rb = M.reliability_bins(TOY_PROBS, TOY_LABELS)
    assert rb["count"].tolist() == [0, 0, 0, 0, 2, 0, 0, 1, 1, 1]
    assert rb["accuracy"][4] == pytest.approx(0.5, abs=TOL)
    assert rb["confidence"][4] == pytest.approx(0.475, abs=TOL)
    assert rb["edges"] == pytest.approx(np.linspace(0, 1, 11), abs=TOL)


def test_bin_edges_exact_values():
    # k/10 belongs to bin k-1, i.e. (k-1)/10 < v <= k/10; 0 goes to bin 0
    for n in (5, 10, 15):
        for k in range(1, n + 1):
            assert M.bin_ids(np.array([k / n]), n)[0] == k - 1
    assert M.bin_ids(np.array([0.0, 1e-9, 0.5 + 1e-12, 1.0]), 10).tolist() == [0, 0, 5, 9]


# --------------------------------------------------------------------------- evaluate


def test_evaluate_keys_and_values_on_toy():
    out = M.evaluate(TOY_PROBS, TOY_LABELS)
    assert list(out) == EXPECTED_KEYS
    expected = {
        "accuracy": TOY_ACCURACY,
        "ece": TOY_ECE,
        "mce": TOY_MCE,
        "adaptive_ece": TOY_ADAPTIVE[10],
        "classwise_ece": TOY_CLASSWISE,
        "nll": TOY_NLL,
        "brier": TOY_BRIER,
        "macro_f1": TOY_MACRO_F1,
    }
    for k, v in expected.items():
        assert isinstance(out[k], float)
        assert out[k] == pytest.approx(v, abs=TOL), k


def test_evaluate_passes_n_bins():
    out = M.evaluate(TOY_PROBS, TOY_LABELS, n_bins=2)
    assert out["ece"] == pytest.approx(0.12, abs=TOL)
    assert out["adaptive_ece"] == pytest.approx(0.18, abs=TOL)


def test_evaluate_numpy_and_torch_identical():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(200, 6)) * 2.5
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = rng.integers(0, 6, size=200)
    a = M.evaluate(probs, labels)
    b = M.evaluate(torch.tensor(probs, dtype=torch.float64), torch.tensor(labels))
    c = M.evaluate(torch.tensor(probs, dtype=torch.float64, requires_grad=True), torch.tensor(labels))
    assert list(a) == list(b) == list(c) == EXPECTED_KEYS
    assert a == b == c
    # list inputs too
    assert M.evaluate(TOY_PROBS.tolist(), TOY_LABELS.tolist())["ece"] == pytest.approx(TOY_ECE, abs=TOL)


def test_evaluate_perfectly_calibrated_toy():
    # 4 samples at confidence .75 (one bin), 3 of 4 correct -> acc .75 = conf -> ECE = MCE = 0
    probs = np.array([[0.75, 0.25], [0.75, 0.25], [0.25, 0.75], [0.25, 0.75]])
    labels = np.array([0, 0, 1, 0])
    out = M.evaluate(probs, labels)
    assert out["accuracy"] == pytest.approx(0.75, abs=TOL)
    assert out["ece"] == pytest.approx(0.0, abs=TOL)
    assert out["mce"] == pytest.approx(0.0, abs=TOL)
    # class-wise: class 0 p = [.75,.75,.25,.25] vs y0 = [1,1,0,1]:
    #   (.7,.8]: acc 1, conf .75 -> .25*2 = .5 ; (.2,.3]: acc .5, conf .25 -> .25*2 = .5 -> 1/4
    #   class 1 is the mirror image -> 1/4; mean 1/4
    assert out["classwise_ece"] == pytest.approx(0.25, abs=TOL)
    assert M.adaptive_ece(probs, labels, n_bins=1) == pytest.approx(0.0, abs=TOL)
    # brier: correct rows .0625*2 = .125, wrong row .5625*2 = 1.125 -> (3*.125 + 1.125)/4 = .375
    assert out["brier"] == pytest.approx(0.375, abs=TOL)


def test_one_hot_confident_and_correct_is_zero_everywhere():
    probs = np.eye(3)[[0, 1, 2, 1]]
    out = M.evaluate(probs, np.array([0, 1, 2, 1]))
    assert out == {
        "accuracy": 1.0,
        "ece": 0.0,
        "mce": 0.0,
        "adaptive_ece": 0.0,
        "classwise_ece": 0.0,
        "nll": pytest.approx(0.0, abs=1e-15),
        "brier": 0.0,
        "macro_f1": 1.0,
    }


# --------------------------------------------------------------------------- bad shapes


@pytest.mark.parametrize("fn", list(M.METRICS.values()) + [M.evaluate, M.reliability_bins])
def test_bad_probs_shape_raises(fn):
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        fn(np.array([0.2, 0.8]), np.array([1]))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        fn(np.zeros((2, 3, 4)), np.array([0, 1]))


@pytest.mark.parametrize("fn", list(M.METRICS.values()) + [M.evaluate, M.reliability_bins])
def test_bad_labels_shape_raises(fn):
    probs = TOY_PROBS
    with pytest.raises(ValueError, match=r"\(N,\) with N = 5.*\(4,\)"):
        fn(probs, TOY_LABELS[:4])
    with pytest.raises(ValueError, match=r"\(N,\) with N = 5.*\(5, 1\)"):
        fn(probs, TOY_LABELS[:, None])
    with pytest.raises(ValueError, match=r"\(N,\)"):
        fn(torch.tensor(probs), torch.tensor(TOY_LABELS[:3]))


# --------------------------------------------------------------------------- references


def _random_case(seed: int, n: int, c: int, scale: float):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * scale
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    # labels drawn from a softer distribution than probs -> over-confident, mixed accuracy
    soft = np.exp(0.5 * (logits - logits.max(1, keepdims=True)))
    soft /= soft.sum(1, keepdims=True)
    cum = soft.cumsum(1)
    labels = np.minimum((rng.random(n)[:, None] > cum).sum(1), c - 1)
    return probs, labels


CASES = [
    (seed, c, scale)
    for seed, c, scale in [(0, 3, 2.0), (1, 4, 3.0), (2, 5, 3.0), (3, 7, 4.0), (4, 10, 4.0), (5, 10, 1.5)]
]


@pytest.mark.parametrize("seed,c,scale", CASES)
def test_ece_mce_match_netcal_top_label(seed, c, scale):
    probs, labels = _random_case(seed, 500, c, scale)
    conf = probs.max(1)
    hits = (probs.argmax(1) == labels).astype(np.float64)
    # sanity: the case is non-trivial (spread confidences, mixed correctness)
    assert 0.1 < hits.mean() < 0.95
    assert conf.max() - conf.min() > 0.4
    ref_ece = ECE(bins=10).measure(conf, hits)
    ref_mce = MCE(bins=10).measure(conf, hits)
    ours_ece = M.ece(probs, labels, n_bins=10)
    ours_mce = M.mce(probs, labels, n_bins=10)
    assert ours_ece > 0.01 and ours_mce > 0.01
    assert ours_ece == pytest.approx(ref_ece, abs=1e-9)
    assert ours_mce == pytest.approx(ref_mce, abs=1e-9)
    # other bin counts too
    assert M.ece(probs, labels, n_bins=15) == pytest.approx(ECE(bins=15).measure(conf, hits), abs=1e-9)
    assert M.mce(probs, labels, n_bins=15) == pytest.approx(MCE(bins=15).measure(conf, hits), abs=1e-9)


def test_netcal_uses_left_closed_bins_we_use_right_closed():
    # Documented difference: on an exact interior edge netcal puts 0.5 into [0.5, 0.6),
    # calbench into (0.4, 0.5]. Toy set: netcal gives (0.5 + 0.45 + .75 + .15 + .05)/5 = 0.38
    conf = TOY_PROBS.max(1)
    hits = (TOY_PROBS.argmax(1) == TOY_LABELS).astype(np.float64)
    assert ECE(bins=10).measure(conf, hits) == pytest.approx(0.38, abs=1e-9)
    assert M.ece(TOY_PROBS, TOY_LABELS) == pytest.approx(0.2, abs=TOL)


@pytest.mark.parametrize("seed,c,scale", CASES)
def test_nll_brier_f1_match_sklearn(seed, c, scale):
    probs, labels = _random_case(seed, 500, c, scale)
    assert M.nll(probs, labels) == pytest.approx(log_loss(labels, probs, labels=list(range(c))), abs=1e-10)
    # sklearn >= 1.7: multiclass Brier is sum over classes, range [0, 2]; scale_by_half=False
    # keeps that range for any C (the "auto" default would halve it when C == 2).
    ref_brier = brier_score_loss(labels, probs, labels=list(range(c)), scale_by_half=False)
    assert M.brier(probs, labels) == pytest.approx(ref_brier, abs=1e-10)
    assert M.macro_f1(probs, labels) == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"), abs=1e-12)
    assert M.accuracy(probs, labels) == pytest.approx(float((probs.argmax(1) == labels).mean()), abs=0)


def test_brier_binary_is_two_times_sklearn_default():
    probs, labels = _random_case(11, 300, 2, 3.0)
    ours = M.brier(probs, labels)
    assert ours == pytest.approx(brier_score_loss(labels, probs, labels=[0, 1], scale_by_half=False), abs=1e-12)
    # sklearn's binary default ("auto") is the [0, 1] form: mean (y - p_1)^2 = ours / 2
    assert ours == pytest.approx(2 * brier_score_loss(labels, probs[:, 1]), abs=1e-12)


def test_macro_f1_union_of_present_classes_matches_sklearn():
    # class 3 never appears in labels or predictions -> excluded (like sklearn);
    # class 2 is predicted but never true -> F1 0 is included
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.1, 0.2, 0.6, 0.1], [0.6, 0.2, 0.1, 0.1]])
    labels = np.array([0, 1, 1, 0])
    # class 0: tp 2, pred 2, true 2 -> 1 ; class 1: tp 1, pred 1, true 2 -> 2/3 ; class 2: 0
    assert M.macro_f1(probs, labels) == pytest.approx((1 + 2 / 3 + 0) / 3, abs=TOL)
    assert M.macro_f1(probs, labels) == pytest.approx(
        f1_score(labels, probs.argmax(1), average="macro", zero_division=0), abs=TOL
    )
