"""Calibration under shift: corruptions deterministic per (image, corruption, severity), cached once as
views, and `compare --shift` scoring, logging and reporting every run on them."""

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2hed

from calbench.cache import FeatureCache
from calbench.compare import CompareRequest, Grid, run_compare
from calbench.compare.deferral_shift import DeferralShiftOptions
from calbench.data import load_dataset
from calbench.data.corruptions import (
    CORRUPTIONS,
    IMAGENET_C,
    SEVERITIES,
    Shift,
    corrupt,
    hed_to_rgb,
    parse_shift_kind,
    rgb_to_hed,
    shift_kind,
)
from calbench.data.synthetic import CLASSES
from calbench.data.transforms import describe, eval_transform, role_of, to_tensor
from calbench.deferral import DEFERRAL_COLUMNS
from calbench.models import load_vlm
from calbench.models.base import PreprocessConfig
from calbench.report import write_results_report
from calbench.results import read_results, read_shift
from calbench.session import FewShot, RunContext

CFG = PreprocessConfig(size=32)


def tile(seed=0, size=40):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(30, 230, (size, size + 6, 3), dtype=np.uint8))


def pixels(image):
    return np.asarray(image, dtype=np.float64) / 255


def test_kinds_round_trip_and_keep_the_base_kinds_role():
    kind = shift_kind("gaussian_blur", 3)
    assert kind == "shift-gaussian_blur-3" and parse_shift_kind(kind) == Shift("gaussian_blur", 3)
    noisy = shift_kind("stain", 5, "score-noise0.25")
    assert parse_shift_kind(noisy) == Shift("stain", 5, "score-noise0.25") and role_of(noisy) == "score"
    assert role_of(kind) is None and parse_shift_kind("eval") is None
    assert "parameter=3.0" in describe(kind, CFG) and describe(kind, CFG).endswith(describe("eval", CFG))
    with pytest.raises(ValueError):
        shift_kind("fog", 1)
    with pytest.raises(ValueError):
        shift_kind("jpeg", 6)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_each_copy_is_the_same_whenever_it_is_made(corruption):
    image, cfg = tile(size=224), PreprocessConfig(size=224)  # blur is in pixels of a 224 px image, as ImageNet-C's
    for severity in (1, 3, 5):
        first = to_tensor(image, shift_kind(corruption, severity), cfg, 0, 7, "test")
        torch.testing.assert_close(first, to_tensor(image, shift_kind(corruption, severity), cfg, 0, 7, "test"))
        assert not torch.equal(first, eval_transform(image, cfg))
    low, high = (pixels(corrupt(image, Shift(corruption, s), "test", 7)) for s in (1, 5))
    clean = pixels(image)
    assert np.abs(high - clean).mean() > np.abs(low - clean).mean()  # severity 5 departs further than 1


def test_random_corruptions_differ_by_image_and_split_only():
    image = tile()
    noise = Shift("gaussian_noise", 2)
    assert corrupt(image, noise, "test", 1).tobytes() != corrupt(image, noise, "test", 2).tobytes()
    assert corrupt(image, noise, "test", 1).tobytes() != corrupt(image, noise, "train", 1).tobytes()
    # one draw per image, scaled by severity: severity 4 is severity 2's noise, 0.26 / 0.12 as strong
    x = np.full((16, 16, 3), 0.5)
    flat = Image.fromarray(np.uint8(x * 255))
    two, four = (pixels(corrupt(flat, Shift("gaussian_noise", s), "test", 3)) - 127 / 255 for s in (2, 4))
    inside = (np.abs(four) < 0.45) & (np.abs(two) > 0.05)  # away from clipping and rounding
    np.testing.assert_allclose(four[inside] / two[inside], 0.26 / 0.12, rtol=0.1)


def test_imagenet_c_formulas_by_hand():
    image = tile(1)
    x = pixels(image)
    mean = x.mean(axis=(0, 1))
    expected = np.round(np.clip((x - mean) * 0.4 + mean, 0, 1) * 255)
    np.testing.assert_array_equal(np.asarray(corrupt(image, Shift("contrast", 1), "test", 0)), expected)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=IMAGENET_C["jpeg"][4])
    np.testing.assert_array_equal(
        np.asarray(corrupt(image, Shift("jpeg", 5), "test", 0)), np.asarray(Image.open(buffer).convert("RGB"))
    )
    white = Image.fromarray(np.full((8, 8, 3), 230, dtype=np.uint8))  # grey 230: brightness adds 0.1 to V
    assert np.asarray(corrupt(white, Shift("brightness", 1), "test", 0))[0, 0].tolist() == [255, 255, 255]


def test_stain_deconvolution_is_scikit_images():
    x = np.random.default_rng(0).uniform(0.02, 1, (12, 12, 3))
    np.testing.assert_allclose(np.maximum(rgb_to_hed(x), 0), rgb2hed(x), atol=1e-12)  # skimage clips at 0
    np.testing.assert_allclose(hed_to_rgb(rgb_to_hed(x)), x, atol=1e-12)


@pytest.fixture(scope="module")
def tiny_random():
    return load_vlm("tiny-random", device="cpu")


@pytest.fixture()
def mini(synthetic, tmp_path):
    """The synthetic dataset with 6 training and 2 test images per class: enough for 2 + 2 shots."""
    root = tmp_path / "mini"
    (root / "images").mkdir(parents=True)
    shutil.copy(synthetic.root / "classnames.txt", root / "classnames.txt")
    for split, keep in (("train", 6), ("test", 2)):
        for folder in sorted((synthetic.root / "images" / split).iterdir()):
            (root / "images" / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:keep]:
                shutil.copy(image, root / "images" / split / folder.name / image.name)
    return root


def test_corrupted_copies_are_encoded_once(tiny_random, mini, tmp_path):
    dataset = load_dataset(str(mini), cache_dir=tmp_path)
    kind = shift_kind("jpeg", 3)
    cache = FeatureCache(tmp_path / "c", tiny_random, progress=False)
    first = cache.features(dataset, "test", [0, 1, 2], kind=kind)
    assert cache.stats.encoded == 3
    again = FeatureCache(tmp_path / "c", tiny_random, progress=False)
    torch.testing.assert_close(again.features(dataset, "test", [0, 1, 2], kind=kind), first, atol=0, rtol=0)
    assert again.stats.encoded == 0 and again.stats.loaded == 3
    clean = again.features(dataset, "test", [0, 1, 2], kind="eval")
    assert not torch.allclose(clean, first)  # its own key: not the clean features


@pytest.mark.e2e
def test_compare_shift_logs_reports_and_resumes(mini, cache_dir, tmp_path):
    grid = Grid(
        ["zero-shot", "zero-shot+ts"],
        [1],
        FewShot(2, 2, 2),
        bootstrap=0,
        extras=DeferralShiftOptions(shift=True, smooth_diagrams=True),
    )
    context = RunContext(device="cpu", cache_dir=cache_dir)
    result = run_compare(
        CompareRequest(model="tiny-random", data=str(mini), grid=grid, context=context, out=tmp_path / "out")
    )
    rows = read_results(tmp_path / "out" / "results.csv")
    assert result.computed == 2 and all(not np.isnan(row[c]) for row in rows for c in ("aurc", "lac_size"))
    assert set(DEFERRAL_COLUMNS) <= set(rows[0]) and rows[0]["conformal_n"] == 2 * len(
        CLASSES
    )  # 2 val shots x the classes
    shifted = read_shift(tmp_path / "out")
    assert len(shifted) == 2 * len(CORRUPTIONS) * len(SEVERITIES)
    names = {path.parent.name for path in result.plots.values()}
    assert {"reliability", "risk_coverage", "shift", "reliability_smooth"} <= names
    report = write_results_report(tmp_path / "out")[0].read_text()
    assert "## Deferral" in report and "## Shift" in report and "risk_coverage/" in report
    again = run_compare(
        CompareRequest(model="tiny-random", data=str(mini), grid=grid, context=context, out=tmp_path / "out")
    )
    assert again.computed == 0 and again.stats.encoded == 0
    # runs logged without --shift are run again when it is asked for
    plain = run_compare(
        CompareRequest(
            model="tiny-random",
            data=str(mini),
            grid=Grid(**{**grid.__dict__, "extras": DeferralShiftOptions()}),
            context=context,
            out=tmp_path / "p",
        )
    )
    assert plain.computed == 2 and read_shift(tmp_path / "p") == []
    shifted_now = run_compare(
        CompareRequest(model="tiny-random", data=str(mini), grid=grid, context=context, out=tmp_path / "p")
    )
    assert shifted_now.computed == 2 and len(read_shift(tmp_path / "p")) == len(shifted)


def _shift_line(corruption="jpeg", severity=1, accuracy="0.5", ece="0.1", seed=1):
    return f"tiny,synthetic,coop-ce,{seed},c1,{corruption},{severity},{accuracy},{ece},0.1,1.2,0.3\n"


def test_shift_rows_are_validated_when_read(tmp_path):
    from calbench.data.corruptions import CONDITIONS
    from calbench.errors import CalbenchWarning
    from calbench.results import SHIFT_COLUMNS

    lines = [
        _shift_line(),
        _shift_line(),  # the same run, corruption and severity again
        _shift_line(severity=2, accuracy="1e309"),
        _shift_line(severity=3, ece="nan"),
        _shift_line(severity=4, accuracy="-0.1"),
        _shift_line(corruption="snow"),
        _shift_line(severity=99),
        _shift_line(severity=0),
        _shift_line(severity=5),
    ]
    (tmp_path / "shift.csv").write_text(",".join(SHIFT_COLUMNS) + "\n" + "".join(lines))
    with pytest.warns(CalbenchWarning) as caught:
        rows = read_shift(tmp_path, CONDITIONS)
    assert [(r["corruption"], r["severity"]) for r in rows] == [("jpeg", 1), ("jpeg", 5)]
    reasons = [str(w.message).split("is damaged (")[1].split(");")[0] for w in caught]
    assert reasons == [
        "repeats line 2's run, corruption and severity",
        "accuracy '1e309' is not a finite number in [0, 1]",
        "ece 'nan' is not a finite number in [0, 1]",
        "accuracy '-0.1' is not a finite number in [0, 1]",
        "no corruption 'snow' at severity 1 is known",
        "no corruption 'jpeg' at severity 99 is known",
        "no corruption 'jpeg' at severity 0 is known",
    ]
    with pytest.warns(CalbenchWarning):  # the report reads it again
        report = write_results_report_of_shift(tmp_path)
    assert "snow" not in report and "severity 99" not in report


def write_results_report_of_shift(folder):
    """The report's shift section of ``folder``'s shift.csv for one logged coop-ce run."""
    from calbench.report.blocks import render_markdown
    from calbench.report.deferral import shift_blocks

    run = {"model": "tiny", "dataset": "synthetic", "method": "coop-ce", "seed": 1, "config": "c1", "status": "ok"}
    return render_markdown(shift_blocks([{**run, "accuracy": 0.6, "ece": 0.1}], {}, folder), folder)


def test_a_run_with_an_unknown_condition_in_place_of_a_known_one_is_not_done(tmp_path):
    from calbench.compare.deferral_shift import shift_done
    from calbench.results import SHIFT_COLUMNS, ResultsStore

    known = [(c, s) for c in CORRUPTIONS for s in SEVERITIES]
    lines = [_shift_line(c, s) for c, s in known[:-1]] + [_shift_line("snow", 1)]
    (tmp_path / "shift.csv").write_text(",".join(SHIFT_COLUMNS) + "\n" + "".join(lines))
    assert shift_done(ResultsStore(tmp_path)) == set()
    (tmp_path / "shift.csv").write_text(",".join(SHIFT_COLUMNS) + "\n" + "".join(_shift_line(c, s) for c, s in known))
    assert shift_done(ResultsStore(tmp_path)) == {("tiny", "synthetic", "coop-ce", "1", "c1")}
