"""The settings of a tiny training run, shared by every test that trains through the CLI: on the 600-sample
synthetic dataset (the ``synthetic`` fixture) a run takes a second or two per seed."""

from __future__ import annotations


def tiny_run(epochs: int = 3, batch_size: int = 64) -> list[str]:
    """``dmgl train`` / ``dmgl sweep`` arguments for a run of ``epochs`` epochs of ``batch_size`` samples."""
    return ["--set", f"train.epochs={epochs}", "--set", f"train.batch_size={batch_size}"]
