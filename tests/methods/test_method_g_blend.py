"""G-Blend (BalanceBenchmark's GBlendingTrainer): the weights are |Delta_G| / Delta_O^2 of temporary copies trained
from the current checkpoint, the real model and optimiser stay untouched, and training starts from an estimate.

The method is driven directly on a tiny in-memory dataset through a stand-in for the trainer (the attributes the
method reads: config, splits, device, model, optimizer, seed); the copies are retrained here by hand."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmgl_cli.config import load_config
from dmgl_cli.data.loader import ArraySplit, Splits, make_loader
from dmgl_cli.data.prepared import SplitArrays
from dmgl_cli.errors import DmglError
from dmgl_cli.methods import build_method
from dmgl_cli.methods.g_blend import FUSED, blend_weights, fresh_optimizer

DIMS = {"fast": 3, "slow": 5}
CLASSES = 3
BATCH, EVAL_BATCH = 16, 10  # 48 training samples: 3 batches; 25 validation samples: batches of 10, 10, 5


def _arrays(count: int, seed: int) -> SplitArrays:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count)
    inputs = {
        m: (rng.normal(size=(count, d)) + labels[:, None] * (1.0 if m == "fast" else 0.3)).astype(np.float32)
        for m, d in DIMS.items()
    }
    return SplitArrays(labels=labels.astype(np.int64), inputs=inputs)


def _setup(*settings: str):
    config = load_config(
        "synthetic",
        [
            "method.name=g-blend",
            "strategy.name=constant",
            "strategy.alpha=0",
            f"train.batch_size={BATCH}",
            f"train.eval_batch_size={EVAL_BATCH}",
            "train.device=cpu",
            "model.embed_dim=8",
            "optim.lr=0.1",
            "method.options.g-blend.copy_epochs=2",
            *settings,
        ],
    )
    method = build_method(config)
    torch.manual_seed(0)
    modalities = {m: {"kind": "vector", "dtype": "float32", "shape": [d]} for m, d in DIMS.items()}
    model = method.build_model(modalities, CLASSES)
    optim = config.optim
    optimizer = torch.optim.SGD(
        method.param_groups(model), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
    )
    train, val = ArraySplit(_arrays(48, 1)), ArraySplit(_arrays(25, 2))
    # Two real steps first, so the real optimiser has momentum buffers and the parameters have gradients.
    for start in (0, BATCH):
        rows = np.arange(start, start + BATCH)
        batch = train.__getitems__(list(rows))
        loss = F.cross_entropy(model(batch["inputs"]).logits, batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trainer = SimpleNamespace(
        config=config,
        dataset=SimpleNamespace(modalities=modalities),
        splits=Splits(train, val, val, "test"),
        device=torch.device("cpu"),
        model=model,
        optimizer=optimizer,
        seed=3,
    )
    method.attach(trainer)
    return method, model, trainer


def _hand_copy_losses(
    model, trainer, head: str, epoch: int, copy_epochs: int, reduction: str, copy_batches: int = 0
) -> dict[str, float]:
    """The copy of ``head`` retrained by hand: plain Concat on the fused CE, other modalities' inputs zero, a fresh
    SGD with the run's settings, the real run's batches of epochs epoch .. epoch + copy_epochs - 1."""
    optim = trainer.config.optim
    replica = copy.deepcopy(model)
    optimizer = torch.optim.SGD(
        replica.parameters(), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
    )
    kept = set(DIMS) if head == FUSED else {head}

    def blank(inputs):
        return {m: x if m in kept else torch.zeros_like(x) for m, x in inputs.items()}

    loader = make_loader(trainer.splits.train, BATCH, shuffle=True, seed=trainer.seed, drop_last=True)
    val = trainer.splits.val
    record = {}
    for copy_epoch in range(copy_epochs):
        replica.train()
        loader.batch_sampler.set_epoch(epoch - 1 + copy_epoch)
        batch_losses = []
        for number, batch in enumerate(loader):
            if copy_batches and number >= copy_batches:
                break
            loss = F.cross_entropy(replica(blank(batch["inputs"])).logits, batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            batch_losses.append((float(loss.detach()), len(batch["labels"])))
        replica.eval()
        val_losses = []
        with torch.no_grad():
            for start in range(0, len(val), EVAL_BATCH):
                batch = val.__getitems__(list(range(start, min(start + EVAL_BATCH, len(val)))))
                val_losses.append(
                    (
                        float(F.cross_entropy(replica(blank(batch["inputs"])).logits, batch["labels"])),
                        len(batch["labels"]),
                    )
                )
        if copy_epoch in (0, copy_epochs - 1):
            which = "first" if copy_epoch == 0 else "last"
            for name, losses in (("train", batch_losses), ("val", val_losses)):
                if reduction == "batch-sum":
                    record[f"{name}_{which}"] = sum(loss for loss, _ in losses)
                else:
                    record[f"{name}_{which}"] = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    return record


@pytest.mark.slow
@pytest.mark.parametrize(("reduction", "copy_batches"), [("batch-sum", 0), ("mean", 2)])
def test_weights_are_generalisation_over_squared_overfitting_of_the_copies(reduction, copy_batches):
    method, model, trainer = _setup(
        f"method.options.g-blend.loss_reduction={reduction}", f"method.options.g-blend.copy_batches={copy_batches}"
    )
    method.on_epoch_start(model, 1)
    estimate = method.state_dict()["own"]["last_estimate"]
    assert estimate["epoch"] == 1
    recorded = estimate["losses"]
    assert set(recorded) == {"fast", "slow", FUSED}
    raw = {}
    for head in ("fast", "slow", FUSED):
        # The losses the estimate used are the copies' losses, retrained independently here.
        hand = _hand_copy_losses(model, trainer, head, 1, 2, reduction, copy_batches)
        assert recorded[head] == pytest.approx(hand, rel=1e-5, abs=1e-6), head
        gain = hand["val_first"] - hand["val_last"]
        overfit = (hand["val_last"] - hand["train_last"]) - (hand["val_first"] - hand["train_first"])
        raw[head] = abs(gain) / overfit**2
    total = sum(raw.values())
    assert method.weights == pytest.approx({head: value / total for head, value in raw.items()}, rel=1e-4)
    assert sum(method.weights.values()) == pytest.approx(1.0)
    assert method.updates == 1
    # The logged Delta_G / Delta_O are the estimate's.
    metrics = method.on_epoch_end(model, 1, {})
    for head in raw:
        loss = recorded[head]
        assert metrics[f"gblend_generalisation_{head}"] == pytest.approx(loss["val_first"] - loss["val_last"])
        assert metrics[f"gblend_weight_{head}"] == method.weights[head]


@pytest.mark.slow
def test_the_estimate_leaves_the_real_model_optimiser_and_random_state_untouched():
    method, model, trainer = _setup("model.dropout=0.3")
    parameters = {k: v.clone() for k, v in model.state_dict().items()}
    gradients = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer_state = copy.deepcopy(trainer.optimizer.state_dict())
    rng = torch.get_rng_state()
    model.train()
    method.on_epoch_start(model, 1)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, parameters[key]), key
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.grad, gradients[name]), name
    after = trainer.optimizer.state_dict()
    assert after["param_groups"] == optimizer_state["param_groups"]
    assert after["state"].keys() == optimizer_state["state"].keys()
    for index, state in optimizer_state["state"].items():
        assert torch.equal(after["state"][index]["momentum_buffer"], state["momentum_buffer"])
    assert torch.equal(torch.get_rng_state(), rng)  # the copies ran under a forked, seeded random state
    # Seeded: the same checkpoint gives the same estimate (dropout included), as a resumed run needs.
    again, _, _ = _setup("model.dropout=0.3")
    again.on_epoch_start(again.trainer.model, 1)
    assert again.state_dict()["own"]["last_estimate"] == method.state_dict()["own"]["last_estimate"]


def test_training_starts_from_an_estimate_and_minimises_the_blend():
    method, model, trainer = _setup()
    method.on_epoch_start(model, 1)
    weights = method.weights
    assert max(abs(w - 1 / 3) for w in weights.values()) > 1e-3  # an estimate, not uniform weights
    batch = trainer.splits.train.__getitems__(list(range(BATCH)))
    output = model(batch["inputs"])
    labels = batch["labels"]
    ce = {
        FUSED: F.cross_entropy(output.logits, labels),
        **{m: F.cross_entropy(output.unimodal_logits[m], labels) for m in DIMS},
    }
    # Concat's head split gives the per-modality logits: W_m z_m + b / 2.
    head = model.fusion.head
    embed = model.fusion.embed_dim
    fast = output.embeddings["fast"] @ head.weight[:, :embed].T + head.bias / 2
    assert torch.allclose(output.unimodal_logits["fast"], fast, atol=1e-6)
    for alpha in (0.0, 0.3):
        extra = method.extra_losses(output, labels, {"alpha": alpha})["gblend_blend"]
        # The loop adds (1 - alpha) CE_fused; with the extra term the total is (1 - alpha) sum_k w_k CE_k.
        total = (1 - alpha) * ce[FUSED] + extra
        expected = (1 - alpha) * sum(weights[k] * ce[k] for k in ce)
        assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


@pytest.mark.slow
def test_estimates_every_super_epoch_and_resumes_with_the_same_weights():
    method, model, trainer = _setup("method.options.g-blend.super_epoch=2")
    method.on_epoch_start(model, 1)
    first = dict(method.weights)
    method.on_epoch_start(model, 2)
    assert method.updates == 1 and method.weights == first
    assert "gblend_generalisation_fast" not in method.on_epoch_end(model, 2, {})
    method.on_epoch_start(model, 3)
    assert method.updates == 2 and method.state_dict()["own"]["last_estimate"]["epoch"] == 3
    state = method.state_dict()
    resumed, _, _ = _setup("method.options.g-blend.super_epoch=2")
    resumed.attach(trainer)
    resumed.load_state_dict(state)
    resumed.on_epoch_start(model, 3)  # resumed in the middle of epoch 3: the estimate is not redone
    assert resumed.weights == method.weights and resumed.updates == 2


def test_blend_weights_by_hand():
    losses = {
        "a": {"train_first": 10.0, "val_first": 4.0, "train_last": 6.0, "val_last": 3.0},  # G 1, O 3
        "b": {"train_first": 10.0, "val_first": 4.0, "train_last": 9.0, "val_last": 4.5},  # G -0.5, O 1.5
        "c": {"train_first": 2.0, "val_first": 2.0, "train_last": 1.0, "val_last": 1.0},  # G 1, O 0
    }
    weights, gains, overfits = blend_weights(losses)
    assert gains == {"a": 1.0, "b": -0.5, "c": 1.0}
    assert overfits == {"a": 3.0, "b": 1.5, "c": 0.0}
    raw = {"a": 1 / 9, "b": 0.5 / 2.25, "c": 1 / 1e-12}  # |G| (the reference's abs); O^2 floored at 1e-12
    assert weights == pytest.approx({k: v / sum(raw.values()) for k, v in raw.items()})
    flat = {k: {"train_first": 1.0, "val_first": 1.0, "train_last": 1.0, "val_last": 1.0} for k in "ab"}
    assert blend_weights(flat)[0] is None  # nothing generalised: the estimate is skipped
    broken = {"a": {**losses["a"], "val_last": float("nan")}, "b": losses["b"]}
    assert blend_weights(broken)[0] is None


def test_settings_are_checked():
    with pytest.raises(DmglError, match=r"method\.options\.g-blend\.copy_epochs must be >= 2"):
        build_method(load_config("synthetic", ["method.name=g-blend", "method.options.g-blend.copy_epochs=1"]))
    with pytest.raises(DmglError, match=r"method\.options\.g-blend\.mode must be one of online, offline"):
        build_method(load_config("synthetic", ["method.name=g-blend", "method.options.g-blend.mode=sometimes"]))
    with pytest.raises(DmglError, match=r"train\.epochs"):
        build_method(
            load_config("synthetic", ["method.name=g-blend", "method.options.g-blend.mode=offline", "train.epochs=1"])
        )
    offline = build_method(
        load_config("synthetic", ["method.name=g-blend", "method.options.g-blend.mode=offline", "train.epochs=7"])
    )
    assert (offline.super_epoch, offline.copy_epochs) == (7, 7)
    defaults = build_method(load_config("synthetic", ["method.name=g-blend"]))
    assert (
        defaults.options.mode,
        defaults.super_epoch,
        defaults.copy_epochs,
        defaults.options.copy_batches,
        defaults.options.loss_reduction,
    ) == ("online", 10, 10, 0, "batch-sum")


@pytest.mark.parametrize("kind", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_copies_get_a_fresh_optimiser_with_the_runs_settings(kind):
    real = torch.nn.Linear(2, 2)
    settings = {"lr": 0.03, "weight_decay": 0.002, **({"momentum": 0.9} if kind is torch.optim.SGD else {})}
    optimizer = kind(real.parameters(), **settings)
    real(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    replica = copy.deepcopy(real)
    fresh = fresh_optimizer(optimizer, [{"params": list(replica.parameters())}])
    assert type(fresh) is kind and not fresh.state
    for key, value in settings.items():
        assert fresh.param_groups[0][key] == value
    assert fresh.param_groups[0]["params"] == list(replica.parameters())
