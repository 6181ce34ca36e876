"""Preparers: one file per dataset, registered here explicitly.

A preparer turns a dataset's public raw distribution into the prepared format (:mod:`dmgl_cli.data.prepared`).
It is a module with ``NAME``, ``VERSION``, ``DESCRIPTION``, ``OPTIONS`` (its ``--option KEY=VALUE`` settings with
defaults) and ``prepare(job: PrepareJob) -> manifest``.
"""

from __future__ import annotations

from types import ModuleType

from dmgl_cli.data.preparers import crema_d, custom, kinetics_sounds, nvgesture, sarcasm, synthetic, twitter2015
from dmgl_cli.data.preparers.base import PrepareJob

PREPARERS: dict[str, ModuleType] = {
    synthetic.NAME: synthetic,
    crema_d.NAME: crema_d,
    custom.NAME: custom,
    kinetics_sounds.NAME: kinetics_sounds,
    nvgesture.NAME: nvgesture,
    sarcasm.NAME: sarcasm,
    twitter2015.NAME: twitter2015,
}

__all__ = ["PREPARERS", "PrepareJob"]
