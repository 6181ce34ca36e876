"""Prepared format, registry, splits and the synthetic dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dmgl_cli.data.loader import EpochBatchSampler, make_splits
from dmgl_cli.data.prepared import PreparedDataset, PreparedWriter
from dmgl_cli.data.preparers.synthetic import OPTIONS, generate
from dmgl_cli.data.registry import DatasetRegistry
from dmgl_cli.data.splits import stratified_split
from dmgl_cli.errors import DmglError


def test_prepare_synthetic_writes_and_registers(run_cli, registry):
    result = run_cli("prepare", "synthetic", "-o", "samples=400", "-o", "modalities=3")
    assert "prepared synthetic: 8 classes; train 300, test 100" in result.output
    dataset = PreparedDataset(registry / "datasets" / "synthetic")
    assert set(dataset.modalities) == {"fast", "slow", "mid"}
    train = dataset.split("train")
    assert train.inputs["slow"].shape == (300, 32) and train.inputs["slow"].dtype == np.float32
    assert isinstance(train.inputs["fast"], np.memmap)
    row = DatasetRegistry(registry).get("synthetic")
    assert row["splits"] == {"train": 300, "test": 100}
    assert row["modalities"]["mid"]["shape"] == [32]
    assert row["checksum"] == dataset.checksum and row["preparer_version"] == "1"
    assert dataset.verify() == []
    assert not list((registry / "datasets").glob(".tmp-*"))
    listing = run_cli("datasets")
    assert "synthetic" in listing.output and "fast,slow,mid" in listing.output
    assert "all files match" in run_cli("datasets", "verify", "synthetic").output


def test_verify_detects_a_changed_file(run_cli, registry):
    run_cli("prepare", "synthetic", "-o", "samples=200")
    path = registry / "datasets" / "synthetic" / "train" / "slow.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run_cli("datasets", "verify", "synthetic", expect=1)
    assert "train/slow.npy" in result.output


def test_generator_is_seeded_and_imbalanced_by_construction():
    args = {k: OPTIONS[k] for k in OPTIONS if k != "samples"}
    labels_a, feats_a = generate(seed=3, samples=200, **args)
    labels_b, feats_b = generate(seed=3, samples=200, **args)
    assert np.array_equal(labels_a, labels_b) and np.array_equal(feats_a["slow"], feats_b["slow"])
    # The slow modality's inputs are small (slow to learn); the fast one's are at unit scale.
    assert feats_a["slow"].std() < 0.3 * feats_a["fast"].std()


def test_writer_leaves_nothing_when_it_fails(tmp_path):
    destination = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        with PreparedWriter(destination) as writer:
            writer.put("train", "labels", np.zeros(4, dtype=np.int64))
            raise RuntimeError("crash while preparing")
    assert not destination.exists()
    assert list(tmp_path.iterdir()) == []


def test_reader_refuses_a_corrupt_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DmglError, match="corrupt"):
        PreparedDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(DmglError, match="format 99"):
        PreparedDataset(tmp_path)


def test_stratified_split_is_seeded_and_keeps_every_class():
    labels = np.repeat(np.arange(5), 20)
    kept, held = stratified_split(labels, 0.1, seed=1)
    again_kept, again_held = stratified_split(labels, 0.1, seed=1)
    assert np.array_equal(held, again_held) and np.array_equal(kept, again_kept)
    assert len(held) == 10 and set(np.bincount(labels[held])) == {2}
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == 100
    assert not np.array_equal(held, stratified_split(labels, 0.1, seed=2)[1])


def test_validation_is_carved_from_train_never_from_test(run_cli, registry):
    run_cli("prepare", "synthetic", "-o", "samples=400")
    dataset = PreparedDataset(registry / "datasets" / "synthetic")
    splits = make_splits(dataset, 0.1, split_seed=0)
    assert splits.val.arrays is splits.train.arrays  # both views of the train arrays
    assert len(np.intersect1d(splits.val.indices, splits.train.indices)) == 0
    assert len(splits.val) + len(splits.train) == 300 and len(splits.test) == 100


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    sampler = EpochBatchSampler(10, 4, shuffle=True, seed=7, drop_last=True)
    sampler.set_epoch(2)
    first = list(sampler)
    other = EpochBatchSampler(10, 4, shuffle=True, seed=7, drop_last=True)
    other.set_epoch(2)
    assert list(other) == first and len(first) == 2
    other.set_epoch(3)
    assert list(other) != first


def test_sqlite_on_a_network_filesystem_is_warned_about(tmp_path, caplog):
    from dmgl_cli.paths import network_filesystem, warn_if_shared_sqlite

    table = tmp_path / "mounts"  # a mount table in /proc/mounts' format with an NFS export
    table.write_text(f"server:/export {tmp_path / 'shared'} nfs4 rw 0 0\n/dev/vda / ext4 rw 0 0\n")
    assert network_filesystem(tmp_path / "shared" / "x", table) == "nfs4"
    assert network_filesystem(tmp_path / "local", table) is None
    assert network_filesystem(tmp_path) is None  # this machine's real table: a local disk
    with caplog.at_level("WARNING", logger="dmgl"):
        warn_if_shared_sqlite(tmp_path / "shared" / "optuna.db", "Optuna storage", table)
    assert "network filesystem (nfs4)" in caplog.text and "PostgreSQL" in caplog.text


def test_an_evaluation_loader_forks_no_more_workers_than_it_has_batches_to_read_ahead(run_cli, registry):
    from dmgl_cli.config import load_config
    from dmgl_cli.data.loader import eval_loader

    run_cli("prepare", "synthetic", "-o", "samples=400", "--silent")
    dataset = PreparedDataset(registry / "datasets" / "synthetic")
    one_batch = load_config("synthetic", ["train.eval_batch_size=512"])  # test: 100 samples, one batch
    assert eval_loader(dataset, one_batch, "test", num_workers=2).num_workers == 0
    two_batches = load_config("synthetic", ["train.eval_batch_size=50"])
    assert eval_loader(dataset, two_batches, "test", num_workers=2).num_workers == 1
    many = load_config("synthetic", ["train.eval_batch_size=10"])
    loader = eval_loader(dataset, many, "test", num_workers=2)
    assert loader.num_workers == 2
    # the same batches either way (the evaluation transform draws nothing)
    in_process = eval_loader(dataset, many, "test", num_workers=0)
    for read, direct in zip(loader, in_process, strict=True):
        assert np.array_equal(read["labels"], direct["labels"])
        for name, values in read["inputs"].items():
            assert np.array_equal(values, direct["inputs"][name])
