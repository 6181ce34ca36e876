"""dmgl-official against the authors' released code (Crema_epoch_learnable.py of njustkmg/NeurIPS24-LFM): its
alignment loss, its alpha gradient and its schedule, each computed here independently from their formulas."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmgl_cli.config import load_config
from dmgl_cli.data.registry import open_dataset
from dmgl_cli.losses import js_divergence, mixture_kl_divergence
from dmgl_cli.tracking import Tracker, local_path, mlflow_metric_name
from dmgl_cli.train import Trainer


def _mixture_kl_by_hand(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """½[KL(m‖p) + KL(m‖q)], sum over classes, mean over samples, in numpy."""

    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(logits_a), softmax(logits_b)
    m = (p + q) / 2
    return float(np.mean(0.5 * ((m * np.log(m / p)).sum(1) + (m * np.log(m / q)).sum(1))))


def test_mixture_kl_is_kl_from_the_mixture_not_jensen_shannon():
    generator = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(5, 6, generator=generator, dtype=torch.float64),
        torch.randn(5, 6, generator=generator, dtype=torch.float64),
    )
    value = mixture_kl_divergence(a, b).item()
    assert value == pytest.approx(_mixture_kl_by_hand(a.numpy(), b.numpy()), rel=1e-12)
    # F.kl_div(log p, m, batchmean) is KL(m‖p): the released code's Alignment, term by term
    p, q = F.softmax(a, -1), F.softmax(b, -1)
    m = 0.5 * p + 0.5 * q
    released = 0.5 * (F.kl_div(p.log(), m, reduction="batchmean") + F.kl_div(q.log(), m, reduction="batchmean"))
    assert value == pytest.approx(released.item(), rel=1e-12)
    assert abs(value - js_divergence(a, b).item()) > 1e-3  # not the Jensen-Shannon divergence
    assert mixture_kl_divergence(a, a).item() == pytest.approx(0.0, abs=1e-12)


class NullSink:
    def log_metrics(self, metrics, step):
        pass

    def save_checkpoint(self, name, state):
        pass


@pytest.mark.slow
def test_official_settings_model_and_alpha_gradient(synthetic):
    config = load_config("synthetic", ["method.name=dmgl-official", "train.epochs=3"])
    lb = config.strategy.lb
    assert config.loss.matching == "mixture_kl" and lb.approx == "official" and lb.update_every == "epoch_start"
    assert (lb.alpha_optimizer, lb.alpha_lr, lb.alpha_lr_halving) == ("sgd", 1e-4, 20)
    assert (lb.initial_alpha, lb.min_alpha, lb.max_alpha) == (0.95, 0.05, 0.95)
    assert (lb.outer_data, lb.holdout, lb.outer_batch_size, lb.outer_sampling) == ("holdout", 16, 8, "fixed")
    trainer = Trainer(config, open_dataset("synthetic"), 0, NullSink())
    assert len(trainer.holdout) == 16 and not set(trainer.holdout.indices) & set(trainer.splits.train.indices)
    assert trainer.method.objective_scale == 2.0

    # two heads, each with its own bias; L_CLS on ½(o_a + o_v)
    heads = trainer.model.fusion.heads
    assert set(heads) == {"fast", "slow"} and all(h.bias is not None for h in heads.values())
    eight = trainer.holdout.__getitems__(list(range(8)))  # the first 8 of the 16, every time
    inputs, labels = eight["inputs"], eight["labels"]
    trainer.model.eval()
    output = trainer.model(inputs)
    torch.testing.assert_close(output.logits, 0.5 * (output.unimodal_logits["fast"] + output.unimodal_logits["slow"]))

    # the alpha gradient, formed independently: H g_CLS by double backward through functional_call
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    names = list(params)
    alpha = 0.95

    def losses(flat: dict[str, torch.Tensor]):
        out = torch.func.functional_call(trainer.model, flat, (inputs,))
        cls = F.cross_entropy(0.5 * (out.unimodal_logits["fast"] + out.unimodal_logits["slow"]), labels)
        p, q = F.softmax(out.unimodal_logits["fast"], -1), F.softmax(out.unimodal_logits["slow"], -1)
        m = 0.5 * (p + q)
        align = 0.5 * (F.kl_div(p.log(), m, reduction="batchmean") + F.kl_div(q.log(), m, reduction="batchmean"))
        return cls, align

    def total(flat):
        cls, align = losses(flat)
        return (1 - alpha) * cls + alpha * align

    g_cls = torch.func.grad(lambda f: losses(f)[0])(params)
    _, h_g = torch.func.jvp(torch.func.grad(total), (params,), (g_cls,))
    expected = h_g[names[0]].mean().item()
    trainer.model.train()
    assert trainer.outer_step.alpha_gradient() == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert trainer.model.training


@pytest.mark.slow
def test_official_run_updates_alpha_before_each_epoch_with_a_doubled_objective(run_cli, synthetic):
    result = run_cli("train", "--method", "dmgl-official", "--epochs", "2", "--set", "train.batch_size=32")
    run_id = re.search(r"seed 0 \(run ([0-9a-f]{32})\)", result.output).group(1)
    run = Tracker().get_run(run_id)
    assert run.params["loss.matching"] == "mixture_kl" and run.params["strategy.lb.approx"] == "official"
    history = {
        key: sorted((m.step, m.value) for m in Tracker().client.get_metric_history(run_id, mlflow_metric_name(key)))
        for key in ("alpha", "alpha_hypergradient", "train_loss", "train_cls_loss", "train_mm_loss")
    }
    alphas = [value for _, value in history["alpha"]]
    gradients = [value for _, value in history["alpha_hypergradient"]]
    # epoch 1 trains at the alpha after the first (pre-training) update: 0.95 - 1e-4 * g1, clipped
    assert alphas[0] == pytest.approx(min(0.95, max(0.05, 0.95 - 1e-4 * gradients[0])), abs=1e-12)
    assert alphas[1] == pytest.approx(min(0.95, max(0.05, alphas[0] - 1e-4 * gradients[1])), abs=1e-12)
    for epoch in range(2):  # alpha is constant within an epoch, so the epoch means obey the doubled objective
        alpha = alphas[epoch]
        cls, mm, loss = (history[k][epoch][1] for k in ("train_cls_loss", "train_mm_loss", "train_loss"))
        assert loss == pytest.approx(2 * ((1 - alpha) * cls + alpha * mm), rel=1e-5)
    folder = local_path(run.artifact_uri)
    state = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)
    assert state["strategy"]["updates"] == 2 and state["strategy"]["current_lr"] == 1e-4
    assert math.isfinite(gradients[-1])
    refused = run_cli("train", "--method", "dmgl-official", "--strategy", "heuristic", "--epochs", "1", expect=1)
    assert "--strategy lb only" in refused.output


def test_eq3_variant_keeps_the_released_setting_but_takes_eq3(synthetic):
    config = load_config("synthetic", ["method.name=dmgl-official-eq3"])
    lb = config.strategy.lb
    assert config.loss.matching == "mixture_kl" and (lb.holdout, lb.outer_batch_size, lb.outer_sampling) == (
        16,
        8,
        "fixed",
    )
    assert (lb.approx, lb.update_every, lb.alpha_optimizer) == ("cg", "epoch", "adam")
