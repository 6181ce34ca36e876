"""A run is named by its whole id, a unique id prefix (6+ characters) or its unique name, wherever a command takes a
run id; an ambiguous or unknown one is one clear error. Sweep trial names differ across studies, and `runs compare`
compares only the settings that apply to every run."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dmgl_cli.cli import cli
from dmgl_cli.errors import DmglError
from dmgl_cli.strategies import parse_strategy
from dmgl_cli.sweep.worker import _run_name
from dmgl_cli.tracking import RUN_ID_PREFIX_MIN, SHOWN_CANDIDATES, Tracker


def _parent(tracker: Tracker, experiment_id: str, name: str, strategy: str, params: dict[str, object]) -> str:
    run_id = tracker.start_run(
        experiment_id,
        name,
        {"dmgl.role": "parent", "dmgl.strategy": strategy, "dmgl.method": "concat", "dmgl.seeds": "0"},
    )
    tracker.log_params(run_id, {"strategy.name": strategy, "method.name": "concat", "optim.lr": 0.01, **params})
    tracker.end_run(run_id, "FINISHED")
    return run_id


@pytest.fixture
def store(registry):
    """Runs named as dmgl names them: one LB and one constant run, and a name given to seven runs."""
    tracker = Tracker()
    experiment_id = tracker.experiment_id("refs")
    runs = {
        "lb": _parent(tracker, experiment_id, "concat-lb", "lb", {"strategy.lb.alpha_lr": 0.05}),
        "constant": _parent(tracker, experiment_id, "concat-constant-0.5", "constant", {"strategy.alpha": 0.5}),
    }
    repeated = [_parent(tracker, experiment_id, "again", "lb", {}) for _ in range(SHOWN_CANDIDATES + 2)]
    return tracker, runs, repeated


def _json(*args: str) -> dict:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_run_is_found_by_id_prefix_or_name(store):
    tracker, runs, _ = store
    lb = runs["lb"]
    for reference in (lb, lb[:RUN_ID_PREFIX_MIN], lb[:12], "concat-lb", f"  {lb[:8]} "):
        assert tracker.find_run(reference).run_id == lb
    assert _json("runs", "show", lb[:8], "--json")["run_id"] == lb
    assert _json("runs", "show", "concat-constant-0.5", "--json")["run_id"] == runs["constant"]


def test_an_ambiguous_name_lists_some_candidates_and_the_command(store, run_cli):
    _, _, repeated = store
    output = run_cli("runs", "show", "again", expect=1).output
    assert output.count("Error:") == 1 and "fits more than one run" in output
    listed = [run_id for run_id in repeated if run_id in output]
    assert len(listed) == SHOWN_CANDIDATES and "... and more" in output
    assert "`dmgl runs list --role all`" in output


def test_an_unknown_or_too_short_reference_says_so(store, run_cli):
    _, runs, _ = store
    assert "does not exist" in run_cli("runs", "show", "ffffffffff", expect=1).output
    short = run_cli("runs", "show", runs["lb"][:3], expect=1).output
    assert "does not exist" in short and f"at least {RUN_ID_PREFIX_MIN} characters" in short
    with pytest.raises(DmglError, match="does not exist"):
        store[0].find_run("0123456789abcdef0123456789abcdef")


@pytest.mark.parametrize(
    "command",
    [
        ["eval"],
        ["register", "--name", "m"],
        ["explain"],
        ["train", "--resume"],
        ["runs", "compare", "concat-lb"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_every_command_that_takes_a_run_id_resolves_it_alike(store, run_cli, command):
    output = run_cli(*command, "again", expect=1).output
    assert "fits more than one run" in output and "Traceback" not in output


def test_runs_compare_takes_prefixes_and_compares_only_shared_settings(store):
    _, runs, _ = store
    comparison = _json("runs", "compare", runs["lb"][:8], "concat-constant-0.5", "--json")
    assert [r["run_id"] for r in comparison["runs"]] == [runs["lb"], runs["constant"]]
    # strategy.lb.* is no setting of the constant run, strategy.alpha none of the LB run: neither is a difference
    assert comparison["params"] == {"strategy.name": ["lb", "constant"]}
    assert comparison["same_params"] == 2  # method.name, optim.lr


def test_the_same_run_twice_is_refused_even_by_two_references(store, run_cli):
    _, runs, _ = store
    output = run_cli("runs", "compare", runs["lb"], "concat-lb", expect=1).output
    assert "named more than once" in output


def test_trial_names_differ_across_studies():
    spec = parse_strategy("stepwise:0.95")
    first, second = _run_name("synthetic-20261204-0551", 3, spec), _run_name("synthetic-20261204-0612", 3, spec)
    assert first.startswith("t3-stepwise-0.95-") and second.startswith("t3-stepwise-0.95-")
    assert first != second
    assert _run_name("synthetic-20261204-0551", 3, spec) == first  # one study, one name
