"""How rows name methods and strategies: ``code`` (the CLI's names, ``concat (LB)``) or ``paper`` (the paper's:
Concat, Ours-H, Ours-LB, and the comparison methods as Table 1 names them).

The paper's rows are Concat (``concat`` with ``constant:0``), Ours-H (``concat`` with ``heuristic``) and Ours-LB
(``concat`` with ``lb``); a comparison method trained as published (``constant:0``) is its paper name alone, and
with another strategy its name and the strategy (``PMR (heuristic)``). The uni-modal rows are named by their
modality (``Audio``). Paper rows come in the method registry's order, uni-modal rows first and Ours-H / Ours-LB
after the comparison methods; code rows stay in alphabetical order.
"""

from __future__ import annotations

from dmgl_cli.catalogue import METHODS
from dmgl_cli.strategies import StrategySpec

LABELS = ("code", "paper")

# Method name -> the paper's name, in the catalogue's order (each entry's ``paper_label``).
PAPER_METHODS: dict[str, str] = {name: entry.paper_label for name, entry in METHODS.items()}
OURS = {"heuristic": "Ours-H", "lb": "Ours-LB"}


def check_labels(style: str) -> str:
    from dmgl_cli.errors import DmglError

    if style not in LABELS:
        raise DmglError(f"unknown labels {style!r}; valid: {', '.join(LABELS)}")
    return style


def method_label(method: str, variant: str = "", style: str = "code") -> str:
    """The method's own name: ``concat`` / ``unimodal audio`` (code), ``Concat`` / ``Audio`` (paper)."""
    if style != "paper":
        return f"{method} {variant}" if variant else method
    if method == "unimodal" and variant:
        return variant[:1].upper() + variant[1:]
    return METHODS[method].paper_label if method in METHODS else method


def row_label(method: str, spec: StrategySpec, variant: str = "", style: str = "code") -> str:
    """A row's name: ``concat (LB)`` (code); ``Ours-LB``, ``Concat``, ``OGM-GE``, ``PMR (heuristic)`` (paper)."""
    name = method_label(method, variant, style)
    if style != "paper":
        return f"{name} ({spec.label})"
    if method == "concat" and spec.key in OURS:
        return OURS[spec.key]
    if spec.key == "constant:0":
        return name
    return f"{name} ({spec.label})"


def row_order(method: str, spec: StrategySpec, variant: str = "", style: str = "code") -> tuple:
    """Sort key of a row: alphabetical by method (code); the paper's layout (paper)."""
    if style != "paper":
        return (method, variant, spec.sort_key())
    registry = list(METHODS)
    rank = registry.index(method) if method in registry else len(registry)
    if method == "unimodal":
        band = 0
    elif method == "concat" and spec.key in OURS:
        band, rank = 3, 0
    elif method.startswith("dmgl-official"):
        band = 4
    elif method in METHODS:
        band = 1 if method == "concat" or spec.key == "constant:0" else 2
    else:
        band = 2
    return (band, rank, method, variant, spec.sort_key())
