"""The one table of defaults: every method's default settings with where each comes from,
and the published per-(model, dataset) settings and numbers (``configs/published.yaml``).

The table is data, as open_clip's model configs are: a reader checks a number against its
source without reading code, and a change of default is one line in one file. Each entry has
a ``value`` and a ``source``: ``"<owner>/<repo> <path>:<line>"`` (optionally followed by
``" — "`` and a note) for a value read from published code, ``"<paper>"`` for a value
stated in a paper, or ``"calbench: <why>"`` for a value of our own.

Resolution (:func:`resolve`): a method's section, then the model's training overrides
(MedCLIP's warm-up lr), then the pair's published row for the methods that row names (on a
dataset outside the published pairs, the model's published fallback); a user's ``--params``
go on top of that (in :mod:`calbench.methods`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Optional

import yaml

TABLE = Path(__file__).parent / "configs" / "published.yaml"
#: the sections of the table that are not a method's: the trainer, few-shot sampling, certification
SHARED_SECTIONS = ("train", "fewshot", "certify")


@dataclass(frozen=True)
class Setting:
    """A default and where it comes from."""

    value: Any
    source: str

    @property
    def ours(self) -> bool:
        """Whether calbench chose the value (not a published config, script or paper)."""
        return self.source.startswith("calbench")

    @property
    def citation(self) -> Optional[tuple[str, str, int]]:
        """(repository, path, line) of a value read from published code, else None."""
        head = self.source.split(" — ")[0].strip()
        repo, _, place = head.partition(" ")
        path, _, line = place.rpartition(":")
        if "/" not in repo or not path or not line.isdigit():
            return None
        return repo, path, int(line)


@dataclass(frozen=True)
class PairRow:
    """What the published runs used and reported on one (model, dataset) pair."""

    model: str
    dataset: str
    settings: Mapping[str, Setting]  # CalibPrompt's alpha / w_as / w_smac on this pair
    methods: tuple[str, ...]  # the methods that take ``settings`` (where they have the parameter)
    published_ece: Mapping[str, float]  # method id -> ECE (%) reported
    ece_source: str


@cache
def _table() -> dict[str, Any]:
    with TABLE.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _settings(entries: Mapping[str, Any], where: str) -> dict[str, Setting]:
    out = {}
    for name, entry in entries.items():
        if not isinstance(entry, Mapping) or set(entry) != {"value", "source"}:
            raise ValueError(f"{TABLE.name}: {where}.{name} must have exactly a value and a source")
        value = tuple(entry["value"]) if isinstance(entry["value"], list) else entry["value"]
        out[str(name)] = Setting(value, str(entry["source"]))
    return out


def sections() -> list[str]:
    """Every section of defaults: the shared ones and one per method."""
    return list(_table()["defaults"])


def section(name: str) -> dict[str, Setting]:
    """The defaults of one section (a method id, or ``train``, ``fewshot``, ``certify``); empty if none."""
    return _settings(_table()["defaults"].get(name) or {}, name)


def setting(section_name: str, name: str) -> Setting:
    entries = section(section_name)
    if name not in entries:
        raise KeyError(f"{TABLE.name} has no default {section_name}.{name}")
    return entries[name]


def default(section_name: str, name: str) -> Any:
    """The default value of ``name`` in ``section_name`` (the one place a default number lives)."""
    return setting(section_name, name).value


def _model_part(model: Optional[str], part: str) -> dict[str, Setting]:
    models = _table().get("models") or {}
    return _settings((models.get(model) or {}).get(part) or {}, f"models.{model}.{part}") if model else {}


def model_overrides(model: Optional[str]) -> dict[str, Setting]:
    """Training options the published runs set differently for ``model`` (e.g. MedCLIP's warm-up lr)."""
    return _model_part(model, "train")


def fallback(model: Optional[str]) -> dict[str, Setting]:
    """CalibPrompt's alpha / w_as / w_smac that the published code gives ``model`` on a dataset it was
    not tuned on (a run script's ``*)`` case, or the model's config where the script sets none); empty
    for a model without one, which then takes the generic setting."""
    return _model_part(model, "fallback")


def architecture(model: Optional[str]) -> dict[str, Setting]:
    """Architecture settings the published runs used for ``model`` that its weights' own config may
    not say (QuiltNet's QuickGELU)."""
    return _model_part(model, "architecture")


def pair(model: Optional[str], dataset: Optional[str]) -> Optional[PairRow]:
    """The published row of (model, dataset), or None where the papers ran no such pair."""
    rows = _table().get("pairs") or {}
    row = rows.get(f"{model}/{dataset}")
    if row is None:
        return None
    where = f"pairs.{model}/{dataset}"
    return PairRow(
        model=str(model),
        dataset=str(dataset),
        settings=_settings(row["calibprompt"], where + ".calibprompt"),
        methods=tuple(_table()["pair_methods"]),
        published_ece=dict(row["published_ece"]["value"]),
        ece_source=str(row["published_ece"]["source"]),
    )


def template(dataset: str) -> Setting:
    """The published hand prompt of a paper dataset (``{}`` is the class name)."""
    entry = (_table().get("datasets") or {}).get(dataset)
    if entry is None:
        raise KeyError(f"{TABLE.name} has no template for dataset {dataset!r}")
    return _settings(entry, f"datasets.{dataset}")["template"]


def pairs() -> list[PairRow]:
    rows = []
    for key in _table().get("pairs") or {}:
        model, _, dataset = key.partition("/")
        found = pair(model, dataset)
        assert found is not None
        rows.append(found)
    return rows


def resolve(
    method: str, model: Optional[str] = None, dataset: Optional[str] = None, trains: bool = True
) -> dict[str, Setting]:
    """Every default of ``method`` on (model, dataset): the method's own, then (for a method that
    ``trains`` a prompt) the model's training overrides, then the pair's published setting where
    ``method`` takes it, or, on a dataset outside the published pairs, the model's published
    :func:`fallback`. Training options (``train`` section) are included only where the model or
    the method changes them."""
    own = section(method)
    out = {**own, **(model_overrides(model) if trains else {})}
    row = pair(model, dataset)
    taken = row.settings if row is not None else fallback(model) if dataset is not None else {}
    if method in _table()["pair_methods"]:
        out.update({name: value for name, value in taken.items() if name in own})
    return out
