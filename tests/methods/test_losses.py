"""Exact-value tests for calbench.losses.

Every expected value is derived by hand: either a literal number worked out on
paper (the arithmetic is in the comments) or an explicit loop over plain Python
floats using only the ``math`` module. No expected value calls torch's softmax /
cross-entropy or the function under test.

Most paper derivations use logits that are logarithms of small integers, so that
p = softmax(logits) is a row of exact fractions (weights / sum of weights).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from calbench import losses as L
from calbench.errors import CalbenchError

#: CalibPrompt's generic setting, spelled out: the loss functions take no defaults
CALIBPROMPT = {"alpha": 0.05, "w_smac": 1.0, "w_as": 0.01}

TOL = 1e-10


# --------------------------------------------------------------------------- helpers
# Plain-float references (math module only, no torch).


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _ce(rows, labels):
    return sum(-_log_softmax(r)[y] for r, y in zip(rows, labels)) / len(rows)


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def _y(labels):
    return torch.tensor(labels, dtype=torch.int64)


def _val(x: torch.Tensor) -> float:
    assert x.dim() == 0, f"loss must be a scalar, got shape {tuple(x.shape)}"
    return float(x)


# --------------------------------------------------------------------------- fixtures
# "Fraction" batch: logits = log(weights), so p rows are exact fractions.
#   row0 weights [1,2,1] -> p = [1/4, 1/2, 1/4], label 1  (pred 1, correct, conf 1/2)
#   row1 weights [6,1,1] -> p = [3/4, 1/8, 1/8], label 0  (pred 0, correct, conf 3/4)
#   row2 weights [1,1,2] -> p = [1/4, 1/4, 1/2], label 0  (pred 2, wrong,   conf 1/2)
#   row3 weights [1,3,4] -> p = [1/8, 3/8, 1/2], label 1  (pred 2, wrong,   conf 1/2)
# f = label fractions = [2/4, 2/4, 0/4]
# mean_b p_bc = [(1/4+3/4+1/4+1/8)/4, (1/2+1/8+1/4+3/8)/4, (1/4+1/8+1/2+1/2)/4]
#             = [11/32, 10/32, 11/32]
FRAC_WEIGHTS = [[1, 2, 1], [6, 1, 1], [1, 1, 2], [1, 3, 4]]
FRAC_LOGITS = [[math.log(w) for w in row] for row in FRAC_WEIGHTS]
FRAC_LABELS = [1, 0, 0, 1]
LN2 = math.log(2.0)

# "Irregular" batch: arbitrary logits with no structure, checked against the
# math-module loop references (catches bugs a symmetric toy case could hide).
IRR_LOGITS = [
    [0.3, -1.2, 2.1],
    [1.7, 0.4, -0.5],
    [-0.8, 0.9, 0.1],
    [2.4, 2.2, -1.3],
]
IRR_LABELS = [2, 1, 1, 0]


def frac_batch():
    return _t(FRAC_LOGITS), _y(FRAC_LABELS)


def irr_batch():
    return _t(IRR_LOGITS), _y(IRR_LABELS)


# --------------------------------------------------------------------------- cross_entropy


def test_cross_entropy_paper_value():
    # -log p_y per row: -log(1/2), -log(3/4), -log(1/4), -log(3/8)
    #   = ln2 + ln(4/3) + ln4 + ln(8/3) = ln(2 * 4/3 * 4 * 8/3) = ln(256/9)
    # mean over 4 rows: ln(256/9) / 4 = ln(28.444...) / 4 = 3.347952 / 4 = 0.836988
    expected = math.log(256 / 9) / 4
    assert expected == pytest.approx(0.836988, abs=1e-6)
    assert _val(L.cross_entropy(*frac_batch())) == pytest.approx(expected, abs=TOL)


def test_cross_entropy_irregular_matches_loop():
    assert _val(L.cross_entropy(*irr_batch())) == pytest.approx(_ce(IRR_LOGITS, IRR_LABELS), abs=TOL)


def test_cross_entropy_uniform_is_log_c():
    # all-zero logits -> p = 1/C everywhere -> CE = ln C = ln 5
    logits = torch.zeros(3, 5, dtype=torch.float64)
    assert _val(L.cross_entropy(logits, _y([0, 3, 4]))) == pytest.approx(math.log(5), abs=TOL)


# --------------------------------------------------------------------------- label smoothing


def test_label_smoothing_paper_value():
    # alpha = 0.1, C = 3: target 0.9 on the true class, 0.1/2 = 0.05 elsewhere.
    # row0 p=[1/4,1/2,1/4], y=1: .05*ln4 + .9*ln2 + .05*ln4 = (.2 + .9) ln2 = 1.10 ln2
    # row1 p=[3/4,1/8,1/8], y=0: .9*ln(4/3) + .05*ln8 + .05*ln8 = .9 ln(4/3) + .30 ln2
    # row2 p=[1/4,1/4,1/2], y=0: .9*ln4 + .05*ln4 + .05*ln2 = (1.8 + .1 + .05) ln2 = 1.95 ln2
    # row3 p=[1/8,3/8,1/2], y=1: .05*ln8 + .9*ln(8/3) + .05*ln2 = .9 ln(8/3) + .20 ln2
    # sum = 3.55 ln2 + .9 (ln(4/3) + ln(8/3)) = 3.55 ln2 + .9 ln(32/9); mean = sum / 4
    expected = (3.55 * LN2 + 0.9 * math.log(32 / 9)) / 4
    assert _val(L.label_smoothing(*frac_batch(), alpha=0.1)) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.3])
def test_label_smoothing_irregular_matches_loop(alpha):
    c = 3
    total = 0.0
    for row, y in zip(IRR_LOGITS, IRR_LABELS):
        logp = _log_softmax(row)
        for k in range(c):
            target = 1.0 - alpha if k == y else alpha / (c - 1)
            total -= target * logp[k]
    expected = total / len(IRR_LOGITS)
    assert _val(L.label_smoothing(*irr_batch(), alpha=alpha)) == pytest.approx(expected, abs=TOL)


def test_label_smoothing_alpha_zero_is_cross_entropy():
    assert _val(L.label_smoothing(*irr_batch(), alpha=0.0)) == pytest.approx(_ce(IRR_LOGITS, IRR_LABELS), abs=TOL)


def test_label_smoothing_differs_from_torch_alpha_over_c():
    # torch spreads alpha/C over all classes (true one included): true 1-a+a/3, others a/3.
    logits, labels = frac_batch()
    ours = _val(L.label_smoothing(logits, labels, alpha=0.1))
    theirs = float(F.cross_entropy(logits, labels, label_smoothing=0.1))
    # torch's value by hand: targets 0.9333.. / 0.0333..
    torch_by_hand = 0.0
    for row, y in zip(FRAC_LOGITS, FRAC_LABELS):
        logp = _log_softmax(row)
        torch_by_hand -= sum(((1 - 0.1 + 0.1 / 3) if k == y else 0.1 / 3) * logp[k] for k in range(3))
    torch_by_hand /= 4
    assert theirs == pytest.approx(torch_by_hand, abs=TOL)
    assert abs(ours - theirs) > 1e-3


# --------------------------------------------------------------------------- SMAC


def test_smac_paper_value():
    # alpha = 0.1, C = 3, f = [1/2, 1/2, 0]
    # s_c = f_c * .9 + (1 - f_c) * .05 -> s = [.45 + .025, .45 + .025, 0 + .05] = [.475, .475, .05]
    # mean p = [11/32, 10/32, 11/32] = [.34375, .3125, .34375]
    # |mean p - s| = [.13125, .1625, .29375]; sum = .5875; mean over 3 classes = .5875/3
    expected = 0.5875 / 3
    assert _val(L.smac(*frac_batch(), alpha=0.1)) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.2])
def test_smac_irregular_matches_loop(alpha):
    c, b = 3, len(IRR_LOGITS)
    probs = [_softmax(r) for r in IRR_LOGITS]
    total = 0.0
    for k in range(c):
        f = sum(1 for y in IRR_LABELS if y == k) / b
        s = f * (1 - alpha) + (1 - f) * alpha / (c - 1)
        mean_p = sum(p[k] for p in probs) / b
        total += abs(mean_p - s)
    assert _val(L.smac(*irr_batch(), alpha=alpha)) == pytest.approx(total / c, abs=TOL)


# --------------------------------------------------------------------------- angular separation


def test_angular_separation_right_angles_paper_value():
    # directions 0deg, 90deg, 180deg (lengths deliberately not 1)
    # cos(0,90) = 0, cos(0,180) = -1, cos(90,180) = 0
    # row sums of S (diag zeroed): [-1, 0, -1]; / (C-1)=2 -> [-.5, 0, -.5]; mean = -1/3
    feats = _t([[2.0, 0.0], [0.0, 3.0], [-0.5, 0.0]])
    assert _val(L.angular_separation(feats)) == pytest.approx(-1 / 3, abs=TOL)


def test_angular_separation_mixed_angles_paper_value():
    # directions 0deg, 60deg, 90deg: cos60 = 1/2, cos90 = 0, cos30 = sqrt(3)/2
    # row sums: r0 = 1/2 + 0, r1 = 1/2 + sqrt3/2, r2 = 0 + sqrt3/2 -> total 1 + sqrt3
    # loss = (1 + sqrt3) / (C-1) / C = (1 + sqrt3) / 6 = 0.45534...
    feats = _t([[1.0, 0.0], [2 * math.cos(math.pi / 3), 2 * math.sin(math.pi / 3)], [0.0, 5.0]])
    assert _val(L.angular_separation(feats)) == pytest.approx((1 + math.sqrt(3)) / 6, abs=TOL)


@pytest.mark.parametrize("c", [2, 3, 4, 5, 8])
def test_angular_separation_equally_spaced_circle(c):
    # C unit vectors equally spaced on a circle sum to 0, so each row sum of S is
    # (sum_j cos) - 1 = -1, hence loss = -1/(C-1). Embed in D=4 with a scale per row.
    rows = []
    for i in range(c):
        th = 2 * math.pi * i / c + 0.3
        s = 1.0 + i  # norms must not matter
        rows.append([s * math.cos(th), 0.0, s * math.sin(th), 0.0])
    assert _val(L.angular_separation(_t(rows))) == pytest.approx(-1 / (c - 1), abs=TOL)


def test_angular_separation_irregular_matches_loop():
    feats = [[0.2, -1.0, 0.7], [1.5, 0.3, -0.2], [-0.4, 0.8, 0.9], [0.1, 0.1, -1.1]]
    c = len(feats)
    norms = [math.sqrt(sum(v * v for v in r)) for r in feats]
    total = 0.0
    for i in range(c):
        row = 0.0
        for j in range(c):
            if i != j:
                row += sum(a * b for a, b in zip(feats[i], feats[j])) / (norms[i] * norms[j])
        total += row / (c - 1)
    assert _val(L.angular_separation(_t(feats))) == pytest.approx(total / c, abs=TOL)


# --------------------------------------------------------------------------- focal


def test_focal_paper_value_gamma3():
    # -(1-p_t)^3 log p_t with p_t = [1/2, 3/4, 1/4, 3/8]
    # row0: (1/2)^3 ln2            = ln2 / 8
    # row1: (1/4)^3 ln(4/3)        = ln(4/3) / 64
    # row2: (3/4)^3 ln4            = 27/64 * 2 ln2 = 54/64 ln2
    # row3: (5/8)^3 ln(8/3)        = 125/512 ln(8/3)
    expected = (LN2 / 8 + math.log(4 / 3) / 64 + 54 / 64 * LN2 + 125 / 512 * math.log(8 / 3)) / 4
    assert _val(L.focal(*frac_batch(), gamma=3.0)) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("gamma", [1.0, 2.0, 3.0])
def test_focal_irregular_matches_loop(gamma):
    total = 0.0
    for row, y in zip(IRR_LOGITS, IRR_LABELS):
        pt = _softmax(row)[y]
        total += -((1 - pt) ** gamma) * math.log(pt)
    assert _val(L.focal(*irr_batch(), gamma=gamma)) == pytest.approx(total / 4, abs=TOL)


def test_focal_gamma0_is_cross_entropy():
    assert _val(L.focal(*irr_batch(), gamma=0.0)) == pytest.approx(_ce(IRR_LOGITS, IRR_LABELS), abs=TOL)
    assert _val(L.focal(*frac_batch(), gamma=0.0)) == pytest.approx(math.log(256 / 9) / 4, abs=TOL)


# --------------------------------------------------------------------------- MDCA / DCA


def test_mdca_paper_value():
    # f = [1/2, 1/2, 0], mean p = [11/32, 10/32, 11/32]
    # |.34375 - .5| + |.3125 - .5| + |.34375 - 0| = .15625 + .1875 + .34375 = .6875; / 3
    assert _val(L.mdca(*frac_batch())) == pytest.approx(0.6875 / 3, abs=TOL)


def test_mdca_irregular_matches_loop():
    probs = [_softmax(r) for r in IRR_LOGITS]
    total = 0.0
    for k in range(3):
        f = sum(1 for y in IRR_LABELS if y == k) / 4
        total += abs(sum(p[k] for p in probs) / 4 - f)
    assert _val(L.mdca(*irr_batch())) == pytest.approx(total / 3, abs=TOL)


def test_dca_paper_value():
    # max p = [1/2, 3/4, 1/2, 1/2] -> mean 2.25/4 = .5625
    # preds [1, 0, 2, 2] vs labels [1, 0, 0, 1] -> accuracy 2/4 = .5
    # |.5625 - .5| = .0625
    assert _val(L.dca(*frac_batch())) == pytest.approx(0.0625, abs=TOL)


def test_dca_irregular_matches_loop():
    confs, hits = [], []
    for row, y in zip(IRR_LOGITS, IRR_LABELS):
        p = _softmax(row)
        k = max(range(3), key=lambda i: p[i])
        confs.append(p[k])
        hits.append(1.0 if k == y else 0.0)
    expected = abs(sum(confs) / 4 - sum(hits) / 4)
    assert expected > 0.05  # non-trivial case
    assert _val(L.dca(*irr_batch())) == pytest.approx(expected, abs=TOL)


# --------------------------------------------------------------------------- MMCE


def _mmce_loops(confs, hits, bw=0.4):
    """Reference with explicit loops: the *mean* form over pair groups."""
    ok = [r for r, h in zip(confs, hits) if h]
    bad = [r for r, h in zip(confs, hits) if not h]
    m, n = len(ok), len(bad)

    def k(a, b):
        return math.exp(-abs(a - b) / bw)

    a = sum((1 - ri) * (1 - rj) * k(ri, rj) for ri in ok for rj in ok) / (m * m)
    b = sum(ri * rj * k(ri, rj) for ri in bad for rj in bad) / (n * n)
    x = sum((1 - ri) * rj * k(ri, rj) for ri in ok for rj in bad) / (m * n)
    mmce2 = a / m**2 + b / n**2 - 2 * x / (m * n)
    return math.sqrt(max(mmce2, 0.0) + 1e-10)


def test_mmce_paper_value_two_correct_two_wrong():
    # frac batch: correct r = [1/2, 3/4] (m=2), wrong r = [1/2, 1/2] (n=2); E = exp(-.25/.4) = exp(-.625)
    # A = mean over 4 correct pairs of (1-ri)(1-rj)K:
    #     (.5,.5): .25 ; (.75,.75): .0625 ; (.5,.75) twice: .5*.25*E = .125E each
    #     A = (.3125 + .25E) / 4
    # B = mean over 4 wrong pairs of ri rj K = .25 (all r = .5, K = 1)
    # X = mean over 4 correct x wrong pairs of (1-ri) rj K:
    #     ri=.5: .5*.5*1 = .25 (x2) ; ri=.75: .25*.5*E = .125E (x2) -> X = (.5 + .25E) / 4
    # MMCE^2 = A/4 + B/4 - 2X/4 = [(.3125+.25E)/4 + .25 - (.5+.25E)/2] / 4
    #        = [.078125 + .0625E + .25 - .25 - .125E] / 4 = (.078125 - .0625E) / 4
    #   E = 0.5352614, .0625E = 0.0334538 -> MMCE^2 = 0.0446712 / 4 = 0.0111678 -> sqrt = 0.1056778
    e = math.exp(-0.625)
    mmce2 = (0.078125 - 0.0625 * e) / 4
    expected = math.sqrt(mmce2 + 1e-10)
    assert expected == pytest.approx(0.1056778, abs=1e-7)
    assert _val(L.mmce(*frac_batch())) == pytest.approx(expected, abs=TOL)
    # and the same through the explicit-loop reference
    assert _mmce_loops([0.5, 0.75, 0.5, 0.5], [1, 1, 0, 0]) == pytest.approx(expected, abs=1e-14)


def test_mmce_irregular_matches_loop():
    # 5 samples, mixed correctness, distinct confidences
    logits = [[2.0, 0.1, -0.3], [0.2, 1.1, 0.9], [-1.0, 0.0, 3.0], [0.5, 0.4, 0.45], [1.2, -0.7, 1.0]]
    labels = [0, 2, 2, 1, 0]
    confs, hits = [], []
    for row, y in zip(logits, labels):
        p = _softmax(row)
        k = max(range(3), key=lambda i: p[i])
        confs.append(p[k])
        hits.append(k == y)
    assert sum(hits) == 3  # 3 correct, 2 wrong
    expected = _mmce_loops(confs, hits)
    assert _val(L.mmce(_t(logits), _y(labels))) == pytest.approx(expected, abs=TOL)


def test_mmce_bandwidth_argument_is_used():
    expected = _mmce_loops([0.5, 0.75, 0.5, 0.5], [1, 1, 0, 0], bw=0.1)
    assert _val(L.mmce(*frac_batch(), bandwidth=0.1)) == pytest.approx(expected, abs=TOL)


def test_mmce_zero_gap_hits_epsilon_floor():
    # 1 correct (r=.5), 1 wrong (r=.5): A = .25, B = .25, X = .25 -> MMCE^2 = .25 + .25 - .5 = 0
    # loss = sqrt(0 + 1e-10) = 1e-5
    logits = _t([[math.log(2), 0.0, 0.0], [math.log(2), 0.0, 0.0]])  # p = [1/2, 1/4, 1/4]
    assert _val(L.mmce(logits, _y([0, 1]))) == pytest.approx(1e-5, abs=1e-12)


@pytest.mark.parametrize("labels", [[1, 0, 2, 2], [0, 1, 0, 0]])
def test_mmce_all_correct_or_all_wrong_is_zero(labels):
    # frac preds are [1, 0, 2, 2]: first labels = all correct, second = all wrong
    logits = _t(FRAC_LOGITS).requires_grad_(True)
    out = L.mmce(logits, _y(labels))
    assert out.dim() == 0
    assert float(out.detach()) == 0.0
    out.backward()  # still part of the graph
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_mmce_differentiable_on_mixed_batch():
    logits = _t(IRR_LOGITS).requires_grad_(True)
    out = L.mmce(logits, _y([2, 0, 1, 1]))  # preds [2, 0, 1, 0]: 3 correct, 1 wrong
    out.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


# --------------------------------------------------------------------------- MBLS


def test_mbls_paper_value_with_active_margin():
    # row0 [0, 12, 25], y=2: max 25 -> distances [25, 13, 0] -> relu(d - 10) = [15, 3, 0] (sum 18)
    # row1 [5, 0, 20],  y=0: max 20 -> distances [15, 20, 0] -> relu(d - 10) = [5, 10, 0] (sum 15)
    # penalty = 0.1 * (18 + 15) / 6 = 0.1 * 5.5 = 0.55
    # CE row0 = lse(0,12,25) - 25 = ln(1 + e^-13 + e^-25)
    # CE row1 = lse(5,0,20) - 5  = 15 + ln(1 + e^-15 + e^-20)
    ce = (math.log(1 + math.exp(-13) + math.exp(-25)) + 15 + math.log(1 + math.exp(-15) + math.exp(-20))) / 2
    expected = ce + 0.55
    logits, labels = _t([[0.0, 12.0, 25.0], [5.0, 0.0, 20.0]]), _y([2, 0])
    assert _val(L.mbls(logits, labels, margin=10.0, alpha=0.1)) == pytest.approx(expected, abs=TOL)
    # alpha = 1, margin = 12: relu(d - 12) = [13, 1, 0] and [3, 8, 0] -> 25 / 6
    assert _val(L.mbls(logits, labels, margin=12.0, alpha=1.0)) == pytest.approx(ce + 25 / 6, abs=TOL)


def test_mbls_small_gaps_equals_cross_entropy():
    # all logit gaps < 10 -> no penalty
    assert _val(L.mbls(*irr_batch(), margin=10.0, alpha=0.1)) == pytest.approx(_ce(IRR_LOGITS, IRR_LABELS), abs=TOL)


# --------------------------------------------------------------------------- LogitNorm


def test_logit_norm_paper_value():
    # row0 [3, 4, 0]: ||.|| = 5  -> [3, 4, 0] / (5 + 1e-7)
    # row1 [1, -2, 2]: ||.|| = 3 -> [1, -2, 2] / (3 + 1e-7)
    rows = [[3.0, 4.0, 0.0], [1.0, -2.0, 2.0]]
    labels = [1, 2]
    for temp in (1.0, 0.5, 0.05):
        scaled = [[v / (5 + 1e-7) / temp for v in rows[0]], [v / (3 + 1e-7) / temp for v in rows[1]]]
        expected = _ce(scaled, labels)
        got = _val(L.logit_norm(_t(rows), _y(labels), temperature=temp))
        assert got == pytest.approx(expected, abs=TOL)
    # temperature 1 -> normalised rows ~[.6,.8,0] and [1/3,-2/3,2/3]
    approx_unit = _ce([[0.6, 0.8, 0.0], [1 / 3, -2 / 3, 2 / 3]], labels)
    assert _val(L.logit_norm(_t(rows), _y(labels), temperature=1.0)) == pytest.approx(approx_unit, abs=1e-7)


def test_logit_norm_is_scale_invariant():
    # logits and 7 * logits normalise to the same row (up to the 1e-7 epsilon)
    a = _val(L.logit_norm(*irr_batch(), temperature=1.0))
    b = _val(L.logit_norm(7.0 * _t(IRR_LOGITS), _y(IRR_LABELS), temperature=1.0))
    assert a == pytest.approx(b, abs=1e-6)


# --------------------------------------------------------------------------- ZS-Norm / ZS penalty


def test_zs_norm_paper_value():
    # row0 logits [1, 3, 2]: lo 1, hi 3 -> (l - 1)/2 = [0, 1, .5]
    #      zs [.5, -.5, 1.5]: zlo -.5, zhi 1.5 -> [0, 1, .5] * 2 - .5 = [-.5, 1.5, .5]
    # row1 logits [4, 4, 4]: range 0, clamped to 1e-6 -> (0/1e-6) * 3 + (-1) = [-1, -1, -1]
    #      zs [-1, 0, 2]: zlo -1, zhi 2 -> constant row -> CE = ln 3
    # labels [0, 2]
    # CE row0 = -log softmax([-.5, 1.5, .5])[0] = ln(e^-.5 + e^1.5 + e^.5) + .5
    ce0 = math.log(math.exp(-0.5) + math.exp(1.5) + math.exp(0.5)) + 0.5
    expected = (ce0 + math.log(3)) / 2
    logits = _t([[1.0, 3.0, 2.0], [4.0, 4.0, 4.0]])
    zs = _t([[0.5, -0.5, 1.5], [-1.0, 0.0, 2.0]])
    assert _val(L.zs_norm(logits, _y([0, 2]), zs_logits=zs)) == pytest.approx(expected, abs=TOL)


def test_zs_norm_irregular_matches_loop():
    zs = [[0.1, 0.5, -0.2], [1.0, 2.0, 3.0], [0.0, -0.3, 0.4], [-1.0, 1.0, 0.2]]
    rescaled = []
    for row, zrow in zip(IRR_LOGITS, zs):
        lo, hi, zlo, zhi = min(row), max(row), min(zrow), max(zrow)
        rescaled.append([(v - lo) / max(hi - lo, 1e-6) * (zhi - zlo) + zlo for v in row])
    expected = _ce(rescaled, IRR_LABELS)
    assert _val(L.zs_norm(*irr_batch(), zs_logits=_t(zs))) == pytest.approx(expected, abs=TOL)


def test_zs_penalty_paper_value():
    # row0 l [2, -1, .5], zs [0, 1, -.5]: zhi 1, zlo -.5
    #      relu(l - 1) = [1, 0, 0]; relu(-.5 - l) = [0, .5, 0]
    # row1 l [.2, .3, 3], zs [0, .25, .5]: zhi .5, zlo 0
    #      relu(l - .5) = [0, 0, 2.5]; relu(0 - l) = [0, 0, 0]
    # mean over 6 entries: upper (1 + 2.5)/6 + lower .5/6 = 4/6 = 2/3
    logits = _t([[2.0, -1.0, 0.5], [0.2, 0.3, 3.0]])
    zs = _t([[0.0, 1.0, -0.5], [0.0, 0.25, 0.5]])
    assert _val(L.zs_penalty(logits, _y([0, 1]), zs_logits=zs)) == pytest.approx(2 / 3, abs=TOL)


def test_zs_penalty_zero_inside_range():
    logits = _t([[0.1, 0.2, 0.3]])
    zs = _t([[0.0, 1.0, 0.5]])
    assert _val(L.zs_penalty(logits, _y([0]), zs_logits=zs)) == 0.0


# --------------------------------------------------------------------------- margin mean-variance


def test_margin_mean_var_paper_value():
    # row0 [1, 4, 2],   y=1: m = 4 - 2    = 2
    # row1 [3, 0, 5],   y=0: m = 3 - 5    = -2
    # row2 [0, 1, 1.5], y=2: m = 1.5 - 1  = .5
    # mean m = .5/3 = 1/6; population var = (4 + 4 + .25)/3 - 1/36 = 2.75 - 1/36 = 49/18
    # loss = -.1 * 1/6 + .01 * 49/18 = -1/60 + 49/1800 = 19/1800
    logits = _t([[1.0, 4.0, 2.0], [3.0, 0.0, 5.0], [0.0, 1.0, 1.5]])
    labels = _y([1, 0, 2])
    assert _val(L.margin_mean_var(logits, labels, alpha=0.1, beta=0.01)) == pytest.approx(19 / 1800, abs=TOL)
    # alpha = 1, beta = 1: -1/6 + 49/18 = 46/18
    assert _val(L.margin_mean_var(logits, labels, alpha=1.0, beta=1.0)) == pytest.approx(46 / 18, abs=TOL)
    # sample (unbiased) variance would give -1/60 + .01 * 49/12 -> must NOT match
    assert abs(_val(L.margin_mean_var(logits, labels, alpha=0.1, beta=0.01)) - (-1 / 60 + 0.01 * 49 / 12)) > 1e-4


# --------------------------------------------------------------------------- text moment matching


def test_text_moment_matching_paper_value():
    # t  = [[1,0],[0,1],[-1,-1]]: mu_t = [0,0]; X^T X = [[2,1],[1,2]] -> Sigma_t = [[2,1],[1,2]]/3
    # z0 = [[2,0],[0,0],[1,3]]:   mu_0 = [1,1]; centred [[1,-1],[-1,-1],[0,2]]
    #      X^T X = [[2,0],[0,6]] -> Sigma_0 = [[2,0],[0,6]]/3
    # ||mu_t - mu_0||^2 = 1 + 1 = 2
    # Sigma_t - Sigma_0 = [[0,1],[1,-4]]/3 -> ||.||_F^2 = (0 + 1 + 1 + 16)/9 = 2
    # total = 4
    t = _t([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    z = _t([[2.0, 0.0], [0.0, 0.0], [1.0, 3.0]])
    assert _val(L.text_moment_matching(t, z)) == pytest.approx(4.0, abs=TOL)
    assert _val(L.text_moment_matching(t, t)) == 0.0


def test_text_moment_matching_irregular_matches_loop():
    t = [[0.2, -1.0, 0.7], [1.5, 0.3, -0.2], [-0.4, 0.8, 0.9], [0.1, 0.1, -1.1]]
    z = [[0.0, -0.9, 0.5], [1.2, 0.5, -0.1], [-0.6, 1.0, 0.6], [0.3, 0.2, -1.0]]
    c, d = 4, 3

    def moments(x):
        mu = [sum(r[k] for r in x) / c for k in range(d)]
        cov = [[sum((r[i] - mu[i]) * (r[j] - mu[j]) for r in x) / c for j in range(d)] for i in range(d)]
        return mu, cov

    mt, ct = moments(t)
    m0, c0 = moments(z)
    expected = sum((a - b) ** 2 for a, b in zip(mt, m0)) + sum(
        (ct[i][j] - c0[i][j]) ** 2 for i in range(d) for j in range(d)
    )
    assert _val(L.text_moment_matching(_t(t), _t(z))) == pytest.approx(expected, abs=TOL)


# --------------------------------------------------------------------------- Objective


def test_calibprompt_objective_total_and_parts():
    logits, labels = irr_batch()
    feats = _t([[0.2, -1.0, 0.7], [1.5, 0.3, -0.2], [-0.4, 0.8, 0.9]])
    obj = L.calibprompt_objective(alpha=0.05, w_smac=1.0, w_as=0.01)
    total, parts = obj(logits=logits, labels=labels, text_features=feats)

    ls = float(L.label_smoothing(logits, labels, alpha=0.05))
    sm = float(L.smac(logits, labels, alpha=0.05))
    as_ = float(L.angular_separation(feats))
    assert set(parts) == {"ls", "smac", "as"}
    assert parts["ls"] == pytest.approx(ls, abs=TOL)
    assert parts["smac"] == pytest.approx(sm, abs=TOL)
    assert parts["as"] == pytest.approx(as_, abs=TOL)
    assert float(total) == pytest.approx(ls + 1.0 * sm + 0.01 * as_, abs=TOL)
    # the parts are unweighted: the "as" part is not multiplied by 0.01
    assert abs(as_) > 1e-3

    # and the pieces themselves against the hand references (alpha = 0.05)
    ls_ref = 0.0
    for row, y in zip(IRR_LOGITS, IRR_LABELS):
        lp = _log_softmax(row)
        ls_ref -= sum((0.95 if k == y else 0.025) * lp[k] for k in range(3))
    assert parts["ls"] == pytest.approx(ls_ref / 4, abs=TOL)


def test_calibprompt_objective_weights_and_extra_inputs():
    logits, labels = frac_batch()
    feats = _t([[2.0, 0.0], [0.0, 3.0], [-0.5, 0.0]])  # AS = -1/3 (see above)
    obj = L.calibprompt_objective(alpha=0.1, w_smac=2.0, w_as=0.5)
    # extra inputs (zs_logits) are ignored by terms that don't name them
    total, parts = obj(logits=logits, labels=labels, text_features=feats, zs_logits=logits)
    ls = (3.55 * LN2 + 0.9 * math.log(32 / 9)) / 4
    sm = 0.5875 / 3
    assert parts["ls"] == pytest.approx(ls, abs=TOL)
    assert parts["smac"] == pytest.approx(sm, abs=TOL)
    assert parts["as"] == pytest.approx(-1 / 3, abs=TOL)
    assert float(total) == pytest.approx(ls + 2.0 * sm + 0.5 * (-1 / 3), abs=TOL)


def test_calibprompt_objective_generic_setting():
    # CalibPrompt's generic setting (PLIP-Kather's): alpha = 0.05, w_smac = 1.0, w_as = 0.01
    obj = L.calibprompt_objective(**CALIBPROMPT)
    assert obj.terms == {
        "ls": L.Term("label_smoothing", 1.0, {"alpha": 0.05}),
        "smac": L.Term("smac", 1.0, {"alpha": 0.05}),
        "as": L.Term("angular_separation", 0.01),
    }
    logits, labels = frac_batch()
    feats = _t([[2.0, 0.0], [0.0, 3.0], [-0.5, 0.0]])  # AS = -1/3
    total, parts = obj(logits=logits, labels=labels, text_features=feats)
    assert parts["as"] == pytest.approx(-1 / 3, abs=TOL)
    assert float(total) == pytest.approx(parts["ls"] + parts["smac"] + 0.01 * (-1 / 3), abs=TOL)


def test_objective_total_is_differentiable():
    logits = _t(IRR_LOGITS).requires_grad_(True)
    feats = _t([[0.2, -1.0, 0.7], [1.5, 0.3, -0.2], [-0.4, 0.8, 0.9]]).requires_grad_(True)
    total, _ = L.calibprompt_objective(**CALIBPROMPT)(logits=logits, labels=_y(IRR_LABELS), text_features=feats)
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0


def test_objective_inputs():
    assert L.calibprompt_objective(**CALIBPROMPT).inputs == {"logits", "labels", "text_features"}
    obj = L.Objective({"ce": L.Term("cross_entropy"), "pen": L.Term("zs_penalty", 0.5)})
    assert obj.inputs == {"logits", "labels", "zs_logits"}
    # keyword-only hyper-parameters (gamma) are not inputs
    assert L.Objective({"f": L.Term("focal", 1.0, {"gamma": 3.0})}).inputs == {"logits", "labels"}
    assert L.Objective({"t": L.Term("text_moment_matching")}).inputs == {"text_features", "zs_text_features"}


def test_objective_term_kwargs_are_passed():
    logits, labels = frac_batch()
    obj = L.Objective({"f": L.Term("focal", 2.0, {"gamma": 0.0})})
    total, parts = obj(logits=logits, labels=labels)
    ce = math.log(256 / 9) / 4  # focal with gamma 0 is CE
    assert parts["f"] == pytest.approx(ce, abs=TOL)
    assert float(total) == pytest.approx(2.0 * ce, abs=TOL)


def test_unknown_loss_name_raises_calbench_error_listing_names():
    with pytest.raises(CalbenchError) as info:
        L.Objective({"x": L.Term("no_such_loss")})
    msg = str(info.value)
    assert "no_such_loss" in msg
    for name in ("label_smoothing", "smac", "angular_separation", "cross_entropy", "mmce"):
        assert name in msg
    with pytest.raises(CalbenchError):
        L.LOSSES.get("no_such_loss")


def test_every_registered_loss_is_tested_here():
    # if a loss is added to the registry, this file must grow a test for it
    assert set(L.LOSSES.names()) == {
        "cross_entropy",
        "label_smoothing",
        "smac",
        "angular_separation",
        "focal",
        "mdca",
        "dca",
        "mmce",
        "mbls",
        "logit_norm",
        "zs_norm",
        "zs_penalty",
        "margin_mean_var",
        "text_moment_matching",
    }


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("cross_entropy", {}),
        ("label_smoothing", {"alpha": 0.05}),
        ("smac", {"alpha": 0.05}),
        ("focal", {"gamma": 3.0}),
        ("mdca", {}),
        ("dca", {}),
        ("mbls", {"margin": 10.0, "alpha": 0.1}),
        ("logit_norm", {"temperature": 1.0}),
        ("margin_mean_var", {"alpha": 0.1, "beta": 0.01}),
    ],
)
def test_logit_losses_gradients_finite(name, kwargs):
    # scaled irregular logits so mbls's margin (10) is active on some entries
    logits = (_t(IRR_LOGITS) * 6.0).requires_grad_(True)
    out = L.LOSSES.get(name)(logits, _y(IRR_LABELS), **kwargs)
    out.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_mbls_gradient_includes_margin_term():
    # d/dl of alpha*mean relu(max - l - margin): for row0 [0,12,25] the entries at 0 and 12 are
    # active, each contributes -alpha/6 to its own logit and +alpha/6 to the max logit (25).
    logits = _t([[0.0, 12.0, 25.0], [5.0, 0.0, 20.0]]).requires_grad_(True)
    labels = _y([2, 0])
    L.mbls(logits, labels, margin=10.0, alpha=0.1).backward()
    g = logits.grad
    # CE part by hand: (p - onehot) / B
    ce_grad = []
    for row, y in zip([[0.0, 12.0, 25.0], [5.0, 0.0, 20.0]], [2, 0]):
        p = _softmax(row)
        ce_grad.append([(p[k] - (1.0 if k == y else 0.0)) / 2 for k in range(3)])
    a = 0.1 / 6
    expected = [
        [ce_grad[0][0] - a, ce_grad[0][1] - a, ce_grad[0][2] + 2 * a],
        [ce_grad[1][0] - a, ce_grad[1][1] - a, ce_grad[1][2] + 2 * a],
    ]
    for i in range(2):
        for k in range(3):
            assert float(g[i, k]) == pytest.approx(expected[i][k], abs=TOL)


def test_zs_losses_gradients_finite():
    logits = _t(IRR_LOGITS).requires_grad_(True)
    zs = _t([[0.1, 0.5, -0.2], [1.0, 2.0, 3.0], [0.0, -0.3, 0.4], [-1.0, 1.0, 0.2]])
    (L.zs_norm(logits, _y(IRR_LABELS), zs) + L.zs_penalty(logits, _y(IRR_LABELS), zs)).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["angular_separation", "text_moment_matching"])
def test_text_losses_gradients_finite(name):
    feats = _t([[0.2, -1.0, 0.7], [1.5, 0.3, -0.2], [-0.4, 0.8, 0.9]]).requires_grad_(True)
    args = (
        (feats,)
        if name == "angular_separation"
        else (feats, _t([[0.0, -0.9, 0.5], [1.2, 0.5, -0.1], [-0.6, 1.0, 0.6]]))
    )
    L.LOSSES.get(name)(*args).backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0


def test_losses_work_in_float32():
    # training runs in float32; values should agree with the float64 hand value to ~1e-6
    logits = torch.tensor(FRAC_LOGITS, dtype=torch.float32)
    got = float(L.label_smoothing(logits, _y(FRAC_LABELS), alpha=0.1))
    assert got == pytest.approx((3.55 * LN2 + 0.9 * math.log(32 / 9)) / 4, abs=1e-6)
    got = float(L.smac(logits, _y(FRAC_LABELS), alpha=0.1))
    assert got == pytest.approx(0.5875 / 3, abs=1e-6)
