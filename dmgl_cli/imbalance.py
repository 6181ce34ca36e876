"""What BalanceBenchmark reports beyond accuracy (issue #24, item 6): how much each modality contributes to the
fused test accuracy, how unequal those contributions are, and what the model costs.

**Shapley values of test accuracy.** The modalities are the players of a cooperative game whose value ``v(S)`` is
the accuracy of the method's fused prediction (``method.forward`` in eval mode, then ``method.predict``, argmax of
the softmax, exactly as :func:`dmgl_cli.evaluation.evaluate` scores ``test_acc``) when only the modalities in ``S`` are
present. A modality is made *absent* by replacing its model input (the batch after the evaluation transform) with
zeros of the same shape and dtype, ``torch.zeros_like``, as BalanceBenchmark's toolkit does. The rule is the same for
every method, because every model takes its inputs through ``method.forward``; dmgl's per-modality scores
(``test_acc_<modality>``: Concat's head split, a method's own uni-modal heads, or probes) cannot define the value of
a coalition of two out of three modalities, so they are not used here. What zeros mean depends on the input: the
mean after normalisation for images and spectrograms, the origin for vectors, all-padding tokens with an all-zero
attention mask for text. The empty coalition's value ``v({})`` is the accuracy of the fused model with every input
zeroed (a constant input, so usually the share of one class; not assumed to be chance ``1/num_classes``), and it is
recorded beside the Shapley values (``test_empty_coalition_acc``). The values are exact, over all ``2^M``
coalitions (``M`` modalities: ``2^M`` passes over the split)::

    phi_i = sum over S not containing i of  |S|! (M - |S| - 1)! / M!  *  (v(S + {i}) - v(S))

so they add up to ``v(all) - v({})`` (efficiency), a modality the prediction never reads gets exactly 0, and
``v(all)`` is the run's ``test_acc``. A method whose scoring changes its state (Greedy's gate averages, model
buffers) is put back to the same state before each coalition, so that every coalition is scored by the same model.

**Imbalance degree** = max - min of the Shapley values (0 with one modality), the spread dmgl already uses for its
per-modality gap (:func:`dmgl_cli.metrics.performance_gap`). BalanceBenchmark's toolkit records the Shapley values but
its code gives no formula for a single imbalance figure; max - min is 0 for equal contributions and, unlike a ratio,
stays defined when a contribution is 0 or negative.

**Cost.** Parameters: every parameter of the model, frozen ones included. FLOPs per sample: what
``torch.utils.flop_counter.FlopCounterMode`` counts (matrix products and convolutions, a multiply-add = 2 FLOPs;
element-wise operations are not counted) over one evaluation forward of the split's first batch, divided by its
size. Seconds per epoch: the mean of the trainer's ``epoch_seconds`` (training only, without validation and test).
Peak memory in MiB (2^20 bytes): on CUDA ``torch.cuda.max_memory_allocated`` since the last
:func:`reset_peak_memory` (run.training resets it when a seed's trainer is built, so it is the seed's training and
evaluation), elsewhere the process's peak resident set size (``resource.getrusage``), which covers the whole process
so far, including any seed trained before in it; :func:`peak_memory_mib` says which.

Training layer: torch, no MLflow; run.training calls these once per seed on the best checkpoint's weights.
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dmgl_cli.config import Config
from dmgl_cli.device import autocast, to_device
from dmgl_cli.methods.base import Method
from dmgl_cli.metrics import performance_gap
from dmgl_cli.models import MultimodalModel

Coalition = frozenset[str]
CUDA_PEAK = "cuda max_memory_allocated"
PROCESS_PEAK_RSS = "process peak RSS"
# Final metrics measured on the machine (time, memory): they differ between two runs of the same seed
MACHINE_MEASURED = ("seconds_per_epoch", "peak_memory_mib")

__all__ = [
    "CUDA_PEAK",
    "MACHINE_MEASURED",
    "PROCESS_PEAK_RSS",
    "Coalition",
    "coalition_accuracy",
    "coalition_values",
    "cost_metrics",
    "flops_per_sample",
    "imbalance_degree",
    "mean_epoch_seconds",
    "parameter_count",
    "peak_memory_mib",
    "reset_peak_memory",
    "shapley_metrics",
    "shapley_values",
]


@contextmanager
def _same_state_each_time(model: MultimodalModel, method: Method) -> Iterator[Callable[[], None]]:
    """Yields ``restore()``, which puts the model's weights and buffers and the method's state back to what they are
    now when the method's scoring changes them (Greedy), and does nothing otherwise; restored on the way out too."""
    if not method.scoring_changes_state:
        yield lambda: None
        return
    model_state = copy.deepcopy(model.state_dict())
    method_state = copy.deepcopy(method.state_dict())

    def restore() -> None:
        model.load_state_dict(model_state)
        method.load_state_dict(copy.deepcopy(method_state))

    try:
        yield restore
    finally:
        restore()


@torch.inference_mode()
def coalition_accuracy(
    model: MultimodalModel,
    method: Method,
    config: Config,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    present: Collection[str],
) -> float:
    """Accuracy of the fused prediction over ``loader`` with every input not in ``present`` replaced by zeros."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    samples = 0
    try:
        for batch in loader:
            inputs, labels = to_device(batch, device)
            inputs = {m: x if m in present else torch.zeros_like(x) for m, x in inputs.items()}
            with autocast(device, config.train.amp):
                output = method.forward(model, inputs, training=False)
            # float32 softmax first, as evaluate() scores: the same argmax, ties included
            probs = torch.softmax(method.predict(output).float(), dim=-1)
            correct += (probs.argmax(dim=-1) == labels).sum()
            samples += int(labels.shape[0])
    finally:
        model.train(was_training)
    if samples == 0:
        raise ValueError("the loader yielded no samples to score")
    return int(correct) / samples


def coalition_values(
    model: MultimodalModel,
    method: Method,
    config: Config,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    modalities: Sequence[str],
) -> dict[Coalition, float]:
    """``v(S)`` (:func:`coalition_accuracy`) for every subset ``S`` of ``modalities``, the empty one included."""
    values: dict[Coalition, float] = {}
    with _same_state_each_time(model, method) as restore:
        for size in range(len(modalities) + 1):
            for members in itertools.combinations(modalities, size):
                restore()
                values[frozenset(members)] = coalition_accuracy(model, method, config, loader, device, members)
    return values


def shapley_values(values: Mapping[Coalition, float], players: Sequence[str]) -> dict[str, float]:
    """Exact Shapley value of each player from the value of every coalition (``values`` must hold all ``2^M``)."""
    if len(set(players)) != len(players):
        raise ValueError(f"players must be distinct, got {list(players)}")
    count = len(players)
    missing = [
        sorted(members)
        for size in range(count + 1)
        for members in itertools.combinations(players, size)
        if frozenset(members) not in values
    ]
    if missing:
        raise ValueError(f"no value for coalition(s) {missing}")
    shapley: dict[str, float] = {}
    for player in players:
        others = [p for p in players if p != player]
        total = 0.0
        for size in range(count):
            weight = math.factorial(size) * math.factorial(count - size - 1) / math.factorial(count)
            for members in itertools.combinations(others, size):
                without = frozenset(members)
                total += weight * (values[without | {player}] - values[without])
        shapley[player] = total
    return shapley


def imbalance_degree(shapley: Mapping[str, float]) -> float:
    """max - min of the modalities' Shapley values; 0.0 for one modality."""
    return performance_gap(shapley)


def shapley_metrics(
    model: MultimodalModel,
    method: Method,
    config: Config,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    modalities: Sequence[str],
    split: str = "test",
) -> dict[str, float]:
    """``{split}_shapley_<modality>``, ``{split}_imbalance_degree`` and ``{split}_empty_coalition_acc`` of the
    model on ``loader`` (:func:`coalition_values`, :func:`shapley_values`, :func:`imbalance_degree`)."""
    values = coalition_values(model, method, config, loader, device, modalities)
    shapley = shapley_values(values, modalities)
    metrics = {f"{split}_shapley_{m}": value for m, value in shapley.items()}
    metrics[f"{split}_imbalance_degree"] = imbalance_degree(shapley)
    metrics[f"{split}_empty_coalition_acc"] = values[frozenset()]
    return metrics


def parameter_count(model: nn.Module) -> int:
    """Every parameter of ``model``, trainable or frozen."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def flops_per_sample(
    model: MultimodalModel, method: Method, config: Config, loader: Iterable[dict[str, Any]], device: torch.device
) -> float:
    """FLOPs of one evaluation forward (every modality present) of ``loader``'s first batch, divided by its size, as
    ``FlopCounterMode`` counts them. ``model`` must not be compiled (the counter sees eager operations only)."""
    batch = next(iter(loader), None)
    if batch is None:
        raise ValueError("the loader yielded no batch to count FLOPs on")
    inputs, labels = to_device(batch, device)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with _same_state_each_time(model, method):
        try:
            with counter, autocast(device, config.train.amp):
                method.forward(model, inputs, training=False)
        finally:
            model.train(was_training)
    return counter.get_total_flops() / int(labels.shape[0])


def mean_epoch_seconds(history: Sequence[Mapping[str, float]]) -> float:
    """Mean ``epoch_seconds`` over the epochs that logged it; NaN when none did."""
    seconds = [epoch["epoch_seconds"] for epoch in history if "epoch_seconds" in epoch]
    return sum(seconds) / len(seconds) if seconds else math.nan


def cost_metrics(
    model: MultimodalModel,
    method: Method,
    config: Config,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    history: Sequence[Mapping[str, float]],
) -> dict[str, float]:
    """``params``, ``flops_per_sample`` and ``seconds_per_epoch`` (peak memory is read apart, by
    :func:`peak_memory_mib`, before any scoring pass adds to it)."""
    return {
        "params": float(parameter_count(model)),
        "flops_per_sample": flops_per_sample(model, method, config, loader, device),
        "seconds_per_epoch": mean_epoch_seconds(history),
    }


def reset_peak_memory(device: torch.device) -> None:
    """Start CUDA's peak-memory count afresh (a seed's own peak); nothing to reset for a process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """(peak memory in MiB, where it was read: :data:`CUDA_PEAK` or :data:`PROCESS_PEAK_RSS`). NaN where the
    platform has no ``resource`` module (Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, CUDA_PEAK
    try:
        import resource
    except ImportError:
        return math.nan, PROCESS_PEAK_RSS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    return (peak / 2**20 if sys.platform == "darwin" else peak / 2**10), PROCESS_PEAK_RSS
