"""Importing this module warms up the decoders, so that forked ``dmgl prepare`` workers start ready.

The driver names this module in ``set_forkserver_preload``: the forkserver imports it once, and every worker forked
from it inherits the result. Importing ``librosa`` alone is not enough — it loads its submodules (and numba,
soxr, audioread behind them) lazily, on the first ``librosa.load``, which cost each worker ~1.2 s on its first
clip and made 2 workers slower than 1 on a short run. So this also decodes a tiny WAV held in memory (no file is
written), resamples it and takes its spectrogram, through the same functions the preparers call.

A failure here only means workers pay those imports themselves, so it never stops the forkserver.
"""

from __future__ import annotations

import io
import warnings


def warm_up() -> None:
    """Import the decoders and run each once on tiny in-memory inputs."""
    import av  # noqa: F401  (PyAV: video and container audio)
    import cv2  # (optical flow of nvgesture, JPEG encoding of the frame store)
    import librosa
    import numpy as np
    import PIL.Image
    import soundfile

    from dmgl_cli.data import media

    rate = media.SAMPLE_RATE
    tone = (0.1 * np.sin(np.arange(rate // 4) * (2 * np.pi * 440 / rate))).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, tone, rate, format="WAV", subtype="PCM_16")
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples, _ = librosa.load(buffer, sr=rate, mono=True)
        librosa.resample(samples, orig_sr=rate, target_sr=rate // 2)
    media.log_spectrogram(samples, len(samples) / rate, rate)
    PIL.Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).resize((2, 2), PIL.Image.Resampling.BICUBIC)
    cv2.imencode(".jpg", np.zeros((8, 8, 3), dtype=np.uint8))


try:
    warm_up()
except Exception:  # noqa: BLE001  (an optimisation only: workers then import what they need themselves)
    pass
