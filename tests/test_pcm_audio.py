"""The pcm16 audio store: prepare keeps a clip's 16-bit samples, the loader computes the log-spectrogram from them
with numpy's STFT, which is librosa's to the bit; both audio stores read back the same spectrograms."""

from __future__ import annotations

import json

import librosa
import numpy as np
import pytest
import scipy.signal
import soundfile
from rawgen import make_crema_d, make_kinetics_sounds

from dmgl_cli.data.loader import ArraySplit
from dmgl_cli.data.media import (
    HANN_WINDOW,
    HOP,
    LOG_EPS,
    N_FFT,
    audio_spectrogram,
    from_pcm16,
    load_audio,
    log_magnitude,
    seconds_for_frames,
    to_pcm16,
)
from dmgl_cli.data.pcm_audio import PcmSpectrograms
from dmgl_cli.data.prepared import PreparedDataset

SMALL = ["-o", "frame_size=16", "--silent"]


def test_the_window_is_librosas_periodic_hann():
    np.testing.assert_array_equal(HANN_WINDOW, scipy.signal.get_window("hann", N_FFT, fftbins=True))


@pytest.mark.parametrize("source", ["pcm16", "float", "tone"])
def test_numpy_stft_equals_librosa(source):
    rng = np.random.default_rng(1)
    if source == "pcm16":
        samples = from_pcm16(rng.integers(-32768, 32768, 48_000).astype(np.int16))
    elif source == "float":
        samples = rng.uniform(-1, 1, 30_245).astype(np.float32)
    else:
        samples = (0.3 * np.sin(np.arange(16_000) * 0.05)).astype(np.float32)
    reference = librosa.stft(samples, n_fft=N_FFT, hop_length=HOP, win_length=N_FFT, window="hann", center=False)
    mine = log_magnitude(samples)
    assert mine.dtype == np.float32 and mine.shape == reference.shape == (257, 1 + (len(samples) - N_FFT) // HOP)
    np.testing.assert_allclose(np.exp(mine) - LOG_EPS, np.abs(reference), rtol=1e-5, atol=1e-6)
    # the same arithmetic as librosa's (float64 window and FFT, complex64 result): equal to the bit
    np.testing.assert_array_equal(mine, np.log(np.abs(reference) + LOG_EPS).astype(np.float32))


def test_pcm16_rounding_is_lossless_for_16_bit_samples_and_at_most_half_a_step_otherwise():
    rng = np.random.default_rng(2)
    exact = from_pcm16(rng.integers(-32768, 32768, 1000).astype(np.int16))
    np.testing.assert_array_equal(from_pcm16(to_pcm16(exact)), exact)
    other = rng.uniform(-1, 1, 1000).astype(np.float32)
    other[:2] = 1.0, -1.0  # full scale: +1 is one step past int16's range and clipped to 32767
    assert np.abs(from_pcm16(to_pcm16(other))[2:] - other[2:]).max() <= 0.5 / 32768
    assert to_pcm16(other)[:2].tolist() == [32767, -32768]


@pytest.fixture
def crema_both(run_cli, registry, tmp_path):
    raw = tmp_path / "CREMA-D"
    make_crema_d(raw, per_class=2)
    # one clip longer than 3 s, so one is cut while the others (1.2 s) are repeated
    soundfile.write(raw / "AudioWAV" / "1001_DFA_ANG_XX.wav", np.sin(np.arange(56_000) * 0.01) * 0.5, 16_000, "PCM_16")
    for store in ("pcm16", "spectrogram"):
        run_cli("prepare", "crema-d", "--raw", raw, "--name", f"crema-{store}", "-o", f"audio_store={store}", *SMALL)
    return raw, (PreparedDataset(registry / "datasets" / f"crema-{s}") for s in ("pcm16", "spectrogram"))


def test_pcm16_and_spectrogram_stores_read_back_the_same_spectrograms(run_cli, registry, crema_both):
    raw, (pcm, spectrogram) = crema_both
    assert pcm.modalities["audio"] == {
        "kind": "audio",
        "dtype": "float32",
        "shape": [257, 299],
        "storage": "pcm16",
        "samples": 48_000,
    }
    assert spectrogram.modalities["audio"] == {"kind": "audio", "dtype": "float32", "shape": [257, 299]}
    assert pcm.manifest["preparer_version"] == "2"
    for split in ("train", "test"):
        stored, reference = pcm.split(split).inputs["audio"], spectrogram.split(split).inputs["audio"]
        assert isinstance(stored, PcmSpectrograms) and stored.shape == reference.shape and stored.dtype == np.float32
        # computed at read time from int16 samples = computed at prepare time from the WAV: to the bit
        assert np.abs(np.asarray(stored) - np.asarray(reference)).max() == 0
        last = len(stored) - 1
        np.testing.assert_array_equal(stored[last], reference[last])
        np.testing.assert_array_equal(stored[[last, 0]], reference[[last, 0]])
        np.testing.assert_array_equal(stored[0, 5], reference[0, 5])
        # the samples are the WAV's, repeated or cut to 3 s, exactly
        ids = np.load(pcm.path / split / "ids.npy")
        samples = np.load(pcm.path / split / "audio.pcm16.npy")
        assert samples.dtype == np.int16 and samples.shape == (len(ids), 48_000)
        wav = load_audio(raw / "AudioWAV" / f"{ids[0]}.wav")
        expected = np.tile(wav, -(-48_000 // len(wav)))[:48_000]
        np.testing.assert_array_equal(from_pcm16(samples[0]), expected)
    # a loader batch reads the same, and the model sees the spectrogram's shape
    batch = ArraySplit(pcm.split("train")).__getitems__([5, 0, 3])
    np.testing.assert_array_equal(
        batch["inputs"]["audio"].numpy(), np.asarray(spectrogram.split("train").inputs["audio"])[[5, 0, 3]]
    )
    # and either equals the media helper's spectrogram of the WAV
    first = np.load(pcm.path / "train" / "ids.npy")[0]
    np.testing.assert_array_equal(
        pcm.split("train").inputs["audio"][0], audio_spectrogram(raw / "AudioWAV" / f"{first}.wav", 3.0)
    )
    # a quarter of the bytes: 96 kB a clip against 307 kB
    sizes = [sum(p.stat().st_size for p in d.path.rglob("audio*")) for d in (pcm, spectrogram)]
    assert sizes[0] < sizes[1] / 3


def test_the_pcm16_file_is_checksummed_and_verified(run_cli, registry, crema_both):
    _, (pcm, _) = crema_both
    files = json.loads((pcm.path / "manifest.json").read_text())["files"]
    assert "train/audio.pcm16.npy" in files and "test/audio.pcm16.npy" in files
    assert not any(name.endswith("audio.npy") for name in files)
    assert "all files match" in run_cli("datasets", "verify", "crema-pcm16").output
    path = pcm.path / "train" / "audio.pcm16.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    result = run_cli("datasets", "verify", "crema-pcm16", expect=1)
    assert "train/audio.pcm16.npy" in result.output


def test_spectrogram_frames_sets_the_samples_stored(run_cli, registry, tmp_path):
    raw = tmp_path / "CREMA-D"
    make_crema_d(raw, per_class=1)
    run_cli("prepare", "crema-d", "--raw", raw, "--name", "c188", "-o", "spectrogram_frames=188", *SMALL)
    dataset = PreparedDataset(registry / "datasets" / "c188")
    assert dataset.modalities["audio"]["shape"] == [257, 188] and dataset.modalities["audio"]["samples"] == 30_245
    first = np.load(dataset.path / "train" / "ids.npy")[0]
    expected = audio_spectrogram(raw / "AudioWAV" / f"{first}.wav", seconds_for_frames(188))
    np.testing.assert_array_equal(dataset.split("train").inputs["audio"][0], expected)


def test_a_bad_audio_store_is_one_message(run_cli, registry, tmp_path):
    raw = tmp_path / "CREMA-D"
    make_crema_d(raw, per_class=1)
    result = run_cli("prepare", "crema-d", "--raw", raw, "-o", "audio_store=wav", expect=1)
    assert "option audio_store must be one of pcm16, spectrogram, got 'wav'" in result.output
    assert "Traceback" not in result.output
    assert not (registry / "datasets" / "crema-d").exists()


@pytest.mark.slow
def test_kinetics_sounds_pcm16_from_aac_is_within_16_bit_rounding(run_cli, registry, tmp_path):
    raw = tmp_path / "KS"
    make_kinetics_sounds(raw, per_split={"train": 1, "test": 1})
    for store in ("pcm16", "spectrogram"):
        run_cli(
            "prepare", "kinetics-sounds", "--raw", raw, "--name", f"ks-{store}", "-o", f"audio_store={store}",
            "-o", "audio_dtype=float32", "-o", "seconds=1", *SMALL,
        )  # fmt: skip
    pcm, spectrogram = (PreparedDataset(registry / "datasets" / f"ks-{s}") for s in ("pcm16", "spectrogram"))
    assert pcm.modalities["audio"]["storage"] == "pcm16"
    # AAC decodes to floats that are no 16-bit values: the samples move by at most half a step, and the spectrogram
    # read is the one of those rounded samples; where the clip is not near silence, the log-magnitude barely moves
    ids = np.load(pcm.path / "train" / "ids.npy")
    samples = from_pcm16(np.load(pcm.path / "train" / "audio.pcm16.npy")[0])
    exact = load_audio(raw / "videos" / f"{ids[0]}.mp4")[:16_000]
    assert np.abs(samples - np.clip(exact, -1, 1)).max() <= 0.5 / 32768
    read, reference = pcm.split("train").inputs["audio"][0], spectrogram.split("train").inputs["audio"][0]
    np.testing.assert_array_equal(read, log_magnitude(samples))
    loud = reference > np.log(1e-2)
    assert loud.mean() > 0.05 and np.abs(read - reference)[loud].max() < 0.05
