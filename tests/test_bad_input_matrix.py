"""The bad-input matrix: every kind of bad input, made for real, ends in one message naming the culprit.

Each case builds its broken input for real (an empty WAV, a WAV whose header bytes are overwritten, a WAV cut in
the middle of its data, a cut JPEG, a JPEG whose header claims 30000 x 30000 pixels, a list / TSV line missing a
field, a label outside the class list, a video shorter than the frames asked for, a checkpoint copied from another
model, a registry folder the process may not write, a file-size limit that makes writing the prepared arrays fail)
and runs the real command on it. Every case must end with exit code 1 (2 for a click usage error), exactly one
``Error:`` whose message names the culprit (the file, the line or the value), no traceback, and nothing half-written:
the registry is byte-for-byte unchanged except, for a failure while decoding samples, the documented resumable work
folder ``datasets/.work-<name>/`` (plan fingerprint + done log + staging arrays; see ``driver.py``) — never a
``datasets/<name>`` folder, a ``.tmp-*`` / ``.old-*`` folder, a manifest or a registry row.

Three cases run ``python -m dmgl_cli`` in a child process: the read-only registry (tests run as root, where a 0o555
folder is still writable, so the child drops CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH / CAP_FOWNER from its capability
bounding set before exec; switching to ``nobody`` is impossible here because the interpreter lives under the 0o700
/root), the full disk simulated by RLIMIT_FSIZE with SIGXFSZ ignored (writes past the limit fail with EFBIG), and a
really full disk: a 3 MB tmpfs mounted over the registry in a private mount namespace (root only; skipped elsewhere).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from rawgen import (
    COLOURS,
    make_crema_d,
    make_nvgesture,
    make_tiny_text_model,
    make_twitter2015,
    nvgesture_line,
    truncate,
    write_video,
)

from dmgl_cli.data.media import audio_spectrogram
from dmgl_cli.data.prepared import PreparedDataset
from dmgl_cli.data.registry import DatasetRegistry
from dmgl_cli.tracking import Tracker, local_path

pytestmark = pytest.mark.integration  # every case runs `python -m dmgl_cli` in a subprocess
CREMA = ["-o", "frame_size=16", "--silent"]
NV_LIST = "nvgesture_train_correct_cvpr2016_v2.lst"
RUN_ID = "0123456789abcdef0123456789abcdef"
FILE_LIMIT = 1 << 20  # bytes: the staging audio array of 11 CREMA-D clips is 3.4 MB, so creating it fails
# The disk-full cases store spectrograms (3.4 MB): the default pcm16 store's 11 clips (1.06 MB) would fit in 3 MB.
CREMA_SPECTROGRAM = [*CREMA, "-o", "audio_store=spectrogram"]
# Capabilities that let root ignore file permissions (linux/capability.h) and prctl's PR_CAPBSET_DROP.
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3
PR_CAPBSET_DROP = 24
TRACKING_STORE = "mlflow.db"
TRACKING_TABLES = {"runs", "metrics", "latest_metrics", "params", "tags"}  # a new store holds one experiment


@dataclass
class Case:
    args: list[str]
    culprit: str  # must be named by the error message
    says: str  # what the message says about it
    exit_code: int = 1
    dataset: str | None = None  # a prepare's dataset name: nothing of it may appear but the work folder
    resumable: bool = False  # failed while decoding samples: the documented work folder stays for the re-run
    # Run `python -m dmgl_cli` in a child process, prepared by ``preexec`` and/or under the command ``wrap``.
    preexec: Callable[[], None] | None = None
    wrap: list[str] | None = None
    after: Callable[[str], None] | None = None  # case-specific checks of the output once the failure is verified


# ------------------------------------------------------------------------------------------------ raw inputs


def _crema(tmp_path: Path) -> Path:
    root = tmp_path / "CREMA-D"
    make_crema_d(root, per_class=2, frames=12)
    return root


def _crema_case(raw: Path, culprit: Path, says: str, resumable: bool = True) -> Case:
    return Case(
        ["prepare", "crema-d", "--raw", raw, *CREMA], str(culprit), says, dataset="crema-d", resumable=resumable
    )


def missing_raw_folder(tmp_path, **_):
    missing = tmp_path / "not-downloaded"
    return Case(["prepare", "crema-d", "--raw", missing, *CREMA], str(missing), "does not exist", dataset="crema-d")


def empty_wav(tmp_path, **_):
    raw = _crema(tmp_path)
    bad = raw / "AudioWAV" / "1002_DFA_DIS_XX.wav"
    bad.write_bytes(b"")
    return _crema_case(raw, bad, "is empty (0 bytes)")


def wav_bad_header(tmp_path, **_):
    raw = _crema(tmp_path)
    bad = raw / "AudioWAV" / "1001_DFA_HAP_XX.wav"
    data = bytearray(bad.read_bytes())
    data[:16] = b"\x13\x37" * 8  # RIFF id, size, WAVE id and the fmt chunk id overwritten
    bad.write_bytes(bytes(data))
    return _crema_case(raw, bad, "is not a readable audio file")


def truncated_wav_data(tmp_path, **_):
    raw = _crema(tmp_path)
    bad = raw / "AudioWAV" / "1002_DFA_NEU_XX.wav"
    truncate(bad, 0.5)  # the header still declares the whole data chunk
    return _crema_case(raw, bad, "is truncated: its header declares")


def video_shorter_than_frames(tmp_path, **_):
    raw = _crema(tmp_path)
    bad = raw / "VideoFlash" / "1001_DFA_SAD_XX.flv"
    write_video(bad, 5, COLOURS[5])
    return _crema_case(raw, bad, "has 5 video frames, fewer than the 10 requested")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return make_tiny_text_model(tmp_path_factory.mktemp("tiny-bert"))


def _twitter(tmp_path: Path, text_model: Path) -> tuple[Path, list[str]]:
    raw = tmp_path / "twitter2015"
    make_twitter2015(raw, per_split={"train": 3, "dev": 2, "test": 2})
    args = [
        "prepare",
        "twitter2015",
        "--raw",
        raw,
        "--text-model",
        text_model,
        "-o",
        "image_size=16",
        "-o",
        "max_tokens=16",
        "--silent",
    ]
    return raw, args


def truncated_jpeg(tmp_path, text_model, **_):
    raw, args = _twitter(tmp_path, text_model)
    bad = sorted((raw / "twitter2015_images").iterdir())[4]
    truncate(bad, 0.4)
    return Case(args, str(bad), "(Truncated File Read)", dataset="twitter2015", resumable=True)


def decompression_bomb(tmp_path, text_model, **_):
    raw, args = _twitter(tmp_path, text_model)
    bad = sorted((raw / "twitter2015_images").iterdir())[1]
    data = bytearray(bad.read_bytes())
    frame = data.find(b"\xff\xc0")  # baseline start-of-frame: length(2) precision(1) height(2) width(2)
    assert frame > 0
    data[frame + 5 : frame + 9] = (30000).to_bytes(2, "big") * 2
    bad.write_bytes(bytes(data))
    return Case(args, str(bad), "is refused as a decompression bomb", dataset="twitter2015", resumable=True)


def malformed_tsv_line(tmp_path, text_model, **_):
    raw, args = _twitter(tmp_path, text_model)
    with open(raw / "dev.tsv", "a") as handle:
        handle.write("2\t1\t1860700.jpg\tRT @user : $T$ is here\n")  # no target field
    return Case(args, f"{raw / 'dev.tsv'}:4", "has 4 tab-separated fields, expected 5", dataset="twitter2015")


def _nvgesture(tmp_path: Path, extra_line: str) -> tuple[Path, list[str]]:
    raw = tmp_path / "nvgesture"
    make_nvgesture(raw, classes=2, train_per_class=1, test_per_class=1, frames=8, start=0, end=8)
    with open(raw / NV_LIST, "a") as handle:
        handle.write(extra_line + "\n")
    return raw, ["prepare", "nvgesture", "--raw", raw, "-o", "frames=2", "-o", "frame_size=16", "--silent"]


def malformed_list_line(tmp_path, **_):
    line = nvgesture_line(2, 1, 0, 0, 8).rsplit(" label:", 1)[0]  # the label field is missing
    raw, args = _nvgesture(tmp_path, line)
    return Case(args, f"{raw / NV_LIST}:3", "has no label field", dataset="nvgesture")


def label_outside_classes(tmp_path, **_):
    raw, args = _nvgesture(tmp_path, nvgesture_line(2, 1, 0, 0, 8).replace("label:2", "label:26"))
    return Case(args, f"{raw / NV_LIST}:3", "has label:26, expected 1..25", dataset="nvgesture")


# ------------------------------------------------------------------------------------------------- settings


def _train(*args: str, culprit: str, says: str) -> Callable[..., Case]:
    return lambda **_: Case(["train", *args], culprit, says)


def unknown_table(**_):
    return Case(["report", "--table", "nope"], "'nope'", "is not one of 'main'", exit_code=2)


def run_not_found(**_):
    return Case(["eval", RUN_ID], f"'{RUN_ID}'", "does not exist")


def _trained_child(run_cli, *extra: str):
    result = run_cli(
        "train", "--strategy", "heuristic", "--epochs", "1", "--silent", "--set", "train.batch_size=64", *extra
    )
    parent_id = re.search(r"parent run ([0-9a-f]{32})", result.output).group(1)
    return Tracker().children(parent_id)[0]


def checkpoint_from_another_model(run_cli, **_):
    run_cli("prepare", "synthetic", "-o", "samples=400", "--silent")
    small = _trained_child(run_cli, "--set", "model.embed_dim=8")
    large = _trained_child(run_cli, "--set", "model.embed_dim=16")
    target = local_path(large.artifact_uri) / "checkpoints" / "best.pt"
    shutil.copyfile(local_path(small.artifact_uri) / "checkpoints" / "best.pt", target)
    return Case(
        ["eval", large.run_id],
        f"checkpoint run {large.run_id} checkpoints/best.pt",
        "was made for another model (shape differs for",
    )


# ----------------------------------------------------------------------------------- the system says no


def _drop_root_file_override() -> Callable[[], None]:
    """A preexec function: as root, leave the capabilities that bypass file permissions out of the bounding set,
    so that the exec'd interpreter obeys them like any user. (Not setuid to nobody: the interpreter is under /root,
    which is 0o700.) As another user, nothing to do."""
    if os.geteuid() != 0:
        return lambda: None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it

    def drop() -> None:
        for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
            if prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    return drop


def registry_read_only(tmp_path, registry, **_):
    raw = _crema(tmp_path)
    registry.mkdir()
    registry.chmod(0o555)
    return Case(
        ["prepare", "crema-d", "--raw", raw, *CREMA],
        f"registry folder {registry}",
        "is not writable (Permission denied)",
        dataset="crema-d",
        preexec=_drop_root_file_override(),
    )


def _staging_file(registry: Path) -> str:
    return str(registry / "datasets" / ".work-crema-d" / "staging" / "train" / "audio.npy")  # the first one made


def _file_size_limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def disk_full_during_prepare(tmp_path, registry, run_cli, **_):
    raw = _crema(tmp_path)

    def resumes_once_there_is_room(_output: str) -> None:
        result = run_cli("prepare", "crema-d", "--raw", raw, *CREMA_SPECTROGRAM)
        assert "prepared crema-d: 6 classes; train 11, test 1" in result.output
        assert not (registry / "datasets" / ".work-crema-d").exists()

    return Case(
        ["prepare", "crema-d", "--raw", raw, *CREMA_SPECTROGRAM],
        _staging_file(registry),
        "File too large; free some space there",
        dataset="crema-d",
        resumable=True,
        preexec=_file_size_limit,
        after=resumes_once_there_is_room,
    )


def _can_mount_privately() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--mount", "--propagation", "private", "--", "mount", "-t", "tmpfs", "tmpfs", "/mnt"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def disk_full_for_real(tmp_path, registry, **_):
    """The registry on a 3 MB tmpfs, mounted in a private mount namespace (seen by the child alone, gone with it):
    a real ENOSPC, where a write through a memory map into a sparse file would die of SIGBUS without a word."""
    if not _can_mount_privately():
        pytest.skip("mounting a private tmpfs needs root and unshare")
    raw = _crema(tmp_path)
    registry.mkdir()
    # The mount vanishes with the child, so the child lists what it left there (on stderr, after the message).
    script = (
        'mount -t tmpfs -o size=3m tmpfs "$DMGL_HOME" || exit 99; "$@"; rc=$?; '
        'echo "left:" >&2; find "$DMGL_HOME" -type f -printf "%P\\n" >&2; exit $rc'
    )

    def leaves_only_the_work_folder(output: str) -> None:
        left = output.split("left:\n", 1)[1].split()
        assert sorted(left) == sorted(["datasets/.work-crema-d/.lock", "datasets/.work-crema-d/plan.json"]), left

    return Case(
        ["prepare", "crema-d", "--raw", raw, *CREMA_SPECTROGRAM],
        _staging_file(registry),
        "No space left on device; free some space there",
        dataset="crema-d",
        wrap=["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"],
        after=leaves_only_the_work_folder,
    )


CASES = {
    "missing-raw-folder": missing_raw_folder,
    "empty-wav": empty_wav,
    "wav-bad-header": wav_bad_header,
    "truncated-wav-data": truncated_wav_data,
    "truncated-jpeg": truncated_jpeg,
    "decompression-bomb-image": decompression_bomb,
    "malformed-list-line": malformed_list_line,
    "malformed-tsv-line": malformed_tsv_line,
    "label-outside-classes": label_outside_classes,
    "video-shorter-than-frames": video_shorter_than_frames,
    "unknown-recipe": _train("--recipe", "nope", culprit="recipe 'nope'", says="unknown recipe"),
    "unknown-method": _train("--method", "nope", culprit="method 'nope'", says="unknown method"),
    "unknown-strategy": _train("--strategy", "magic", culprit="strategy 'magic'", says="unknown strategy"),
    "unknown-table": unknown_table,
    "alpha-above-1": _train(
        "--strategy", "constant", "--alpha", "1.5", culprit="alpha", says="alpha must be in [0, 1], got 1.5"
    ),
    "alpha-below-0": _train(
        "--strategy", "constant", "--alpha", "-0.1", culprit="alpha", says="alpha must be in [0, 1], got -0.1"
    ),
    "p-above-1": _train("--strategy", "stepwise", "--p", "2", culprit="p", says="p must be in [0, 1], got 2"),
    "p-below-0": _train("--strategy", "stepwise", "--p", "-0.5", culprit="p", says="p must be in [0, 1], got -0.5"),
    "seeds-0": _train("--seeds", "0", culprit="--seeds", says="must be >= 1 (a count) or a list like 0,1,2; got 0"),
    "seeds-negative": _train("--seeds", "-2", culprit="--seeds", says="must be >= 1 (a count) or a list like 0,1,2"),
    "run-id-not-found": run_not_found,
    "checkpoint-from-another-model": checkpoint_from_another_model,
    "registry-read-only": registry_read_only,
    "disk-full-during-prepare": disk_full_during_prepare,
    "disk-full-for-real": disk_full_for_real,
}


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` but the MLflow store's (looking a run up opens, and may create, the store)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(TRACKING_STORE)
    }


def _tracked(root: Path) -> dict[str, int]:
    """Rows in the MLflow store's tables, which no failed command may add to."""
    if not (root / TRACKING_STORE).is_file():
        return {}
    with sqlite3.connect(f"file:{root / TRACKING_STORE}?mode=ro", uri=True) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in sorted(tables & TRACKING_TABLES)}


def _invoke(case: Case, run_cli) -> tuple[int, str]:
    if case.preexec is None and case.wrap is None:
        result = run_cli(*case.args, expect=case.exit_code)
        assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an escaped exception
        return result.exit_code, result.output
    child = subprocess.run(
        [*(case.wrap or []), sys.executable, "-m", "dmgl_cli", *map(str, case.args)],
        capture_output=True,
        text=True,
        preexec_fn=case.preexec,
        timeout=120,
    )
    return child.returncode, child.stdout + child.stderr


@pytest.mark.parametrize("build", CASES.values(), ids=CASES.keys())
def test_bad_input_gives_one_clear_message_and_leaves_nothing(build, tmp_path, registry, run_cli, request):
    model = request.getfixturevalue("text_model") if "text_model" in build.__code__.co_varnames else None
    case = build(tmp_path=tmp_path, registry=registry, run_cli=run_cli, text_model=model)
    before, tracked = _files(registry), _tracked(registry)

    code, output = _invoke(case, run_cli)

    assert code == case.exit_code, output
    assert "Traceback" not in output, output
    assert output.count("Error:") == 1, output
    message = output[output.index("Error:") :]
    assert case.culprit in message and case.says in message, message
    # Nothing half-written: the registry is unchanged but for the documented resumable work folder.
    work = f"datasets/.work-{case.dataset}/"
    changed = {path for path, stamp in _files(registry).items() if before.get(path) != stamp}
    changed |= set(before) - set(_files(registry))
    assert {p for p in changed if not (case.resumable and p.startswith(work))} == set(), changed
    assert {t: n for t, n in _tracked(registry).items() if n} == {t: n for t, n in tracked.items() if n}
    datasets = registry / "datasets"
    if case.dataset is not None:
        assert not (datasets / case.dataset).exists()
        assert not list(datasets.glob(".tmp-*")) and not list(datasets.glob(".old-*"))
        assert case.dataset not in [row["name"] for row in DatasetRegistry(registry).rows()]
        assert (datasets / f".work-{case.dataset}" / "plan.json").is_file() == case.resumable
        assert not list(registry.rglob("manifest.json"))
    if case.after is not None:
        case.after(output)


# ------------------------------------------------------------------------------------------------ --skip-bad


def test_skip_bad_quarantines_exactly_the_injected_files(run_cli, registry, tmp_path):
    raw = _crema(tmp_path)
    injected = {
        "1001_DFA_ANG_XX": raw / "AudioWAV" / "1001_DFA_ANG_XX.wav",  # empty
        "1002_DFA_FEA_XX": raw / "AudioWAV" / "1002_DFA_FEA_XX.wav",  # header overwritten
        "1001_DFA_NEU_XX": raw / "AudioWAV" / "1001_DFA_NEU_XX.wav",  # data cut in half
        "1002_DFA_SAD_XX": raw / "VideoFlash" / "1002_DFA_SAD_XX.flv",  # 4 frames, 10 asked for
    }
    injected["1001_DFA_ANG_XX"].write_bytes(b"")
    header = bytearray(injected["1002_DFA_FEA_XX"].read_bytes())
    header[:12] = b"\x00" * 12
    injected["1002_DFA_FEA_XX"].write_bytes(bytes(header))
    truncate(injected["1001_DFA_NEU_XX"], 0.5)
    write_video(injected["1002_DFA_SAD_XX"], 4, COLOURS[5])

    result = run_cli("prepare", "crema-d", "--raw", raw, *CREMA, "--skip-bad", "--workers", "2")

    assert "Traceback" not in result.output and "Error:" not in result.output
    assert "skipped 4 unreadable samples" in result.output
    listed = [line.strip() for line in result.output.splitlines() if line.startswith("  ")]
    assert sorted(line.split(": ", 1)[0] for line in listed) == sorted(str(p) for p in injected.values())
    manifest = json.loads((registry / "datasets" / "crema-d" / "manifest.json").read_text())
    records = {r["id"]: r for r in manifest["bad_samples"]}
    assert set(records) == set(injected)
    assert {r["path"] for r in records.values()} == {str(p) for p in injected.values()}
    assert "empty" in records["1001_DFA_ANG_XX"]["reason"]
    assert "not a readable audio file" in records["1002_DFA_FEA_XX"]["reason"]
    assert "truncated" in records["1001_DFA_NEU_XX"]["reason"]
    assert "fewer than the 10 requested" in records["1002_DFA_SAD_XX"]["reason"]
    assert DatasetRegistry(registry).get("crema-d")["bad_samples"] == 4
    # Every good clip is there, once, with the audio its own WAV gives; no bad one is.
    dataset = PreparedDataset(registry / "datasets" / "crema-d")
    stored = {}
    for split in manifest["splits"]:
        arrays = dataset.split(split)
        for row, clip in enumerate(np.load(dataset.path / split / "ids.npy").tolist()):
            stored[clip] = arrays.inputs["audio"][row]
    good = sorted(p.stem for p in (raw / "AudioWAV").glob("*.wav") if p.stem not in injected)
    assert sorted(stored) == good and len(good) == 8
    for clip in good:
        np.testing.assert_allclose(
            stored[clip], audio_spectrogram(raw / "AudioWAV" / f"{clip}.wav", 3.0), rtol=1e-5, atol=1e-5
        )
    assert not (registry / "datasets" / ".work-crema-d").exists()
