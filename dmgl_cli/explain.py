"""GradCAM of an image or video-frame modality for chosen test samples (``dmgl explain``, the paper's Figure 4).

What is attributed. The fused prediction's score for the sample's **true class**: the pre-softmax fused logit that
the run is scored on (``method.predict`` of ``method.forward`` in eval mode, exactly as ``dmgl eval`` scores a
split), with the other modalities of the same sample held fixed. GradCAM (Selvaraju et al. 2017) is
``captum.attr.LayerGradCam`` with ``relu_attributions=True``: the target layer's activations weighted by the
spatial mean of the score's gradient with respect to them, summed over channels, negative values set to 0.

Where. The target layer is the modality encoder's last convolutional block (:func:`target_layer`): the last
residual block of a ResNet encoder (``resnet18`` / ``resnet50``: ``trunk.layer4[-1]``; ``r3d_18`` /
``r2plus1d_18`` / ``mc3_18``: ``backbone.layer4[-1]``), or, in an encoder without residual blocks, its last
convolution. Encoders with no convolution (MLP, BERT) are refused.

What is drawn. The map is upsampled to the frame's size (bilinear; trilinear over time and space for a 3-D video
encoder), divided by its maximum (a map that is 0 everywhere stays 0) and laid over the frame in the ``jet``
colour map at 50% opacity. A video is explained on the middle one of the frames the model sees at evaluation (the
evaluation transform's deterministic frame sampling); a 2-D encoder's map for that frame is its own, since frames
are encoded one by one before the time average. The model is the run's recorded ``config.yaml`` and its best (or
last) checkpoint, rebuilt as ``dmgl eval`` rebuilds it; a parent run stands for its seed with the best validation
score (``final_val_<train.select_metric>``, a tie to the lower seed), as ``dmgl register`` chooses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dmgl_cli.errors import DmglError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dmgl_cli.data.prepared import PreparedDataset
    from dmgl_cli.recorded import RecordedModel
    from dmgl_cli.tracking import Tracker

ARTIFACT_FOLDER = "explain"
EXPLAINED_KINDS = ("image", "video")
DEFAULT_SAMPLES = 4


# --------------------------------------------------------------------------------------------------- GradCAM


def target_layer(encoder: nn.Module, what: str = "the encoder") -> nn.Module:
    """The encoder's last convolutional block: its last residual block (torchvision's ``BasicBlock`` /
    ``Bottleneck``, 2-D or 3-D) or, without any, its last convolution; DmglError when it has no convolution."""
    from torch import nn
    from torchvision.models import resnet as tv_resnet
    from torchvision.models.video import resnet as tv_video

    blocks = (tv_resnet.BasicBlock, tv_resnet.Bottleneck, tv_video.BasicBlock, tv_video.Bottleneck)
    modules = list(encoder.modules())
    residual = [m for m in modules if isinstance(m, blocks)]
    if residual:
        return residual[-1]
    convolutions = [m for m in modules if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    if convolutions:
        return convolutions[-1]
    raise DmglError(
        f"{what} has no convolutional layer, so GradCAM has no feature map to weight; "
        "explain a modality with a convolutional encoder (resnet18, resnet50, r3d_18, ...)"
    )


def gradcam(forward, layer: nn.Module, inputs: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """GradCAM of ``forward(inputs)[i, targets[i]]`` at ``layer``'s output (``captum.attr.LayerGradCam``, ReLU
    applied): shape ``[N', 1, *spatial]`` as the layer emits it (N' = N, or N x frames for a frame-folding
    encoder). Gradients are taken in whatever mode the model is in (callers put it in eval mode)."""
    import torch
    from captum.attr import LayerGradCam

    with torch.enable_grad():
        maps = LayerGradCam(forward, layer).attribute(inputs, target=[int(t) for t in targets], relu_attributions=True)
    assert isinstance(maps, torch.Tensor)  # one input, one layer output
    return maps.detach()


def upsample_maps(maps: torch.Tensor, batch: int, frames: int, size: tuple[int, int]) -> torch.Tensor:
    """Layer maps -> ``[batch, frames, H, W]``: ``[batch * frames, 1, h, w]`` (a 2-D encoder that folds frames into
    the batch) bilinearly, ``[batch, 1, t, h, w]`` (a 3-D encoder) trilinearly to ``frames`` x ``size``."""
    from torch.nn import functional

    maps = maps.float()
    if maps.dim() == 5:
        out = functional.interpolate(maps, size=(frames, *size), mode="trilinear", align_corners=False)
        return out[:, 0]
    if maps.dim() == 4 and maps.shape[0] == batch * frames:
        out = functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        return out[:, 0].reshape(batch, frames, *size)
    raise DmglError(
        f"the target layer's maps have shape {tuple(maps.shape)}, which fits neither frames folded into the batch "
        f"({batch} x {frames}) nor a 3-D clip"
    )


def normalise(heat: np.ndarray) -> np.ndarray:
    """``heat / max(heat)`` (GradCAM maps are >= 0); an all-zero map stays zero."""
    top = float(heat.max()) if heat.size else 0.0
    return heat / top if top > 0 else np.zeros_like(heat)


def overlay(frame: np.ndarray, heat: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """A uint8 RGB image: ``frame`` ([H, W, C] uint8; C = 1, 2 or 3) blended with ``heat`` ([H, W] in [0, 1]) in
    matplotlib's ``jet`` colour map."""
    from matplotlib import colormaps

    rgb = display_frame(frame).astype(np.float32) / 255.0
    colours = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3]
    return np.clip(255.0 * ((1 - opacity) * rgb + opacity * colours), 0, 255).round().astype(np.uint8)


def display_frame(frame: np.ndarray) -> np.ndarray:
    """[H, W, C] -> [H, W, 3] uint8 for display: RGB as is, one channel as grey, two (optical flow) as their mean."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        low, high = float(frame.min()), float(frame.max())
        frame = ((frame - low) / (high - low or 1.0) * 255).astype(np.uint8)
    if frame.shape[-1] == 3:
        return frame
    grey = frame.astype(np.float32).mean(axis=-1).round().astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


# ---------------------------------------------------------------------------------------------- samples


def explainable_modality(dataset: PreparedDataset, modality: str | None) -> str:
    """``modality`` checked (an image or video modality of ``dataset``), or the dataset's only such modality."""
    kinds = {name: spec["kind"] for name, spec in dataset.modalities.items()}
    candidates = [name for name, kind in kinds.items() if kind in EXPLAINED_KINDS]
    if modality is None:
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise DmglError(
                f"dataset {dataset.name!r} has no image or video modality to explain "
                f"({', '.join(f'{n}: {k}' for n, k in kinds.items())})"
            )
        raise DmglError(
            f"dataset {dataset.name!r} has several image/video modalities; choose one with --modality: "
            + ", ".join(candidates)
        )
    if modality not in kinds:
        raise DmglError(f"dataset {dataset.name!r} has no modality {modality!r}; it has {', '.join(kinds)}")
    if kinds[modality] not in EXPLAINED_KINDS:
        raise DmglError(
            f"modality {modality!r} is {kinds[modality]}; dmgl explain draws image and video modalities "
            f"({', '.join(candidates) or 'this dataset has none'})"
        )
    return modality


def choose_samples(labels: np.ndarray, count: int | None, indices: Sequence[int] | None) -> list[int]:
    """Test-split positions: ``indices`` as given (checked), else ``count`` samples taking the first test sample
    of each class in turn (class 0, 1, ..., then the second of each), so that they cover min(count, classes)
    classes."""
    total = len(labels)
    if indices:
        bad = [i for i in indices if not 0 <= i < total]
        if bad:
            raise DmglError(f"--indices {', '.join(map(str, bad))} outside the test split (0 to {total - 1})")
        return list(dict.fromkeys(int(i) for i in indices))
    count = DEFAULT_SAMPLES if count is None else count
    if count < 1:
        raise DmglError(f"--samples must be at least 1, got {count}")
    per_class = [np.flatnonzero(labels == c).tolist() for c in sorted(set(labels.tolist()))]
    chosen: list[int] = []
    for rank in range(max((len(p) for p in per_class), default=0)):
        for positions in per_class:
            if rank < len(positions) and len(chosen) < count:
                chosen.append(positions[rank])
    return chosen


@dataclass
class Explained:
    """One run's GradCAM of the chosen samples: the frame shown, its normalised map, the true and predicted class."""

    label: str  # the run's column title
    run_id: str
    frames: list[np.ndarray]  # [H, W, C] uint8 each
    maps: list[np.ndarray]  # [H, W] in [0, 1] each
    predicted: list[int]
    probability: list[float]  # of the true class


def explain_samples(loaded: RecordedModel, modality: str, positions: Sequence[int]) -> Explained:
    """GradCAM of ``modality`` for the test samples at ``positions`` (see the module docstring for what is
    attributed and drawn)."""
    import torch

    from dmgl_cli.data.loader import ArraySplit, eval_loader
    from dmgl_cli.device import to_device

    model, method = loaded.model, loaded.method
    encoders = getattr(model, "encoders", None)
    if encoders is None or modality not in encoders:
        raise DmglError(
            f"method {loaded.config.method.name!r} has no encoder of its own for modality {modality!r} to explain"
        )
    encoder_name = loaded.config.encoder_for(modality).name
    layer = target_layer(encoders[modality], f"modality {modality!r}'s encoder ({encoder_name})")
    split = ArraySplit(loaded.dataset.split("test"), np.asarray(positions, dtype=np.int64))
    result = Explained(loaded.label, loaded.run.run_id, [], [], [], [])
    model.eval()
    for batch in eval_loader(loaded.dataset, loaded.config, split):
        inputs, labels = to_device(batch, loaded.device)

        def forward(x: torch.Tensor, fixed: dict[str, torch.Tensor] = inputs) -> torch.Tensor:
            return method.predict(method.forward(model, {**fixed, modality: x}, training=False)).float()

        x = inputs[modality]
        video = x.dim() == 5
        frames = x.shape[1] if video else 1
        height, width = x.shape[-3], x.shape[-2]
        maps = gradcam(forward, layer, x, labels.tolist())
        heat = upsample_maps(maps, x.shape[0], frames, (height, width))
        with torch.no_grad():
            probs = torch.softmax(forward(x), dim=1)
        middle = frames // 2
        for row in range(x.shape[0]):
            frame = x[row, middle] if video else x[row]
            result.frames.append(frame.detach().cpu().numpy())
            result.maps.append(normalise(heat[row, middle].cpu().numpy()))
            result.predicted.append(int(probs[row].argmax()))
            result.probability.append(float(probs[row, labels[row]]))
    return result


# ---------------------------------------------------------------------------------------------------- files


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def explain_figure(
    modality: str, positions: Sequence[int], labels: Sequence[int], classes: Sequence[str], runs: Sequence[Explained]
):
    """One row per sample; columns input | run 1 | run 2 ..., each run's column titled with its label."""
    from dmgl_cli import plots

    columns = 1 + len(runs)
    figure, axes = plots.subplots(
        len(positions),
        columns,
        figsize=(2.6 * columns, 2.6 * len(positions) + 0.7),
        dpi=110,
        squeeze=False,
        layout="constrained",
    )
    for row, (position, label) in enumerate(zip(positions, labels, strict=True)):
        axes[row][0].imshow(display_frame(runs[0].frames[row]))
        axes[row][0].set_ylabel(f"test #{position}\ntrue: {classes[label]}", fontsize=8)
        for column, run in enumerate(runs, start=1):
            axes[row][column].imshow(overlay(run.frames[row], run.maps[row]))
            axes[row][column].set_xlabel(
                f"pred {classes[run.predicted[row]]}, p(true) {run.probability[row]:.2f}", fontsize=7
            )
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    axes[0][0].set_title("input", fontsize=9)
    for column, run in enumerate(runs, start=1):
        axes[0][column].set_title(f"{run.label}\n{run.run_id[:8]}", fontsize=9)
    figure.suptitle(f"GradCAM of {modality} for the fused score of the true class", fontsize=10)
    return figure


@dataclass
class ExplainOutcome:
    modality: str
    positions: list[int]
    files: list[Path]
    logged: dict[str, list[str]]  # run id -> artifact paths logged to it


def explain(
    run_id: str,
    *,
    tracker: Tracker,
    compare: str | None = None,
    modality: str | None = None,
    samples: int | None = None,
    indices: Sequence[int] | None = None,
    out_dir: Path = Path("dmgl-explain"),
    checkpoint: str = "best",
) -> ExplainOutcome:
    """GradCAM overlays of ``modality`` for chosen test samples of ``run_id`` (and ``compare``, side by side).

    Writes to ``out_dir`` one overlay per run and sample (``<modality>-test<i>-<run>.png``) and the grid
    ``gradcam-<modality>-<run>[-vs-<run>].png`` (rows: samples; columns: input and each run), and logs them to the
    runs under ``explain/``: the grid to every run it shows, each overlay to its own run."""
    from dmgl_cli import plots
    from dmgl_cli.recorded import load_seed_model

    if samples is not None and indices:
        raise DmglError("give --samples or --indices, not both")
    first = load_seed_model(tracker, run_id, checkpoint)
    loaded = [first]
    if compare is not None:
        second = load_seed_model(tracker, compare, checkpoint)
        if second.config.dataset != first.config.dataset or second.dataset.checksum != first.dataset.checksum:
            raise DmglError(
                f"runs {first.run.run_id} ({first.config.dataset}) and {second.run.run_id} ({second.config.dataset}) "
                "were trained on different data; compare runs of one prepared dataset"
            )
        if second.run.run_id == first.run.run_id:
            raise DmglError(f"--compare names the same seed run as RUN_ID ({first.run.run_id})")
        loaded.append(second)
    name = explainable_modality(first.dataset, modality)
    labels = np.asarray(first.dataset.split("test").labels)
    positions = choose_samples(labels, samples, indices)
    runs = [explain_samples(r, name, positions) for r in loaded]
    from matplotlib.image import imsave

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    logged: dict[str, list[str]] = {r.run_id: [] for r in runs}
    for run in runs:
        for row, position in enumerate(positions):
            path = out_dir / f"{_file_part(name)}-test{position}-{run.run_id[:8]}.png"
            imsave(path, overlay(run.frames[row], run.maps[row]))
            files.append(path)
            tracker.log_file(run.run_id, path, ARTIFACT_FOLDER)
            logged[run.run_id].append(f"{ARTIFACT_FOLDER}/{path.name}")
    grid_name = f"gradcam-{_file_part(name)}-" + "-vs-".join(r.run_id[:8] for r in runs) + ".png"
    figure = explain_figure(name, positions, [int(labels[p]) for p in positions], first.dataset.classes, runs)
    grid = plots.save_png(figure, out_dir / grid_name)
    files.append(grid)
    for run in runs:
        tracker.log_file(run.run_id, grid, ARTIFACT_FOLDER)
        logged[run.run_id].append(f"{ARTIFACT_FOLDER}/{grid.name}")
    return ExplainOutcome(name, positions, files, logged)
