"""`dmgl reproduce`: the paper's figures as package data, the plan (reuse vs train), the measured side recomputed
from the recorded runs, and the errors a user can cause."""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from dmgl_cli.cli import cli
from dmgl_cli.methods import METHODS
from dmgl_cli.reproduce import paper_tables
from dmgl_cli.strategies import TABLE4, parse_strategy
from dmgl_cli.tracking import Tracker

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ["--seeds", "2", "--set", "train.epochs=2", "--set", "train.batch_size=64"]
ROWS = ["--only", "constant:0,Ours-LB"]


def _all_runs() -> list:
    tracker = Tracker()
    experiments = tracker.experiments()
    return tracker.find_runs(list(experiments), "") if experiments else []


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> dict:
    """A registry where `dmgl reproduce table4 --dataset synthetic` (two rows x two seeds) ran once, with the
    dry run made before anything was recorded."""
    home = tmp_path_factory.mktemp("reproduce") / "registry"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DMGL_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        runner = CliRunner()
        prepared = runner.invoke(cli, ["prepare", "synthetic", "-o", "samples=600", "--silent"])
        assert prepared.exit_code == 0, prepared.output
        dry = runner.invoke(cli, ["reproduce", "table4", "--dataset", "synthetic", *SETTINGS, *ROWS, "--dry-run"])
        assert dry.exit_code == 0, dry.output
        runs_after_dry_run = len(_all_runs())
        first = runner.invoke(cli, ["reproduce", "table4", "--dataset", "synthetic", *SETTINGS, *ROWS])
        assert first.exit_code == 0, f"{first.output}\n{first.exception!r}"
        runs_after_first = len(_all_runs())
    return {
        "home": home,
        "dry": dry.output,
        "runs_after_dry_run": runs_after_dry_run,
        "first": first.output,
        "runs_after_first": runs_after_first,
    }


@pytest.fixture
def rep_cli(reproduced, monkeypatch):
    monkeypatch.setenv("DMGL_HOME", str(reproduced["home"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner = CliRunner()

    def invoke(*args: str, expect: int = 0):
        result = runner.invoke(cli, ["reproduce", *map(str, args)])
        assert result.exit_code == expect, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
        return result

    return invoke


# ------------------------------------------------------------------------------------------- paper figures


def test_paper_figures_parse_and_match_the_paper_at_hand_picked_cells():
    tables = paper_tables()
    assert list(tables) == ["table1", "table2", "table4", "table5"]
    rows = {t: {r.label: r for r in table.rows} for t, table in tables.items()}
    t1, t4, t5 = rows["table1"], rows["table4"], rows["table5"]
    # Table 2 (NVGesture).
    assert rows["table2"]["MLA"].figures["nvgesture"] == {"acc": 83.73, "f1": 83.87}
    assert rows["table2"]["OGR-GB"].method == "g-blend"
    assert rows["table2"]["Ours-LB"].figures["nvgesture"]["f1"] == 84.68
    # Table 1, checked by hand against the paper's text.
    assert t1["Ours-LB"].figures["crema-d"] == {"acc": 83.62, "map": 90.06}
    assert t1["MLA"].figures["kinetics-sounds"]["acc"] == 70.04
    assert t1["Affine"].figures["twitter2015"]["f1"] == 59.92
    assert t1["Text"].figures["sarcasm"] == {"acc": 81.36, "f1": 80.65}
    assert t1["Video"].figures["crema-d"]["map"] == 58.79
    assert "sarcasm" not in t1["Channel"].figures and "twitter2015" not in t1["Greedy"].figures  # "-" in the paper
    assert t1["Ours-H"].std["kinetics-sounds"]["map"] == 0.43  # Table A1
    assert t1["OGM"].method == "ogm-ge" and t1["OGM"].strategy is None  # trained as published
    # Table 4 (Kinetics-Sounds) and Table A3 (CREMA-D).
    assert t4["h(0.95)"].figures["kinetics-sounds"]["video"] == 46.72
    assert t4["Ours-LB"].figures["crema-d"]["multi"] == 84.11
    assert t4["Constant 1"].figures["crema-d"]["audio"] == 33.15
    assert [r.strategy for r in tables["table4"].rows] == list(TABLE4)
    # Table 5.
    assert t5["CLIP+Ours"].figures["twitter2015"]["image"] == 64.67
    assert t5["CLIP"].figures["sarcasm"]["text"] == 82.15
    assert {d: s.recipe for d, s in tables["table5"].datasets.items()} == {
        "sarcasm": "sarcasm-clip",
        "twitter2015": "twitter2015-clip",
    }
    for table in tables.values():
        for row in table.rows:
            assert row.method in METHODS
            if row.strategy is not None:
                assert parse_strategy(row.strategy).key == row.strategy
            for dataset, figures in row.figures.items():
                columns = {c.id for c in table.datasets[dataset].columns}
                assert set(figures) == columns, (table.name, row.label, dataset)


def test_the_figures_file_ships_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert "paper_results.yaml" in config["package-data"]["dmgl_cli"]
    assert (ROOT / "dmgl_cli" / "paper_results.yaml").is_file()


# ------------------------------------------------------------------------------------------- plan and reuse


@pytest.mark.slow  # the module's registry trains 2 rows x 2 seeds once (about 20 s on 2 cores)
def test_dry_run_on_an_empty_registry_lists_every_planned_run_and_records_nothing(reproduced):
    dry = reproduced["dry"]
    assert reproduced["runs_after_dry_run"] == 0
    assert "dry run: nothing is trained or recorded" in dry
    assert "2 row(s); 0 seed run(s) reused, 4 to train" in dry
    assert re.search(r"Constant 0\s+concat \(const 0\)\s+train seed\(s\) 0,1", dry)
    assert re.search(r"Ours-LB\s+concat \(LB\)\s+train seed\(s\) 0,1", dry)
    assert "the paper has no Table 4 / Table A3 figures for synthetic" in dry
    # Training made one parent per row with its two seeds.
    assert reproduced["runs_after_first"] == 2 * (1 + 2)


@pytest.mark.slow  # the module's registry trains 2 rows x 2 seeds once (about 20 s on 2 cores)
def test_a_second_invocation_reuses_every_run(rep_cli, reproduced):
    again = rep_cli("table4", "--dataset", "synthetic", *SETTINGS, *ROWS)
    assert "4 seed run(s) reused, 0 to train" in again.output
    assert len(_all_runs()) == reproduced["runs_after_first"]  # nothing new trained
    dry = rep_cli("table4", "--dataset", "synthetic", *SETTINGS, *ROWS, "--dry-run", "--json")
    plan = json.loads(dry.stdout)
    seed_runs = {r.run_id for r in _all_runs() if r.tags.get("dmgl.role") == "seed"}
    reused = {run for row in plan["rows"] for run in row["reused"].values()}
    assert reused == seed_runs and plan["to_train"] == 0
    # Other settings are another configuration: nothing to reuse.
    other = rep_cli("table4", "--dataset", "synthetic", "--seeds", "2", "--set", "train.epochs=3", *ROWS, "--dry-run")
    assert "0 seed run(s) reused, 4 to train" in other.output


@pytest.mark.slow  # the module's registry trains 2 rows x 2 seeds once (about 20 s on 2 cores)
def test_measured_side_is_mean_and_std_of_the_recorded_final_test_metric(rep_cli, reproduced):
    result = json.loads(rep_cli("table4", "--dataset", "synthetic", *SETTINGS, *ROWS, "--json").stdout)
    cell = next(c for c in result["cells"] if c["row"] == "Ours-LB" and c["column"] == "Multi")
    runs = [Tracker().get_run(run_id) for run_id in cell["runs"]]
    assert len(runs) == 2 and all(r.tags["dmgl.strategy"] == "lb" for r in runs)
    values = [r.metrics["final_test_acc"] for r in runs]
    assert math.isclose(cell["measured_mean"], 100 * statistics.mean(values), rel_tol=1e-12)
    assert math.isclose(cell["measured_std"], 100 * statistics.stdev(values), rel_tol=1e-12)
    assert cell["n"] == 2 and cell["paper"] is None and cell["diff_points"] is None
    shown = f"{100 * statistics.mean(values):.2f}% ± {100 * statistics.stdev(values):.2f}%"
    assert shown in reproduced["first"]


@pytest.mark.slow  # the module's registry trains 2 rows x 2 seeds once (about 20 s on 2 cores)
def test_without_paper_figures_the_measured_side_is_still_printed(reproduced):
    text = reproduced["first"]
    assert "the paper has no Table 4 / Table A3 figures for synthetic; measured side only" in text
    assert "Table 4 / Table A3 rows measured on synthetic" in text
    header = next(line for line in text.splitlines() if line.startswith("Row "))
    assert header.split() == ["Row", "dmgl", "Multi", "fast", "slow"]


@pytest.mark.slow  # the module's registry trains 2 rows x 2 seeds once (about 20 s on 2 cores)
def test_paper_figure_next_to_measured_with_the_difference_in_points(rep_cli, tmp_path):
    """Table A3's CREMA-D column against runs made with a recipe of one's own (here the synthetic one: the runs
    above are reused, nothing trains)."""
    recipe = tmp_path / "mine.yaml"
    shutil.copy(ROOT / "recipes" / "synthetic.yaml", recipe)
    args = ["table4", "--dataset", "crema-d", "--recipe", recipe, *SETTINGS, *ROWS]
    result = json.loads(rep_cli(*args, "--json").stdout)
    assert result["paper"] == "Table A3 (CREMA-D, supplementary)" and result["to_train"] == 0
    cell = next(c for c in result["cells"] if c["row"] == "Constant 0" and c["column"] == "Multi")
    assert cell["paper"] == 63.31
    assert math.isclose(cell["diff_points"], cell["measured_mean"] - 63.31, abs_tol=1e-9)
    video = next(c for c in result["cells"] if c["row"] == "Constant 0" and c["column"] == "Video")
    assert video["paper"] == 18.68 and video["measured_mean"] is None  # synthetic data has no video modality
    text = rep_cli(*args, "--silent").output
    line = next(line for line in text.splitlines() if line.startswith("Constant 0"))
    assert "63.31%" in line and f"{cell['diff_points']:+.2f}" in line
    low, high = cell["measured_ci"]  # the paper's figure against the measured mean's 95% t-interval
    assert cell["paper_vs_ci"] == ("below" if 63.31 < low else "above" if 63.31 > high else "inside")
    assert f"{cell['diff_points']:+.2f} ({cell['paper_vs_ci']})" in line
    latex = rep_cli(*args, "--silent", "--format", "latex").output
    assert r"\begin{tabular}" in latex and r"\multicolumn{3}{c}{Multi}" in latex and "Diff." in latex
    markdown = rep_cli(*args, "--silent", "--format", "markdown").output
    assert "| Row | dmgl | Multi Paper | Multi Measured | Multi Δ |" in markdown


# ------------------------------------------------------------------------------------------------ errors


def test_user_errors_end_in_one_clear_message(run_cli, registry, tmp_path, monkeypatch):
    unknown_table = run_cli("reproduce", "table9", "--dataset", "crema-d", expect=2)
    assert "'table9' is not one of 'table1', 'table2', 'table4', 'table5'" in unknown_table.output
    not_in_table = run_cli("reproduce", "table5", "--dataset", "crema-d", expect=1)
    assert "Table 5 has no figures for crema-d; it covers sarcasm" in not_in_table.output
    unknown = run_cli("reproduce", "table1", "--dataset", "no-such-data", expect=1)
    assert "unknown dataset 'no-such-data'" in unknown.output
    not_prepared = run_cli("reproduce", "table1", "--dataset", "crema-d", "--dry-run", expect=1)
    assert "dataset 'crema-d' is not prepared" in not_prepared.output
    assert "dmgl prepare crema-d" in not_prepared.output
    bad_row = run_cli("reproduce", "table4", "--dataset", "crema-d", "--only", "bogus", expect=1)
    assert "--only bogus names no row" in bad_row.output
    monkeypatch.setenv("DMGL_RECIPES", str(tmp_path))  # a recipes folder without sarcasm-clip
    no_recipe = run_cli("reproduce", "table5", "--dataset", "sarcasm", expect=1)
    assert "trains with recipe 'sarcasm-clip', which is not installed" in no_recipe.output
    for result in (not_in_table, unknown, not_prepared, bad_row, no_recipe):
        assert result.output.count("Error:") == 1 and "Traceback" not in result.output


@pytest.mark.slow  # the module's registry trains 2 rows x 2 seeds once (about 20 s on 2 cores)
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_the_latex_table_compiles(rep_cli, tmp_path):
    recipe = tmp_path / "mine.yaml"
    shutil.copy(ROOT / "recipes" / "synthetic.yaml", recipe)
    body = rep_cli("table4", "--dataset", "crema-d", "--recipe", recipe, *SETTINGS, *ROWS, "-f", "latex", "--silent")
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\\usepackage{booktabs,array,graphicx}\n\\begin{document}\n"
        f"{body.stdout}\n\\end{{document}}\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:]


@pytest.mark.slow  # the module's registry trains 2 rows x 2 seeds once (about 20 s on 2 cores)
def test_table1_on_a_dataset_of_ones_own_plans_every_method_and_one_unimodal_row_per_modality(rep_cli):
    plan = json.loads(rep_cli("table1", "--dataset", "synthetic", "--seeds", "1", "--dry-run", "--json").stdout)
    rows = [row["row"] for row in plan["rows"]]
    assert rows[:2] == ["Fast", "Slow"] and rows[-2:] == ["Ours-H", "Ours-LB"]
    assert "Audio" not in rows and "Channel" in rows and len(rows) == 2 + 18
    assert plan["paper"] is None and plan["to_train"] == 20
    by_row = {row["row"]: row for row in plan["rows"]}
    assert by_row["Fast"]["method"] == "unimodal" and by_row["Fast"]["modality"] == "fast"
    assert by_row["OGM"]["strategy"] == "constant:0"  # a comparison method trains as published


def test_paper_figures_are_placed_against_the_measured_95_percent_interval():
    from scipy import stats as scipy_stats

    from dmgl_cli.report.selection import Stat
    from dmgl_cli.reproduce import measured_cell, paper_against_interval

    values = [0.80, 0.83, 0.81]
    mean, std = statistics.mean(values), statistics.stdev(values)
    cell = measured_cell(Stat(mean, std, 3, ("a", "b", "c"), {0: 0.80, 1: 0.83, 2: 0.81}))
    low, high = scipy_stats.t.interval(0.95, 2, loc=mean, scale=std / math.sqrt(3))
    assert cell.ci == (pytest.approx(low), pytest.approx(high))
    assert paper_against_interval(81.0, cell.ci) == "inside"
    assert paper_against_interval(100 * low - 0.01, cell.ci) == "below"
    assert paper_against_interval(100 * high + 0.01, cell.ci) == "above"
    assert paper_against_interval(81.0, None) is None  # one seed: no interval
