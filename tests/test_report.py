"""`dmgl report`: tables recomputed from the runs' own metrics, marks in the right cells, figures, bad input,
and golden files for every table format (regenerate with DMGL_UPDATE_GOLDEN=1 after an intended change)."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from dmgl_cli.cli import cli
from dmgl_cli.report import SeedRun, attach_notes, build_tables, render
from dmgl_cli.strategies import parse_strategies, parse_strategy, spec_from_params
from dmgl_cli.tracking import Tracker

GOLDEN = Path(__file__).parent / "golden"
SWEEP_STRATEGIES = ["constant:0", "constant:0.5", "lb"]


# ------------------------------------------------------------------------- a real sweep to report on


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """A registry holding `dmgl sweep --strategies constant:0,constant:0.5,lb --seeds 2` on synthetic data."""
    home = tmp_path_factory.mktemp("report") / "registry"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DMGL_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        runner = CliRunner()
        for args in (
            ["prepare", "synthetic", "-o", "samples=600", "--silent"],
            [
                "sweep",
                "--study",
                "rep",
                "--strategies",
                ",".join(SWEEP_STRATEGIES),
                "--seeds",
                "2",
                "--set",
                "train.epochs=2",
                "--set",
                "train.batch_size=64",
                "--silent",
            ],
        ):
            result = runner.invoke(cli, args)
            assert result.exit_code == 0, result.output
    return home


@pytest.fixture
def report_cli(swept, monkeypatch):
    monkeypatch.setenv("DMGL_HOME", str(swept))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner = CliRunner()

    def invoke(*args: str, expect: int = 0):
        result = runner.invoke(cli, ["report", *map(str, args)])
        assert result.exit_code == expect, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
        return result

    return invoke


def _seed_runs_by_strategy() -> dict[str, list]:
    tracker = Tracker()
    runs = tracker.find_runs(list(tracker.experiments()), "tags.`dmgl.role` = 'seed' and tags.`dmgl.sweep` = 'rep'")
    grouped: dict[str, list] = {}
    for run in runs:
        grouped.setdefault(spec_from_params(run.params).key, []).append(run)
    return grouped


def _mean_std(runs, key: str) -> tuple[float, float]:
    values = [r.metrics[key] for r in runs]
    return statistics.mean(values), statistics.stdev(values)


def test_strategies_table_equals_mean_and_std_recomputed_from_the_runs(report_cli, swept):
    data = json.loads(report_cli("--sweep", "rep", "--table", "strategies", "--format", "json").stdout)
    (table,) = data["tables"]
    assert table["dataset"] == "synthetic" and table["columns"] == ["0", "0.5", "LB"]
    grouped = _seed_runs_by_strategy()
    assert sorted(grouped) == sorted(SWEEP_STRATEGIES) and all(len(r) == 2 for r in grouped.values())
    rows = {row["stub"][0]: row["cells"] for row in table["rows"]}
    assert list(rows) == ["Multi", "fast", "slow", "Gap"]
    for row, key in (
        ("Multi", "final_test_acc"),
        ("fast", "final_test_acc_fast"),
        ("slow", "final_test_acc_slow"),
        ("Gap", "final_test_gap_acc"),
    ):
        for cell, strategy in zip(rows[row], SWEEP_STRATEGIES, strict=True):
            mean, std = _mean_std(grouped[strategy], key)
            assert cell["n"] == 2
            assert math.isclose(cell["mean"], mean, rel_tol=1e-12, abs_tol=1e-15)
            assert math.isclose(cell["std"], std, rel_tol=1e-12, abs_tol=1e-15)
            assert sorted(cell["runs"]) == sorted(r.run_id for r in grouped[strategy])


def test_main_latex_marks_best_bold_and_second_underlined(report_cli, swept):
    text = report_cli("--sweep", "rep", "--format", "latex").stdout
    assert r"\toprule" in text and r"\multicolumn{2}{c}{synthetic}" in text
    grouped = _seed_runs_by_strategy()
    labels = {"constant:0": "concat (const 0)", "constant:0.5": "concat (const 0.5)", "lb": "concat (LB)"}
    lines = {
        label: next(line for line in text.splitlines() if line.strip().startswith(label + " &"))
        for label in labels.values()
    }
    for column, key in enumerate(("final_test_acc", "final_test_map")):
        shown = {s: _mean_std(grouped[s], key) for s in SWEEP_STRATEGIES}
        ranked = sorted({round(100 * m, 2) for m, _ in shown.values()}, reverse=True)
        for strategy, (mean, std) in shown.items():
            cell = lines[labels[strategy]].split(" & ")[1 + column].rstrip(" \\")
            body = f"{100 * mean:.2f}\\% {{\\scriptsize $\\pm$ {100 * std:.2f}\\%}}"
            rank = ranked.index(round(100 * mean, 2))
            expected = {0: rf"\textbf{{{body}}}", 1: rf"\underline{{{body}}}"}.get(rank, body)
            assert cell == expected, (strategy, key, cell, expected)


def test_ablation_and_runs_tables(report_cli, swept):
    ablation = report_cli("--sweep", "rep", "--table", "ablation").stdout
    rows = [line.split() for line in ablation.splitlines() if line.startswith(("×", "✓"))]
    assert [row[:3] for row in rows] == [["×", "×", "const"], ["✓", "×", "const"], ["✓", "✓", "LB"]]
    runs = report_cli("--sweep", "rep", "--table", "runs", "--format", "csv").stdout.splitlines()
    assert runs[0].startswith("table,dataset,method,row,")
    assert len({line.split(",")[3] for line in runs[1:]}) == 6  # 3 strategies x 2 seeds


def test_plots_are_written_and_not_blank(report_cli, swept, tmp_path):
    import matplotlib.image

    result = report_cli("--sweep", "rep", "--plot", "alpha,gap", "--plot", "curves", "--out", tmp_path / "figs")
    files = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert files == ["alpha.png", "curves-synthetic.png", "gap-synthetic.png"]
    assert result.stdout == ""  # only figures were asked for
    for name in files:
        path = tmp_path / "figs" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 300 and pixels.std() > 0.05  # drawn, not an empty canvas


def test_no_matching_run_says_what_was_searched(report_cli, swept):
    result = report_cli("--dataset", "nope", "--sweep", "rep", expect=1)
    assert "no seed runs match" in result.output
    assert "dataset nope" in result.output and "sweep 'rep'" in result.output and "mlflow.db" in result.output
    assert "no MLflow experiment named 'ghost'" in report_cli("--experiment", "ghost", expect=1).output
    assert "MLflow could not search runs" in report_cli("--filter", "params.x ==== 'y'", expect=1).output


def test_unknown_table_format_and_plot(report_cli):
    assert "Invalid value for '--table'" in report_cli("--table", "pivot", expect=2).output
    assert "Invalid value for '--format'" in report_cli("--format", "xlsx", expect=2).output
    assert "unknown plot heat" in report_cli("--plot", "heat", expect=1).output


def test_missing_metrics_print_a_dash_and_warn_naming_the_run(run_cli, registry):
    tracker = Tracker()
    experiment = tracker.experiment_id("handmade")
    made = {}
    for spec, seed, metrics in [
        ("lb", 0, {"final_test_acc": 0.8, "final_test_map": 0.7, "final_val_acc": 0.8}),
        ("lb", 1, {"final_test_acc": 0.6, "final_val_acc": 0.6}),  # no MAP recorded
        ("heuristic", 0, {"final_test_acc": 0.5, "final_val_acc": 0.5}),  # no MAP at all
    ]:
        run_id = tracker.start_run(
            experiment,
            f"{spec}-{seed}",
            {
                "dmgl.role": "seed",
                "dmgl.dataset": "toy",
                "dmgl.method": "concat",
                "dmgl.strategy": spec,
                "dmgl.seed": str(seed),
            },
        )
        tracker.log_params(run_id, {"strategy.name": spec, "train.seed": seed, "train.select_metric": "acc"})
        tracker.log_metrics(run_id, metrics)
        tracker.end_run(run_id, "FINISHED")
        made[(spec, seed)] = run_id
    result = run_cli("report", "--format", "json")
    data = json.loads(result.stdout)
    rows = {row["stub"][0]: row["cells"] for row in data["tables"][0]["rows"]}
    assert rows["concat (heuristic)"][1]["mean"] is None
    assert rows["concat (LB)"][0]["mean"] == pytest.approx(0.7) and rows["concat (LB)"][0]["n"] == 2
    assert rows["concat (LB)"][1] == {"mean": 0.7, "std": None, "n": 1, "mark": None, "runs": [made[("lb", 0)]]}
    assert any(made[("lb", 1)] in w and "final_test_map" in w for w in data["warnings"])
    text = run_cli("report").output
    heuristic_line = next(line for line in text.splitlines() if line.startswith("concat (heuristic)"))
    assert heuristic_line.split()[-1] == "-"
    assert f"warning: run {made[('heuristic', 0)]}" in text


# ------------------------------------------------------------------------------------- golden files


def _golden_runs() -> list[SeedRun]:
    """Two datasets (audio-video and text-image), two methods, five strategies, three seeds; one seed lacks a
    metric, one group has two configurations, and one method has no run on one dataset."""
    runs = []
    strategies = {
        "constant:0": ("constant", "0.0"),
        "constant:0.5": ("constant", "0.5"),
        "stepwise:0.05": ("stepwise", "0.05"),
        "heuristic": ("heuristic", None),
        "lb": ("lb", None),
    }
    datasets = {"crema-d": ("audio", "video"), "sarcasm": ("image", "text")}
    for d_index, (dataset, modalities) in enumerate(datasets.items()):
        for s_index, (key, (name, value)) in enumerate(strategies.items()):
            for method in ("concat", "mla"):
                if method == "mla" and (key != "constant:0" or dataset == "sarcasm"):
                    continue
                for lr in ("0.01", "0.05") if key == "lb" and dataset == "crema-d" else ("0.01",):
                    for seed in range(3):
                        base = 0.40 + 0.07 * s_index + 0.03 * d_index + (0.05 if method == "mla" else 0.0)
                        base -= 0.10 if lr == "0.05" else 0.0
                        wiggle = (seed - 1) * 0.011 * (1 + s_index % 3)
                        metrics = {"final_best_epoch": 3.0 + seed}
                        for split, shift in (("val", 0.02), ("test", 0.0)):
                            fused = base + shift + wiggle
                            first, second = fused - 0.05, fused - 0.30 + 0.05 * s_index
                            metrics.update(
                                {
                                    f"final_{split}_acc": fused,
                                    f"final_{split}_map": fused + 0.04,
                                    f"final_{split}_f1": fused - 0.03,
                                    f"final_{split}_modality_gap": 0.9 + 0.1 * s_index + 0.01 * seed,
                                }
                            )
                            for metric, offset in (("acc", 0.0), ("map", 0.04), ("f1", -0.03)):
                                metrics[f"final_{split}_{metric}_{modalities[0]}"] = first + offset
                                metrics[f"final_{split}_{metric}_{modalities[1]}"] = second + offset
                                metrics[f"final_{split}_gap_{metric}"] = abs(first - second)
                        if (dataset, key, seed, method) == ("crema-d", "heuristic", 2, "concat"):
                            del metrics["final_test_map"]
                        params = {
                            "strategy.name": name,
                            "train.seed": str(seed),
                            "train.select_metric": "acc",
                            "optim.lr": lr,
                            "method.name": method,
                        }
                        if name == "constant":
                            params["strategy.alpha"] = value
                        if name == "stepwise":
                            params["strategy.p"] = value
                        run_id = f"{dataset}-{method}-{key}-lr{lr}-s{seed}".replace(":", "")
                        runs.append(
                            SeedRun(
                                run_id,
                                "golden",
                                dataset,
                                method,
                                spec_from_params(params),
                                seed,
                                "FINISHED",
                                1_700_000_000_000 + len(runs),
                                metrics,
                                params,
                                {"mlflow.parentRunId": f"parent-{dataset}-{key}"},
                            )
                        )
    return runs


GOLDEN_CASES = [
    ("main", "text"),
    ("main", "markdown"),
    ("main", "latex"),
    ("main", "csv"),
    ("main", "json"),
    ("strategies", "text"),
    ("strategies", "latex"),
    ("ablation", "markdown"),
    ("ablation", "latex"),
    ("runs", "text"),
]


@pytest.mark.parametrize("kind, fmt", GOLDEN_CASES)
def test_golden_tables(kind, fmt):
    warnings, notes = [], []
    runs = _golden_runs()
    if kind == "runs":
        runs = [r for r in runs if r.dataset == "sarcasm" and r.spec.name in ("lb", "heuristic")]
    tables = build_tables(kind, runs, warn=warnings.append, note=notes.append)
    attach_notes(tables, notes)
    text = render(tables, fmt, warnings)
    path = GOLDEN / f"{kind}.{ {'markdown': 'md', 'latex': 'tex', 'text': 'txt'}.get(fmt, fmt) }"
    if os.environ.get("DMGL_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} differs; if intended, rerun with DMGL_UPDATE_GOLDEN=1"


def test_golden_inputs_exercise_the_edge_cases():
    warnings, notes = [], []
    (table,) = build_tables("main", _golden_runs(), warn=warnings.append, note=notes.append)
    assert any("final_test_map" in w and "crema-d-concat-heuristic-lr0.01-s2" in w for w in warnings)
    assert any("2 configurations" in n and "crema-d" in n for n in notes)
    mla = next(r for r in table.rows if r.stub == ["mla (const 0)"])
    assert [c.mean is None for c in mla.cells] == [False, False, True, True]  # no mla run on sarcasm: '-'
    marks = [c.mark for c in (r.cells[0] for r in table.rows)]
    assert marks.count("best") == 1 and marks.count("second") == 1


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_latex_output_compiles(tmp_path):
    wide = [r for r in _golden_runs() if r.dataset == "crema-d" and r.method == "concat"]
    for number in range(4):  # nine strategies, like Table 4: scaled to the line width
        for seed in range(3):
            extra = copy.deepcopy(wide[seed])
            extra.run_id, extra.spec = f"{extra.run_id}-extra{number}", parse_strategy(f"constant:0.{number + 1}")
            extra.params["strategy.alpha"] = f"0.{number + 1}"
            wide.append(extra)
    body = "\n".join(
        render(build_tables(kind, runs), "latex")
        for kind, runs in (("main", _golden_runs()), ("strategies", wide), ("ablation", _golden_runs()))
    )
    assert r"\resizebox{\linewidth}" in body
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\\usepackage{booktabs,amssymb,graphicx}\n"
        "\\usepackage[margin=1cm,landscape]{geometry}\\begin{document}\n"
        f"{body}\n\\end{{document}}\n"
    )
    result = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.parametrize(
    "text, keys",
    [
        (
            "table4",
            [
                "constant:0",
                "constant:0.5",
                "constant:1",
                "stepwise:0",
                "stepwise:1",
                "stepwise:0.05",
                "stepwise:0.95",
                "heuristic",
                "lb",
            ],
        ),
        ("constant:0.5, h(0.95),LB", ["constant:0.5", "stepwise:0.95", "lb"]),
    ],
)
def test_strategy_specs(text, keys):
    assert [s.key for s in parse_strategies(text)] == keys
