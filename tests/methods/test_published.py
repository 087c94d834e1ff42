"""The one table of defaults (calbench/configs/published.yaml): every published value pinned to the
file and line of the published code it comes from, per-pair resolution, the trainer's step count,
and that no default number is written anywhere else in the library.

Line numbers are those of the snapshots named at the top of published.yaml:
iabh1shekbasu/CalibPrompt c6ec13e, nhussein/promptsmooth 222377a, KaiyangZhou/CoOp ff61507.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch
from training import train_prompt_learner
from typer.testing import CliRunner

from calbench import published
from calbench.baselines.coop import LOSS_METHODS
from calbench.calibprompt import RANGES as CALIBPROMPT_RANGES
from calbench.losses import Objective, Term
from calbench.methods import METHODS, list_methods, make_method, resolve
from calbench.train import TrainConfig, steps_per_epoch

CP = "iabh1shekbasu/CalibPrompt"
PLIP_CFG = "configs/trainers/CoOp/vit_b32_plip_c16_ep50_batch16.yaml"
QN_CFG = "configs/trainers/CoOp/vit_b32_quiltnet_c16_ep50_batch16.yaml"
MC_CFG = "configs/trainers/CoOp_MedCLIP/vit_b32_medclip_c16_ep50_batch16.yaml"
BM_CFG = "configs/trainers/CoOp_BioMedCLIP/vit_b32_biomedclip_c16_ep50_batch16.yaml"
LOSSES_PY = "trainers/classification/losses.py"
DASSL_DEFAULTS = "Dassl.pytorch/dassl/config/defaults.py"

#: (section, setting, value, "<repo> <path>:<line>") — the published line, read from the snapshot
DEFAULTS = [
    ("train", "epochs", 50, f"{CP} {PLIP_CFG}:18"),  # `  MAX_EPOCH: 50  #200`
    ("train", "batch_size", 16, f"{CP} {PLIP_CFG}:3"),  # `    BATCH_SIZE: 16`
    ("train", "lr", 0.002, f"{CP} {PLIP_CFG}:17"),  # `  LR: 0.002  # 0.0002 # 0.002`
    ("train", "momentum", 0.9, f"{CP} {DASSL_DEFAULTS}:154"),  # `_C.OPTIM.MOMENTUM = 0.9`
    ("train", "weight_decay", 5e-4, f"{CP} {DASSL_DEFAULTS}:153"),  # `_C.OPTIM.WEIGHT_DECAY = 5e-4`
    ("train", "warmup_epochs", 1, f"{CP} {PLIP_CFG}:20"),  # `  WARMUP_EPOCH: 1`
    ("train", "warmup_lr", 1e-5, f"{CP} {PLIP_CFG}:22"),  # `  WARMUP_CONS_LR: 1e-5`
    ("train", "n_ctx", 16, f"{CP} {PLIP_CFG}:33"),  # `    N_CTX: 16`
    ("train", "ctx_init", None, f"{CP} {PLIP_CFG}:34"),  # `    CTX_INIT: ""`
    ("train", "class_specific", False, f"{CP} train.py:93"),  # `cfg.TRAINER.COOP.CSC = False`
    ("train", "shots", 8, f"{CP} run/classification/fewshot/all_fewshot_plip.sh:10"),  # `SHOTS=8`
    ("calibprompt", "alpha", 0.05, f"{CP} {PLIP_CFG}:51"),  # `        ALPHA: 0.05  # Control smoothing ...`
    ("calibprompt", "w_smac", 1.0, f"{CP} {PLIP_CFG}:57"),  # `        WEIGHT: 1.0` under SMAC
    ("calibprompt", "w_as", 0.01, f"{CP} {PLIP_CFG}:55"),  # `        WEIGHT: 0.01` under AS
    ("coop-ls", "alpha", 0.05, f"{CP} {PLIP_CFG}:51"),
    ("coop-mbls", "margin", 10.0, f"{CP} {LOSSES_PY}:377"),  # `... MBLS.MARGIN if cfg is not None else 10.0`
    ("coop-mbls", "alpha", 0.1, f"{CP} {LOSSES_PY}:378"),  # `... MBLS.ALPHA if cfg is not None else 0.1`
    ("coop-focal", "gamma", 3.0, f"{CP} {PLIP_CFG}:48"),  # `        GAMMA: 3.0  # Control Focus`
    ("coop-mdca", "beta", 1.0, f"{CP} {PLIP_CFG}:45"),  # MDCA `        WEIGHT: 1.0`
    ("coop-dca", "beta", 1.0, f"{CP} {PLIP_CFG}:43"),  # DCA `        WEIGHT: 1.0  #15.0`
    ("coop-mmce", "weight", 2.0, f"{CP} {PLIP_CFG}:53"),  # MMCE `        WEIGHT: 2.0`
    ("coop-logitnorm", "temperature", 1.0, f"{CP} {LOSSES_PY}:412"),  # `... TEMPERATURE if cfg is not None else 1.0`
    ("coop-penalty", "weight", 1.0, f"{CP} {PLIP_CFG}:60"),  # ECCV_PENALTY `        WEIGHT: 1.0`
    ("coop-mmv", "alpha", 0.1, f"{CP} {LOSSES_PY}:429"),  # `    alpha = 0.1  # Fixed value ...`
    ("coop-mmv", "beta", 0.01, f"{CP} {LOSSES_PY}:430"),  # `    beta = 0.01  # Fixed value ...`
    ("coop-tmm", "weight", 5.0, f"{CP} {PLIP_CFG}:73"),  # TEXT_MOMENT_MATCHING `        WEIGHT: 5.0`
]

#: (model, dataset, alpha, its line, w_as, its line, w_SMAC line, published CE ECE, CalibPrompt ECE)
PAIRS = [
    ("plip", "kather", 0.05, "run/classification/fewshot/all_fewshot_plip.sh:51", 0.01, "run/classification/fewshot/all_fewshot_plip.sh:51", f"{PLIP_CFG}:57", 5.92, 3.11),
    ("plip", "pannuke", 0.2, "run/classification/fewshot/all_fewshot_plip.sh:52", 0.1, "run/classification/fewshot/all_fewshot_plip.sh:52", f"{PLIP_CFG}:57", 17.82, 2.19),
    ("plip", "digestpath", 0.03, "run/classification/fewshot/all_fewshot_plip.sh:53", 0.001, "run/classification/fewshot/all_fewshot_plip.sh:53", f"{PLIP_CFG}:57", 9.50, 3.08),
    ("quiltnet", "kather", 0.01, "run/classification/fewshot/all_fewshot_quiltnet.sh:51", 1.0, "run/classification/fewshot/all_fewshot_quiltnet.sh:51", f"{QN_CFG}:57", 2.49, 3.58),
    ("quiltnet", "pannuke", 0.1, "run/classification/fewshot/all_fewshot_quiltnet.sh:52", 0.001, "run/classification/fewshot/all_fewshot_quiltnet.sh:52", f"{QN_CFG}:57", 19.70, 2.47),
    ("quiltnet", "digestpath", 0.05, "run/classification/fewshot/all_fewshot_quiltnet.sh:53", 0.001, "run/classification/fewshot/all_fewshot_quiltnet.sh:53", f"{QN_CFG}:57", 11.27, 0.77),
    ("biomedclip", "covid", 0.1, f"{BM_CFG}:47", 3.0, f"{BM_CFG}:51", f"{BM_CFG}:53", 6.61, 4.69),
    ("biomedclip", "rsna18", 0.1, f"{BM_CFG}:47", 3.0, f"{BM_CFG}:51", f"{BM_CFG}:53", 7.02, 5.74),
    ("medclip", "covid", 0.2, f"{MC_CFG}:48", 1.0, f"{MC_CFG}:52", f"{MC_CFG}:54", 27.51, 27.41),
    ("medclip", "rsna18", 0.2, f"{MC_CFG}:48", 1.0, f"{MC_CFG}:52", f"{MC_CFG}:54", 17.21, 17.14),
]  # fmt: skip

#: (model, alpha, its line, w_as, its line, w_smac line): what the published code gives a dataset outside its
#: pairs. PLIP and QuiltNet: the `*)` case of the run script's per-dataset `case` (`*)  SMAC_ALPHA=0.2;
#: AS_WEIGHT=0.1 ;;` and `*)  SMAC_ALPHA=0.01; AS_WEIGHT=1.0 ;;`, line 54 of each); BiomedCLIP and MedCLIP:
#: their run scripts pass no per-dataset options, so the CoOp config's LS ALPHA / AS WEIGHT / SMAC WEIGHT
FALLBACKS = [
    ("plip", 0.2, "run/classification/fewshot/all_fewshot_plip.sh:54", 0.1, "run/classification/fewshot/all_fewshot_plip.sh:54", f"{PLIP_CFG}:57"),
    ("quiltnet", 0.01, "run/classification/fewshot/all_fewshot_quiltnet.sh:54", 1.0, "run/classification/fewshot/all_fewshot_quiltnet.sh:54", f"{QN_CFG}:57"),
    ("biomedclip", 0.1, f"{BM_CFG}:47", 3.0, f"{BM_CFG}:51", f"{BM_CFG}:53"),
    ("medclip", 0.2, f"{MC_CFG}:48", 1.0, f"{MC_CFG}:52", f"{MC_CFG}:54"),
]  # fmt: skip

#: the published zero-shot template per dataset: trainers/classification/zsclip.py, CUSTOM_TEMPLATES
TEMPLATES = [
    ("kather", "An H&E image of {}.", 41),
    ("pannuke", "An H&E image patch of {} skin tissue.", 38),
    ("digestpath", "An H&E image patch of {} tissue.", 37),
    ("covid", "A chest X-ray image of {} patient", 39),
    ("rsna18", "A chest X-ray image of {} patient", 40),
]


@pytest.mark.parametrize(("section", "name", "value", "source"), DEFAULTS)
def test_each_default_is_the_published_value_at_its_line(section, name, value, source):
    entry = published.setting(section, name)
    assert entry.value == value
    assert entry.source.split(" — ")[0] == source


@pytest.mark.parametrize(("model", "dataset", "alpha", "a_at", "w_as", "w_at", "smac_at", "ce", "cp"), PAIRS)
def test_each_pair_row_is_the_published_setting_and_number(model, dataset, alpha, a_at, w_as, w_at, smac_at, ce, cp):
    row = published.pair(model, dataset)
    assert row is not None
    assert (row.settings["alpha"].value, row.settings["w_as"].value, row.settings["w_smac"].value) == (alpha, w_as, 1.0)
    assert row.settings["alpha"].source == f"{CP} {a_at}"
    assert row.settings["w_as"].source == f"{CP} {w_at}"
    assert row.settings["w_smac"].source == f"{CP} {smac_at}"
    # CalibPrompt's README.md: the CE and CalibPrompt rows of its two results tables
    assert row.published_ece == {"coop-ce": ce, "calibprompt": cp}
    assert row.ece_source.startswith(f"{CP} README.md:233-234" if "clip" not in model else f"{CP} README.md:238-239")


def test_there_are_exactly_the_ten_published_pairs():
    assert {(r.model, r.dataset) for r in published.pairs()} == {(p[0], p[1]) for p in PAIRS}


@pytest.mark.parametrize(("model", "alpha", "a_at", "w_as", "w_at", "smac_at"), FALLBACKS)
def test_each_model_falls_back_to_its_published_setting_outside_the_pairs(model, alpha, a_at, w_as, w_at, smac_at):
    entry = published.fallback(model)
    assert {k: (e.value, e.source.split(" — ")[0]) for k, e in entry.items()} == {
        "alpha": (alpha, f"{CP} {a_at}"),
        "w_as": (w_as, f"{CP} {w_at}"),
        "w_smac": (1.0, f"{CP} {smac_at}"),
    }
    for dataset in ("pneumoniamnist", "/data/my_folder"):  # MedMNIST, a user's folder
        assert resolve("calibprompt", model, dataset).params == {
            "alpha": alpha,
            "w_as": w_as,
            **({"warmup_lr": 1e-3} if model == "medclip" else {}),
        }
        assert resolve("coop-ls", model, dataset).params.get("alpha") == alpha
    assert resolve("coop-mmce", model, "pneumoniamnist").params in ({}, {"warmup_lr": 1e-3})  # takes none of it


def test_variants_take_their_models_fallback_and_the_demo_model_calbenchs_own():
    assert resolve("calibprompt", "biomedclip-published", "pneumoniamnist").params == {"alpha": 0.1, "w_as": 3.0}
    assert resolve("ls+as", "medclip-masked", "chestmnist").params == {"alpha": 0.2, "w_as": 1.0, "warmup_lr": 1e-3}
    assert resolve("calibprompt", "biomedclip", "covid").params == {"alpha": 0.1, "w_as": 3.0}  # the pair's own row
    demo = resolve("calibprompt", "tiny", "synthetic").settings
    assert {k: demo[k].value for k in ("alpha", "w_as", "w_smac")} == {"alpha": 0.05, "w_as": 0.01, "w_smac": 1.0}
    assert all(demo[k].source.startswith("calbench: the demo model") for k in ("alpha", "w_as", "w_smac"))


def test_methods_command_shows_the_published_fallback(monkeypatch):
    from calbench.cli import common
    from calbench.cli.app import app

    monkeypatch.setattr(common.console, "width", 400)
    out = CliRunner().invoke(app, ["methods", "--model", "biomedclip", "--data", "pneumoniamnist"])
    assert out.exit_code == 0, out.output
    row = next(line for line in out.output.splitlines() if line.startswith("│ calibprompt "))
    assert "alpha 0.1, w_smac 1, w_as 3" in row
    sources = [line for line in out.output.splitlines() if "│ calibprompt " in line and "│ w_as " in line]
    assert "vit_b32_biomedclip_c16_ep50_batch16.yaml:51" in sources[0] and "│ 3 " in sources[0]
    assert "biomedclip · any other dataset" in out.output


@pytest.mark.parametrize(("dataset", "template", "line"), TEMPLATES)
def test_templates_are_the_published_zero_shot_prompts(dataset, template, line):
    from calbench.data.prepare import OFFICIAL

    entry = published.template(dataset)
    assert (entry.value, entry.source) == (template, f"{CP} trainers/classification/zsclip.py:{line}")
    assert OFFICIAL[dataset].template == template  # the prepared folders get it from the table


def test_medclip_takes_its_published_warmup_lr():
    # `  WARMUP_CONS_LR: 1e-3` in CalibPrompt's MedCLIP config, where PLIP's has 1e-5
    entry = published.model_overrides("medclip")["warmup_lr"]
    assert (entry.value, entry.source) == (1e-3, f"{CP} {MC_CFG}:22")
    assert resolve("coop-ce", "medclip", "covid").build().config.warmup_lr == 1e-3
    assert resolve("coop-ce", "medclip-masked", "covid").build().config.warmup_lr == 1e-3  # a variant: its model's
    assert resolve("coop-ce", "plip", "kather").build().config.warmup_lr == 1e-5
    assert resolve("zero-shot", "medclip", "covid").params == {}  # nothing to train, nothing to warm up


def test_every_entry_names_a_source_and_every_citation_a_published_repository():
    repos = {"iabh1shekbasu/CalibPrompt", "nhussein/promptsmooth", "KaiyangZhou/CoOp"}
    entries = [e for s in published.sections() for e in published.section(s).values()]
    entries += [e for r in published.pairs() for e in r.settings.values()]
    models = ("plip", "quiltnet", "quiltnet-b16", "biomedclip", "medclip", "tiny")
    entries += [e for m in models for e in published.model_overrides(m).values()]
    entries += [e for m in models for e in {**published.fallback(m), **published.architecture(m)}.values()]
    for entry in entries:
        assert entry.ours or entry.citation is not None or entry.source.startswith(("Basu", "Hussein")), entry
        if entry.citation is not None:
            assert entry.citation[0] in repos, entry


def test_every_method_parameter_has_its_default_in_the_table():
    for name, spec in LOSS_METHODS.items():
        assert set(spec.params) == set(published.section(name)), name
    assert set(CALIBPROMPT_RANGES) == set(published.section("calibprompt"))
    for name in list_methods():
        make_method(name)  # builds from the table alone


def test_the_generic_calibprompt_is_the_plip_kather_row():
    built = make_method("calibprompt")
    terms = built.objective.terms
    assert (terms["ls"].kwargs["alpha"], terms["smac"].kwargs["alpha"], terms["as"].weight) == (0.05, 0.05, 0.01)
    assert built.config == TrainConfig()


def test_per_pair_defaults_reach_calibprompt_its_ablations_and_coop_ls():
    assert resolve("calibprompt", "plip", "pannuke").params == {"alpha": 0.2, "w_as": 0.1}
    assert resolve("coop-ls+ts", "quiltnet", "kather").params == {"alpha": 0.01}
    assert resolve("ls+as", "biomedclip", "covid").params == {"alpha": 0.1, "w_as": 3.0}
    assert resolve("coop-mmce", "plip", "pannuke").params == {}  # not a CalibPrompt setting
    assert resolve("calibprompt", "tiny", "synthetic").params == {}  # no published row: generic defaults
    # a dataset given as a folder is looked up by its name, in every command
    assert resolve("calibprompt", "plip", "/some/folder/pannuke").params == {"alpha": 0.2, "w_as": 0.1}
    # --params wins over the published row, and says so
    chosen = resolve("calibprompt", "plip", "pannuke", {"alpha": 0.3})
    assert chosen.params == {"alpha": 0.3, "w_as": 0.1}
    assert chosen.sources["alpha"] == "--params" and chosen.sources["w_as"].endswith("all_fewshot_plip.sh:52")
    # the resolved values are in the run's config hash: another pair's setting is another config
    sig = {p: resolve("calibprompt", *p).config_hash() for p in PAIRS_KEYS}
    assert sig[("plip", "kather")] != sig[("plip", "pannuke")]
    assert sig[("plip", "kather")] == resolve("calibprompt").config_hash()
    # spelling out a default is the same config; changing it is another
    assert resolve("calibprompt", overrides={"alpha": 0.05}).config_hash() == resolve("calibprompt").config_hash()
    assert resolve("calibprompt", overrides={"epochs": 3}).config_hash() != resolve("calibprompt").config_hash()


def test_every_method_declares_its_parameters_and_whether_it_learns_a_prompt_without_being_built():
    for name in list_methods():
        spec = METHODS.get(name)
        own = set(published.section(name))
        assert set(spec.params) <= own, name  # each declared parameter has its default in the table
        # the rest of its section are the trainer's options, set otherwise for this method (PromptSmooth's n_ctx)
        assert own - set(spec.params) <= (set(published.section("train")) if spec.learns_prompt else set()), name
        assert spec.learns_prompt == make_method(name).capabilities.learns_prompt, name
        trainer = set(published.section("train")) if spec.learns_prompt else set()
        assert set(spec.defaults()) == set(published.section(name)) | trainer, name


PAIRS_KEYS = [("plip", "kather"), ("plip", "pannuke")]


@pytest.mark.parametrize(("n", "batch", "steps"), [(72, 16, 4), (24, 16, 1), (16, 16, 1), (8, 16, 1), (48, 16, 3)])
def test_steps_per_epoch_drop_the_last_incomplete_batch(n, batch, steps):
    """Dassl.pytorch/dassl/data/data_manager.py:43, `drop_last=is_train and len(data_source) >= batch_size`:
    Kather at 8 shots (9 classes, 72 images) takes 4 steps, RSNA18 (3 classes, 24) 1 step."""
    assert steps_per_epoch(n, batch) == steps


class _Counting(Objective):
    """Cross-entropy that records each batch's size."""

    def __init__(self) -> None:
        super().__init__({"ce": Term("cross_entropy")})
        object.__setattr__(self, "sizes", [])

    def __call__(self, **inputs):
        self.sizes.append(int(inputs["labels"].shape[0]))
        return super().__call__(**inputs)


@pytest.mark.parametrize(("n", "sizes"), [(72, [16, 16, 16, 16]), (24, [16]), (8, [8])])
def test_the_trainer_takes_full_batches_only(tiny, n, sizes):
    from calbench.prompts import PromptLearner

    learner = PromptLearner(tiny, ["a", "b", "c"], n_ctx=2, seed=0)
    objective = _Counting()
    features = torch.nn.functional.normalize(torch.randn(1, n, tiny.embed_dim), dim=-1)
    train_prompt_learner(learner, objective, features, torch.arange(n) % 3, TrainConfig(epochs=2), seed=1)
    assert objective.sizes == sizes * 2


LIBRARY = [Path("calbench"), Path("baselines"), Path("cli")]
#: literal default numbers, and the names next to which a count is a default
DEFAULT_NUMBERS = {0.05, 0.01}
#: ... on a line that sets a method parameter or a training option (elsewhere, e.g. a corruption
#: severity or a 90% interval, 0.05 is not a method default)
PARAMETER_NAMES = r"\b(alpha|w_as|w_smac|beta|weight|gamma|margin|temperature|lr|sigma)\b"
DEFAULT_COUNTS = {"n_ctx": 16, "shots": 8, "views": 10}
#: places where such a number is not a method default, and why
NOT_DEFAULTS = {
    ("calbench/tune/space.py", "log_range(0.01, 1.0)"): "a search-range bound of MbLS's alpha",
    ("calbench/tune/space.py", "log_range(5e-4, 1e-2)"): "a search-range bound of the learning rate",
    ("calbench/deferral/__init__.py", "target_error"): "the selective-prediction target error, a metric setting",
    ("calbench/report/deferral.py", "beta.ppf([0.05, 0.95]"): "the 5% and 95% quantiles of a 90% interval",
    ("calbench/tune/space.py", "one_of(4, 8, 16, 32)"): "the n_ctx values a search tries",
    ("calbench/tune/space.py", "one_of(2, 5, 8, 16)"): "the n_ctx values a search tries",
}
#: modules that draw the demo world (textures, stains), not method settings
WORLD = ("calbench/data/synthetic.py",)


def test_no_default_number_is_written_outside_the_table():
    root = Path(__file__).resolve().parents[2]
    found = []
    for folder in LIBRARY:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel in WORLD:
                continue
            text = path.read_text(encoding="utf-8")
            lines = text.splitlines()
            for tok in tokenize.generate_tokens(io.StringIO(text).readline):
                if tok.type != tokenize.NUMBER:
                    continue
                line = lines[tok.start[0] - 1]
                if any(rel == f and snippet in line for f, snippet in NOT_DEFAULTS):
                    continue
                value = ast.literal_eval(tok.string)
                count = any(re.search(rf"\b{name}\b", line) and value == n for name, n in DEFAULT_COUNTS.items())
                number = value in DEFAULT_NUMBERS and re.search(PARAMETER_NAMES, line)
                if number or count:
                    found.append(f"{rel}:{tok.start[0]}: {line.strip()}")
    assert not found, "default numbers outside calbench/configs/published.yaml:\n" + "\n".join(found)


def test_methods_command_prints_defaults_with_their_sources(monkeypatch):
    from calbench.cli import common
    from calbench.cli.app import app

    monkeypatch.setattr(common.console, "width", 400)  # one line per row, whole sources
    out = CliRunner().invoke(app, ["methods", "--model", "medclip", "--data", "rsna18"])
    assert out.exit_code == 0, out.output
    assert "vit_b32_medclip_c16_ep50_batch16.yaml:22" in out.output  # MedCLIP's warm-up lr
    assert "vit_b32_medclip_c16_ep50_batch16.yaml:48" in out.output  # its alpha
    assert "published per-pair settings" in out.output and "27.51" in out.output


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        ("plp", "pannuke", "unknown model 'plp'; choose one of: "),
        ("plip", "pannuk", "unknown dataset 'pannuk'; choose one of: "),
    ],
)
def test_methods_command_refuses_an_unknown_model_or_dataset(model, data, message):
    from calbench.cli.app import app

    out = CliRunner().invoke(app, ["methods", "--model", model, "--data", data])
    assert out.exit_code == 2 and out.output.startswith(f"error: {message}") and "Traceback" not in out.output
    assert "published per-pair settings" not in out.output


def test_report_shows_the_settings_each_pair_ran_with(tmp_path):
    from calbench.report.blocks import Table
    from calbench.report.results import build_blocks
    from calbench.results import ResultsStore

    store = ResultsStore(tmp_path)
    runs = (
        (("plip", "pannuke"), "c1"),
        (("medclip", "covid"), "c2"),
        (("biomedclip", "rsna18"), "c3"),
        (("biomedclip-published", "rsna18"), "c4"),
        (("quiltnet", "kather"), "c5"),
    )
    for pair, config in runs:
        row = {"model": pair[0], "dataset": pair[1], "method": "calibprompt", "seed": 1, "config": config}
        metrics = {"accuracy": 0.5, "ece": 0.1, "nll": 1.0, "brier": 0.5, "status": "ok", "error": ""}
        store.put({**row, **metrics})
        settings = resolve("calibprompt", *pair).settings
        store.put_settings({config: {**row, "settings": {k: (s.value, s.source) for k, s in settings.items()}}})
    tables = [b for b in build_blocks(tmp_path) if isinstance(b, Table)]
    text = "\n".join(" | ".join(map(str, r)) for t in tables for r in t.rows)
    assert "alpha 0.2 (all_fewshot_plip.sh:52)" in text
    assert "warmup_lr 0.001 (vit_b32_medclip_c16_ep50_batch16.yaml:22)" in text
    assert "alpha 0.2, w_as 0.1, w_smac 1 (published)" in text  # next to the published numbers
    # "(published)" only where the model runs as the published code runs it: not BiomedCLIP embedding its
    # prompt tokens once; its published-embedding variant and QuiltNet (QuickGELU) do
    rows = {r[0]: r[-1] for t in tables for r in t.rows if len(r) == 6}
    assert rows["biomedclip · rsna18"] == (
        "alpha 0.1, w_as 3, w_smac 1 (published setting; prompt tokens embedded once; the published learner "
        "embeds them twice (biomedclip-published))"
    )
    assert rows["biomedclip-published · rsna18"].endswith("w_smac 1 (published)")
    assert rows["quiltnet · kather"].endswith("w_smac 1 (published)")


def test_the_methods_page_table_matches_the_table():
    page = (Path(__file__).resolve().parents[2] / "docs" / "methods.md").read_text(encoding="utf-8")
    section = page[page.index("## Methods and their defaults") : page.index("## Where calbench knowingly differs")]
    rows = re.findall(r"^\| `([^`]+)` \| [^|]+ \|([^|]*)\|$", section, flags=re.M)
    assert {name for name, _ in rows} == {*LOSS_METHODS, "calibprompt", "zero-shot"}
    for name, cell in rows:
        stated = dict(item.strip().split(" ") for item in cell.split(",") if item.strip())
        table = {k: f"{e.value:g}" for k, e in published.section(name).items()}
        assert stated == table, name
