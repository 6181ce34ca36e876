"""Figures drawn from recorded metrics (matplotlib, headless)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def heuristic_alpha(epoch: int) -> float:
    """omega(t) = 1 - exp(-1/t), t the 1-based epoch (§3.3)."""
    return 1.0 - math.exp(-1.0 / epoch)


def alpha_figure(trajectories: dict[str, list[float]], title: str = "alpha during training"):
    """Alpha per epoch against x = epoch / total epochs, with the heuristic omega(t) for reference (Figure 3)."""
    figure, axis = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    longest = 1
    for label, values in trajectories.items():
        total = len(values)
        longest = max(longest, total)
        axis.plot([(e + 1) / total for e in range(total)], values, marker="o", markersize=3, label=label)
    reference = [heuristic_alpha(e) for e in range(1, longest + 1)]
    axis.plot([(e + 1) / longest for e in range(longest)], reference, linestyle="--", color="gray",
              label=r"heuristic $\omega(t)=1-e^{-1/t}$")
    axis.set_xlabel("epoch / total epochs")
    axis.set_ylabel(r"$\alpha$")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def close(figure) -> None:
    plt.close(figure)
