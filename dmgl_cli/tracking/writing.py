"""What a run writes: experiments and runs, params, tags, metrics, statuses, text/figure/file artifacts, the dataset
input, checkpoints.

Every write to an existing run is one *record* (a JSON-able dict, ``op`` + its data), applied by :meth:`_apply`. On
a local store the record is applied at once, as MLflow's own calls would; on a tracking server it goes to the
journal (:mod:`dmgl_cli.tracking.journal`) and the call returns at once. Creating an experiment or a run is not
journaled: its id is needed at once, and it happens before training (``dmgl train`` creates the seed runs with
the parent).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dmgl_cli import __version__
from dmgl_cli.errors import DmglError, Interrupted, Stopped
from dmgl_cli.paths import default_artifacts_dir
from dmgl_cli.provenance import environment_tags, git_commit
from dmgl_cli.tracking.journal import ReplayState
from dmgl_cli.tracking.queries import RunQueries
from dmgl_cli.tracking.records import PARENT_TAG, DatasetRecord, mlflow_metric_name
from dmgl_cli.tracking.store import (
    BATCH,
    DATASET_CONTEXT_TAG,
    EXPERIMENT_KIND_TAG,
    NOTE_TAG,
    local_path,
    logger,
    mlflow_exception,
    with_retries,
)


class RunWriting(RunQueries):
    # ------------------------------------------------------------------------------------------- experiments
    def experiment_id(self, name: str, create: bool = True) -> str:
        from mlflow.exceptions import MlflowException

        try:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                return experiment.experiment_id
            if not create:
                raise DmglError(f"no MLflow experiment named {name!r} in {self.uri}")
            location = None
            if self.default_store:
                location = (default_artifacts_dir() / name).as_uri()
            return self.client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: "custom_model_development"}
            )
        except MlflowException as exc:
            if "already exists" in str(exc):  # another process created it between our lookup and create
                existing = self.client.get_experiment_by_name(name)
                assert existing is not None  # creating it failed because it exists
                return existing.experiment_id
            raise DmglError(f"MLflow store {self.uri}: {exc.message}") from None

    # -------------------------------------------------------------------------------------------------- runs
    def start_run(
        self,
        experiment_id: str,
        name: str,
        tags: dict[str, str],
        parent_id: str | None = None,
        status: str = "RUNNING",
    ) -> str:
        """Create a run (at once, not journaled: its id is needed). ``status="SCHEDULED"`` makes one that waits
        (a seed created with its parent); :meth:`mark_running` starts it."""
        tags = {"dmgl.version": __version__, **environment_tags(), **tags}
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags["dmgl.git_commit"] = commit
        if parent_id:
            tags[PARENT_TAG] = parent_id
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        if run.info.artifact_uri:
            self._artifact_uris[run.info.run_id] = run.info.artifact_uri
        if parent_id:
            self._unended.setdefault(parent_id, set()).add(run.info.run_id)
        if status != "RUNNING":
            self.client.update_run(run.info.run_id, status=status)
        return run.info.run_id

    def set_status(self, run_id: str, status: str) -> None:
        """Set a run's status without ending it, e.g. SCHEDULED: a sweep run that waits for workers."""
        self._write(run_id, {"op": "status", "status": status})

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        self._write(run_id, {"op": "params", "params": {k: str(v)[:6000] for k, v in params.items()}})

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self._write(run_id, {"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_metrics(
        self,
        run_id: str,
        metrics: dict[str, float],
        step: int = 0,
        *,
        model_id: str | None = None,
        dataset: DatasetRecord | None = None,
    ) -> None:
        """Log dmgl's metric keys under their MLflow names (:func:`mlflow_metric_name`). ``model_id`` links the
        values to a logged model (they show on its page), ``dataset`` to the dataset they were measured on, as
        :meth:`log_dataset` records it."""
        now = int(time.time() * 1000)
        record = {
            "op": "metrics",
            "metrics": [[mlflow_metric_name(k), float(v), now, step] for k, v in metrics.items()],
            "model_id": model_id,
            "dataset": [dataset.name, dataset.digest] if dataset is not None else None,
        }
        self._write(run_id, record)

    def end_run(self, run_id: str, status: str) -> None:
        """End a run. A parent that ends otherwise than FINISHED ends the same way the child runs this process made
        under it and has not ended: seeds made SCHEDULED that never started, and a run a stop caught between its
        creation and the work that ends it (``dmgl train --resume`` trains them)."""
        for children in self._unended.values():
            children.discard(run_id)
        for child in sorted(self._unended.pop(run_id, set())) if status != "FINISHED" else []:
            self.end_run(child, status)
        self._write(run_id, {"op": "end", "status": status, "end_time": int(time.time() * 1000)})

    @contextmanager
    def run(self, run_id: str) -> Iterator[str]:
        """Work recorded into ``run_id``: leaving by a stop (Ctrl-C, SIGTERM, a pruned sweep trial) marks the run
        KILLED (resumable), by an error FAILED; both re-raise. A normal exit leaves the status to the caller, who
        ends the run FINISHED once its results are logged. Either way the checkpoint being written in the background
        is on disk first: a KILLED run resumes from its last checkpoint."""
        try:
            yield run_id
            self.wait_for_checkpoints(release=True)  # a write that failed fails the run
        except (KeyboardInterrupt, Interrupted, Stopped):
            try:
                self._settle_checkpoints(run_id)
            finally:
                self.end_run(run_id, "KILLED")
            raise
        except BaseException:
            try:
                self._settle_checkpoints(run_id)
            finally:
                self.end_run(run_id, "FAILED")
            raise

    def mark_running(self, run_id: str) -> None:
        """A resumed run (or a seed created SCHEDULED with its parent): RUNNING, owned by this process."""
        self.set_status(run_id, "RUNNING")
        self.set_tags(
            run_id,
            {
                k: v
                for k, v in environment_tags().items()
                if k in ("dmgl.host", "dmgl.pid", "dmgl.pid_start", "dmgl.heartbeat")
            },
        )

    # ---------------------------------------------------------------------------------------------- artifacts
    def _artifact_dir(self, run_id: str) -> Path | None:
        uri = self._artifact_uris.get(run_id)
        return local_path(uri if uri is not None else self.get_run(run_id).artifact_uri)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._write(run_id, {"op": "text", "text": text, "artifact_file": artifact_file})

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        if self._journal_writer() is None:
            self.client.log_figure(run_id, figure, artifact_file)
            return
        kept = self._kept_file(run_id, Path(artifact_file).name)
        figure.savefig(kept)
        folder = str(Path(artifact_file).parent)
        self._write(run_id, {"op": "file", "path": str(kept), "folder": None if folder == "." else folder})

    def log_file(self, run_id: str, path: Path, folder: str | None = None) -> None:
        """Copy the local file ``path`` into the run's artifacts, under ``folder`` (e.g. ``explain``) if given."""
        if self._journal_writer() is not None:
            try:
                kept = self._kept_file(run_id, path.name)
                shutil.copyfile(path, kept)
            except OSError as exc:
                raise DmglError(f"cannot log {path.name} to run {run_id} ({exc})") from None
            path = kept
        try:
            self._write(run_id, {"op": "file", "path": str(path), "folder": folder})
        except (mlflow_exception(), OSError) as exc:
            raise DmglError(f"cannot log {path.name} to run {run_id} ({exc})") from None

    def _kept_file(self, run_id: str, name: str) -> Path:
        """A new place in the run's journal for a file a record names (the record may be sent after the caller
        has deleted or replaced its own copy)."""
        writer = self._journal_writer()
        assert writer is not None
        folder = writer.run_folder(run_id) / "files" / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
        return folder / name

    def save_checkpoint(self, run_id: str, name: str, state: dict[str, Any]) -> None:
        """``checkpoints/<name>.pt`` on the run, written atomically in place when the artifact store is local. It is
        written in the background (:class:`~dmgl_cli.checkpoint.CheckpointWriter`): this returns once ``state`` is
        copied, having waited only for the previous checkpoint's write. Reading a checkpoint here and leaving
        :meth:`run` wait for the write; anyone else calls :meth:`wait_for_checkpoints`. A remote artifact store
        behind a tracking server gets it through the journal (from the copy kept there, which is read back)."""
        from dmgl_cli.checkpoint import CheckpointWriter, save_checkpoint  # torch: only what trains loads it

        if self._checkpoint_writer is None:
            self._checkpoint_writer = CheckpointWriter()
        folder = self._artifact_dir(run_id)
        what = f"checkpoint checkpoints/{name}.pt of run {run_id}"
        if folder is not None:
            path = folder / "checkpoints" / f"{name}.pt"
            self._checkpoint_writer.submit(lambda snapshot: save_checkpoint(path, snapshot), state, what)
            return
        kept = self._kept_checkpoint(run_id, name)
        if kept is not None:

            def keep_and_send(snapshot: dict[str, Any]) -> None:
                save_checkpoint(kept, snapshot)
                record = {"op": "file", "path": str(kept), "folder": "checkpoints", "supersedes": f"{name}.pt"}
                self._write(run_id, record)

            self._checkpoint_writer.submit(keep_and_send, state, what)
            return

        def upload(snapshot: dict[str, Any]) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{name}.pt"
                save_checkpoint(path, snapshot)
                with_retries(self.client.log_artifact, run_id, str(path), "checkpoints")

        self._checkpoint_writer.submit(upload, state, what)

    def _kept_checkpoint(self, run_id: str, name: str) -> Path | None:
        """Where the journal keeps a remote artifact store's checkpoint of ``run_id``; None without a journal."""
        writer = self._journal_writer()
        return None if writer is None else writer.run_folder(run_id) / "checkpoints" / f"{name}.pt"

    def wait_for_checkpoints(self, release: bool = False) -> None:
        """Block until the checkpoint being written is on disk; a DmglError if its write failed. ``release`` also
        frees the memory kept for the next checkpoint's copy (a run that ends)."""
        if self._checkpoint_writer is not None:
            if release:
                self._checkpoint_writer.release()
            else:
                self._checkpoint_writer.wait()

    def _settle_checkpoints(self, run_id: str) -> None:
        """:meth:`wait_for_checkpoints` while another error is already on its way: a failed write is only logged."""
        try:
            self.wait_for_checkpoints(release=True)
        except DmglError as exc:
            logger.warning("%s; run %s resumes from the checkpoint before it", exc, run_id)

    def load_checkpoint(self, run_id: str, name: str) -> dict[str, Any]:
        from dmgl_cli.checkpoint import load_checkpoint  # torch: only what trains or scores loads it

        with tempfile.TemporaryDirectory() as tmp:
            return load_checkpoint(self._checkpoint_file(run_id, name, tmp))

    def _checkpoint_file(self, run_id: str, name: str, tmp: str, wait: bool = True) -> Path:
        """The file of the run's ``checkpoints/<name>.pt``: in a local artifact store, the journal's copy, or
        downloaded into ``tmp``; ``wait`` first for the checkpoint being written (the journal's thread, sending
        what a finished run wrote, must not: the writer belongs to the training thread)."""
        if wait:
            self.wait_for_checkpoints()
        folder = self._artifact_dir(run_id)
        if folder is not None:
            path = folder / "checkpoints" / f"{name}.pt"
            if not path.is_file():
                raise DmglError(f"run {run_id} has no checkpoint checkpoints/{name}.pt")
            return path
        kept = self._kept_checkpoint(run_id, name)
        if kept is not None and kept.is_file():
            return kept
        try:
            return Path(self.client.download_artifacts(run_id, f"checkpoints/{name}.pt", tmp))
        except (mlflow_exception(), OSError):
            raise DmglError(f"run {run_id} has no checkpoint checkpoints/{name}.pt") from None

    # ---------------------------------------------------------------------------------- MLflow's own features
    def set_description(self, run_id: str, markdown: str) -> None:
        """The run's description (``mlflow.note.content``): markdown shown on its page in the UI."""
        self.set_tags(run_id, {NOTE_TAG: markdown})

    @staticmethod
    def artifact_link(run_id: str, artifact_file: str) -> str:
        """A link to one of a run's artifacts that works inside a run's description: relative to the UI's own
        address, so it holds for ``dmgl ui``, a tracking server and a static prefix alike."""
        return f"get-artifact?path={artifact_file}&run_uuid={run_id}"

    def log_dataset(self, run_id: str, dataset: DatasetRecord, context: str = "training") -> None:
        """Record ``dataset`` as the run's input (the Dataset column of the runs table): an ``mlflow.data``
        MetaDataset, source = the prepared folder, digest = the manifest's checksum (its first
        :data:`DATASET_DIGEST_LENGTH` digits), schema = one tensor per modality, profile = classes, split sizes and
        the whole checksum."""
        import numpy as np
        from mlflow.data.dataset_source_registry import get_dataset_source_from_json
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.types import Schema, TensorSpec

        source = get_dataset_source_from_json(json.dumps({"uri": str(dataset.folder)}), source_type="local")
        schema = (
            Schema(
                [
                    TensorSpec(np.dtype(spec["dtype"]), (-1, *spec["shape"]), name)
                    for name, spec in dataset.modalities.items()
                ]
            )
            if dataset.modalities
            else None
        )
        described = MetaDataset(source, name=dataset.name, digest=dataset.digest, schema=schema).to_dict()
        entity = {
            "name": described["name"],
            "digest": described["digest"],
            "source_type": described["source_type"],
            "source": described["source"],
            "schema": described.get("schema"),
            "profile": json.dumps(dataset.profile) if dataset.profile else None,
        }
        self._write(run_id, {"op": "dataset", "dataset": entity, "context": context})

    # ------------------------------------------------------------------------------------------------ records
    def _write(self, run_id: str, record: dict[str, Any]) -> None:
        writer = self._journal_writer()
        if writer is None:
            self._apply({**record, "run_id": run_id}, ReplayState())
        else:
            writer.append(run_id, {**record, "run_id": run_id})

    def _apply(self, record: dict[str, Any], state: ReplayState) -> None:
        """Write one record to the store (raises what MLflow raises)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag, Param, RunTag

        run_id, op = record["run_id"], record["op"]
        if op == "params":
            items = [Param(k, v) for k, v in record["params"].items()]
            for start in range(0, len(items), BATCH):
                with_retries(self.client.log_batch, run_id, params=items[start : start + BATCH])
        elif op == "tags":
            with_retries(self.client.log_batch, run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
        elif op == "metrics":
            self._apply_metrics(record, state)
        elif op == "status":
            with_retries(self.client.update_run, run_id, status=record["status"])
        elif op == "end":
            with_retries(self.client.set_terminated, run_id, status=record["status"], end_time=record["end_time"])
        elif op == "text":
            self.client.log_text(run_id, record["text"], record["artifact_file"])
        elif op == "file":
            with_retries(self.client.log_artifact, run_id, record["path"], record["folder"] or None)
        elif op == "dataset":
            entity = Dataset(**record["dataset"])
            inputs = [DatasetInput(entity, [InputTag(DATASET_CONTEXT_TAG, record["context"])])]
            with_retries(self.client.log_inputs, run_id, datasets=inputs)
        else:
            self._apply_model_record(record, state)

    def _apply_model_record(self, record: dict[str, Any], state: ReplayState) -> None:
        raise ValueError(f"unknown journal record {record['op']!r}")

    def _apply_metrics(self, record: dict[str, Any], state: ReplayState) -> None:
        from mlflow.entities import Metric

        run_id = record["run_id"]
        if state.uncertain:  # a send may have half-happened: read once what the run holds
            state.known_steps = {
                (name, metric.step)
                for name in self.client.get_run(run_id).data.metrics
                for metric in self.client.get_metric_history(run_id, name)
            }
            state.uncertain = False
        model_id = record["model_id"]
        if model_id is not None and model_id.startswith("journal:"):
            model_id = state.model_ids.get(model_id)  # None: the model was refused; the values stand alone
        name, digest = record["dataset"] or (None, None)
        items = [
            Metric(key, value, timestamp, step, model_id, dataset_name=name, dataset_digest=digest)
            for key, value, timestamp, step in record["metrics"]
            if state.known_steps is None or (key, step) not in state.known_steps
        ]
        for start in range(0, len(items), 1000):
            with_retries(self.client.log_batch, run_id, metrics=items[start : start + 1000])
        if state.known_steps is not None:
            state.known_steps.update((m.key, m.step) for m in items)
