"""`dmgl report --plot embeddings` (Figure 2): the figure is written from two tiny trained cells (Concat and
Ours-H on synthetic data), and the gap it shows is the centroid distance computed directly from the embeddings
(and the `final_test_modality_gap` training logged)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from matplotlib.collections import PathCollection
from tiny import tiny_run

from dmgl_cli.cli import cli
from dmgl_cli.errors import DmglError
from dmgl_cli.report import Selection, make_figures, select_runs
from dmgl_cli.report.embeddings import check_projection, embedding_panel, l2_normalised
from dmgl_cli.tracking import Tracker

TINY = [*tiny_run(epochs=2), "--silent"]


@pytest.fixture(scope="module")
def two_cells(tmp_path_factory):
    """A registry with Concat (constant 0) and Ours-H (heuristic), 2 seeds each, 2 epochs on synthetic data."""
    home = tmp_path_factory.mktemp("embeddings") / "registry"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DMGL_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        runner = CliRunner()
        for args in (
            ["prepare", "synthetic", "-o", "samples=400", "--silent"],
            ["train", "--strategy", "constant", "--alpha", "0", "--seeds", "2", *TINY],
            ["train", "--strategy", "heuristic", "--seeds", "2", *TINY],
        ):
            result = runner.invoke(cli, args)
            assert result.exit_code == 0, result.output
    return home


@pytest.fixture
def registry_of(two_cells, monkeypatch):
    monkeypatch.setenv("DMGL_HOME", str(two_cells))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return two_cells


@pytest.mark.slow
def test_the_command_writes_the_figure(registry_of, tmp_path):
    import matplotlib.image

    result = CliRunner().invoke(
        cli, ["report", "--plot", "embeddings", "--labels", "paper", "--out", str(tmp_path / "figs")]
    )
    assert result.exit_code == 0, result.output
    path = tmp_path / "figs" / "embeddings-synthetic.png"
    assert f"wrote {path}" in result.output
    assert [p.name for p in (tmp_path / "figs").iterdir()] == ["embeddings-synthetic.png"]
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 400 and pixels.std() > 0.05


def _direct_gap(tracker: Tracker, run_id: str) -> tuple[float, dict[str, np.ndarray]]:
    """The modality gap of the run's best checkpoint on test, from the encoders' outputs, by hand."""
    from dmgl_cli.data.loader import eval_loader
    from dmgl_cli.models import MultimodalModel
    from dmgl_cli.recorded import load_seed_model

    loaded = load_seed_model(tracker, run_id, "best")
    model = loaded.model
    assert isinstance(model, MultimodalModel)
    chunks: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for batch in eval_loader(loaded.dataset, loaded.config, "test"):
            for name, z in model.encode(batch["inputs"]).items():
                chunks.setdefault(name, []).append(z.numpy().astype(np.float64))
    embeddings = {name: np.concatenate(parts) for name, parts in chunks.items()}
    centroids = {
        name: (values / np.linalg.norm(values, axis=1, keepdims=True)).mean(axis=0)
        for name, values in embeddings.items()
    }
    return float(np.linalg.norm(centroids["fast"] - centroids["slow"])), embeddings


@pytest.mark.slow
def test_the_plotted_gap_is_the_centroid_distance_of_the_embeddings(registry_of):
    from dmgl_cli import plots

    tracker = Tracker()
    runs, _ = select_runs(Selection(), tracker)
    figures = dict(make_figures(["embeddings"], runs, tracker=tracker, labels="paper"))
    figure = figures["embeddings-synthetic.png"]
    try:
        panels = [axis for axis in figure.axes if axis.get_xlabel() == "PCA 1"]
        titles = [axis.get_title().replace("\n", " ") for axis in panels]
        assert len(panels) == 2 and titles[0].startswith("Concat, seed") and titles[1].startswith("Ours-H, seed")
        for axis, title in zip(panels, titles, strict=True):
            prefix = re.search(r"\((\w{8})\)$", title)
            assert prefix, title
            run = next(r for r in runs if r.run_id.startswith(prefix.group(1)))
            # The seed shown is the one best on validation.
            cell = [r for r in runs if r.spec == run.spec]
            assert run.metrics["final_val_acc"] == max(r.metrics["final_val_acc"] for r in cell)
            direct, embeddings = _direct_gap(tracker, run.run_id)
            legend = [t.get_text() for t in axis.get_legend().get_texts()]
            gap_line = next(t for t in legend if t.startswith("modality gap"))
            assert gap_line == f"modality gap ‖c_fast − c_slow‖ = {direct:.3f}"
            assert run.metrics["final_test_modality_gap"] == pytest.approx(direct, abs=1e-5)
            # The centroid markers sit at the mean of each modality's plotted points.
            scatters = [c for c in axis.collections if isinstance(c, PathCollection)]
            offsets = {str(c.get_label()): np.asarray(c.get_offsets()) for c in scatters}
            points = {name.split(" ")[0]: xy for name, xy in offsets.items() if "(n=" in name}
            markers = {name.split(" ")[1]: xy[0] for name, xy in offsets.items() if name.startswith("centroid")}
            assert set(points) == set(markers) == {"fast", "slow"}
            for name in points:
                np.testing.assert_allclose(markers[name], points[name].mean(axis=0), atol=1e-9)
                assert len(points[name]) == len(embeddings[name])
        over_epochs = next(axis for axis in figure.axes if axis.get_xlabel() == "epoch")
        lines = {line.get_label(): line for line in over_epochs.get_lines()}
        assert set(lines) == {"Concat, 2 seeds", "Ours-H, 2 seeds"}
        assert list(lines["Concat, 2 seeds"].get_xdata()) == [1, 2]
        dots = [c for c in over_epochs.collections if isinstance(c, PathCollection)]
        assert len(dots) == 4  # each seed's own scored epochs, per cell
        assert len(over_epochs.collections) - len(dots) == 2  # a ± std band per cell
    finally:
        for fig in figures.values():
            plots.close(fig)


def test_panel_gap_and_projection_on_known_embeddings():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 6)) + 3.0
    b = rng.standard_normal((40, 6)) - 1.0
    panel = embedding_panel({"a": a, "b": b}, "known")
    na, nb = l2_normalised(a), l2_normalised(b)
    assert panel.gap == pytest.approx(float(np.linalg.norm(na.mean(0) - nb.mean(0))), abs=1e-12)
    assert panel.points["a"].shape == (50, 2) and panel.points["b"].shape == (40, 2)
    # PCA is affine: the 2-D centroid is the projection of the full-dimensional centroid, so a fit on the stacked
    # points maps the normalised centroids onto the plotted ones.
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=0).fit(np.concatenate([na, nb]))
    np.testing.assert_allclose(panel.centroids["a"], pca.transform(na.mean(0)[None])[0], atol=1e-9)
    with pytest.raises(DmglError, match="two or more modalities"):
        embedding_panel({"a": a}, "one")


def test_umap_is_refused_clearly_when_it_is_not_installed():
    import importlib.util

    if importlib.util.find_spec("umap") is not None:
        assert check_projection("umap") == "umap"
        return
    with pytest.raises(DmglError, match="pip install umap-learn"):
        check_projection("umap")
    with pytest.raises(DmglError, match="unknown projection"):
        check_projection("tsne")


@pytest.mark.slow
def test_without_test_curves_the_gap_per_epoch_is_validations(registry_of, monkeypatch):
    from dmgl_cli import plots

    tracker = Tracker()
    runs, _ = select_runs(Selection(), tracker)
    recorded = tracker.metric_history
    monkeypatch.setattr(  # runs trained with train.test_curves=false log no test scores per epoch
        tracker, "metric_history", lambda run_id, key: [] if key.startswith("test_") else recorded(run_id, key)
    )
    warnings: list[str] = []
    figures = dict(make_figures(["embeddings"], runs, tracker=tracker, warn=warnings.append))
    try:
        over_epochs = next(a for a in figures["embeddings-synthetic.png"].axes if a.get_xlabel() == "epoch")
        assert over_epochs.get_ylabel().startswith("val modality gap")
        assert len(over_epochs.get_lines()) == 2
        assert warnings == [
            "synthetic: no run logged test_modality_gap per epoch (train.test_curves=false); the embeddings figure "
            "draws val_modality_gap per epoch instead"
        ]
    finally:
        for figure in figures.values():
            plots.close(figure)


def test_sparse_test_points_are_averaged_only_where_every_seed_scored():
    # test is scored at each seed's own new best epochs: seed A at 1, 2, 4; seed B at 1, 3, 4
    from dmgl_cli import plots
    from dmgl_cli.report.figures import embeddings_figure, seed_band

    seeds = [[(1, 0.5), (2, 0.4), (4, 0.3)], [(1, 0.7), (3, 0.6), (4, 0.5)]]
    steps, mean, _, _ = seed_band(seeds, shared_only=True)
    assert steps == [1, 4] and mean == pytest.approx([0.6, 0.4])
    assert seed_band(seeds)[0] == [1, 2, 3, 4]  # the dense curves keep every epoch
    figure = embeddings_figure(
        [], {"Concat, 2 seeds": (steps, mean)}, {}, "title", seed_points={"Concat, 2 seeds": seeds}
    )
    try:
        (over_epochs,) = [a for a in figure.axes if a.get_xlabel() == "epoch"]
        (line,) = over_epochs.get_lines()
        assert list(line.get_xdata()) == [1, 4]
        dots = [c for c in over_epochs.collections if isinstance(c, PathCollection)]
        assert sorted(len(c.get_offsets()) for c in dots) == [3, 3]  # each seed's own points, drawn as they are
        assert "every seed scored" in over_epochs.get_title() and "each seed's scored epochs" in over_epochs.get_title()
    finally:
        plots.close(figure)
