"""The CLI a researcher scripts against: `dmgl runs list | show | compare`, `--json` on train / eval / sweep,
`dmgl train --print-config` and `--dry-run`, typos refused before torch or MLflow load, and the progress bar."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner
from tiny import tiny_run

from dmgl_cli.cli import cli
from dmgl_cli.cli.output import BatchBar, progress_bar_wanted
from dmgl_cli.config import resolve
from dmgl_cli.errors import DmglError
from dmgl_cli.links import ui_base
from dmgl_cli.paths import repo_root
from dmgl_cli.run_queries import RunFilter, train_plan
from dmgl_cli.strategies import spec_from_flags
from dmgl_cli.tracking import Tracker

FAST = tiny_run(epochs=1)
HEAVY = ("torch", "mlflow", "optuna")


def _invoke(*args: str, expect: int = 0):
    """Like conftest's run_cli, but stdout and stderr apart (result.stdout holds only what a pipe would get)."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == expect, f"dmgl {' '.join(args)}: {result.output}\n{result.exception!r}"
    return result


# ------------------------------------------------------------------------------- refused before anything loads


def _imported(importtime_stderr: str) -> set[str]:
    """Top-level packages named by `python -X importtime` (lines 'import time: self | cumulative | name')."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--set", "train.epoch=3"], "unknown setting 'train.epoch' — did you mean 'train.epochs'?"),
        (["train", "--strategy", "magic"], "unknown strategy 'magic'"),
        (["train", "--seeds", "two"], "--seeds must be a count"),
        (["train", "--name", "../up"], "run name '../up' is not allowed"),
        (["train", "--recipe", "nope", "--dry-run"], "unknown recipe 'nope'"),
        (["sweep", "--strategies", "constant:0.5,magic"], "unknown strategy 'magic'"),
        (["sweep", "--set", "optim.learning_rate=0.1"], "unknown setting 'optim.learning_rate'"),
        (["sweep", "--strategies", "lb", "--seeds", "x"], "--seeds must be a count"),
        (["runs", "list", "--strategy", "magic"], "unknown strategy 'magic'"),
    ],
)
def test_a_typo_is_refused_before_torch_mlflow_or_optuna_is_imported(registry, args, message):
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dmgl_cli", *args],
        cwd=repo_root(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
    imported = _imported(done.stderr)
    assert "dmgl_cli" in imported  # the parse of -X importtime's output works
    assert not imported & set(HEAVY), f"imported before refusing: {sorted(imported & set(HEAVY))}"
    assert not registry.exists()  # nothing created either


def _heavy_imports(*args: str) -> set[str]:
    """The heavy packages one `dmgl` command imports (run in a subprocess, read from -X importtime)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dmgl_cli", *args],
        cwd=repo_root(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    return _imported(done.stderr) & set(HEAVY)


@pytest.mark.slow
def test_an_unknown_run_id_is_answered_without_torch_or_mlflow(registry):
    Tracker().experiment_id("exists")  # a store with an experiment, so that the search runs
    for command in (["runs", "show"], ["eval"], ["explain"], ["register", "--name", "m"], ["train", "--resume"]):
        # the local store is read with the standard library's sqlite3 (tracking/store_reader.py)
        assert _heavy_imports(*command, "ffffffffff") == set(), command


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["train", "--print-config"],
        ["train", "--dry-run"],
        ["train", "--epochs", "1"],  # no dataset is prepared: refused before MLflow loads
        ["sweep", "--print-config"],
        ["reproduce", "table1", "--dataset", "crema-d", "--print-config"],
    ],
    ids=lambda a: " ".join(a),
)
def test_what_records_nothing_loads_neither_mlflow_nor_optuna(registry, args):
    assert not _heavy_imports(*args) & {"mlflow", "optuna"}
    if args[0] == "train":  # config validation asks the torch-free catalogue, not the methods
        assert "torch" not in _heavy_imports(*args)


# --------------------------------------------------------------------------------- --print-config and --dry-run


def test_print_config_is_the_resolved_config(run_cli, registry):
    args = ["--strategy", "constant:0.5", "--epochs", "4", "--set", "optim.lr=0.01", "--experiment", "scratch"]
    expected = resolve(
        "synthetic",
        ["optim.lr=0.01"],
        strategy=spec_from_flags("constant:0.5"),
        settings={"train.epochs": 4, "experiment": "scratch"},
    ).to_dict()
    assert yaml.safe_load(_invoke("train", *args, "--print-config").stdout) == expected
    assert json.loads(_invoke("train", *args, "--print-config", "--json").stdout) == expected
    assert not (registry / "mlflow.db").exists()


def test_dry_run_lists_the_runs_and_records_nothing(run_cli, registry):
    # No dataset is prepared either: a dry run reads nothing but the recipe.
    text = _invoke("train", "--strategy", "stepwise:0.95", "--seeds", "3", "--name", "probe", "--dry-run").stdout
    assert "in experiment 'synthetic'" in text
    assert "parent run probe: concat / stepwise:0.95 on synthetic" in text
    assert [line.split()[2] for line in text.splitlines() if "seed run" in line] == [
        "probe-seed0",
        "probe-seed1",
        "probe-seed2",
    ]
    plan = json.loads(_invoke("train", "--strategy", "lb", "--seeds", "0,4", "--dry-run", "--json").stdout)
    assert plan == {
        "dry_run": True,
        "experiment": "synthetic",
        "parent_run": "concat-lb",
        "seed_runs": ["concat-lb-seed0", "concat-lb-seed4"],
        "seeds": [0, 4],
        "dataset": "synthetic",
        "recipe": "synthetic",
        "method": "concat",
        "strategy": "lb",
        "epochs": resolve("synthetic").train.epochs,
    }
    assert not (registry / "mlflow.db").exists()
    assert not (registry / "artifacts").exists()


def test_the_plan_names_runs_as_training_does():
    from dmgl_cli.run_names import default_run_name

    config = resolve("synthetic", strategy=spec_from_flags("constant", alpha=0.0))
    plan = train_plan(config, [1, 2])
    assert plan.parent_run == default_run_name(config)
    assert plan.seed_runs == [f"{plan.parent_run}-seed1", f"{plan.parent_run}-seed2"]
    assert plan.strategy == "constant:0"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--print-config", "--dry-run"], "give one"),
        (["--resume", "0123456789abcdef0123456789abcdef", "--dry-run"], "drop --dry-run"),
        (["--resume", "0123456789abcdef0123456789abcdef", "--print-config"], "drop --print-config"),
        (["--name", "../up", "--dry-run"], "run name '../up' is not allowed"),
    ],
)
def test_print_config_and_dry_run_refusals(run_cli, args, message):
    assert message in run_cli("train", *args, expect=1).output


# ------------------------------------------------------------------------------------- runs list / show / compare


def _fake_train(tracker: Tracker, experiment: str, strategy: str, value: float | None, method: str, acc: float):
    """A parent run with two seed runs, recorded as `dmgl train` records them (tags, params, final_* metrics)."""
    experiment_id = tracker.experiment_id(experiment)
    params = {"strategy.name": strategy, "method.name": method, "train.select_metric": "acc", "optim.lr": 0.05}
    if value is not None:
        params["strategy.alpha" if strategy == "constant" else "strategy.p"] = value
    tags = {"dmgl.dataset": experiment, "dmgl.method": method, "dmgl.strategy": strategy}
    parent = tracker.start_run(
        experiment_id, f"{method}-{strategy}", {**tags, "dmgl.role": "parent", "dmgl.seeds": "0,1"}
    )
    tracker.log_params(parent, {**params, "seeds": "0,1"})
    for seed in (0, 1):
        child = tracker.start_run(
            experiment_id,
            f"{method}-{strategy}-seed{seed}",
            {**tags, "dmgl.role": "seed", "dmgl.seed": str(seed)},
            parent_id=parent,
        )
        tracker.log_params(child, {**params, "train.seed": seed})
        tracker.log_metrics(child, {"final_test_acc": acc + seed / 100, "final_val_acc": acc})
        tracker.end_run(child, "FINISHED")
    tracker.log_metrics(parent, {"final_test_acc_mean": acc + 0.005, "final_test_acc_std": 0.007})
    tracker.end_run(parent, "FINISHED")
    return parent


@pytest.fixture
def recorded(registry):
    """Three trainings in two experiments: constant:0.5 and lb (concat) on 'alpha', constant:0 (sum) on 'beta'."""
    tracker = Tracker()
    return {
        "half": _fake_train(tracker, "alpha", "constant", 0.5, "concat", 0.61),
        "lb": _fake_train(tracker, "alpha", "lb", None, "concat", 0.72),
        "zero": _fake_train(tracker, "beta", "constant", 0.0, "sum", 0.55),
    }


def _list(*args: str) -> list[dict]:
    return json.loads(_invoke("runs", "list", *args, "--json").stdout)


def test_runs_list_filters_and_json(recorded):
    assert [r["run_id"] for r in _list()] == [recorded["zero"], recorded["lb"], recorded["half"]]  # newest first
    (half,) = _list("--strategy", "constant:0.5")
    assert half["run_id"] == recorded["half"] and half["strategy"] == "constant:0.5" and half["seeds"] == [0, 1]
    assert half["experiment"] == "alpha" and half["role"] == "parent" and half["status"] == "FINISHED"
    assert half["metric"] == "test_acc" and half["value"] == pytest.approx(0.615) and half["std"] == 0.007
    assert half["url"].startswith(ui_base(Tracker().uri)) and recorded["half"] in half["url"]
    assert {r["run_id"] for r in _list("--strategy", "CONSTANT")} == {recorded["half"], recorded["zero"]}
    assert [r["run_id"] for r in _list("--experiment", "alpha", "--strategy", "constant")] == [recorded["half"]]
    assert [r["run_id"] for r in _list("--method", "sum")] == [recorded["zero"]]
    assert [r["run_id"] for r in _list("--dataset", "alpha", "--limit", "1")] == [recorded["lb"]]
    assert _list("--status", "failed") == [] and _list("--strategy", "constant:0.25") == []
    seeds = _list("--role", "seed", "--strategy", "lb")
    assert len(seeds) == 2 and {s["parent_run_id"] for s in seeds} == {recorded["lb"]}
    assert sorted(s["value"] for s in seeds) == pytest.approx([0.72, 0.73])
    assert len(_list("--role", "all")) == 9


def test_runs_list_text_and_refusals(recorded, run_cli):
    out = run_cli("runs", "list", "--experiment", "beta").output
    assert recorded["zero"] in out and "constant:0" in out and "test_acc 0.5550 ± 0.0070" in out
    assert "no runs match" in run_cli("runs", "list", "--method", "none-such").output
    assert "no MLflow experiment named 'gamma'" in run_cli("runs", "list", "--experiment", "gamma", expect=1).output
    assert "is not a name dmgl records" in run_cli("runs", "list", "--dataset", "a'b", expect=1).output


def test_runs_show(recorded, run_cli):
    detail = json.loads(_invoke("runs", "show", recorded["half"], "--json").stdout)
    assert detail["run_id"] == recorded["half"] and detail["strategy"] == "constant:0.5"
    assert detail["params"]["strategy.alpha"] == "0.5" and detail["tags"]["dmgl.role"] == "parent"
    assert detail["final"] == {"test_acc_mean": pytest.approx(0.615), "test_acc_std": 0.007}
    assert [c["name"] for c in detail["children"]] == ["concat-constant-seed0", "concat-constant-seed1"]
    text = run_cli("runs", "show", recorded["half"]).output
    assert "test_acc  0.6150 ± 0.0070" in text and "child runs (2):" in text and "view: http" in text
    assert "does not exist" in run_cli("runs", "show", "0123456789abcdef0123456789abcdef", expect=1).output


def test_runs_compare(recorded, run_cli):
    ids = [recorded["half"], recorded["lb"], recorded["zero"]]
    comparison = json.loads(_invoke("runs", "compare", *ids, "--json").stdout)
    assert [r["run_id"] for r in comparison["runs"]] == ids
    # strategy.alpha is no setting of the lb run: not compared (the strategy row shows constant:0.5 against lb)
    assert comparison["params"] == {
        "method.name": ["concat", "concat", "sum"],
        "strategy.name": ["constant", "lb", "constant"],
    }
    assert comparison["same_params"] == 3  # optim.lr, seeds, train.select_metric
    assert comparison["final"]["test_acc_mean"] == [pytest.approx(0.615), pytest.approx(0.725), pytest.approx(0.555)]
    text = run_cli("runs", "compare", *ids).output
    assert "params that differ (3 others are equal):" in text and "0.7250 ± 0.0070" in text
    assert "at least two run ids" in run_cli("runs", "compare", ids[0], expect=1).output


def test_a_filter_is_checked_before_the_store_opens():
    with pytest.raises(DmglError, match="--limit must be >= 1"):
        RunFilter(limit=0).check()


# ------------------------------------------------------------------------------------------- progress bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    assert progress_bar_wanted(False, _Terminal())
    assert not progress_bar_wanted(True, _Terminal())  # --silent
    assert not progress_bar_wanted(False, io.StringIO())  # redirected to a file or a pipe
    monkeypatch.setenv("TERM", "dumb")
    assert not progress_bar_wanted(False, _Terminal())


def test_batch_bar_draws_one_bar_per_epoch():
    screen = _Terminal()
    with BatchBar(screen) as bar:
        for epoch in (1, 2):
            for batch in range(1, 5):
                bar(3, epoch, batch, 4)
        bar(3, 3, 2, 4)  # a resumed run starts mid-epoch
    drawn = screen.getvalue()  # tqdm redraws at most every 0.1 s: the first state of each bar is always drawn
    assert "seed 3 epoch 1:   0%" in drawn and "seed 3 epoch 2:   0%" in drawn
    assert "seed 3 epoch 3:  25%" in drawn and "seed 3 epoch 3:   0%" not in drawn  # resumed after batch 1
    assert drawn.endswith("\r")  # closed: the last bar is cleared (leave=False), the epoch line follows


def test_train_asks_for_per_batch_progress_only_on_a_terminal(run_cli, synthetic, monkeypatch):
    """No per-batch callback at all when the bar is off (CliRunner's streams are not terminals). The dataset is
    prepared: `dmgl train` refuses an unprepared one before it calls training."""
    from dmgl_cli.run import training
    from dmgl_cli.run.outcomes import TrainOutcome

    seen = []

    def fake_train(config, seeds, **kwargs):
        seen.append(kwargs["step_progress"])
        return TrainOutcome(parent_run_id="p" * 32, experiment="synthetic", experiment_id="1")

    monkeypatch.setattr(training, "train", fake_train)
    run_cli("train", "--epochs", "1")
    monkeypatch.setattr("dmgl_cli.cli.train.progress_bar_wanted", lambda silent, stream=None: not silent)
    run_cli("train", "--epochs", "1")
    run_cli("train", "--epochs", "1", "--silent")
    assert seen[0] is None and isinstance(seen[1], BatchBar) and seen[2] is None


# ----------------------------------------------------------------------------- --json on train, eval and sweep


@pytest.mark.slow
def test_train_and_eval_json_then_list_them(synthetic, registry, monkeypatch):
    result = _invoke("train", "--strategy", "constant:0.5", "--seeds", "2", *FAST, "--json")
    outcome = json.loads(result.stdout)  # stdout is the JSON document alone
    assert "parent run" in result.stderr and "seed 1 epoch   1/1" in result.stderr  # progress went to stderr
    parent = outcome["parent_run_id"]
    assert outcome["experiment"] == "synthetic" and outcome["complete"] is True
    assert [s["seed"] for s in outcome["seeds"]] == [0, 1]
    assert outcome["url"].endswith(f"/runs/{parent}?workflowType=machine_learning")
    assert f"/experiments/{outcome['experiment_id']}/" in outcome["seeds"][0]["url"]
    assert outcome["summary"]["test_acc"] == pytest.approx(sum(s["final"]["test_acc"] for s in outcome["seeds"]) / 2)
    text = _invoke("train", "--strategy", "heuristic", *FAST, "--silent").stdout
    assert text.splitlines()[-1].startswith("view: http") and "/runs/" in text.splitlines()[-1]

    (listed,) = _list("--strategy", "constant:0.5")
    config = resolve("synthetic", strategy=spec_from_flags("constant:0.5"))
    assert listed["name"] == train_plan(config, [0, 1]).parent_run  # the dry run names runs as training does
    assert listed["run_id"] == parent and listed["value"] == pytest.approx(outcome["summary"]["test_acc"])

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    evaluated = _invoke("eval", parent, "--json")
    assert "Downloading artifacts" not in evaluated.output  # MLflow's own bars are off
    scored = json.loads(evaluated.stdout)
    assert scored["run_id"] == parent and scored["checkpoint"] == "best" and scored["split"] == "test"
    assert [r["run_id"] for r in scored["results"]] == [s["run_id"] for s in outcome["seeds"]]
    for result_, seed in zip(scored["results"], outcome["seeds"], strict=True):
        assert result_["metrics"]["test_acc"] == pytest.approx(seed["final"]["test_acc"])
        assert result_["max_abs_diff"] == 0 and result_["url"] == seed["url"]
    assert (
        _invoke("eval", outcome["seeds"][0]["run_id"]).stdout.splitlines()[-1] == f"view: {outcome['seeds'][0]['url']}"
    )


@pytest.mark.slow
def test_sweep_json(synthetic, registry):
    result = _invoke(
        "sweep",
        "--strategies",
        "constant:0.5,heuristic",
        "--study",
        "js",
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=64",
        "--json",
        "--silent",
    )
    document = json.loads(result.stdout)
    assert document["study"] == "js" and document["complete"] is True and document["interrupted"] is False
    assert document["strategies"] == ["constant:0.5", "heuristic"] and document["objective"] == "val_acc"
    assert [t["strategy"] for t in document["trials"]] == ["constant:0.5", "heuristic"]
    assert all(t["state"] == "COMPLETE" and t["run_id"] in t["url"] for t in document["trials"])
    best = document["best"]
    assert best["value"] == max(t["value"] for t in document["trials"])
    assert document["sweep_run_id"] in document["url"]
    sweep_rows = _list("--role", "sweep")
    assert [r["run_id"] for r in sweep_rows] == [document["sweep_run_id"]]
