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
coalitions (``M`` modalities), scored in one pass over the split: each batch is read once and scored for every
coalition, with each modality encoded once a batch and its zeros once, on one sample (an encoder in eval mode gives
one input one output and encodes each sample on its own, so reusing its output changes nothing; the method's
forward, fusion and heads run for each coalition; :class:`_EncodingsReused`). The trainer makes that pass its test
scoring at each new best epoch (:func:`evaluate_with_coalitions`: the full coalition is the scoring forward), so the
values are those of the reported test scores and the end of a seed makes no pass of its own; where it cannot
(data-parallel, ``train.compile``, a method whose scoring changes its state), the end of the seed makes the pass on
the best weights (:func:`score_coalitions`), counting the FLOPs (below) on its first batch's full coalition::

    phi_i = sum over S not containing i of  |S|! (M - |S| - 1)! / M!  *  (v(S + {i}) - v(S))

so they add up to ``v(all) - v({})`` (efficiency), a modality the prediction never reads gets exactly 0, and
``v(all)`` is the run's ``test_acc``. A method whose scoring changes its state (Greedy's gate averages, model
buffers) is scored coalition by coalition instead, one pass each, put back to the same state before each, so that
every coalition is scored by the same model.

**Imbalance degree** = max - min of the Shapley values (0 with one modality), the spread dmgl already uses for its
per-modality gap (:func:`dmgl_cli.metrics.performance_gap`). BalanceBenchmark's toolkit records the Shapley values but
its code gives no formula for a single imbalance figure; max - min is 0 for equal contributions and, unlike a ratio,
stays defined when a contribution is 0 or negative.

**Cost.** Parameters: every parameter of the model, frozen ones included. FLOPs per sample: what
``torch.utils.flop_counter.FlopCounterMode`` counts (matrix products and convolutions, a multiply-add = 2 FLOPs;
element-wise operations are not counted) over one evaluation forward of the split's first batch, divided by its
size, or of its first sample alone where the trainer scored the coalitions (the same count: every counted operation
is per sample; tests/test_imbalance.py checks it for every method). Seconds per epoch: the mean of the trainer's
``epoch_seconds`` (training only, without validation and test).
Peak memory in MiB (2^20 bytes): on CUDA ``torch.cuda.max_memory_allocated`` since the last
:func:`reset_peak_memory` (run.training resets it when a seed's trainer is built, so it is the seed's training and
evaluation), elsewhere the process's peak resident set size (``resource.getrusage``), which covers the whole process
so far, including any seed trained before in it; :func:`peak_memory_mib` says which.

Training layer: torch, no MLflow; the trainer scores the coalitions with its test scores, run.training turns them
into these measures once per seed.
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dmgl_cli.config import Config
from dmgl_cli.device import autocast, to_device
from dmgl_cli.evaluation import evaluate
from dmgl_cli.methods.base import Method
from dmgl_cli.metrics import performance_gap
from dmgl_cli.models import ModelOutput, MultimodalModel

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
    "CoalitionScores",
    "coalition_accuracy",
    "coalitions_from_state",
    "coalitions_to_state",
    "cost_metrics",
    "evaluate_with_coalitions",
    "flops_per_sample",
    "imbalance_degree",
    "mean_epoch_seconds",
    "parameter_count",
    "peak_memory_mib",
    "reset_peak_memory",
    "score_coalitions",
    "shapley_metrics_of",
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


def _predictions(
    model: MultimodalModel, method: Method, config: Config, inputs: dict[str, Tensor], device: torch.device
) -> Tensor:
    """The fused prediction of one batch in eval mode: the argmax of the float32 softmax, as evaluate() scores it
    (the same argmax, ties included)."""
    with autocast(device, config.train.amp):
        output = method.forward(model, inputs, training=False)
    return torch.softmax(method.predict(output).float(), dim=-1).argmax(dim=-1)


def _coalition_inputs(inputs: dict[str, Tensor], present: Collection[str]) -> dict[str, Tensor]:
    """``inputs`` with every modality not in ``present`` replaced by zeros of its shape and dtype."""
    return {m: x if m in present else torch.zeros_like(x) for m, x in inputs.items()}


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
            correct += (_predictions(model, method, config, _coalition_inputs(inputs, present), device) == labels).sum()
            samples += int(labels.shape[0])
    finally:
        model.train(was_training)
    if samples == 0:
        raise ValueError("the loader yielded no samples to score")
    return int(correct) / samples


@dataclass(frozen=True)
class CoalitionScores:
    """``values``: ``v(S)`` for every coalition; ``flops_per_sample``: as :func:`flops_per_sample` counts it, or
    None when not asked for."""

    values: dict[Coalition, float]
    flops_per_sample: float | None


def _all_coalitions(modalities: Sequence[str]) -> list[Coalition]:
    return [frozenset(c) for size in range(len(modalities) + 1) for c in itertools.combinations(modalities, size)]


class _EncodingsReused:
    """While active, each encoder of ``model`` called again with an input tensor it has already encoded (the same
    tensor object) returns a copy of its earlier output instead of running again: in eval mode an encoder gives one
    input one output, so the result is what running it again gives. The coalitions of a batch share their encoders'
    work this way: each real input is encoded once a batch, by the full coalition, which is scored first (FLOPs are
    counted on it, and while they are counted every call runs: a method may encode one input twice).

    An absent modality's input is one of the zero tensors kept here (:meth:`zeros`). Its encoding is computed once per
    modality and sample shape, on one sample, and repeated over the batch: an encoder in eval mode encodes each
    sample on its own (no batch statistics), so every row of an all-zero batch has that encoding, up to the rounding
    of kernels that depend on the batch size (4e-6 at most on a ResNet18's frames against a batch of 12; the
    coalitions' predictions were those of scoring each coalition on its own, for every method in
    tests/test_imbalance.py). Copies are returned, so that a method changing an encoding in place changes no other
    coalition's."""

    def __init__(self, model: MultimodalModel):
        self.encoders = dict(model.encoders.items())
        # per encoder: id(input) -> (input, output); the input is held, so that its id is not reused meanwhile
        self.outputs: dict[str, dict[int, tuple[Tensor, Tensor]]] = {name: {} for name in self.encoders}
        self.zero_inputs: dict[tuple, Tensor] = {}  # (modality, shape, dtype) -> the zero tensor handed out
        # id(zero tensor) -> (the tensor, (modality, sample shape, dtype)); the zeros of one sample shape share a key
        self.zero_samples: dict[int, tuple[Tensor, tuple]] = {}
        self.zero_encodings: dict[tuple[str, tuple], Tensor] = {}  # (encoder, zero sample key) -> its encoding
        self.counting = False

    def __enter__(self) -> _EncodingsReused:
        for name, encoder in self.encoders.items():
            encoder.forward = self._remembering(name, encoder.forward)  # an instance attribute over the class's
        return self

    def __exit__(self, *exc_info: object) -> None:
        for encoder in self.encoders.values():
            del encoder.forward  # back to the class's method
        self.outputs.clear()

    def _remembering(self, name: str, forward: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        outputs = self.outputs[name]

        def remembered(x: Tensor) -> Tensor:
            zeros = self.zero_samples.get(id(x))
            if zeros is not None and zeros[0] is x:
                key = (name, zeros[1])
                if key not in self.zero_encodings:
                    self.zero_encodings[key] = forward(x[:1])
                one = self.zero_encodings[key]
                return one.expand(x.shape[0], *one.shape[1:]).clone()
            seen = outputs.get(id(x))
            if seen is None or seen[0] is not x or self.counting:
                seen = outputs[id(x)] = (x, forward(x))
            return seen[1].clone()

        return remembered

    def zeros(self, modality: str, like: Tensor) -> Tensor:
        """The kept zero tensor of ``like``'s shape and dtype for ``modality``."""
        key = (modality, tuple(like.shape), like.dtype)
        if key not in self.zero_inputs:
            zeros = self.zero_inputs[key] = torch.zeros_like(like)
            self.zero_samples[id(zeros)] = (zeros, (modality, tuple(like.shape[1:]), like.dtype))
        return self.zero_inputs[key]

    def next_batch(self) -> None:
        """Forget the last batch's real inputs."""
        for outputs in self.outputs.values():
            outputs.clear()


@torch.inference_mode()
def score_coalitions(
    model: MultimodalModel,
    method: Method,
    config: Config,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    modalities: Sequence[str],
    count_flops: bool = False,
) -> CoalitionScores:
    """``v(S)`` (:func:`coalition_accuracy`) for every subset ``S`` of ``modalities``, the empty one included, in one
    pass over ``loader``; with ``count_flops``, the FLOPs per sample of the first batch's full-coalition forward too.

    Each batch's coalitions share the encoders' work (:class:`_EncodingsReused`): per batch, each modality is
    encoded once; its zeros once per sample shape, on one sample; the method's forward, fusion and heads run per
    coalition. A method whose
    scoring changes its state is scored one coalition at a time from the same state (:func:`_same_state_each_time`),
    one pass each."""
    coalitions = _all_coalitions(modalities)
    if method.scoring_changes_state:
        with _same_state_each_time(model, method) as restore:
            values = {}
            for coalition in coalitions:
                restore()
                values[coalition] = coalition_accuracy(model, method, config, loader, device, coalition)
        flops = flops_per_sample(model, method, config, loader, device) if count_flops else None
        return CoalitionScores(values, flops)
    everyone = frozenset(modalities)
    coalitions = [everyone] + [c for c in coalitions if c != everyone]  # the full one first: it encodes for the rest
    was_training = model.training
    model.eval()
    correct = {coalition: torch.zeros((), dtype=torch.long, device=device) for coalition in coalitions}
    samples, flops = 0, None
    try:
        with _EncodingsReused(model) as encodings:
            for batch in loader:
                encodings.next_batch()
                inputs, labels = to_device(batch, device)
                for coalition in coalitions:
                    present = {m: x if m in coalition else encodings.zeros(m, x) for m, x in inputs.items()}
                    counter = _flop_counter() if count_flops and flops is None else None
                    encodings.counting = counter is not None
                    with counter or nullcontext():
                        predicted = _predictions(model, method, config, present, device)
                    encodings.counting = False
                    if counter is not None:
                        flops = counter.get_total_flops() / int(labels.shape[0])
                    correct[coalition] += (predicted == labels).sum()
                samples += int(labels.shape[0])
    finally:
        model.train(was_training)
    if samples == 0:
        raise ValueError("the loader yielded no samples to score")
    return CoalitionScores({c: int(n) / samples for c, n in correct.items()}, flops)


def evaluate_with_coalitions(
    model: MultimodalModel,
    method: Method,
    config: Config,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    prefix: str,
    modalities: Sequence[str],
) -> tuple[dict[str, float], dict[Coalition, float]]:
    """:func:`dmgl_cli.evaluation.evaluate`'s scores of ``loader`` and, in the same pass, ``v(S)`` for every coalition
    of ``modalities``, as :func:`score_coalitions` gives them: the full coalition is the scoring forward itself, and
    each batch's other coalitions reuse its encodings (:class:`_EncodingsReused`). The trainer scores the test split
    this way at a new best epoch, so that the seed's Shapley values need no pass of their own over the best weights.
    Single process only (a rank's loader holds its share of the batches), and not for a method whose scoring changes
    its state (:func:`score_coalitions` scores those one coalition at a time)."""
    if method.scoring_changes_state:
        raise ValueError(f"{type(method).__name__}'s scoring changes its state: score its coalitions one by one")
    everyone = frozenset(modalities)
    others = [c for c in _all_coalitions(modalities) if c != everyone]
    correct = {coalition: torch.zeros((), dtype=torch.long, device=device) for coalition in [everyone, *others]}
    samples = 0

    def score_the_other_coalitions(inputs: dict[str, Tensor], labels: Tensor, output: ModelOutput) -> None:
        nonlocal samples
        correct[everyone] += (torch.softmax(method.predict(output).float(), dim=-1).argmax(dim=-1) == labels).sum()
        for coalition in others:
            present = {m: x if m in coalition else encodings.zeros(m, x) for m, x in inputs.items()}
            correct[coalition] += (_predictions(model, method, config, present, device) == labels).sum()
        samples += int(labels.shape[0])
        encodings.next_batch()

    with _EncodingsReused(model) as encodings:
        scores = evaluate(model, method, config, loader, device, prefix, after_batch=score_the_other_coalitions)
    if samples == 0:
        raise ValueError("the loader yielded no samples to score")
    return scores, {c: int(n) / samples for c, n in correct.items()}


def coalitions_to_state(values: Mapping[Coalition, float]) -> list[list[Any]]:
    """``values`` as a checkpoint keeps them: ``[[sorted modalities], value]`` pairs."""
    return [[sorted(coalition), value] for coalition, value in values.items()]


def coalitions_from_state(pairs: Iterable[Sequence[Any]]) -> dict[Coalition, float]:
    return {frozenset(modalities): float(value) for modalities, value in pairs}


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


def shapley_metrics_of(
    values: Mapping[Coalition, float], modalities: Sequence[str], split: str = "test"
) -> dict[str, float]:
    """``{split}_shapley_<modality>``, ``{split}_imbalance_degree`` and ``{split}_empty_coalition_acc`` from the
    coalitions' values (:func:`shapley_values`, :func:`imbalance_degree`)."""
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
    counter = _flop_counter()
    with _same_state_each_time(model, method):
        try:
            with counter, autocast(device, config.train.amp):
                method.forward(model, inputs, training=False)
        finally:
            model.train(was_training)
    return counter.get_total_flops() / int(labels.shape[0])


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode  # here: only the end of a run counts FLOPs

    return FlopCounterMode(display=False)


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
    counted_flops: float | None = None,
) -> dict[str, float]:
    """``params``, ``flops_per_sample`` (``counted_flops`` if given, from :func:`score_coalitions`) and
    ``seconds_per_epoch`` (peak memory is read apart, by :func:`peak_memory_mib`, before any scoring pass adds to
    it)."""
    flops = flops_per_sample(model, method, config, loader, device) if counted_flops is None else counted_flops
    return {
        "params": float(parameter_count(model)),
        "flops_per_sample": flops,
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
