"""Shared fixtures: every test gets its own registry (DMGL_HOME) and runs offline on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from tiny import tiny_run

from dmgl_cli.cli import cli  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A fresh registry folder, with the MLflow store inside it."""
    home = tmp_path / "registry"
    monkeypatch.setenv("DMGL_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture
def run_cli(registry):
    """Invoke the CLI in-process; asserts the exit code and returns the result."""
    runner = CliRunner()

    def invoke(*args: str, expect: int = 0):
        result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=True)
        if result.exit_code != expect:
            raise AssertionError(
                f"dmgl {' '.join(map(str, args))} exited {result.exit_code} (expected {expect})\n"
                f"output:\n{result.output}\nexception: {result.exception!r}"
            )
        if expect != 0:
            assert "Traceback" not in result.output
        return result

    return invoke


@pytest.fixture
def synthetic(run_cli):
    """A small prepared synthetic dataset (600 samples) registered as 'synthetic'."""
    run_cli("prepare", "synthetic", "-o", "samples=600", "--silent")
    return "synthetic"


# Settings that make a synthetic run take a second or two.
FAST = tiny_run(epochs=3)
