"""How a results folder names what it holds: datasets that share a name, and diagram files.

``compare`` draws its figures under these names and the report reads them back, so both take
them from here.
"""

from __future__ import annotations

from collections.abc import Sequence

from calbench.results.store import Row


def dataset_labels(rows: Sequence[Row]) -> dict[tuple[str, str], str]:
    """How the report and the diagrams name each (dataset, dataset_id): the plain name, unless another
    dataset in the same results shares it; then the name and its identity, e.g. "data (a1b2c3)".
    """
    found: dict[str, set[str]] = {}
    for r in rows:
        found.setdefault(str(r["dataset"]), set()).add(str(r.get("dataset_id") or ""))
    labels = {}
    for name, ids in found.items():
        unique = len(ids - {""}) <= 1
        labels.update({(name, i): name if unique else f"{name} ({i or 'unknown'})" for i in ids})
    return labels


def diagram_stem(model: str, dataset_label: str, method: str) -> str:
    """File stem of a reliability diagram, e.g. tiny_synthetic_coop-ce_ts; an identity as data-a1b2c3."""
    tag = dataset_label.replace(" (", "-").replace(")", "")
    return f"{model}_{tag}_{method.replace('+', '_')}"
