"""`dmgl report`: tables recomputed from the runs' own metrics, marks in the right cells, figures, bad input,
and golden files for every table format (regenerate with DMGL_UPDATE_GOLDEN=1 after an intended change)."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from matplotlib.collections import PolyCollection
from matplotlib.container import BarContainer
from scipy import stats as scipy_stats

from dmgl_cli.cli import cli
from dmgl_cli.errors import DmglError
from dmgl_cli.report import SeedRun, attach_notes, build_tables, compare_tables, render
from dmgl_cli.report.labels import PAPER_METHODS
from dmgl_cli.strategies import parse_strategies, parse_strategy, spec_from_params
from dmgl_cli.tables import LATEX_PREAMBLE, usual_n
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
        spec = spec_from_params(run.params)
        assert spec is not None
        grouped.setdefault(spec.key, []).append(run)
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
            body = f"{100 * mean:.2f} {{\\scriptsize$\\pm${100 * std:.2f}}}"  # the caption says "in %"
            rank = ranked.index(round(100 * mean, 2))
            expected = {0: rf"\textbf{{{body}}}", 1: rf"\underline{{{body}}}"}.get(rank, body)
            low, high = scipy_stats.t.interval(0.95, 1, loc=mean, scale=std / math.sqrt(2))  # 2 seeds
            expected += f" {{\\scriptsize({100 * low:.2f}, {100 * high:.2f})}}"  # the mean's 95% t-interval
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


def _check_layout(figure) -> None:
    """Nothing clipped by the figure's edge (each panel with its title, axis and tick labels and annotations, the
    figure's title, the legends), and no legend over a panel, its labels or its annotations."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    edge = figure.bbox
    panels = [(axis, axis.get_tightbbox(renderer)) for axis in figure.axes if axis.get_visible()]
    legends = [(legend, legend.get_window_extent(renderer)) for legend in figure.legends]
    legends += [(a.get_legend(), a.get_legend().get_window_extent(renderer)) for a, _ in panels if a.get_legend()]
    titles = [(text, text.get_window_extent(renderer)) for text in figure.texts if text.get_text()]
    assert panels
    for artist, box in panels + legends + titles:
        assert edge.x0 - 1 <= box.x0 and box.x1 <= edge.x1 + 1 and edge.y0 - 1 <= box.y0 and box.y1 <= edge.y1 + 1, (
            artist,
            box,
            edge,
        )
    for legend, box in legends:
        for axis, panel in panels:
            if legend is not axis.get_legend():
                assert not box.overlaps(panel), (legend, axis)
        for axis, _ in panels:
            for text in [axis.title, axis.xaxis.label, axis.yaxis.label, *axis.texts]:
                if text.get_text():
                    assert not box.overlaps(text.get_window_extent(renderer)), (legend, text)


def test_figures_show_seed_spread_and_nothing_is_clipped_or_hidden(report_cli, swept):
    from dmgl_cli import plots
    from dmgl_cli.report import Selection, make_figures, select_runs

    tracker = Tracker()
    runs, _ = select_runs(Selection(sweep="rep"), tracker)
    figures = dict(make_figures(["alpha", "gap", "curves"], runs, tracker=tracker, labels="paper"))
    try:
        assert sorted(figures) == ["alpha.png", "curves-synthetic.png", "gap-synthetic.png"]
        for figure in figures.values():
            _check_layout(figure)
        (alpha,) = figures["alpha.png"].axes
        assert [c for c in alpha.collections if isinstance(c, PolyCollection)]  # mean ± std over the 2 seeds
        assert "± std" in alpha.get_title()
        panels = [a for a in figures["curves-synthetic.png"].axes if a.get_visible()]
        assert len(panels) == 3 and {a.get_title().split(",")[0] for a in panels} == {
            "Concat",
            "Concat (const 0.5)",
            "Ours-LB",
        }
        assert all(any(isinstance(c, PolyCollection) for c in a.collections) for a in panels)
        scores, distance = figures["gap-synthetic.png"].axes
        bars = [c for c in scores.containers if isinstance(c, BarContainer)]
        assert bars and all(c.errorbar is not None for c in bars)  # ± std error bars on every series
        assert any(c.errorbar is not None for c in distance.containers if isinstance(c, BarContainer))
        assert any(t.get_text().startswith("gap ") for t in scores.texts)
    finally:
        for figure in figures.values():
            plots.close(figure)


def test_long_titles_and_many_series_stay_inside_the_figure():
    from dmgl_cli import plots

    seeds = {f"dataset-{i} (method, 3 seeds)": [0.5 - 0.02 * e * (i + 1) for e in range(20)] for i in range(4)}
    bands = {k: ([v - 0.05 for v in values], [v + 0.05 for v in values]) for k, values in seeds.items()}
    figure = plots.alpha_figure(seeds, "Learned alpha during training (mean over seeds; band: ± std) " * 2, bands)
    try:
        _check_layout(figure)
        assert len([c for c in figure.axes[0].collections if isinstance(c, PolyCollection)]) == 4
    finally:
        plots.close(figure)
    for count, top, title in (
        (3, 0.9, "synthetic: per-modality test ACC and modality gap"),
        (6, 0.99, "a title " * 20),
    ):
        methods = {
            f"method name {i} (const {i})": {"fused": top, "fast": top - 0.05, "slow": top - 0.3} for i in range(count)
        }
        errors: dict[str, dict[str, float | None]] = {
            m: dict.fromkeys(["fused", "fast", "slow"], 0.02) for m in methods
        }
        figure = plots.gap_figure(methods, dict.fromkeys(methods, 1.0), title, errors=errors)
        try:
            _check_layout(figure)  # tall bars: the gap labels above them stay clear of the legend (the old one hid one)
        finally:
            plots.close(figure)
    assert plots.alpha_figure({"seed 0": [0.5, 0.4]}) is not None  # run/summary.py's call still works


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
    assert rows["concat (LB)"][1] == {
        "mean": 0.7,
        "std": None,
        "n": 1,
        "ci": None,  # one seed: no interval
        "mark": None,
        "runs": [made[("lb", 0)]],
    }
    assert any(made[("lb", 1)] in w and "final_test_map" in w for w in data["warnings"])
    text = run_cli("report").output
    heuristic_line = next(line for line in text.splitlines() if line.startswith("concat (heuristic)"))
    assert heuristic_line.split()[-1] == "-"
    assert f"warning: run {made[('heuristic', 0)]}" in text


# ------------------------------------------------------------------------------------- golden files


def _golden_runs() -> list[SeedRun]:
    """Two datasets (audio-video and text-image), two methods, five strategies, three seeds, all from one sweep;
    one seed lacks a metric, one group has two configurations (the sweep tuned optim.lr), one method has no run on
    one dataset and was trained for more epochs than the other."""
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
                            "train.epochs": "30" if method == "mla" else "20",
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
                                {"mlflow.parentRunId": f"parent-{dataset}-{key}", "dmgl.sweep": "golden"},
                            )
                        )
    return runs


GOLDEN_CASES = [
    ("main", "text", "code"),
    ("main", "markdown", "code"),
    ("main", "latex", "code"),
    ("main", "csv", "code"),
    ("main", "json", "code"),
    ("main", "text", "paper"),
    ("strategies", "text", "code"),
    ("strategies", "latex", "code"),
    ("ablation", "markdown", "code"),
    ("ablation", "latex", "code"),
    ("runs", "text", "code"),
    ("runs", "latex", "code"),
]


def _golden_kind_runs(kind: str) -> list[SeedRun]:
    runs = _golden_runs()
    if kind == "runs":
        runs = [r for r in runs if r.dataset == "sarcasm" and r.spec is not None and r.spec.name in ("lb", "heuristic")]
    return runs


@pytest.mark.parametrize("kind, fmt, labels", GOLDEN_CASES)
def test_golden_tables(kind, fmt, labels):
    warnings, notes = [], []
    tables = build_tables(kind, _golden_kind_runs(kind), warn=warnings.append, note=notes.append, labels=labels)
    attach_notes(tables, notes)
    text = render(tables, fmt, warnings)
    suffix = "" if labels == "code" else f"-{labels}"
    path = GOLDEN / f"{kind}{suffix}.{ {'markdown': 'md', 'latex': 'tex', 'text': 'txt'}.get(fmt, fmt) }"
    if os.environ.get("DMGL_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} differs; if intended, rerun with DMGL_UPDATE_GOLDEN=1"


GOLDEN_STATS_CASES = [
    ("main", "text"),
    ("main", "markdown"),
    ("main", "latex"),
    ("main", "csv"),
    ("main", "json"),
    ("strategies", "text"),
    ("ablation", "markdown"),
]


@pytest.mark.parametrize("kind, fmt", GOLDEN_STATS_CASES)
def test_golden_stats_tables(kind, fmt):
    """``--stats``: the paired differences, p-values, tied marks and the note in every format."""
    warnings, notes = [], []
    tables = build_tables(kind, _golden_kind_runs(kind), warn=warnings.append, note=notes.append)
    compare_tables(tables)
    attach_notes(tables, notes)
    text = render(tables, fmt, warnings)
    path = GOLDEN / f"{kind}-stats.{ {'markdown': 'md', 'latex': 'tex', 'text': 'txt'}.get(fmt, fmt) }"
    if os.environ.get("DMGL_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} differs; if intended, rerun with DMGL_UPDATE_GOLDEN=1"


def test_golden_inputs_exercise_the_edge_cases():
    warnings, notes = [], []
    (table,) = build_tables("main", _golden_runs(), warn=warnings.append, note=notes.append)
    assert any("final_test_map" in w and "crema-d-concat-heuristic-lr0.01-s2" in w for w in warnings)
    assert any("2 configurations tuned by sweep 'golden' (optim.lr)" in n and "optim.lr=0.01" in n for n in notes)
    mla = next(r for r in table.rows if r.stub == ["mla (const 0)"])
    assert [c.mean is None for c in mla.cells] == [False, False, True, True]  # no mla run on sarcasm: '-'
    marks = [c.mark for c in (r.cells[0] for r in table.rows)]
    assert marks.count("best") == 1 and marks.count("second") == 1
    # the mla rows ran 30 epochs, the concat rows 20: the table says so
    assert any("train.epochs = 20 (" in n and ", 30 (mla (const 0))" in n for n in table.notes)


# ------------------------------------------------------------------------------ seed counts in every cell


def test_every_cell_carries_its_n_where_it_differs_from_the_tables():
    runs = _golden_runs()
    (table,) = build_tables("main", runs)
    assert usual_n(table) == 3
    heuristic = next(r for r in table.rows if r.stub == ["concat (heuristic)"])
    assert [c.n for c in heuristic.cells] == [3, 2, 3, 3]  # one seed lacks final_test_map
    text = render([table], "text")
    line = next(line for line in text.splitlines() if line.startswith("concat (heuristic)"))
    assert line.count("[n=") == 1 and "0.78%_ [n=2]" in line
    assert "note: cells: mean ± std over n = 3 seeds; [n=k] marks a cell over k seeds instead (here k = 2)" in text
    markdown = render([table], "markdown")
    assert "<u>64.45% ± 0.78%</u><sup>n=2</sup>" in markdown and "over n = 3 seeds" in markdown
    latex = render([table], "latex")
    assert r"\underline{64.45 {\scriptsize$\pm$0.78}}$^{n=2}$" in latex
    assert r"mean $\pm$ std over $n=3$ seeds; $^{n=k}$: over $k$ seeds ($k=2$)" in latex
    data = json.loads(render([table], "json"))["tables"][0]
    assert data["n_usual"] == 3 and data["rows"][3]["cells"][1]["n"] == 2 and "n = 3 seeds" in data["notes"][0]
    rows = list(csv.DictReader(io.StringIO(render([table], "csv"))))
    assert {r["n"] for r in rows if r["row"] == "concat (heuristic)"} == {"3", "2"}


def test_a_table_of_one_seed_per_cell_says_so_and_shows_no_std():
    runs = [r for r in _golden_runs() if r.seed == 0]
    (table,) = build_tables("main", runs)
    text = render([table], "text")
    assert "note: cells: one seed each (no std)" in text and "±" not in text.split("\n", 3)[3]


# ------------------------------------------------------------------- runs of different settings in one cell


def _run(run_id, spec, seed, val, test, *, epochs="20", lr="0.01", sweep=None, checksum=None, method="concat"):
    params = {
        "strategy.name": parse_strategy(spec).name,
        "train.seed": str(seed),
        "train.select_metric": "acc",
        "train.epochs": epochs,
        "optim.lr": lr,
        "method.name": method,
    }
    if parse_strategy(spec).name == "constant":
        params["strategy.alpha"] = str(parse_strategy(spec).value)
    tags = {"dmgl.sweep": sweep} if sweep else {}
    if checksum:
        tags["dmgl.dataset_checksum"] = checksum
    metrics = {"final_val_acc": val, "final_test_acc": test, "final_test_map": test}
    return SeedRun(run_id, "x", "crema-d", method, parse_strategy(spec), seed, "FINISHED", seed, metrics, params, tags)


def test_runs_of_different_settings_are_refused_then_allowed_choosing_on_validation():
    runs = [_run(f"long{s}", "lb", s, 0.70, 0.60) for s in range(3)]
    runs += [_run(f"short{s}", "lb", s, 0.65, 0.90, epochs="5") for s in range(3)]  # better on test, worse on val
    runs += [_run(f"base{s}", "constant:0", s, 0.5, 0.5) for s in range(3)]
    with pytest.raises(DmglError) as refused:
        build_tables("main", runs)
    message = str(refused.value)
    assert "crema-d / concat (LB): train.epochs = 5 (3 runs, e.g. short0), 20 (3 runs, e.g. long0)" in message
    assert "--allow-mixed" in message and "params.`train.epochs` = '5'" in message
    notes = []
    (table,) = build_tables("main", runs, note=notes.append, allow_mixed=True)
    lb = next(r for r in table.rows if r.stub == ["concat (LB)"])
    assert lb.cells[0].mean == pytest.approx(0.60) and set(lb.cells[0].runs) == {"long0", "long1", "long2"}
    assert any("--allow-mixed" in n and "train.epochs=20" in n and "train.epochs = 5" in n for n in notes)
    # one sweep's tuned trials are hyperparameter search: chosen on validation without the flag, with a note
    tuned = [
        _run(r.run_id, "lb", r.seed, r.metrics["final_val_acc"], 0.5, lr=lr, sweep="s")
        for r, lr in zip(runs[:6], ["0.01"] * 3 + ["0.1"] * 3, strict=True)
    ]
    notes = []
    (table,) = build_tables("main", tuned, note=notes.append)
    assert set(table.rows[0].cells[0].runs) == {"long0", "long1", "long2"}
    assert notes and "tuned by sweep 's' (optim.lr)" in notes[0] and "optim.lr=0.01" in notes[0]
    # ... but not over two versions of the dataset
    other_data = [_run(f"d{s}", "lb", s, 0.7, 0.6, sweep="s", checksum="aaa" if s < 2 else "bbb") for s in range(3)]
    with pytest.raises(DmglError, match="dataset checksum = aaa .*bbb"):
        build_tables("strategies", other_data)


def test_report_cli_refuses_mixed_cells_and_allow_mixed_shows_the_best_on_validation(run_cli, registry):
    tracker = Tracker()
    experiment = tracker.experiment_id("mixed")
    for epochs, val in (("20", 0.8), ("5", 0.6)):
        for seed in range(2):
            run_id = tracker.start_run(
                experiment,
                f"lb-{epochs}-{seed}",
                {"dmgl.role": "seed", "dmgl.dataset": "toy", "dmgl.method": "concat", "dmgl.strategy": "lb"},
            )
            tracker.log_params(
                run_id,
                {"strategy.name": "lb", "train.seed": seed, "train.epochs": epochs, "train.select_metric": "acc"},
            )
            tracker.log_metrics(run_id, {"final_val_acc": val, "final_test_acc": 1.0 - val})
            tracker.end_run(run_id, "FINISHED")
    refused = run_cli("report", expect=1)
    assert "toy / concat (LB): train.epochs = 5 (2 runs, e.g. " in refused.output and "20 (2 runs" in refused.output
    assert "--allow-mixed" in refused.output and "Traceback" not in refused.output
    allowed = run_cli("report", "--allow-mixed", "--format", "json")
    (table,) = json.loads(allowed.stdout)["tables"]
    assert table["rows"][0]["cells"][0]["mean"] == pytest.approx(0.2)  # the 20-epoch runs: best on validation
    assert any("--allow-mixed" in n and "train.epochs=20" in n for n in table["notes"])


# ---------------------------------------------------------------------------------------------- labels


def test_paper_labels_name_rows_as_the_paper_does():
    from dmgl_cli.methods import METHODS

    assert set(METHODS) <= set(PAPER_METHODS)
    runs = _golden_runs()
    runs += [_run(f"ogm{s}", "constant:0", s, 0.5, 0.5, method="ogm-ge", lr="0.01") for s in range(3)]
    runs += [_run(f"pmr{s}", "heuristic", s, 0.5, 0.5, method="pmr", lr="0.01") for s in range(3)]
    for modality in ("audio", "video"):
        for s in range(3):
            run = _run(f"uni-{modality}{s}", "constant:0", s, 0.4, 0.4, method="unimodal", lr="0.01")
            run.params["method.options.unimodal.modality"] = modality
            runs.append(run)
    for r in runs:
        r.params["train.epochs"] = "20"
        r.tags.pop("dmgl.dataset_checksum", None)
    (paper,) = build_tables("main", runs, labels="paper")
    assert [r.stub[0] for r in paper.rows] == [
        "Audio",
        "Video",
        "Concat",
        "Concat (const 0.5)",
        "Concat (h(0.05))",
        "OGM-GE",
        "MLA",
        "PMR (heuristic)",
        "Ours-H",
        "Ours-LB",
    ]
    (code,) = build_tables("main", runs)
    assert "unimodal audio (const 0)" in [r.stub[0] for r in code.rows]
    code_lb = next(r for r in code.rows if r.stub == ["concat (LB)"])
    assert [c.mean for c in paper.rows[-1].cells] == [c.mean for c in code_lb.cells]  # Ours-LB is concat (LB)
    with pytest.raises(DmglError, match="unknown labels"):
        build_tables("main", runs, labels="fancy")


# ----------------------------------------------------------------------------------------------- LaTeX


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
@pytest.mark.parametrize(
    "kind",
    ["main", "main-paper", "strategies", "strategies-table4", "ablation", "runs", "main-stats", "ablation-stats"],
)
def test_latex_tables_compile_and_fit_the_text_width(kind, tmp_path):
    """Each table kind in a minimal article (default margins), with the packages the preamble comment names: it
    compiles and no line is wider than \\textwidth."""
    runs, labels, name = _golden_runs(), "code", kind
    if kind == "main-paper":
        name, labels = "main", "paper"
    if kind == "strategies-table4":  # nine strategies, like Table 4
        name = "strategies"
        runs = [r for r in runs if r.dataset == "crema-d" and r.method == "concat"]
        for number in range(4):
            for seed in range(3):
                extra = copy.deepcopy(runs[seed])
                extra.run_id, extra.spec = f"{extra.run_id}-extra{number}", parse_strategy(f"constant:0.{number + 1}")
                extra.params["strategy.alpha"] = f"0.{number + 1}"
                runs.append(extra)
    if kind == "runs":  # real MLflow run ids: 32 hex digits
        runs = copy.deepcopy(runs)
        for index, run in enumerate(runs):
            run.run_id = f"{index:04d}" + "9f3c2a7b5e1d4c8a" * 2
            run.tags["mlflow.parentRunId"] = "7" * 32
    if kind.endswith("-stats"):
        name = kind.removesuffix("-stats")
    tables = build_tables(name, runs, labels=labels, allow_mixed=True)
    if kind.endswith("-stats"):
        compare_tables(tables, test="wilcoxon")
    body = render(tables, "latex")
    packages = re.search(r"\\usepackage\{([^}]*)\}", LATEX_PREAMBLE)
    assert packages and "amssymb" in LATEX_PREAMBLE
    (tmp_path / "doc.tex").write_text(
        f"\\documentclass{{article}}\\usepackage{{{packages[1]},amssymb}}\n\\begin{{document}}\n{body}\n"
        "\\end{document}\n"
    )
    result = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = (tmp_path / "doc.log").read_text(errors="replace")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Overfull \\hbox" not in log, re.findall(r"Overfull \\hbox.*", log)


def test_latex_fits_without_scaling_where_it_can():
    """The paper tables are made narrow (no % in cells, small std, short headers) rather than scaled."""
    latex = render(build_tables("runs", _golden_kind_runs("runs")), "latex")
    assert r"Run & Strategy & Seed & Epoch & Val & ACC & MAP & F1 & Gap \\" in latex  # constant columns hoisted
    assert "Dataset: sarcasm; Method: concat; Status: FINISHED" in latex
    assert r">{\raggedright\arraybackslash}p{8em}" in latex and r"\allowbreak{}" in latex
    assert r"\ifdim\wd0>\textwidth\resizebox{\textwidth}{!}{\usebox0}\else\usebox0\fi" in latex


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


# ------------------------------------------------------------------------------------- --stats and --plot cd


def _by_seed(runs, key: str, method: str, spec: str, dataset: str = "crema-d") -> dict[int, float]:
    return {
        r.seed: r.metrics[key]
        for r in runs
        if (r.dataset, r.method, r.spec.key, r.params["optim.lr"]) == (dataset, method, spec, "0.01")
        and key in r.metrics
    }


@pytest.mark.filterwarnings("ignore:Precision loss occurred")  # scipy's own ttest_rel on equal differences
def test_stats_p_values_and_intervals_are_scipys_paired_t_test_holm_corrected():
    runs = _golden_runs()
    (table,) = build_tables("main", runs, note=lambda _: None)
    compare_tables([table])
    column = 1  # crema-d MAP: the heuristic row lacks seed 2 there
    cells = {row.stub[0]: row.cells[column] for row in table.rows}
    best = _by_seed(runs, "final_test_map", "concat", "lb")
    raw = {}
    for label, (method, spec) in {
        "concat (const 0)": ("concat", "constant:0"),
        "concat (const 0.5)": ("concat", "constant:0.5"),
        "concat (h(0.05))": ("concat", "stepwise:0.05"),
        "concat (heuristic)": ("concat", "heuristic"),
        "mla (const 0)": ("mla", "constant:0"),
    }.items():
        mine = _by_seed(runs, "final_test_map", method, spec)
        seeds = sorted(set(mine) & set(best))
        a, b = [mine[s] for s in seeds], [best[s] for s in seeds]
        comparison = cells[label].comparison
        assert comparison is not None and comparison.reference == "concat (LB)" and comparison.difference is not None
        assert comparison.difference.seeds == tuple(seeds)
        result = scipy_stats.ttest_rel(a, b)
        if not math.isnan(result.pvalue):  # all-equal differences: dmgl says p = 0 where scipy has no spread
            assert comparison.difference.p_value == pytest.approx(result.pvalue, rel=1e-9)
            interval = result.confidence_interval(0.95)
            assert comparison.difference.low == pytest.approx(interval.low, rel=1e-9)
        raw[label] = comparison.difference.p_value
    holm = dict(zip(raw, scipy_holm := _holm_by_hand(list(raw.values())), strict=True))
    assert scipy_holm and all(cells[label].comparison.p_holm == pytest.approx(p) for label, p in holm.items())
    assert cells["concat (heuristic)"].comparison.difference.seeds == (0, 1)  # seed 2 lacks a MAP: not paired
    assert cells["concat (LB)"].comparison.is_reference and cells["concat (LB)"].mark == "best"
    assert cells["concat (heuristic)"].mark == "tied"  # 2 pairs, p_holm = 0.054: not significantly worse
    assert cells["concat (const 0)"].mark == ""
    assert "seeds left unpaired (on one side only): crema-d MAP / concat (heuristic): seed 2 only in concat (LB)" in (
        table.stats_note
    )
    assert "paired t-test, Holm-adjusted across the rows of each column" in table.stats_note
    assert re.search(r"a 1-point difference needs \d+ seeds at 80% power", table.stats_note)


def _holm_by_hand(p_values: list[float]) -> list[float]:
    """Holm's definition, written out independently of dmgl_cli.stats.holm."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for step, index in enumerate(order):
        running = max(running, min(1.0, (m - step) * p_values[index]))
        adjusted[index] = running
    return adjusted


def test_pairing_by_seed_tag_decides_the_result():
    """The same values with the seed tags of one row shuffled: the means stay, the paired p-value changes."""
    runs = []
    noise = [0.00, 0.05, -0.04, 0.03, -0.02, 0.06]  # a seed effect both rows share
    for seed, shift in enumerate(noise):
        runs.append(_run(f"a{seed}", "constant:0", seed, 0.6, 0.60 + shift))
        runs.append(_run(f"b{seed}", "lb", seed, 0.6, 0.61 + shift + 0.001 * (seed % 2)))
    (paired,) = build_tables("main", runs)
    compare_tables([paired])
    shuffled_runs = copy.deepcopy(runs)
    order = [3, 0, 5, 1, 4, 2]
    for run in (r for r in shuffled_runs if r.spec.key == "lb"):
        run.seed = order[run.seed]
    (shuffled,) = build_tables("main", shuffled_runs)
    compare_tables([shuffled])

    def comparison(table):
        row = next(r for r in table.rows if r.stub == ["concat (const 0)"])
        return row.cells[0]

    assert comparison(paired).mean == pytest.approx(comparison(shuffled).mean)
    assert comparison(paired).comparison.p_holm < 0.001 and comparison(paired).mark == ""
    assert comparison(shuffled).comparison.p_holm > 0.05 and comparison(shuffled).mark == "tied"


def test_stats_in_every_format_and_the_baseline_option():
    runs = _golden_runs()
    tables = build_tables("main", runs)
    compare_tables(tables, baseline="Concat (Const 0)")
    text = render(tables, "text")
    assert "  Δ vs concat (const 0)" in text and "Δ: paired difference to concat (const 0)" in text
    lb = next(line for line in text.splitlines() if line.startswith("concat (LB)"))
    assert lb.count("*") == 8  # still the best of every column: bold
    rows = list(csv.DictReader(io.StringIO(render(tables, "csv"))))
    lb_acc = next(r for r in rows if r["row"] == "concat (LB)" and r["group"] == "crema-d" and r["column"] == "ACC")
    assert lb_acc["reference"] == "concat (const 0)" and float(lb_acc["diff"]) == pytest.approx(0.28)
    assert lb_acc["test"] == "t" and lb_acc["pairs"] == "3" and float(lb_acc["p_holm"]) < 0.05
    data = json.loads(render(tables, "json"))["tables"][0]
    reference = data["rows"][0]["cells"][0]
    assert reference["comparison"]["is_reference"] and reference["ci"][0] < reference["mean"] < reference["ci"][1]
    assert any("Δ: paired difference to concat (const 0)" in n for n in data["notes"])
    markdown = render(tables, "markdown")
    assert "| &emsp;Δ vs concat (const 0) | +28.00 [" in markdown
    latex = render(tables, "latex")
    assert r"\quad {\scriptsize $\Delta$ vs concat (const 0)}" in latex and "noncentral t" in latex
    with pytest.raises(DmglError, match=r"--baseline 'nope' names no row of the table; valid: concat \(const 0\), "):
        compare_tables(build_tables("main", runs), baseline="nope")
    with pytest.raises(DmglError, match="--stats compares the rows of the main, strategies, ablation tables"):
        compare_tables(build_tables("runs", runs))
    strategies = build_tables("strategies", runs)
    compare_tables(strategies, baseline="const 0", test="wilcoxon")
    assert "Δ vs const 0" in render(strategies[:1], "text")
    assert "the paired t-test stood in" in strategies[0].stats_note  # 3 seeds: too few for Wilcoxon


def _record_runs(rows: dict[str, list[float]], dataset: str = "toy") -> None:
    """Finished seed runs in the test's MLflow store: per strategy, one run per seed with that test accuracy."""
    tracker = Tracker()
    experiment = tracker.experiment_id("handmade")
    for spec, values in rows.items():
        for seed, value in enumerate(values):
            run_id = tracker.start_run(
                experiment,
                f"{spec}-{seed}",
                {
                    "dmgl.role": "seed",
                    "dmgl.dataset": dataset,
                    "dmgl.method": "concat",
                    "dmgl.strategy": spec,
                    "dmgl.seed": str(seed),
                },
            )
            params = {"strategy.name": parse_strategy(spec).name, "train.seed": seed, "train.select_metric": "acc"}
            if parse_strategy(spec).name == "constant":
                params["strategy.alpha"] = str(parse_strategy(spec).value)
            tracker.log_params(run_id, params)
            tracker.log_metrics(run_id, {"final_test_acc": value, "final_test_map": value, "final_val_acc": value})
            tracker.end_run(run_id, "FINISHED")


def test_report_cli_stats_baseline_and_cd_plot(run_cli, registry, tmp_path):
    _record_runs(
        {
            "constant:0": [0.60, 0.65, 0.58, 0.63],
            "constant:0.5": [0.61, 0.655, 0.592, 0.641],
            "lb": [0.70, 0.74, 0.69, 0.72],
        }
    )
    text = run_cli("report", "--stats").stdout
    assert "  Δ vs concat (LB)" in text and "paired t-test" in text and "seeds at 80% power" in text
    assert "Holm-adjusted" in text and "(a, b) after a cell: the 95% t-interval" in text
    chosen = run_cli("report", "--baseline", "concat (const 0)", "--test", "wilcoxon", "--format", "json").stdout
    (table,) = json.loads(chosen)["tables"]
    half = table["rows"][1]["cells"][0]
    assert table["rows"][1]["stub"] == ["concat (const 0.5)"] and half["comparison"]["reference"] == "concat (const 0)"
    values = ([0.61, 0.655, 0.592, 0.641], [0.60, 0.65, 0.58, 0.63])
    assert half["comparison"]["p"] == pytest.approx(scipy_stats.ttest_rel(*values).pvalue)  # 4 pairs: t stands in
    assert half["comparison"]["test"] == "t" and half["comparison"]["pairs"] == 4
    bad = run_cli("report", "--baseline", "nope", expect=1)
    assert "--baseline 'nope' names no row of the table; valid: concat (const 0), concat (const 0.5), concat (LB)" in (
        bad.output
    )
    assert bad.output.count("Error:") == 1
    assert "--stats compares the rows of" in run_cli("report", "--table", "runs", "--stats", expect=1).output
    one = run_cli("report", "--plot", "cd", "--out", tmp_path, expect=1)
    assert "--plot cd ranks the rows across datasets and needs runs on 2 or more; the selection has 1 (toy)" in (
        one.output
    )
    _record_runs({"constant:0": [0.5, 0.52], "constant:0.5": [0.55, 0.56], "lb": [0.6, 0.61]}, dataset="other")
    drawn = run_cli("report", "--plot", "cd", "--out", tmp_path)
    assert (tmp_path / "cd.png").stat().st_size > 10_000 and "cd.png" in drawn.output


def test_cd_diagram_on_two_datasets_and_its_refusals():
    from dmgl_cli import plots
    from dmgl_cli.report.figures import cd_diagram
    from dmgl_cli.report.selection import group_runs

    groups = group_runs(_golden_runs())
    warnings = []
    figure = cd_diagram(groups, "test", "acc", "paper", warnings.append)
    try:
        _check_layout(figure)
        texts = [t.get_text() for t in figure.axes[0].texts]
        assert "Ours-LB (1.00)" in texts and any(t.startswith("CD = ") for t in texts)
        assert "Friedman" in figure.axes[0].get_title()
    finally:
        plots.close(figure)
    assert warnings and "MLA" in warnings[0]  # no sarcasm run: left out
    few = [g for g in groups if g.spec.key in ("lb", "heuristic")]
    with pytest.raises(DmglError, match="needs 3 or more rows"):
        cd_diagram(few, "test", "acc")
