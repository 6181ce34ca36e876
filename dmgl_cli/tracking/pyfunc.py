"""The pyfunc model that :meth:`~dmgl_cli.tracking.models.ModelStore.log_model` logs: :class:`DmglPyfuncModel`,
and the model's code stored with it.

It subclasses MLflow's ``PythonModel``, so importing this module loads MLflow; ``dmgl_cli.tracking`` imports it on
first access of ``DmglPyfuncModel`` (a logged model's code does ``from dmgl_cli.tracking import DmglPyfuncModel``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from mlflow.pyfunc.model import PythonModel

from dmgl_cli.errors import DmglError

# The model's code, stored with it ("models from code"): loading runs it, and nothing is unpickled.
MODEL_CODE = """\
import mlflow.models

from dmgl_cli.tracking import DmglPyfuncModel

mlflow.models.set_model(DmglPyfuncModel())
"""


class DmglPyfuncModel(PythonModel):
    """A dmgl checkpoint as an MLflow pyfunc model (:meth:`Tracker.log_model` writes it).

    ``predict({modality: array})`` takes the prepared arrays of N samples (the dtypes and shapes of the
    dataset's manifest, e.g. ``dataset.split("test").inputs``) and returns the method's fused scores, float32
    ``[N, classes]`` (``argmax`` indexes the classes in ``model_spec.json``), exactly as the trainer scores a
    split: the evaluation transform, ``method.forward`` in eval mode and ``method.predict``, in batches of
    ``train.eval_batch_size``. ``mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})`` overrides the
    recorded ``train.device``. Loading needs dmgl installed (a pip requirement of the model); the model's code
    is the three lines of ``MODEL_CODE``, and nothing is unpickled.
    """

    # MLflow validates a predict input by its type hint when there is one, and warns when there is none (as the class
    # is made: on every import of this module). A dict of modality arrays is no type it reads, and the logged
    # signature validates the input instead; MLflow's own flag for classes it must not wrap turns both off.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        # dmgl's training code, imported only where a model is loaded (it does not import this module): the one
        # rebuild of a model from a config and a checkpoint that `dmgl eval` and `dmgl explain` use too
        from dmgl_cli.rebuilt import rebuild_model

        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        overrides = context.model_config or {}
        self.modalities, self.num_classes = spec["modalities"], len(spec["classes"])
        rebuilt = rebuild_model(
            Path(context.artifacts["config"]).read_text(),
            self.modalities,
            self.num_classes,
            Path(context.artifacts["checkpoint"]),
            device=overrides.get("device"),
            source="the logged model's checkpoint",
        )
        self.config, self.device, self.method = rebuilt.config, rebuilt.device, rebuilt.method
        self.model, self.transform = rebuilt.model, rebuilt.transform

    def predict(self, context, model_input, params=None):
        import torch

        from dmgl_cli.device import autocast

        if not isinstance(model_input, dict):
            raise DmglError(f"a dmgl model predicts on {{modality: array}} with modalities {sorted(self.modalities)}")
        missing = sorted(set(self.modalities) - set(model_input))
        if missing:
            raise DmglError(f"missing modalities {missing}; the model takes {sorted(self.modalities)}")
        arrays = {m: np.asarray(model_input[m]) for m in self.modalities}
        total = len(next(iter(arrays.values())))
        size, transform = self.config.train.eval_batch_size, self.transform
        scores = []
        with torch.no_grad():
            for start in range(0, total, size):
                rows = np.arange(start, min(start + size, total))
                inputs = {m: torch.from_numpy(np.ascontiguousarray(a[rows])) for m, a in arrays.items()}
                if transform is not None:
                    inputs = transform(inputs, rows)
                inputs = {m: t.to(self.device) for m, t in inputs.items()}
                with autocast(self.device, self.config.train.amp):
                    output = self.method.forward(self.model, inputs, training=False)
                scores.append(self.method.predict(output).float().cpu().numpy())
        if not scores:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        return np.concatenate(scores)
