"""The paper's published figures (``paper_results.yaml``, package data): its tables, rows, columns and datasets."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    pass


PAPER_RESULTS = "paper_results.yaml"
TABLES = ("table1", "table2", "table4", "table5")


@dataclass(frozen=True)
class Column:
    """One figure column: ``metric`` (acc, map, f1) on the fused prediction, or on the dataset's one modality of
    kind ``modality`` (audio, video, image, text); ``=NAME`` names a modality itself (datasets the paper never
    used)."""

    id: str
    label: str
    metric: str
    modality: str | None = None


@dataclass(frozen=True)
class PaperDataset:
    recipe: str
    cite: str
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class PaperRow:
    label: str  # the paper's name for the row (Ours-LB, h(0.05), CLIP+MLA)
    cite: str
    method: str  # a key of dmgl_cli.methods.METHODS
    strategy: str | None  # a StrategySpec key; None: the method's published strategy
    modality: str | None  # unimodal rows: the kind of the one modality trained
    figures: dict[str, dict[str, float]]  # dataset -> column id -> percent
    std: dict[str, dict[str, float]] = field(default_factory=dict)  # Table A1's std, where the paper gives one


@dataclass(frozen=True)
class PaperTable:
    name: str
    cite: str
    title: str
    datasets: dict[str, PaperDataset]
    rows: tuple[PaperRow, ...]

    def covers(self) -> str:
        """``kinetics-sounds (Table 4), crema-d (Table A3 ...)``."""
        return ", ".join(f"{name} ({d.cite})" for name, d in self.datasets.items())


def _load() -> dict[str, Any]:
    text = importlib.resources.files("dmgl_cli").joinpath(PAPER_RESULTS).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def paper_tables() -> dict[str, PaperTable]:
    """The paper's published figures, by table name (``table1``, ``table2``, ``table4``, ``table5``)."""
    tables = {}
    for name, raw in _load()["tables"].items():
        datasets = {
            dataset: PaperDataset(
                recipe=spec["recipe"],
                cite=spec["cite"],
                columns=tuple(Column(c["id"], c["label"], c["metric"], c.get("modality")) for c in spec["columns"]),
            )
            for dataset, spec in raw["datasets"].items()
        }
        rows = tuple(
            PaperRow(
                label=str(row["paper"]),
                cite=row["cite"],
                method=row["method"],
                strategy=None if row.get("strategy") is None else str(row["strategy"]),
                modality=row.get("modality"),
                figures={d: {c: float(v) for c, v in f.items()} for d, f in row.get("figures", {}).items()},
                std={d: {c: float(v) for c, v in f.items()} for d, f in (row.get("std") or {}).items()},
            )
            for row in raw["rows"]
        )
        tables[name] = PaperTable(name, raw["cite"], raw["title"], datasets, rows)
    return tables


def paper_datasets() -> list[str]:
    """The datasets that the tables dmgl reproduces report on (kinetics-sounds, crema-d, sarcasm, twitter2015)."""
    names: dict[str, None] = {}
    for table in paper_tables().values():
        names.update(dict.fromkeys(table.datasets))
    return list(names)
