"""dmgl — Dynamic Modality Gap Learning (NeurIPS 2024) as a tool: prepare, train, eval, sweep, report."""

__version__ = "0.1.0"
