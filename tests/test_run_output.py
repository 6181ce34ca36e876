"""What `dmgl train` prints and records for a user: the run's link as soon as the parent run exists (at the port of
a `dmgl ui` serving the store), the device it trained on, one seed's score without a spread, and the parent's
description table padded; `--print-config` marks what differs from the recipe; the CSV report fills `text`."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
import yaml
from click.testing import CliRunner

from dmgl_cli import links
from dmgl_cli.cli import cli
from dmgl_cli.cli.output import paired_scores
from dmgl_cli.paths import default_tracking_uri
from dmgl_cli.tables import Cell, Row, Table, render_csv, render_markdown
from dmgl_cli.tracking import Tracker

UI = "http://127.0.0.1:5999"  # where the stand-in `dmgl ui` says it serves


@pytest.fixture(scope="module")
def one_seed(tmp_path_factory):
    """One `dmgl train` of one seed, while this process is recorded as a `dmgl ui` over the store at :data:`UI`."""
    home = tmp_path_factory.mktemp("run-output") / "registry"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DMGL_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("DMGL_UI_URL", raising=False)
        runner = CliRunner()
        prepared = runner.invoke(cli, ["prepare", "synthetic", "-o", "samples=300", "--silent"])
        assert prepared.exit_code == 0, prepared.output
        links.record_ui(default_tracking_uri(), UI)
        try:
            trained = runner.invoke(cli, ["train", "--strategy", "constant:0.5", "--epochs", "2"])
            listed = runner.invoke(cli, ["runs", "list"])
        finally:
            links.forget_ui(default_tracking_uri())
        assert trained.exit_code == 0, trained.output
        tracker = Tracker()
        parent_id = re.search(r"parent run ([0-9a-f]{32})", trained.output)
        assert parent_id is not None
        yield trained.output, listed.output, tracker.get_run(parent_id.group(1)), tracker
        assert links.recorded_ui(default_tracking_uri()) is None  # forgotten: links go back to the default


@pytest.mark.slow
def test_the_link_comes_when_the_parent_run_is_created_at_the_ui_port(one_seed):
    output, _, parent, _ = one_seed
    lines = output.splitlines()
    link = f"view: {UI}/#/experiments/{parent.experiment_id}/runs/{parent.run_id}"
    first_link = next(i for i, line in enumerate(lines) if line.startswith(link))
    first_epoch = next(i for i, line in enumerate(lines) if "epoch" in line and line.startswith("seed"))
    assert first_link < first_epoch  # printed as the run starts, not only at its end
    assert lines[-1].startswith(link)


@pytest.mark.slow
def test_the_device_used_is_recorded_not_auto(one_seed):
    _, _, parent, tracker = one_seed
    (seed,) = tracker.children(parent.run_id)
    for run in (parent, seed):
        assert run.tags["dmgl.device"] == "cpu"  # this machine's tests run on the CPU
        assert run.params["train.device"] == "auto"  # the setting, which a resume resolves again


@pytest.mark.slow
def test_one_seed_prints_no_spread(one_seed):
    output, listed, _, _ = one_seed
    summary = next(line for line in output.splitlines() if line.startswith("mean over 1 seeds:"))
    assert "±" not in summary and re.search(r"test_acc \d\.\d{4}", summary)
    row = next(line for line in listed.splitlines() if "concat-constant-0.5" in line)
    assert "±" not in row and re.search(r"test_acc \d\.\d{4}", row)


def test_a_one_seed_column_shows_its_mean_alone():
    columns = {"test_acc": [0.5, 0.6], "test_acc_std": [0.0, 0.02]}
    assert paired_scores(columns, [1, 3]) == {"test_acc": ["0.5000", "0.6000 ± 0.0200"]}
    # a parent recorded by an earlier version named its mean test_acc_mean
    old = {"test_acc_mean": [0.5, 0.6], "test_acc_std": [0.0, 0.02]}
    assert paired_scores(old, [1, 3]) == {"test_acc": ["0.5000", "0.6000 ± 0.0200"]}
    # a metric named like a spread, with no mean beside it, is shown as itself
    assert paired_scores({"film_scale_std": [0.1, 0.2]}) == {"film_scale_std": ["0.1000", "0.2000"]}


@pytest.mark.slow
def test_the_description_table_is_padded(one_seed):
    _, _, parent, _ = one_seed
    note = parent.tags["mlflow.note.content"]
    rows = [line for line in note.splitlines() if line.startswith("|")]
    table = rows[: next(i for i, line in enumerate(rows) if i and "mean ± std" not in line and "seed" not in line)]
    assert "&ensp;ACC&ensp;" in rows[0] and "&ensp;mean ± std (1 seed)&ensp;" in rows[2]
    assert len({len(line) for line in table}) == 1  # the source's columns line up too


def _table() -> Table:
    return Table(
        kind="main",
        title="scores",
        stub_columns=["Method"],
        columns=["ACC", "Note"],
        rows=[
            Row(["concat"], [Cell(0.4, 0.011, 3), Cell(kind="text", text="yes")]),
            Row(["a longer name"], [Cell(0.45, None, 1), Cell(kind="text", text="")]),
        ],
    )


def test_render_markdown_padded_aligns_and_pads_every_cell():
    lines = [line for line in render_markdown(_table(), padded=True).splitlines() if line.startswith("|")]
    assert len({len(line) for line in lines}) == 1
    assert lines[0].startswith("| &ensp;Method&ensp;") and "&ensp;40.00% ± 1.10%&ensp; |" in lines[2]
    assert render_markdown(_table()).splitlines()[2] == "| Method | ACC | Note |"  # the report's, unchanged


def test_the_csv_text_column_holds_the_cell_as_printed():
    rows = list(csv.DictReader(io.StringIO(render_csv([_table()]))))
    assert [r["text"] for r in rows] == ["40.00% ± 1.10%", "yes", "45.00%", ""]
    assert rows[0]["mean"] == repr(0.4)


def test_print_config_marks_what_differs_from_the_recipe(registry):
    args = ["train", "--strategy", "constant:0.5", "--epochs", "4", "--set", "optim.lr=0.02", "--print-config"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    marked = {
        line.split(":")[0].strip(): line.rsplit("# ", 1)[1] for line in result.stdout.splitlines() if " # " in line
    }
    assert marked == {"lr": "--set", "name": "flag", "alpha": "flag", "epochs": "flag"}
    assert yaml.safe_load(result.stdout)["optim"]["lr"] == 0.02  # still YAML
    same = CliRunner().invoke(cli, ["train", "--set", "optim.lr=0.05", "--print-config"])
    assert "  lr: 0.05\n" in same.stdout  # the recipe's own value: nothing to mark


@pytest.mark.parametrize(
    "args",
    [
        ["sweep", "--strategies", "constant:0.5,lb", "--set", "train.epochs=2", "--seeds", "2"],
        ["reproduce", "table1", "--dataset", "crema-d", "--set", "train.epochs=2"],
    ],
    ids=["sweep", "reproduce"],
)
def test_sweep_and_reproduce_print_their_config_and_touch_nothing(registry, args):
    result = CliRunner().invoke(cli, [*args, "--print-config"])
    assert result.exit_code == 0, result.output
    assert "  epochs: 2  # --set" in result.stdout
    assert yaml.safe_load(result.stdout)["train"]["epochs"] == 2
    document = json.loads(CliRunner().invoke(cli, [*args, "--print-config", "--json"]).stdout)
    assert document["config"]["train"]["epochs"] == 2 and document["differs_from_recipe"]["train.epochs"] == "--set"
    if args[0] == "sweep":
        assert document["strategies"]["constant:0.5"] == {"strategy.name": "constant", "strategy.alpha": 0.5}
        assert document["seeds"] == [0, 1]
    else:
        assert document["rows"]["Concat"] == {"method": "concat", "strategy": "constant:0", "modality": None}
    assert not registry.exists()  # no MLflow store, no Optuna storage, no dataset registry
