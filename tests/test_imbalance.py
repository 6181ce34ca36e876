"""Shapley values of test accuracy, imbalance degree and cost (dmgl_cli.imbalance), as recorded per seed and shown by
`dmgl report --table imbalance`: exact values on hand-built models, efficiency, a planted pure-noise modality in a
trained run, FLOPs against a hand count, and the table in every format."""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import random
import re

import pytest
import torch
from click.testing import CliRunner, Result
from torch import Tensor, nn

from dmgl_cli.catalogue import METHODS
from dmgl_cli.cli import cli
from dmgl_cli.config import load_config
from dmgl_cli.evaluation import evaluate
from dmgl_cli.imbalance import (
    PROCESS_PEAK_RSS,
    coalition_accuracy,
    cost_metrics,
    evaluate_with_coalitions,
    flops_per_sample,
    imbalance_degree,
    mean_epoch_seconds,
    parameter_count,
    peak_memory_mib,
    score_coalitions,
    shapley_metrics_of,
    shapley_values,
)
from dmgl_cli.methods.base import Method
from dmgl_cli.models.fusion import ConcatFusion, ModelOutput, MultimodalModel
from dmgl_cli.tracking import RunRecord, Tracker

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ hand-built models


class ReadsOnlyA(nn.Module):
    """Fused logits from modality ``a`` alone plus a bias towards class 0; ``b`` is encoded but never read."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.5, 0.0]))

    def forward(self, embeddings: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = embeddings["a"] + self.bias
        return logits, {"a": logits, "b": embeddings["b"]}


def _loader(inputs: dict[str, Tensor], labels: Tensor, batch_size: int) -> list[dict]:
    return [
        {"inputs": {m: x[i : i + batch_size] for m, x in inputs.items()}, "labels": labels[i : i + batch_size]}
        for i in range(0, len(labels), batch_size)
    ]


@pytest.fixture
def one_modality_data() -> tuple[MultimodalModel, Method, list[dict]]:
    """20 samples, 8 of class 0 and 12 of class 1; ``a`` is right for 16 of them (accuracy 0.8); with ``a`` zeroed
    the bias predicts class 0 for all (accuracy 0.4)."""
    labels = torch.tensor([0] * 8 + [1] * 12)
    shown = labels.clone()
    shown[[0, 1, 8, 9]] = 1 - shown[[0, 1, 8, 9]]  # four samples point to the wrong class
    inputs = {"a": 2.0 * nn.functional.one_hot(shown, 2).float(), "b": torch.randn(20, 2)}
    model = MultimodalModel(nn.ModuleDict({"a": nn.Identity(), "b": nn.Identity()}), ReadsOnlyA())
    return model, Method(load_config("synthetic"), {}), _loader(inputs, labels, batch_size=7)


def test_a_modality_the_prediction_never_reads_is_worth_exactly_zero(one_modality_data):
    model, method, loader = one_modality_data
    config = method.config
    values = score_coalitions(model, method, config, loader, CPU, ["a", "b"]).values
    assert values == {
        frozenset(): pytest.approx(0.4),
        frozenset({"a"}): pytest.approx(0.8),
        frozenset({"b"}): pytest.approx(0.4),
        frozenset({"a", "b"}): pytest.approx(0.8),
    }
    shapley = shapley_values(values, ["a", "b"])
    assert shapley["b"] == 0.0
    assert shapley["a"] == pytest.approx(0.8 - 0.4, abs=1e-12)  # accuracy minus the empty coalition's
    metrics = shapley_metrics_of(values, ["a", "b"])
    assert metrics["test_shapley_b"] == 0.0
    assert metrics["test_imbalance_degree"] == pytest.approx(0.4, abs=1e-12)
    assert metrics["test_empty_coalition_acc"] == pytest.approx(0.4)
    assert model.training  # scoring leaves the model's mode as it found it


def test_shapley_values_of_known_games_and_efficiency():
    players = ["x", "y", "z"]
    coalitions = [frozenset(c) for size in range(4) for c in itertools.combinations(players, size)]
    majority = {c: 1.0 if len(c) >= 2 else 0.0 for c in coalitions}  # symmetric: a third each
    assert shapley_values(majority, players) == pytest.approx({"x": 1 / 3, "y": 1 / 3, "z": 1 / 3})
    additive = {c: sum({"x": 0.1, "y": 0.25, "z": -0.05}[p] for p in c) for c in coalitions}
    assert shapley_values(additive, players) == pytest.approx({"x": 0.1, "y": 0.25, "z": -0.05})
    rng = random.Random(3)
    for count in (1, 2, 3):
        names = players[:count]
        values = {frozenset(c): rng.random() for size in range(count + 1) for c in itertools.combinations(names, size)}
        shapley = shapley_values(values, names)
        assert sum(shapley.values()) == pytest.approx(values[frozenset(names)] - values[frozenset()], abs=1e-12)
    with pytest.raises(ValueError, match="no value for coalition"):
        shapley_values({frozenset(): 0.0, frozenset({"x"}): 1.0}, ["x", "y"])


def test_imbalance_degree_is_the_spread_of_the_shapley_values():
    assert imbalance_degree({"a": 0.4, "b": 0.1, "c": -0.05}) == pytest.approx(0.45)
    assert imbalance_degree({"a": 0.3}) == 0.0


class CountsItsForwards(Method):
    """A method whose scoring changes the model's state, as Greedy's gate averages do."""

    @property
    def scoring_changes_state(self) -> bool:
        return True

    def forward(self, model, inputs, training):
        model.get_buffer("forwards").add_(1)
        return model(inputs)


def test_a_method_whose_scoring_changes_state_is_scored_from_the_same_state(one_modality_data):
    model, _, loader = one_modality_data
    model.register_buffer("forwards", torch.zeros(()))
    method = CountsItsForwards(load_config("synthetic"), {})
    score_coalitions(model, method, method.config, loader, CPU, ["a", "b"])
    flops_per_sample(model, method, method.config, loader, CPU)
    assert float(model.get_buffer("forwards")) == 0.0


class CountedEncoder(nn.Linear):
    """A linear encoder that counts its calls on real and on all-zero inputs."""

    def __init__(self, width: int, calls: dict[str, int]):
        super().__init__(width, 3)
        self.calls = calls

    def forward(self, input: Tensor) -> Tensor:
        key = "real" if bool(input.any()) else "zeros"
        self.calls[key] = self.calls.get(key, 0) + 1
        if key == "zeros":
            self.calls["zero rows"] = self.calls.get("zero rows", 0) + input.shape[0]
        return super().forward(input)


class ChangesEncodingsInPlace(Method):
    """A method whose forward writes into the encodings it is given (a copy must come back each time)."""

    def forward(self, model, inputs, training):
        embeddings = model.encode(inputs)
        for embedding in embeddings.values():
            embedding.mul_(2.0)
        logits, per_modality = model.fusion(embeddings)
        return ModelOutput(logits=logits, embeddings=embeddings, unimodal_logits=per_modality)


class ReadOnce(list):
    """A loader that counts how often it is iterated."""

    passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


@pytest.mark.parametrize("method_class", [Method, ChangesEncodingsInPlace])
def test_coalitions_are_scored_in_one_pass_as_one_by_one_and_flops_on_the_way(method_class):
    torch.manual_seed(0)
    calls: dict[str, int] = {}
    encoders = nn.ModuleDict({m: CountedEncoder(width, calls) for m, width in (("a", 4), ("b", 5), ("c", 2))})
    model = MultimodalModel(encoders, ConcatFusion(["a", "b", "c"], 3, 4))
    inputs = {"a": torch.randn(23, 4), "b": torch.randn(23, 5), "c": torch.randn(23, 2)}
    labels = torch.randint(0, 4, (23,))
    loader = ReadOnce(_loader(inputs, labels, batch_size=5))  # four batches of 5, one of 3
    method = method_class(load_config("synthetic"), {})
    modalities = ["a", "b", "c"]
    scores = score_coalitions(model, method, method.config, loader, CPU, modalities, count_flops=True)
    assert loader.passes == 1
    # each encoder once a batch on its real input (5 batches), and once in all on zeros (one sample)
    assert calls == {"real": 3 * 5, "zeros": 3, "zero rows": 3}
    assert all("forward" not in encoder.__dict__ for encoder in encoders.values())  # the encoders as they were
    calls.clear()
    one_by_one = {
        frozenset(c): coalition_accuracy(model, method, method.config, loader, CPU, c)
        for size in range(4)
        for c in itertools.combinations(modalities, size)
    }
    assert calls["real"] > 3 * 5  # scored one by one, the encoders run for every coalition
    assert scores.values == one_by_one  # the same predictions, so the same counts: equal, not close
    assert len(set(one_by_one.values())) > 2  # the coalitions do differ
    assert scores.flops_per_sample == flops_per_sample(model, method, method.config, loader, CPU)
    assert model.training


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_scores_its_coalitions_in_one_pass_as_one_by_one(synthetic, name):
    """Each method's own forward (heads, gates, prototypes, Greedy's state) through the shared encodings gives the
    coalition values that scoring each coalition on its own gives; untrained weights, several batches."""
    from dmgl_cli.config import resolve
    from dmgl_cli.data.loader import ArraySplit, eval_loader
    from dmgl_cli.data.registry import open_dataset
    from dmgl_cli.data.transforms import model_input_specs
    from dmgl_cli.methods import build_method

    torch.manual_seed(0)
    dataset = open_dataset(synthetic)
    modality = "fast" if name == "unimodal" else None  # the one method that needs its modality named
    config = resolve("synthetic", ["train.eval_batch_size=25"], method=name, modality=modality)
    method = build_method(config)
    model = method.build_model(model_input_specs(dataset.modalities, config), dataset.num_classes)
    loader = eval_loader(dataset, config, "test")
    modalities = sorted(dataset.modalities)
    scores = score_coalitions(model, method, config, loader, CPU, modalities, count_flops=True)
    one_by_one = {
        frozenset(c): coalition_accuracy(model, method, config, loader, CPU, c)
        for size in range(len(modalities) + 1)
        for c in itertools.combinations(modalities, size)
    }
    assert scores.values == one_by_one
    assert scores.flops_per_sample == flops_per_sample(model, method, config, loader, CPU)
    # the seed's end counts FLOPs on one sample when the trainer scored the coalitions: the same count
    split = loader.dataset
    one_sample = eval_loader(dataset, config, ArraySplit(split.arrays, split.indices[:1]))
    assert flops_per_sample(model, method, config, one_sample, CPU) == scores.flops_per_sample
    if method.scoring_changes_state:
        with pytest.raises(ValueError, match="one by one"):
            evaluate_with_coalitions(model, method, config, loader, CPU, "test", modalities)
        return
    # the trainer's test scoring with the coalitions on the way: its own scores, and the same coalition values
    scored, values = evaluate_with_coalitions(model, method, config, loader, CPU, "test", modalities)
    assert values == one_by_one
    alone = evaluate(model, method, config, loader, CPU, "test")
    assert scored.keys() == alone.keys()
    assert all(scored[k] == alone[k] or (math.isnan(scored[k]) and math.isnan(alone[k])) for k in alone)
    assert values[frozenset(modalities)] == scored["test_acc"]


class KeepingSink:
    def __init__(self):
        self.checkpoints: dict[str, dict] = {}

    def log_metrics(self, metrics, step):
        pass

    def save_checkpoint(self, name, state):
        self.checkpoints[name] = copy.deepcopy(state)


@pytest.mark.parametrize("name", ["concat", "pmr"])
def test_the_trainer_scores_the_coalitions_with_the_best_epochs_test_scores(synthetic, name):
    """The values the seed's Shapley values are made of come from the best epoch's test scoring: equal to one pass
    over a fresh model holding the best checkpoint's weights (what the seed's end did before), v(all) the reported
    test_acc; kept in the resumable checkpoint, and a trainer loaded from it returns them."""
    from dmgl_cli.config import resolve
    from dmgl_cli.data.loader import eval_loader
    from dmgl_cli.data.registry import open_dataset
    from dmgl_cli.data.transforms import model_input_specs
    from dmgl_cli.train import Trainer

    dataset = open_dataset(synthetic)
    config = resolve("synthetic", method=name, settings={"train.epochs": 3, "train.batch_size": 64})
    sink = KeepingSink()
    trainer = Trainer(config, dataset, 0, sink)
    assert trainer.scores_coalitions
    result = trainer.fit()
    modalities = sorted(dataset.modalities)
    assert result.test_coalitions is not None and len(result.test_coalitions) == 2 ** len(modalities)
    assert result.test_coalitions[frozenset(modalities)] == result.final["test_acc"]
    fresh = trainer.method.build_model(model_input_specs(dataset.modalities, config), dataset.num_classes)
    fresh.load_state_dict(sink.checkpoints["best"]["model"])
    loader = eval_loader(dataset, config, trainer.splits.test)
    assert score_coalitions(fresh, trainer.method, config, loader, CPU, modalities).values == result.test_coalitions

    resumed = Trainer(config, dataset, 0, KeepingSink())
    resumed.load_state_dict(sink.checkpoints["last"], "last.pt")
    assert resumed.fit().test_coalitions == result.test_coalitions  # nothing left to train: the kept values
    older = copy.deepcopy(sink.checkpoints["last"])
    del older["best"]["coalitions"]  # a checkpoint from before they were kept
    resumed = Trainer(config, dataset, 0, KeepingSink())
    resumed.load_state_dict(older, "last.pt")
    assert resumed.fit().test_coalitions is None  # the seed's end scores them in a pass of its own


@pytest.mark.parametrize(("method", "passes"), [("concat", 0), ("greedy", 1)])
def test_the_seeds_end_makes_a_coalition_pass_only_where_the_trainer_could_not(
    run_cli, synthetic, monkeypatch, method, passes
):
    """`dmgl train`: the Shapley values come from the best epoch's test scoring (no pass at the seed's end), except
    for a method whose scoring changes its state, which the end scores coalition by coalition, as before."""
    import dmgl_cli.run.training as training

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return score_coalitions(*args, **kwargs)

    monkeypatch.setattr(training, "score_coalitions", counted)
    result = run_cli("train", "--method", method, "--epochs", "2", "--set", "train.batch_size=64", "--json")
    assert len(calls) == passes
    final = json.loads(result.stdout)["seeds"][0]["final"]
    assert final["test_shapley_fast"] + final["test_shapley_slow"] == pytest.approx(
        final["test_acc"] - final["test_empty_coalition_acc"], abs=1e-9
    )
    assert final["flops_per_sample"] > 0


# ------------------------------------------------------------------------------------------------------ cost


def test_flops_per_sample_and_parameters_of_a_tiny_linear_model():
    encoders = nn.ModuleDict({"a": nn.Linear(4, 3), "b": nn.Linear(5, 3)})
    model = MultimodalModel(encoders, ConcatFusion(["a", "b"], 3, 2))
    loader = _loader({"a": torch.randn(7, 4), "b": torch.randn(7, 5)}, torch.zeros(7, dtype=torch.long), 7)
    method = Method(load_config("synthetic"), {})
    # a multiply-add is 2 FLOPs: encoders 4x3 and 5x3, the head 6x2, the head split's two 3x2 products
    by_hand = 2 * (4 * 3 + 5 * 3 + 6 * 2 + 3 * 2 + 3 * 2)
    assert flops_per_sample(model, method, method.config, loader, CPU) == by_hand
    assert parameter_count(model) == (4 * 3 + 3) + (5 * 3 + 3) + (6 * 2 + 2)
    history = [{"epoch_seconds": 1.0}, {"epoch_seconds": 2.0}, {"val_acc": 0.5}]
    costs = cost_metrics(model, method, method.config, loader, CPU, history)
    assert costs == {"params": 47.0, "flops_per_sample": float(by_hand), "seconds_per_epoch": 1.5}
    assert math.isnan(mean_epoch_seconds([]))
    peak, source = peak_memory_mib(CPU)
    assert source == PROCESS_PEAK_RSS and 1.0 < peak < 1e6


# ------------------------------------------------------------------------------ trained runs and the report

NOISE_DATASET = ["prepare", "synthetic", "-o", "samples=4000", "-o", "slow_class_signal=0", "-o", "slow_scale=1"]


@pytest.fixture(scope="module")
def noise_runs(tmp_path_factory):
    """A registry where ``slow`` is pure noise at full scale (no class signal): concat constant:0 over 2 seeds and
    constant:0.5 over 1."""
    home = tmp_path_factory.mktemp("imbalance") / "registry"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DMGL_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        runner = CliRunner()
        for args in (
            [*NOISE_DATASET, "--silent"],
            ["train", "--strategy", "constant:0", "--seeds", "2", "--epochs", "3", "--set", "train.batch_size=64"],
            ["train", "--strategy", "constant:0.5", "--epochs", "1", "--set", "train.batch_size=64", "--silent"],
        ):
            result = runner.invoke(cli, args)
            assert result.exit_code == 0, result.output
    return home


@pytest.fixture
def tracker(noise_runs, monkeypatch) -> Tracker:
    monkeypatch.setenv("DMGL_HOME", str(noise_runs))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Tracker()


def _parents(tracker: Tracker) -> list[RunRecord]:
    return [r for r in tracker.search([tracker.experiment_id("synthetic", create=False)]) if r.role == "parent"]


@pytest.mark.slow
def test_a_planted_noise_modality_is_worth_about_nothing(tracker):
    seeds = [child for parent in _parents(tracker) for child in tracker.children(parent.run_id)]
    assert len(seeds) == 3
    for run in seeds:
        metrics = run.metrics
        assert abs(metrics["final_test_shapley_slow"]) <= 0.01  # the target
        assert metrics["final_test_shapley_fast"] > 0.2
        # efficiency, and v(all) is the trainer's own test accuracy at the best epoch
        total = metrics["final_test_shapley_fast"] + metrics["final_test_shapley_slow"]
        assert total == pytest.approx(metrics["final_test_acc"] - metrics["final_test_empty_coalition_acc"], abs=1e-9)
        assert metrics["final_test_imbalance_degree"] == pytest.approx(
            abs(metrics["final_test_shapley_fast"] - metrics["final_test_shapley_slow"])
        )
        assert metrics["final_params"] > 0 and metrics["final_flops_per_sample"] > 0
        assert metrics["final_seconds_per_epoch"] > 0 and metrics["final_peak_memory_mib"] > 0
        assert run.tags["dmgl.peak_memory"] == PROCESS_PEAK_RSS


@pytest.mark.slow
def test_the_parent_run_summarises_the_seeds_and_describes_them(tracker):
    (parent,) = [r for r in _parents(tracker) if r.name == "concat-constant-0"]
    seeds = [c.metrics["final_test_shapley_slow"] for c in tracker.children(parent.run_id)]
    assert parent.metrics["final_test_shapley_slow"] == pytest.approx(sum(seeds) / 2)
    for key in ("test_imbalance_degree", "params", "flops_per_sample", "seconds_per_epoch", "peak_memory_mib"):
        assert f"final_{key}" in parent.metrics and f"final_{key}_std" in parent.metrics
    # the cells are padded for the UI: compare without the padding
    note = re.sub(" +", " ", parent.tags["mlflow.note.content"].replace("&ensp;", ""))
    assert "| ACC | MAP | F1 | ACC fast | ACC slow | Gap ACC |" in note  # the scores' table is unchanged
    assert "| Shapley fast | Shapley slow | Imbalance | Params | FLOPs/sample | s/epoch | Peak MiB |" in note


@pytest.fixture
def report(noise_runs, monkeypatch):
    monkeypatch.setenv("DMGL_HOME", str(noise_runs))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def invoke(*args: str, expect: int = 0) -> Result:
        result = CliRunner().invoke(cli, ["report", "--table", "imbalance", *args])
        assert result.exit_code == expect, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
        assert "Traceback" not in result.output
        return result

    return invoke


@pytest.mark.slow
def test_the_imbalance_table_renders_in_every_format(report):
    text = report().stdout
    assert "Modality imbalance and cost on synthetic" in text and "Shapley" in text
    assert "concat (const 0)" in text and "concat (const 0.5)" in text
    for column in ("fast", "slow", "Imbalance", "Params", "MFLOPs/sample", "s/epoch", "Peak MiB"):
        assert column in text
    assert "[n=1]" in text  # the one-seed row says so
    markdown = report("--format", "markdown").stdout
    assert (
        "| Method | Shapley fast | Shapley slow | Imbalance | Params | MFLOPs/sample | s/epoch | Peak MiB |" in markdown
    )
    latex = report("--format", "latex").stdout
    assert r"\begin{tabular}" in latex and r"\multicolumn{2}{c}{Shapley}" in latex and "MFLOPs" in latex
    rows = list(csv.DictReader(io.StringIO(report("--format", "csv").stdout)))
    assert {r["table"] for r in rows} == {"imbalance"}
    assert {r["column"] for r in rows} == {
        "fast",
        "slow",
        "Imbalance",
        "Params",
        "MFLOPs/sample",
        "s/epoch",
        "Peak MiB",
    }
    slow = [r for r in rows if r["column"] == "slow"]
    assert len(slow) == 2 and all(abs(float(r["mean"])) <= 0.01 for r in slow)
    (table,) = json.loads(report("--format", "json").stdout)["tables"]
    assert table["kind"] == "imbalance" and table["column_groups"] == [["Shapley", 2]]
    assert [row["stub"] for row in table["rows"]] == [["concat (const 0)"], ["concat (const 0.5)"]]
    assert [c["n"] for c in table["rows"][0]["cells"]] == [2] * 7


@pytest.mark.slow
def test_the_imbalance_table_refuses_the_validation_split(report):
    refused = report("--split", "val", expect=1)
    assert "measured on the test split only" in refused.output
