"""Logged models: a seed's best checkpoint as an MLflow 3 logged model (a pyfunc model, :class:`DmglPyfuncModel`),
reading one back, and the Model Registry.

On a tracking server, :meth:`ModelStore.log_model` is a journal record like any write: it returns a reference
(``journal:…``) that the run's ``final_*`` metrics carry, and the journal swaps it for the model's id when it sends
them; the model holds the reference as its tag ``dmgl.journal_ref``, so that a resend finds it instead of making a
second one.
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmgl_cli import __version__
from dmgl_cli.errors import DmglError
from dmgl_cli.paths import link_or_copy
from dmgl_cli.tracking.journal import ReplayState
from dmgl_cli.tracking.records import no_such_run
from dmgl_cli.tracking.store import MODEL_VERSIONS_TAG, local_path, with_retries
from dmgl_cli.tracking.writing import RunWriting

if TYPE_CHECKING:
    from mlflow.pyfunc import PyFuncModel

    from dmgl_cli.tracking.pyfunc import DmglPyfuncModel

JOURNAL_REF_TAG = "dmgl.journal_ref"


_REQUIREMENTS_CHECK_LOCK = threading.Lock()


@contextmanager
def _requirements_taken_as_met() -> Iterator[None]:
    """MLflow checks a model's pip requirements against the installed packages by mapping every installed
    distribution to its modules (0.6-1.5 s at the end of a run, once per process). dmgl's requirements are the
    versions of the packages running it (:meth:`ModelStore._log_model_now`), so the check can only pass: it is
    skipped while the model is saved. If MLflow no longer has that check where it had it, nothing is changed."""
    from mlflow.utils import environment

    name = "warn_dependency_requirement_mismatches"
    with _REQUIREMENTS_CHECK_LOCK:  # the journal's sender may save a model while another thread does
        check = getattr(environment, name, None)
        if check is None:
            yield
            return
        setattr(environment, name, lambda requirements: None)
        try:
            yield
        finally:
            setattr(environment, name, check)


class ModelStore(RunWriting):
    def log_model(
        self,
        run_id: str,
        *,
        config_yaml: str,
        modalities: dict[str, dict[str, Any]],
        classes: list[str],
        step: int,
        tags: dict[str, str] | None = None,
        checkpoint: str = "best",
    ) -> str:
        """Log the run's ``checkpoints/<checkpoint>.pt`` as an MLflow 3 logged model and return its model id.

        A pyfunc model (:class:`DmglPyfuncModel`), not ``mlflow.pytorch``: the network takes a dict of modalities
        and returns a ``ModelOutput``, and what the trainer scores is the method's ``predict`` of its ``forward``
        after the evaluation transform (frame sampling) — none of which the pytorch flavour's pyfunc can serve. The
        model holds the checkpoint, the run's config.yaml and the modality specs, and rebuilds the network as
        ``dmgl eval`` does (no pickled torch module). Its input is the prepared arrays, ``{modality: array}``; its
        output the fused scores, ``[N, classes]``. Requirements are given, never inferred, so logging reads no
        package index (it works offline). The model is the run's output (the Models column) at ``step``, named after
        the run (``.`` written ``_``: MLflow refuses it in a model's name), with the run's params. Whatever goes
        wrong is a DmglError, and a model left half-written is marked FAILED.

        One copy of the weights: where the run's artifacts and the model's are both local files, the model's
        checkpoint (``artifacts/<checkpoint>.pt`` in the model) is a hard link to the run's ``checkpoints/<checkpoint>.pt``
        (a copy only where the filesystem cannot link them); the model stays whole if the run's file is later replaced
        or deleted. A remote store holds its own copy in the model. On a tracking server the model is a journal
        record (module docstring) and the id returned is its reference until it is sent."""
        settings: dict[str, Any] = {
            "config_yaml": config_yaml,
            "modalities": modalities,
            "classes": classes,
            "step": step,
            "tags": tags,
            "checkpoint": checkpoint,
        }
        if self._journal_writer() is not None:
            reference = f"journal:{uuid.uuid4().hex}"
            self._write(run_id, {"op": "model", "reference": reference, "settings": settings})
            return reference
        return self._log_model_now(run_id, settings)

    def _apply_model_record(self, record: dict[str, Any], state: ReplayState) -> None:
        from mlflow.entities import LoggedModelStatus

        if record["op"] != "model":
            super()._apply_model_record(record, state)
            return
        run_id, reference = record["run_id"], record["reference"]
        outputs = self.client.get_run(run_id).outputs
        for output in outputs.model_outputs if outputs else []:
            logged = self.client.get_logged_model(output.model_id)
            if logged.tags.get(JOURNAL_REF_TAG) == reference and logged.status == LoggedModelStatus.READY:
                state.model_ids[reference] = output.model_id  # sent before, by a process that then died
                return
        settings = record["settings"]
        tags = {**(settings["tags"] or {}), JOURNAL_REF_TAG: reference}
        state.model_ids[reference] = self._log_model_now(run_id, {**settings, "tags": tags}, journaled=True)

    def _log_model_now(self, run_id: str, settings: dict[str, Any], journaled: bool = False) -> str:
        """:meth:`log_model`'s work. ``journaled``: sent by the journal, which needs MLflow's own errors (to tell
        an away store from a refusal), and whose checkpoints are on disk already."""
        import numpy as np
        import torch  # already loaded by the trainer; here only for its version
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.exceptions import MlflowException
        from mlflow.models import Model, ModelSignature
        from mlflow.pyfunc import save_model as save_pyfunc_model
        from mlflow.types import Schema, TensorSpec

        from dmgl_cli.tracking.pyfunc import MODEL_CODE

        modalities, classes, checkpoint = settings["modalities"], settings["classes"], settings["checkpoint"]
        run = self.client.get_run(run_id)
        signature = ModelSignature(
            inputs=Schema(
                [TensorSpec(np.dtype(spec["dtype"]), (-1, *spec["shape"]), name) for name, spec in modalities.items()]
            ),
            outputs=Schema([TensorSpec(np.dtype("float32"), (-1, len(classes)))]),
        )
        requirements = [
            f"dmgl=={__version__}",
            f"torch=={torch.__version__.split('+')[0]}",
            f"numpy=={np.__version__}",
        ]
        try:
            logged = with_retries(
                self.client.create_logged_model,
                run.info.experiment_id,
                name=re.sub(r"[/:.%\"']", "_", run.info.run_name or "model"),
                source_run_id=run_id,
                tags={"dmgl.checkpoint": checkpoint, **(settings["tags"] or {})},
                params=dict(run.data.params),
                model_type="dmgl",
            )
        except MlflowException as exc:
            if journaled:
                raise
            raise DmglError(f"MLflow store {self.uri} cannot hold logged models ({exc.message})") from None
        model_id = logged.model_id
        model_folder = local_path(logged.artifact_location) if self._artifact_dir(run_id) is not None else None
        try:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                weights = self._checkpoint_file(run_id, checkpoint, tmp, wait=not journaled)
                if model_folder is not None:
                    # The model is saved around an empty stand-in of the same name, which the run's checkpoint then
                    # replaces as a hard link: the weights are neither copied to a temporary folder nor stored twice.
                    stand_in = folder / "stand-in" / weights.name
                    stand_in.parent.mkdir()
                    stand_in.touch()
                    weights_source = stand_in
                else:
                    weights_source = weights
                (folder / "config.yaml").write_text(settings["config_yaml"])
                (folder / "model_spec.json").write_text(
                    json.dumps({"modalities": modalities, "classes": classes}, indent=2, sort_keys=True)
                )
                (folder / "dmgl_model.py").write_text(MODEL_CODE)
                with warnings.catch_warnings(), _requirements_taken_as_met():
                    # The signature describes the input; an input example (arrays of real samples) is not stored.
                    warnings.filterwarnings("ignore", message=".*input example was not provided")
                    save_pyfunc_model(
                        str(folder / "model"),
                        python_model=str(folder / "dmgl_model.py"),
                        artifacts={
                            "checkpoint": str(weights_source),
                            "config": str(folder / "config.yaml"),
                            "spec": str(folder / "model_spec.json"),
                        },
                        mlflow_model=Model(
                            artifact_path=logged.artifact_location,
                            model_uuid=model_id,
                            run_id=run_id,
                            model_id=model_id,
                        ),
                        signature=signature,
                        pip_requirements=requirements,
                        metadata={"dmgl_version": __version__, "checkpoint": checkpoint},
                        model_config={"device": ""},  # "" = the recorded train.device; load_model can override it
                    )
                with_retries(self.client.log_model_artifacts, model_id, str(folder / "model"))
                if model_folder is not None:
                    saved = Model.load(str(folder / "model")).flavors["python_function"]["artifacts"]
                    link_or_copy(weights, model_folder / saved["checkpoint"]["path"])
            with_retries(self.client.log_outputs, run_id, [LoggedModelOutput(model_id, settings["step"])])
            with_retries(self.client.finalize_logged_model, model_id, LoggedModelStatus.READY)
        except BaseException as exc:
            try:
                self.client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
            except MlflowException:
                pass  # the store went away: the model stays PENDING, and a resend makes a new one
            if isinstance(exc, (MlflowException, OSError)) and not journaled:
                raise DmglError(f"cannot log the model of run {run_id} ({exc})") from None
            raise
        return model_id

    def logged_model_id(self, run_id: str) -> str | None:
        """The READY logged model that the run output last (the latest step), or None."""
        from mlflow.entities import LoggedModelStatus
        from mlflow.exceptions import MlflowException

        self.flush(run_id)
        try:
            outputs = self.client.get_run(run_id).outputs
        except MlflowException:
            raise DmglError(no_such_run(run_id, self.uri)) from None
        for output in sorted(outputs.model_outputs if outputs else [], key=lambda o: o.step, reverse=True):
            try:
                if self.client.get_logged_model(output.model_id).status == LoggedModelStatus.READY:
                    return output.model_id
            except MlflowException:
                continue  # deleted
        return None

    def load_model(self, model_id: str, device: str | None = None) -> PyFuncModel:
        """A logged model as ``mlflow.pyfunc.load_model`` gives it (``predict({modality: array})`` -> scores),
        read through this tracker's store; ``device`` overrides the recorded ``train.device``."""
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc import load_model as load_pyfunc_model

        try:
            location = self.client.get_logged_model(model_id).artifact_location
            local = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=self.uri)
        except MlflowException as exc:
            raise DmglError(f"cannot read logged model {model_id} from {self.uri} ({exc.message})") from None
        return load_pyfunc_model(local, model_config={"device": device} if device else None)

    def register_model(
        self, run_id: str, name: str, *, tags: dict[str, str] | None = None, description: str | None = None
    ) -> tuple[str, str, str]:
        """Put the run's logged model in the Model Registry as a new version of ``name`` (created if needed);
        returns (registered name, version, model URI)."""
        model_id = self.logged_model_id(run_id)
        if model_id is None:
            raise DmglError(
                f"run {run_id} has no logged model to register (runs trained before dmgl logged models have none; "
                "`dmgl train --resume` does not add one to a finished run)"
            )
        source = f"models:/{model_id}"
        from mlflow.exceptions import MlflowException

        try:
            try:
                self.client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                    raise
            version = self.client.create_model_version(
                name, source, run_id=run_id, tags=tags, description=description, model_id=model_id
            )
            registered = json.loads(self.client.get_logged_model(model_id).tags.get(MODEL_VERSIONS_TAG) or "[]")
            registered.append({"name": version.name, "version": version.version})
            self.client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(registered)})
        except MlflowException as exc:
            raise DmglError(f"cannot register the model of run {run_id} as {name!r} ({exc.message})") from None
        return version.name, str(version.version), source


def __getattr__(name: str) -> type[DmglPyfuncModel]:
    # DmglPyfuncModel lives in dmgl_cli.tracking.pyfunc (it subclasses MLflow's PythonModel, so importing it loads
    # MLflow); still importable from here, as it was
    if name == "DmglPyfuncModel":
        from dmgl_cli.tracking.pyfunc import DmglPyfuncModel

        return DmglPyfuncModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
