"""The waveform audio store: a clip's samples kept as 16-bit PCM, turned into its log-spectrogram when read.

A modality prepared with ``audio_store=pcm16`` is stored, per split, as

    <split>/<modality>.pcm16.npy    int16 [n, samples]: each clip's mono 16 kHz samples, repeated or cut to the
                                    clip length and clipped to [-1, 1] exactly as before the STFT, times 32768,
                                    rounded (media.audio_pcm16)

and read through :class:`PcmSpectrograms`, which looks like the [n, 257, frames] array the spectrogram store holds
(the manifest records the spectrogram's shape and dtype, plus ``"storage": "pcm16"`` and ``"samples"``): a read
computes the log-spectrograms of just the rows asked for, with the numpy STFT prepare's spectrogram store uses
(media.log_magnitude), so both stores read back the same arrays to the bit for 16-bit sources such as CREMA-D's
WAVs. A 3 s clip is 96 kB against the float32 spectrogram's 307 kB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dmgl_cli.data.decoded_rows import DecodedRows
from dmgl_cli.data.media import HOP, N_FFT, from_pcm16, log_magnitude

PCM_SUFFIX = ".pcm16.npy"


def pcm_path(folder: Path, key: str) -> Path:
    """The file of a pcm16-stored modality ``key`` in a split's folder."""
    return folder / f"{key}{PCM_SUFFIX}"


def check_pcm_store(path: Path, samples: int, spec: dict[str, Any]) -> str | None:
    """What is wrong with a pcm16 file for ``samples`` rows of ``spec`` (None if nothing)."""
    stored = np.load(path, mmap_mode="r")
    if stored.dtype != np.int16 or stored.shape != (samples, spec["samples"]):
        return f"holds {stored.dtype} {stored.shape}, expected int16 ({samples}, {spec['samples']})"
    expected = [N_FFT // 2 + 1, 1 + (spec["samples"] - N_FFT) // HOP]
    if list(spec["shape"]) != expected:
        return f"{spec['samples']} samples give spectrograms of shape {expected}, the manifest says {spec['shape']}"
    return None


class PcmSpectrograms(DecodedRows):
    """A pcm16-stored audio modality of one split, read like the [n, 257, frames] spectrogram array."""

    def __init__(self, folder: Path, key: str, shape: tuple[int, ...], dtype: Any, samples: int):
        self.pcm = np.load(pcm_path(folder, key), mmap_mode="r")
        if self.pcm.ndim != 2 or self.pcm.shape[1] != samples:
            raise ValueError(f"{pcm_path(folder, key)} has shape {self.pcm.shape}, expected [n, {samples}]")
        self.shape = (int(self.pcm.shape[0]), *shape)
        self.dtype = np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes on disk (the samples)."""
        return int(self.pcm.nbytes)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """The spectrograms of samples ``rows``: [len(rows), 257, frames] in the manifest's dtype. Rows are read in
        file order, one at a time (a batched STFT was 2x slower a row here: its temporaries leave the cache)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for position in np.argsort(rows, kind="stable"):
            out[position] = log_magnitude(from_pcm16(self.pcm[rows[position]]))
        return out
