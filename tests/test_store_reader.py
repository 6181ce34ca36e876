"""The SQLite store reader against MLflow itself: one store written by ``MlflowClient`` (experiments, one deleted;
parents with seed children; params, tags, metrics at several steps with a repeated step, timestamps out of order,
NaN and infinities; deleted runs; generated, renamed and tag-only names; runs started in the same millisecond),
then every query of the reader compared with what ``MlflowClient`` answers on the same store: same runs, same
order, same fields. Then the stores the reader leaves to MLflow, and its schema revisions against MLflow's head.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow.store.db_migrations
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from mlflow.entities import Metric, Param, RunStatus, ViewType
from mlflow.tracking import MlflowClient

from dmgl_cli.errors import DmglError
from dmgl_cli.tracking import Tracker
from dmgl_cli.tracking.queries import reader_query
from dmgl_cli.tracking.store_reader import KNOWN_REVISIONS, PARENT_TAG, SqliteStoreReader, StoredRun

ALL_RUNS = 50000
START = 1_700_000_000_000  # ms; runs are given explicit start times so that some tie


class Store:
    """The written store: its URI and file, the client that wrote it, and the ids worth querying."""

    def __init__(self, uri: str, path: Path, client: MlflowClient):
        self.uri, self.path, self.client = uri, path, client
        self.experiments: dict[str, str] = {}  # name -> id, the deleted one too
        self.parents: list[str] = []
        self.runs: list[str] = []  # every run, deleted ones too
        self.deleted: list[str] = []
        self.tag_only_name = ""


def _write_store(folder: Path) -> Store:
    path = folder / "mlflow.db"
    with sqlite3.connect(path) as connection:  # as dmgl opens its stores: readers work while a writer writes
        connection.execute("PRAGMA journal_mode=WAL")
    uri = f"sqlite:///{path}"
    client = MlflowClient(tracking_uri=uri)
    store = Store(uri, path, client)
    for name in ("alpha", "beta", "gone"):
        store.experiments[name] = client.create_experiment(name, artifact_location=(folder / "artifacts").as_uri())

    def run(experiment: str, name: str | None, start: int, tags: dict[str, str] | None = None) -> str:
        created = client.create_run(store.experiments[experiment], start_time=START + start, tags=tags, run_name=name)
        store.runs.append(created.info.run_id)
        return created.info.run_id

    for index, experiment in enumerate(("alpha", "alpha", "beta")):
        parent = run(experiment, f"parent-{index}", 10 * index, {"dmgl.role": "parent", "dmgl.strategy": "lb"})
        store.parents.append(parent)
        client.log_batch(parent, params=[Param("seeds", "0,1"), Param("strategy.name", "lb")])
        for seed in (0, 1, 2):
            # seeds 0 and 1 start in the same millisecond: MLflow orders them by id
            child = run(
                experiment,
                f"parent-{index}-seed{seed}",
                10 * index + 1 + seed // 2,
                {PARENT_TAG: parent, "dmgl.role": "seed", "dmgl.seed": str(seed)},
            )
            client.log_batch(
                child,
                params=[Param("train.seed", str(seed)), Param("long", "x" * 6000)],
                metrics=[
                    Metric("val/acc", 0.5 + seed / 10, START + 100, 0),
                    Metric("val/acc", 0.6, START + 300, 1),
                    Metric("val/acc", 0.7, START + 200, 2),  # a later step with an earlier timestamp
                    Metric("val/acc", 0.65, START + 400, 1),  # step 1 again, logged later
                    Metric("train/loss", math.nan, START + 100, 0),
                    Metric("train/loss", math.inf, START + 200, 1),
                    Metric("alpha/value", -math.inf, START + 100, 0),
                    Metric("val/loss", math.nan, START + 100, 0),  # NaN as the latest value
                    Metric("final/test_acc", 0.61, START + 500, 0),
                    Metric("final/test_acc", 0.61, START + 500, 0),  # the same value twice
                ],
            )
            if seed == 2:  # the latest value is NaN
                client.log_metric(child, "final/test_acc", math.nan, timestamp=START + 600, step=3)
                client.delete_run(child)
                store.deleted.append(child)
            else:
                client.set_terminated(child, "FINISHED" if seed == 0 else "FAILED", end_time=START + 900)
        client.log_metric(parent, "final/test_acc_mean", 0.605, timestamp=START + 700)
        client.set_terminated(parent, "FINISHED", end_time=START + 1000)
    unnamed = run("alpha", None, 5)  # MLflow makes up a name
    client.set_terminated(unnamed, RunStatus.to_string(RunStatus.KILLED))
    renamed = run("beta", "before", 40)
    client.update_run(renamed, name="after")
    running = run("beta", "still-running", 50, {"dmgl.role": "sweep"})
    client.set_tag(running, "note", "")
    client.log_param(running, "empty", "")
    deleted = run("alpha", "deleted", 60, {"dmgl.role": "parent"})
    client.delete_run(deleted)
    store.deleted.append(deleted)
    in_gone = run("gone", "in-deleted-experiment", 70, {"dmgl.role": "parent"})
    client.set_tag(in_gone, "mlflow.runName", "renamed-by-tag")
    client.delete_experiment(store.experiments["gone"])
    # A run as MLflow 1.x wrote it: the name only in the mlflow.runName tag, the column empty. No client of the
    # installed MLflow writes that, so the column is emptied here; MLflow's reading of it is what is compared.
    store.tag_only_name = run("alpha", "old-style", 80)
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE runs SET name = '' WHERE run_uuid = ?", (store.tag_only_name,))
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return _write_store(tmp_path_factory.mktemp("store"))


@pytest.fixture
def reader(store):
    opened = SqliteStoreReader.open(store.uri)
    assert opened is not None, "the reader refused a store the installed MLflow just wrote"
    with opened:
        yield opened


def _as_stored(run) -> StoredRun:
    info, data = run.info, run.data
    return StoredRun(
        run_id=info.run_id,
        name=info.run_name,
        experiment_id=info.experiment_id,
        status=info.status,
        start_time=info.start_time,
        end_time=info.end_time,
        artifact_uri=info.artifact_uri,
        params=dict(data.params),
        tags=dict(data.tags),
        metrics=dict(data.metrics),
    )


def _comparable(value):
    """``value`` with NaN replaced by a marker (NaN equals nothing, itself included) and dicts by sorted items."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, dict):
        return sorted((key, _comparable(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return [_comparable(item) for item in value]
    if isinstance(value, StoredRun):
        return [(field, _comparable(getattr(value, field))) for field in StoredRun.__dataclass_fields__]
    return value


def _assert_same(found, expected):
    assert _comparable(found) == _comparable(expected)


def _mlflow_search(store: Store, experiment_ids: list[str], filter_string: str = "", max_results: int = ALL_RUNS):
    runs = store.client.search_runs(
        experiment_ids, filter_string, run_view_type=ViewType.ACTIVE_ONLY, max_results=max_results
    )
    return [_as_stored(run) for run in runs]


def test_the_store_holds_what_the_comparisons_need(store, reader):
    runs = reader.search(list(store.experiments.values()))
    metrics = [value for run in runs for value in run.metrics.values()]
    assert any(math.isnan(value) for value in metrics)
    assert 1.7976931348623157e308 in metrics and -1.7976931348623157e308 in metrics  # MLflow's stored infinities
    assert len({run.start_time for run in runs}) < len(runs)  # ties in start time, ordered by id
    old_style = reader.get_run(store.tag_only_name)
    assert old_style is not None and old_style.name == "old-style"


def test_experiments_as_mlflow_lists_them(store, reader):
    listed = store.client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    assert list(reader.experiments().items()) == [(e.experiment_id, e.name) for e in listed]
    assert store.experiments["gone"] not in reader.experiments()
    named = reader.experiments(["beta", "gone", "missing", "alpha"])
    assert list(named.items()) == [(store.experiments["beta"], "beta"), (store.experiments["alpha"], "alpha")]
    for name in ("Default", *store.experiments):
        experiment = store.client.get_experiment_by_name(name)
        assert reader.experiment_name(experiment.experiment_id) == experiment.name  # a deleted one has its name
    assert reader.experiment_name("987654") is None
    assert reader.experiment_name("not-an-id") is None


def test_get_run_as_mlflow_gives_it(store, reader):
    for run_id in store.runs:
        found, expected = reader.get_run(run_id), store.client.get_run(run_id)
        if expected.info.lifecycle_stage == "deleted":  # deleted, or in the deleted experiment
            assert found is None
        else:
            _assert_same(found, _as_stored(expected))
    assert set(store.deleted) <= {run_id for run_id in store.runs if reader.get_run(run_id) is None}
    assert reader.get_run("0" * 32) is None


def test_search_as_mlflow_searches(store, reader):
    experiment_ids = list(store.experiments.values())
    everything = reader.search(experiment_ids)
    _assert_same(everything, _mlflow_search(store, experiment_ids))
    assert not {run.run_id for run in everything} & set(store.deleted)
    for ids in ([store.experiments["alpha"]], [store.experiments["gone"]], [store.experiments["beta"], "0"]):
        _assert_same(reader.search(ids), _mlflow_search(store, ids))
    _assert_same(reader.search(experiment_ids, max_results=3), _mlflow_search(store, experiment_ids, max_results=3))
    assert reader.search([]) == [] and reader.search(["not-an-id"]) == []


def test_search_by_tags_prefix_and_name(store, reader):
    ids = list(store.experiments.values())
    for tags, filter_string in [
        ({"dmgl.role": "parent"}, "tags.`dmgl.role` = 'parent'"),
        ({"dmgl.role": "seed", "dmgl.seed": "1"}, "tags.`dmgl.role` = 'seed' AND tags.`dmgl.seed` = '1'"),
        ({"note": ""}, "tags.note = ''"),
        ({"dmgl.role": "nobody"}, "tags.`dmgl.role` = 'nobody'"),
    ]:
        _assert_same(reader.search(ids, tags=tags), _mlflow_search(store, ids, filter_string))
    for run_id in store.runs:
        for length in (1, 2, 8, 32):
            prefix = run_id[:length]
            found = reader.search(ids, run_id_prefix=prefix)
            _assert_same(found, _mlflow_search(store, ids, f"attributes.run_id LIKE '{prefix}%'"))
            _assert_same(
                reader.search(ids, run_id_prefix=prefix, tags={"dmgl.role": "parent"}, max_results=1),
                _mlflow_search(store, ids, f"attributes.run_id LIKE '{prefix}%' AND tags.`dmgl.role` = 'parent'", 1),
            )
    lettered = next(run_id[:8] for run_id in store.runs if not run_id[:8].isdigit())
    assert reader.search(ids, run_id_prefix=lettered.upper()) == []  # MLflow's LIKE is case-sensitive too
    for name in ("parent-1", "after", "before", "old-style", "renamed-by-tag", "nobody"):
        _assert_same(reader.search(ids, run_name=name), _mlflow_search(store, ids, f"attributes.run_name = '{name}'"))


def test_search_by_status_as_mlflow_searches(store, reader):
    ids = list(store.experiments.values())
    for status in ("FINISHED", "FAILED", "KILLED", "RUNNING", "SCHEDULED", "finished"):
        _assert_same(reader.search(ids, status=status), _mlflow_search(store, ids, f"attributes.status = '{status}'"))
        _assert_same(
            reader.search(ids, status=status, tags={"dmgl.role": "seed"}),
            _mlflow_search(store, ids, f"attributes.status = '{status}' and tags.`dmgl.role` = 'seed'"),
        )


def test_run_exists_in_any_stage(store, reader):
    assert all(reader.run_exists(run_id) for run_id in store.runs)  # the deleted ones too
    assert not reader.run_exists("0" * 32)


def test_children_as_mlflow_finds_them(store, reader):
    for parent_id in store.parents:
        experiment_id = store.client.get_run(parent_id).info.experiment_id
        children = reader.children(parent_id)
        _assert_same(children, _mlflow_search(store, [experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'"))
        assert sorted(run.tags["dmgl.seed"] for run in children) == ["0", "1"]  # the deleted seed 2 is left out
        assert {run.parent_id for run in children} == {parent_id}
    assert reader.children("0" * 32) == []


def test_metric_history_as_mlflow_gives_it(store, reader):
    compared = 0
    for run_id in store.runs:
        for name in (
            "val/acc",
            "train/loss",
            "alpha/value",
            "final/test_acc",
            "final/test_acc_mean",
            "val/loss",
            "missing",
        ):
            expected = [(m.step, m.value, m.timestamp) for m in store.client.get_metric_history(run_id, name)]
            _assert_same(reader.metric_history(run_id, name), expected)
            compared += len(expected)
    assert compared > 50
    assert reader.metric_history("0" * 32, "val/acc") == []


def test_reads_a_store_that_a_writer_is_writing(store, reader):
    """WAL: a write transaction left open by another connection neither blocks the reader nor shows in it."""
    run_id = store.parents[0]
    with sqlite3.connect(store.path, isolation_level=None) as writer:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE tags SET value = 'half-written' WHERE run_uuid = ? AND key = 'dmgl.strategy'", (run_id,))
        try:
            found = reader.get_run(run_id)
            assert found is not None and found.tags["dmgl.strategy"] == "lb"
        finally:
            writer.execute("ROLLBACK")


# ------------------------------------------------------------------- the Tracker's reads, through the reader
def _records(value):
    """RunRecords (or lists, dicts of them) as comparable plain values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _comparable(dataclasses.asdict(value))
    if isinstance(value, list):
        return [_records(item) for item in value]
    return _comparable(value)


def _answer(call, tracker: Tracker):
    try:
        return _records(call(tracker))
    except DmglError as exc:
        return f"DmglError: {exc}"


def test_tracker_reads_through_the_reader_as_through_mlflow(store, monkeypatch):
    """What a Tracker on a local SQLite store answers through the reader (no MLflow) is what it answers through
    MLflow's client (the reader turned off): runs by id (a deleted one is left to MLflow), searches with the filters
    dmgl writes, children, experiments, metric histories, runs named by prefix or name."""
    fast = Tracker(store.uri)
    with monkeypatch.context() as patch:
        patch.setattr(SqliteStoreReader, "open", staticmethod(lambda uri: None))
        plain = Tracker(store.uri)
    assert fast.store_reader() is not None and plain.store_reader() is None
    ids = list(store.experiments.values())
    calls = []
    for run_id in [*store.runs, "0" * 32]:
        calls.append(lambda t, r=run_id: t.get_run(r))
        calls.append(lambda t, r=run_id: t.find_run(r))
        for key in ("val_acc", "train_loss", "alpha", "final_test_acc", "final_test_acc_mean", "val_loss", "none"):
            calls.append(lambda t, r=run_id, k=key: t.metric_history(r, k))
        for length in (6, 8):
            calls.append(lambda t, p=run_id[:length]: t.find_run(p))
    for parent in store.parents:
        calls.append(lambda t, p=parent: t.children(p))
    for name in ("parent-1", "after", "old-style", "renamed-by-tag", "parent-0-seed1", "nobody"):
        calls.append(lambda t, n=name: t.find_run(n))
    filters = [
        "",
        "tags.`dmgl.role` = 'parent'",
        "tags.`dmgl.role` = 'seed' and attributes.status = 'FINISHED'",
        "attributes.status = 'KILLED'",
        f"attributes.run_id LIKE '{store.runs[0][:6]}%'",
        "attributes.run_name = 'after'",
        "tags.`dmgl.role` = 'parent' AND tags.`dmgl.role` = 'seed'",  # left to MLflow
        "metrics.`val/acc` > 0.5",  # left to MLflow
    ]
    for filter_string in filters:
        for limit in (2, 50000):
            calls.append(lambda t, f=filter_string, n=limit: t.search(ids, f, max_results=n))
    calls += [
        lambda t: t.experiments(),
        lambda t: t.experiments(["beta", "alpha"]),
        lambda t: t.experiments(["alpha", "gone"]),  # a deleted experiment: left to MLflow
        lambda t: t.experiments(["missing"]),
        *(lambda t, e=experiment_id: t.experiment_name(e) for experiment_id in ids),
    ]
    for call in calls:
        assert _answer(call, fast) == _answer(call, plain)
    assert "DmglError" in _answer(lambda t: t.get_run("0" * 32), fast)
    assert reader_query(filters[2]) == {"tags": {"dmgl.role": "seed"}, "status": "FINISHED"}
    assert reader_query(filters[6]) is None and reader_query(filters[7]) is None
    assert reader_query("tags.`a` = 'it''s'") is None and reader_query("tags.a = 'b'") is None


def test_import_stays_off_mlflow_and_other_heavy_packages():
    code = "import json, sys, dmgl_cli.tracking.store_reader; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported = set(json.loads(done.stdout))
    assert not imported & {"mlflow", "sqlalchemy", "alembic", "numpy", "torch"}


# ------------------------------------------------------------------------------------- stores left to MLflow
def _copy(store: Store, folder: Path, change: str | None = None) -> str:
    """A copy of the store (through SQLite's backup, which carries what is still in the WAL), changed by ``change``."""
    folder.mkdir()
    path = folder / "copy.db"
    with sqlite3.connect(store.path) as source, sqlite3.connect(path) as target:
        source.backup(target)
        if change:
            target.execute(change)
    return f"sqlite:///{path}"


def test_stores_left_to_mlflow(store, tmp_path, monkeypatch):
    assert (
        SqliteStoreReader.open(_copy(store, tmp_path / "unknown", "UPDATE alembic_version SET version_num = 'f00'"))
        is None
    )
    moved = _copy(store, tmp_path / "workspace", "UPDATE experiments SET workspace = 'team' WHERE name = 'beta'")
    assert SqliteStoreReader.open(moved) is None
    (tmp_path / "plain").mkdir()
    with sqlite3.connect(tmp_path / "plain" / "other.db") as other:
        other.execute("CREATE TABLE runs (run_uuid TEXT)")
    (tmp_path / "text.db").write_text("not a database\n")
    for uri in (
        f"sqlite:///{tmp_path / 'missing.db'}",
        f"sqlite:///{tmp_path}",  # a folder
        f"sqlite:///{tmp_path / 'plain' / 'other.db'}",  # SQLite, but no alembic_version
        f"sqlite:///{tmp_path / 'text.db'}",
        f"sqlite:///{store.path}?timeout=5",
        "sqlite://",
        "sqlite:///:memory:",
        "postgresql://dmgl@localhost/mlflow",
        "http://localhost:5000",
        store.path.parent.as_uri(),
        str(store.path),
    ):
        assert SqliteStoreReader.open(uri) is None, uri
    monkeypatch.setenv("MLFLOW_ENABLE_WORKSPACES", "true")
    assert SqliteStoreReader.open(store.uri) is None
    monkeypatch.setenv("MLFLOW_ENABLE_WORKSPACES", "false")
    assert SqliteStoreReader.open(store.uri) is not None


def test_relative_sqlite_uri(store, monkeypatch):
    monkeypatch.chdir(store.path.parent)
    opened = SqliteStoreReader.open(f"sqlite:///{store.path.name}")
    assert opened is not None
    with opened:
        assert opened.path == store.path.resolve()


def test_known_revisions_hold_installed_mlflow_head():
    config = Config()
    config.set_main_option("script_location", str(Path(mlflow.store.db_migrations.__file__).parent))
    heads = set(ScriptDirectory.from_config(config).get_heads())
    assert heads <= KNOWN_REVISIONS, (
        f"MLflow {mlflow.__version__} has the store schema head {sorted(heads)}, not in "
        f"dmgl_cli/tracking/store_reader.py KNOWN_REVISIONS {sorted(KNOWN_REVISIONS)}: check the new migrations against the "
        "tables the reader reads, then add it (see the comment there)"
    )
