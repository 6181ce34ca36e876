"""Greedy: balanced multi-modal learning by the conditional learning speed (Wu, Jastrzebski, Cho & Geras, ICML
2022, "Characterizing and overcoming the greedy nature of learning in multi-modal deep neural networks").

Follows the authors' code, nyukat/greedy_multimodal_learning:

* ``src/model.py`` ``MMTM_MVCNN.forward`` — two uni-modal branches with an MMTM after ResNet layer2, layer3 and
  layer4, one classifier per branch, prediction = mean of the two branches' logits. Here: the model of the
  ``channel`` method (``channel.py``: an MMTM after every encoder stage but the last, which for the ResNet encoders
  is after layer2, layer3 and layer4; per-stream classifiers averaged), with the authors' plain ``sigmoid`` gate
  (``gate_scale`` 1) instead of MMTM's ``2 * sigmoid``.
* ``train.py`` ``blend_loss`` — the training loss is the *sum* of the branches' cross-entropies.
* ``src/callbacks.py`` ``Bias_Mitigation_Strong.compute_BDR`` — what is measured. For each modality j the
  parameters are split into its *main* branch (encoder j and its stream classifier; the authors' ``net_view_j``)
  and its *bypass*, the fusion layers through which the other modality reaches branch j (every MMTM's joint
  squeeze layer, shared by both bypasses, and its excitation layer for j; the authors' ``fc_squeeze`` and
  ``fc_visual``/``fc_skeleton``). After a step's backward, before the optimiser step::

      M_bypass_j += sum ||g||^2 / sum ||theta||^2   over bypass_j     (sums over the group's tensors)
      M_main_j   += sum ||g||^2 / sum ||theta||^2   over main_j
      BDR_j = log10(M_bypass_j / M_main_j),         d_BDR = BDR_0 - BDR_1

  (the paper's conditional learning speed: how fast branch j learns from the other modality relative to how fast
  it learns from its own; modality 0 is the dataset's first modality).
* ``Bias_Mitigation_Strong.on_backward_end`` / ``on_epoch_begin`` — when. Before epoch ``starting_epoch``
  (1-based, as the authors' loop counts; default 2, so epoch 1 is the warm-up) every step is normal and measured.
  From then on, after a normal step with ``|d_BDR| > epsilon`` the next ``window`` steps are *re-balancing* steps
  caring for modality 0 if ``d_BDR > 0`` and modality 1 otherwise; they are not measured, and the step after them
  is normal again. A re-balancing window runs on across an epoch's end.
* ``src/balanced_mmtm.py`` ``MMTM_mitigate.forward`` — how. Every MMTM keeps a running average of each modality's
  gate (excitation), the plain mean over all forward passes so far of the batch-mean gate, updated on every
  forward (training and evaluation batches alike) before it is used. In a re-balancing step every MMTM replaces
  the cared-for modality's gate by its running average (a constant: the cross-modal signal into that branch is
  cut, the branch must learn from its own input), the other modality keeps its gate, and the same loss updates
  all parameters (the cared-for modality's excitation layers get no gradient from the replaced gate). As released,
  *both* running averages are taken of the first modality's gate (``running_avg_weight_skeleton`` is updated from
  ``vis_out``), so a step caring for the second modality gates it with the first modality's average gate; that is
  the default (``running_average=first-modality``, which needs equal channel counts at every fusion point, as the
  authors' ResNet pairs have).
* ``configs/training_guided.gin`` — defaults: ``epsilon`` 0.01, ``window`` 5 (``curation_windowsize``),
  ``starting_epoch`` 2; MMTM ``ratio`` 4.

The method is defined for exactly two modalities and for CNN/MLP encoders (text has no channels to gate; the DMGL
paper has no Greedy result on its text-image datasets).

Deviations from the authors' code:

* Evaluation never re-balances: the released loop passes its current curation mode to the validation and test
  forwards too, so a window open at an epoch's end also changed that epoch's scores; here the scores (and
  ``dmgl eval`` of a checkpoint) always use the model's own gates.
* Only trainable parameters enter the sums; a trainable parameter without a gradient counts as a zero gradient
  (the released code reads every parameter's ``.grad``). With a matching strategy (alpha > 0, not the published
  setting) the measured gradients are those of dmgl's total loss, L_MM included.
* The model is dmgl's: its encoders end in a projection to ``model.embed_dim`` that the stream classifier reads
  (part of the main branch here), and the running averages are buffers, so they are checkpointed and a resumed run
  continues them (the released ones are plain attributes, lost on reload). As in the released loop, validation and
  test are scored at every validated epoch while ``average_eval_batches`` holds (their forwards enter the averages;
  other methods score test only at new best epochs), so test batches shape the gates of later training steps, as
  released; ``average_eval_batches=false`` keeps them out.
* Not reproduced: the random variant (``Bias_Mitigation_Random``) and the offline conditional utilisation rate
  analysis (``eval.py`` with ``turnoff_cross_modal_flow``); the MMTM options ``SEonly`` and ``shareweight`` (off in
  the released configs).
* Options of ours (defaults are the released behaviour): ``running_average=own`` averages each modality's own gate
  (what the paper describes); ``average_eval_batches=false`` keeps evaluation forwards out of the averages;
  ``training_loss=fused`` trains on the cross-entropy of the averaged logits (as ``channel``) instead of the sum
  over the streams; ``gate_scale`` (1.0) multiplies the sigmoid gate.

Settings (``method.options.greedy.*``): ``ratio`` (4), ``gate_scale`` (1.0), ``epsilon`` (0.01), ``window`` (5),
``starting_epoch`` (2), ``running_average`` (first-modality | own), ``average_eval_batches`` (true),
``training_loss`` (streams | fused). Logged per epoch: ``greedy_d_bdr`` (mean d_BDR of the epoch's measured
steps), ``greedy_bdr_<modality>`` (BDR_j at the epoch's end), ``greedy_curation_steps_<modality>`` (steps whose
forward replaced that modality's gate), and the ``mmtm_gate_*`` statistics of ``channel``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmgl_cli.catalogue.options import GreedyOptions
from dmgl_cli.errors import DmglError
from dmgl_cli.methods.channel import MMTM, ChannelMethod, MMTMModel, StreamHeads
from dmgl_cli.methods.fusion_base import FusionOutput
from dmgl_cli.models import ModelOutput, MultimodalModel

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config


class CuratedMMTM(MMTM):
    """An MMTM that keeps a running average of every modality's gate and, while ``curated`` names a modality
    index, gates that modality with its running average instead of its own gate."""

    averaged_batches: Tensor  # a registered buffer (nn.Module types attributes it does not know as Tensor | Module)

    def __init__(
        self, channels: list[int], ratio: int, gate_scale: float, average_sources: list[int], average_eval_batches: bool
    ):
        super().__init__(channels, ratio, gate_scale)
        # average_sources[j]: the modality whose gate feeds modality j's running average.
        self.average_sources = list(average_sources)
        self.average_eval_batches = average_eval_batches
        for index, width in enumerate(channels):
            self.register_buffer(f"running_gate_{index}", torch.zeros(width))
        self.register_buffer("averaged_batches", torch.zeros((), dtype=torch.long))
        self.curated: int | None = None  # set by GreedyMethod.forward for the duration of one forward pass

    def running_gate(self, index: int) -> Tensor:
        return getattr(self, f"running_gate_{index}")

    @torch.no_grad()
    def _update_running_gates(self, gates: list[Tensor]) -> None:
        seen = self.averaged_batches.to(torch.float32)
        for index, source in enumerate(self.average_sources):
            average = self.running_gate(index)
            average.mul_(seen).add_(gates[source].detach().float().mean(dim=0)).div_(seen + 1)
        self.averaged_batches += 1

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        gates = self.gates(features)
        if self.training or self.average_eval_batches:
            self._update_running_gates(gates)  # before the substitution: the average includes this batch
        if self.curated is not None:
            own = gates[self.curated]
            gates[self.curated] = self.running_gate(self.curated).to(own.dtype).expand_as(own)
        return self.recalibrate(features, gates), gates


def branch_groups(model: MMTMModel) -> tuple[list[list[nn.Parameter]], list[list[nn.Parameter]]]:
    """Per modality (in the model's order): its main branch (encoder and stream classifier) and its bypass (every
    MMTM's joint squeeze layer and its excitation layer), trainable parameters only."""
    fusion = model.fusion
    assert isinstance(fusion, StreamHeads)  # ChannelMethod.build_model's late fusion
    mmtms = cast(list[MMTM], list(model.mmtms))  # nn.ModuleList is not generic: its items type as Module
    main, bypass = [], []
    for index, modality in enumerate(model.modalities):
        main.append([*model.encoders[modality].parameters(), *fusion.heads[modality].parameters()])
        bypass.append(
            [p for mmtm in mmtms for p in (*mmtm.squeeze.parameters(), *mmtm.excitations[index].parameters())]
        )
    trainable = [[[p for p in group if p.requires_grad] for group in groups] for groups in (main, bypass)]
    return trainable[0], trainable[1]


def effective_updates(groups: list[list[nn.Parameter]]) -> np.ndarray:
    """``sum ||g||^2 / sum ||theta||^2`` of every group (float64), with one transfer from the device."""
    unique = list({id(p): p for group in groups for p in group}.values())
    position = {id(p): i for i, p in enumerate(unique)}
    zero = unique[0].new_zeros((), dtype=torch.float32)
    squares = (
        torch.stack(
            [
                torch.stack([p.grad.detach().float().pow(2).sum() if p.grad is not None else zero for p in unique]),
                torch.stack([p.detach().float().pow(2).sum() for p in unique]),
            ]
        )
        .double()
        .cpu()
        .numpy()
    )
    ratios = []
    for group in groups:
        columns = [position[id(p)] for p in group]
        grad_sq, weight_sq = squares[0, columns].sum(), squares[1, columns].sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios.append(np.float64(grad_sq) / np.float64(weight_sq))
    return np.array(ratios, dtype=np.float64)


class GreedyMethod(ChannelMethod, method="greedy"):
    """Balanced multi-modal learning (MMTM model, conditional learning speed, running-average curation); see the
    module docstring."""

    options: GreedyOptions

    def __init__(self, config: Config, options: GreedyOptions):
        super().__init__(config, options)
        # Accumulated effective updates, per modality in the model's order (the authors' M_bypass / M_main).
        self.bypass_speed = np.zeros(2)
        self.main_speed = np.zeros(2)
        self.d_bdr = float("nan")  # the last measured d_BDR
        self.unlocked = False  # the warm-up is over
        self.curating = False  # the coming steps re-balance
        self.caring: int | None = None  # index of the modality whose gate the re-balancing steps replace
        self.curation_step = 0
        self._epoch: dict[str, float] = {}  # this epoch's counts (measured steps, d_BDR sum, curated steps)
        self._counted_epoch = 0  # the epoch _epoch counts (kept when a run resumes in its middle)

    @property
    def scoring_changes_state(self) -> bool:
        return bool(self.options.average_eval_batches)

    # -- model ---------------------------------------------------------------------------------------------
    def make_mmtm(self, channels: list[int]) -> CuratedMMTM:
        if self.options.running_average == "first-modality":
            if len(set(channels)) != 1:
                raise DmglError(
                    f"{self.key('running_average')}=first-modality (the released code's running averages, both of "
                    f"the first modality's gate) needs the same number of channels in every modality at each "
                    f"fusion point; got {channels}. Set {self.key('running_average')}=own"
                )
            sources = [0] * len(channels)
        else:
            sources = list(range(len(channels)))
        return CuratedMMTM(
            channels,
            self.options.ratio,
            float(self.options.gate_scale),
            sources,
            self.options.average_eval_batches,
        )

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> MMTMModel:
        if len(modalities) != 2:
            raise DmglError(
                f"method 'greedy' balances the conditional learning speed between exactly two "
                f"modalities; dataset {self.config.dataset!r} has {len(modalities)}: "
                f"{', '.join(modalities)}"
            )
        return super().build_model(modalities, num_classes)

    def forward(self, model: MultimodalModel, inputs: dict[str, Tensor], training: bool) -> ModelOutput:
        curated = self.caring if training and self.curating else None
        assert isinstance(model, MMTMModel)  # the one build_model built
        mmtms = cast(list[CuratedMMTM], list(model.mmtms))  # make_mmtm's; nn.ModuleList types its items as Module
        for mmtm in mmtms:
            mmtm.curated = curated
        try:
            return model(inputs)
        finally:  # a forward pass outside the method (dmgl eval, probes) always sees the model's own gates
            for mmtm in mmtms:
                mmtm.curated = None

    def classification_loss(self, output: FusionOutput, labels: Tensor) -> Tensor:
        if self.options.training_loss == "fused":
            return super().classification_loss(output, labels)
        # A Tensor: the sum runs over the two streams (pyright types sum() as possibly its start, 0).
        return cast(Tensor, sum(F.cross_entropy(logits.float(), labels) for logits in output.unimodal_logits.values()))

    # -- the balancing ---------------------------------------------------------------------------------------
    def bdr(self) -> np.ndarray:
        """BDR_j = log10(M_bypass_j / M_main_j) per modality."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log10(self.bypass_speed / self.main_speed)

    def measure(self, model: MMTMModel) -> float:
        """Accumulate this step's effective updates and return d_BDR (Bias_Mitigation_Strong.compute_BDR)."""
        main, bypass = branch_groups(model)
        updates = effective_updates([*bypass, *main])
        self.bypass_speed = self.bypass_speed + updates[:2]
        self.main_speed = self.main_speed + updates[2:]
        bdr = self.bdr()
        self.d_bdr = float(bdr[0] - bdr[1])
        self._epoch["d_bdr_sum"] = self._epoch.get("d_bdr_sum", 0.0) + self.d_bdr
        self._epoch["measured"] = self._epoch.get("measured", 0.0) + 1
        return self.d_bdr

    def after_backward(self, model: MultimodalModel, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> None:
        super().after_backward(model, output, labels, step)
        assert isinstance(model, MMTMModel)  # the one build_model built
        if self.curating:  # the step that just ran replaced the cared-for modality's gate
            key = f"curated_{self.caring}"
            self._epoch[key] = self._epoch.get(key, 0.0) + 1
        if not self.unlocked:
            self.measure(model)
            self.curating, self.caring = False, 0
        elif not self.curating:
            d_bdr = self.measure(model)
            if abs(d_bdr) > self.options.epsilon:  # False for NaN (no speed measured yet)
                self.curating, self.curation_step = True, 0
                self.caring = 0 if d_bdr > 0 else 1
            else:
                self.curating, self.caring = False, 0
        else:
            self.curation_step += 1
            if self.curation_step == self.options.window:
                self.curating = False

    # -- epochs ---------------------------------------------------------------------------------------------
    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        super().on_epoch_start(model, epoch)
        if epoch != self._counted_epoch:
            self._epoch, self._counted_epoch = {}, epoch
        if epoch >= self.options.starting_epoch:
            self.unlocked = True

    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        metrics = super().on_epoch_end(model, epoch, val_metrics)
        names = model.modalities
        for index, modality in enumerate(names):
            metrics[f"greedy_curation_steps_{modality}"] = self._epoch.get(f"curated_{index}", 0.0)
        if self._epoch.get("measured"):
            metrics["greedy_d_bdr"] = self._epoch["d_bdr_sum"] / self._epoch["measured"]
        bdr = self.bdr()
        metrics.update({f"greedy_bdr_{m}": float(b) for m, b in zip(names, bdr, strict=True) if np.isfinite(b)})
        return metrics

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "greedy": {
                "bypass_speed": self.bypass_speed.tolist(),
                "main_speed": self.main_speed.tolist(),
                "d_bdr": self.d_bdr,
                "unlocked": self.unlocked,
                "curating": self.curating,
                "caring": self.caring,
                "curation_step": self.curation_step,
                "epoch": dict(self._epoch),
                "counted_epoch": self._counted_epoch,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        own = state.get("greedy")
        if own is None:
            return
        self.bypass_speed = np.array(own["bypass_speed"], dtype=np.float64)
        self.main_speed = np.array(own["main_speed"], dtype=np.float64)
        self.d_bdr = float(own["d_bdr"])
        self.unlocked, self.curating = bool(own["unlocked"]), bool(own["curating"])
        self.caring = None if own["caring"] is None else int(own["caring"])
        self.curation_step = int(own["curation_step"])
        self._epoch = {k: float(v) for k, v in own.get("epoch", {}).items()}
        self._counted_epoch = int(own.get("counted_epoch", 0))
