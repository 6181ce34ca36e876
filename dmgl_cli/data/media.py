"""Decoding raw media into the arrays the prepared format stores — shared by every preparer.

* Audio: librosa at 16 kHz mono (files libsndfile reads: WAV, FLAC, OGG, MP3); audio inside video containers
  (MP4, FLV, AVI, MKV, ...) is decoded with PyAV at its native rate and resampled with librosa, so both paths
  resample the same way. A clip is repeated (if short) and cut to a fixed length, clipped to [-1, 1] and turned
  into ``log(|STFT| + 1e-7)`` with a 512-sample Hann window, hop 159, ``center=False``: 3 s -> 257 x 299 and
  10 s -> 257 x 1004, the shapes §4.1 states. The STFT is numpy's (:func:`log_magnitude`, equal to librosa's to
  the bit), so that the training process can compute it from stored 16-bit samples (``audio_store=pcm16``,
  data/pcm_audio.py) without librosa.
* Video: PyAV. The clip is demuxed once: its packets are counted (no decoding), the wanted indices picked, and
  the packets decoded up to the last wanted frame; only those frames are converted (resized with swscale's area
  filter). A clip whose packets promise more frames than it can decode is counted again from what was decoded.
* Images: Pillow, converted to RGB and resized; a decompression bomb (more pixels than ``MAX_IMAGE_PIXELS``) is
  refused rather than warned about.
* Text: a ``transformers`` tokenizer from a local folder or a hub id (downloaded only if the user named a hub id
  and has a network), stored as one int64 array ``[n, 2, L]``: row 0 token ids, row 1 attention mask.

A raw file that cannot be decoded raises :class:`BadSample` (path + reason). Preparers stop on it by default or,
with ``--skip-bad``, record it; it is an ordinary exception so that it crosses process boundaries.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dmgl_cli.errors import DmglError

SAMPLE_RATE = 16_000
N_FFT = 512
HOP = 159
LOG_EPS = 1e-7
# Extensions read by libsndfile through librosa; everything else goes through PyAV.
SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif"}
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mkv", ".webm", ".avi", ".flv", ".mov", ".mpg", ".mpeg", ".3gp"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
AUDIO_SUFFIXES = SOUNDFILE_SUFFIXES | {".m4a", ".aac", ".opus", ".wma"}
# Larger images are refused as likely decompression bombs (Pillow's own default threshold).
MAX_IMAGE_PIXELS = 89_478_485


class BadSample(Exception):
    """A raw file that cannot be decoded (corrupt, truncated, empty, too short)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):
        return (BadSample, (self.path, self.reason))


# ------------------------------------------------------------------------------------------------------ audio


def spectrogram_frames(seconds: float, sr: int = SAMPLE_RATE) -> int:
    """Number of STFT frames for a clip of ``seconds`` (center=False)."""
    samples = int(round(seconds * sr))
    if samples < N_FFT:
        raise DmglError(f"an audio clip of {seconds} s is shorter than one {N_FFT}-sample STFT window")
    return 1 + (samples - N_FFT) // HOP


def spectrogram_shape(seconds: float, sr: int = SAMPLE_RATE) -> tuple[int, int]:
    return (N_FFT // 2 + 1, spectrogram_frames(seconds, sr))


def seconds_for_frames(frames: int, sr: int = SAMPLE_RATE) -> float:
    """The clip length whose spectrogram has exactly ``frames`` columns (the inverse of :func:`spectrogram_frames`,
    the shortest such length): 188 -> 1.8903125 s (257 x 188), 299 -> 2.9999375 s."""
    return (N_FFT + (frames - 1) * HOP) / sr


def clip_samples(seconds: float, sr: int = SAMPLE_RATE) -> int:
    """Samples in a clip of ``seconds``: what audio is repeated or cut to before the STFT."""
    return int(round(seconds * sr))


def fixed_length(samples: np.ndarray, seconds: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """``samples`` repeated (if short) and cut to ``seconds``, clipped to [-1, 1]: float32 [clip_samples]."""
    length = clip_samples(seconds, sr)
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if samples.size == 0:
        raise ValueError("no samples")
    if samples.size < length:
        samples = np.tile(samples, math.ceil(length / samples.size))
    return np.clip(samples[:length], -1.0, 1.0)


# The periodic Hann window, as librosa's stft takes it (scipy.signal.get_window("hann", N_FFT, fftbins=True)),
# written the way scipy computes it, so that the two agree to the bit: 0.5 + 0.5 cos over N_FFT + 1 points from
# -pi to pi, the last dropped.
HANN_WINDOW = 0.5 + 0.5 * np.cos(np.linspace(-np.pi, np.pi, N_FFT + 1))[:N_FFT]


def log_magnitude(samples: np.ndarray) -> np.ndarray:
    """``log(|STFT| + 1e-7)`` of 1-D float32 samples as float32 [257, frames]: frames of N_FFT every HOP samples from
    the first (``center=False``), the periodic Hann window, a real FFT.

    numpy alone, so that the training process (which computes it from the pcm16 store, data/pcm_audio.py) never
    imports librosa. It repeats librosa.stft's arithmetic (window in float64, the FFT in float64, rounded to
    complex64, its magnitude in float32), which makes it equal to ``librosa.stft``'s to the bit
    (tests/test_pcm_audio.py) and so leaves every spectrogram prepared before it unchanged."""
    frames = np.lib.stride_tricks.sliding_window_view(np.asarray(samples, dtype=np.float32), N_FFT)[::HOP]
    spectrum = np.fft.rfft(frames * HANN_WINDOW, axis=-1).astype(np.complex64)
    return np.log(np.abs(spectrum) + LOG_EPS).T.astype(np.float32)


def log_spectrogram(samples: np.ndarray, seconds: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Repeat/cut ``samples`` to ``seconds``, clip to [-1, 1], return log(|STFT| + 1e-7) as float32 [257, frames]."""
    return log_magnitude(fixed_length(samples, seconds, sr))


PCM16_SCALE = 32768  # a 16-bit WAV's full scale: sample / 32768 is what libsndfile reads as a float


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] as int16 (x * 32768, rounded, clipped to int16's range): lossless for samples read
    from a 16-bit file, otherwise the rounding a 16-bit WAV of them would make (at most half a step, 1.5e-5)."""
    scaled = np.rint(np.asarray(samples, dtype=np.float64) * PCM16_SCALE)
    return np.clip(scaled, -PCM16_SCALE, PCM16_SCALE - 1).astype(np.int16)


def from_pcm16(pcm: np.ndarray) -> np.ndarray:
    """int16 samples back as float32 in [-1, 1) (exact: a division by a power of two)."""
    return np.asarray(pcm).astype(np.float32) / np.float32(PCM16_SCALE)


def _check_samples(path: Path, samples: np.ndarray) -> np.ndarray:
    if samples.size == 0:
        raise BadSample(path, "contains no audio samples")
    if not np.isfinite(samples).all():
        raise BadSample(path, "contains non-finite audio samples")
    return samples


def _check_wav_length(path: Path) -> None:
    """Refuse an empty file, and a RIFF/WAVE file whose data chunk is shorter than its header declares.

    libsndfile trusts the file length and reads a truncated WAV without complaint, so a download cut short would
    otherwise be stored as a shorter clip, silently repeated to the fixed length.
    """
    size = path.stat().st_size
    if size == 0:
        raise BadSample(path, "is empty (0 bytes)")
    if path.suffix.lower() != ".wav":
        return
    with open(path, "rb") as handle:
        head = handle.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return  # not plain little-endian RIFF/WAVE: libsndfile judges it
        offset = 12
        while offset + 8 <= size:
            handle.seek(offset)
            chunk = handle.read(8)
            length = int.from_bytes(chunk[4:8], "little")
            if chunk[:4] == b"data":
                available = size - offset - 8
                # 0 and 0xFFFFFFFF are what streaming writers leave when they could not go back to fill it in.
                if length not in (0, 0xFFFFFFFF) and length > available:
                    raise BadSample(
                        path,
                        f"is truncated: its header declares {length} bytes of audio data, the file holds {available}",
                    )
                return
            offset += 8 + length + (length & 1)


def load_audio(path: str | Path, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples at ``sr``: librosa for audio files, PyAV for audio tracks inside other containers."""
    path = Path(path)
    if path.suffix.lower() not in SOUNDFILE_SUFFIXES:
        return audio_from_container(path, sr)
    import librosa
    import soundfile

    try:
        with warnings.catch_warnings():
            # librosa warns, then falls back to audioread, when libsndfile cannot read a file: treat it as bad.
            warnings.simplefilter("ignore")
            _check_wav_length(path)
            with soundfile.SoundFile(path) as handle:  # reads the header: corrupt files fail here, cheaply
                if handle.frames == 0:
                    raise BadSample(path, "contains no audio samples")
            samples, _ = librosa.load(path, sr=sr, mono=True)
    except (soundfile.LibsndfileError, RuntimeError, EOFError, ValueError) as exc:
        raise BadSample(path, f"is not a readable audio file ({exc})") from None
    except OSError as exc:
        raise BadSample(path, f"cannot be read ({exc.strerror or exc})") from None
    return _check_samples(path, samples)


def audio_from_container(path: str | Path, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of any container PyAV reads; mono float32 resampled to ``sr`` by librosa."""
    import av
    import av.error  # the submodule with FFmpegError, imported so type checkers know av.error
    import librosa

    path = Path(path)
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise BadSample(path, "has no audio stream")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate or stream.rate
            if not rate:
                raise BadSample(path, "has an audio stream without a sample rate")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except av.error.FFmpegError as exc:
        raise BadSample(path, f"cannot be decoded ({exc})") from None
    except OSError as exc:
        raise BadSample(path, f"cannot be read ({exc.strerror or exc})") from None
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    _check_samples(path, samples)
    if rate != sr:
        samples = librosa.resample(samples, orig_sr=rate, target_sr=sr)
    return samples


def audio_spectrogram(path: str | Path, seconds: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """The audio modality of one clip as the spectrogram store keeps it: float32 [257, frames]."""
    return log_spectrogram(load_audio(path, sr), seconds, sr)


def audio_pcm16(path: str | Path, seconds: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """The audio modality of one clip as the pcm16 store keeps it: int16 [clip_samples], the samples the
    spectrogram is computed from (repeated or cut to ``seconds`` and clipped), see :func:`to_pcm16`."""
    return to_pcm16(fixed_length(load_audio(path, sr), seconds, sr))


# How prepare keeps a clip's audio: the waveform as 16-bit PCM (spectrogram computed when read) or the spectrogram.
AUDIO_STORES = ("pcm16", "spectrogram")


def decode_audio(path: str | Path, seconds: float, store: str, dtype: str) -> np.ndarray:
    """One clip's stored audio: int16 samples for ``store="pcm16"``, else the spectrogram in ``dtype``."""
    if store == "pcm16":
        return audio_pcm16(path, seconds)
    return audio_spectrogram(path, seconds).astype(dtype)


# ------------------------------------------------------------------------------------------------------ video


def even_indices(count: int, wanted: int, start: int = 0) -> list[int]:
    """``wanted`` indices spread evenly over ``start .. start + count - 1`` (the centre of each of ``wanted`` equal
    segments); requires ``count >= wanted``."""
    if count < wanted:
        raise ValueError(f"{count} frames, {wanted} wanted")
    step = count / wanted
    return [start + int(step * k + step / 2) for k in range(wanted)]


def count_frames(path: str | Path) -> int:
    """Video frames in the first video stream, counted by demuxing (no decoding)."""
    import av
    import av.error  # the submodule with FFmpegError, imported so type checkers know av.error

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadSample(path, "has no video stream")
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size)
    except av.error.FFmpegError as exc:
        raise BadSample(path, f"cannot be opened as a video ({exc})") from None
    except OSError as exc:
        raise BadSample(path, f"cannot be read ({exc.strerror or exc})") from None


def decode_frames(path: str | Path, indices: Sequence[int], convert: Any) -> tuple[dict[int, np.ndarray], int]:
    """Decode the first video stream and return ``{index: convert(frame)}`` for the wanted indices, plus the number
    of frames decoded (which stops once the last wanted index is reached)."""
    wanted = sorted({int(i) for i in indices})
    found, decoded, _ = _count_and_decode(Path(path), lambda count: wanted, convert)
    return found, decoded


def rgb_converter(size: int | tuple[int, int] | None):
    """Frame -> uint8 [H, W, 3] RGB, resized to ``size`` (square if an int) with an area filter."""
    if size is None:
        return lambda frame: frame.to_ndarray(format="rgb24")
    height, width = (size, size) if isinstance(size, int) else size

    def convert(frame) -> np.ndarray:
        return frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA")

    return convert


def _count_and_decode(path: Path, pick, convert: Any) -> tuple[dict[int, np.ndarray], int, list[int]]:
    """One opening of the clip: its video packets demuxed and counted, ``pick(count)`` -> the wanted indices, and
    those frames decoded from the packets already read (no second demuxing pass, which cost ~1.4 ms a CREMA-D clip).
    Returns ``(found, frames decoded, indices)``; decoding stops at the last wanted frame."""
    import av
    import av.error  # the submodule with FFmpegError, imported so type checkers know av.error

    found: dict[int, np.ndarray] = {}
    decoded, indices = 0, []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadSample(path, "has no video stream")
            stream = container.streams.video[0]
            packets = [packet for packet in container.demux(stream) if packet.size]
            indices = pick(len(packets))
            wanted, last = set(indices), max(indices, default=-1)

            def frames():
                for packet in packets:
                    yield from stream.codec_context.decode(packet)
                yield from stream.codec_context.decode(None)  # the frames a decoder with delay still holds

            for index, frame in enumerate(frames()):
                decoded = index + 1
                if index in wanted:
                    found[index] = convert(frame)
                if index >= last:
                    break
    except av.error.FFmpegError as exc:
        raise BadSample(path, f"cannot be decoded ({exc})") from None
    except OSError as exc:
        raise BadSample(path, f"cannot be read ({exc.strerror or exc})") from None
    return found, decoded, indices


def read_clip(path: str | Path, frames: int, size: int, *, start: int = 0, end: int | None = None) -> np.ndarray:
    """``frames`` RGB frames spread evenly over frames ``[start, end)`` of the clip: uint8 [frames, size, size, 3].

    The frames are counted from the demuxed packets (a container's own frame count is not used: FLV has none, and
    others can be wrong). A clip (or range) with fewer decodable frames than requested is a :class:`BadSample`.
    """
    path = Path(path)
    convert = rgb_converter(size)

    def pick(total: int) -> list[int]:
        stop = total if end is None else min(end, total)
        available = stop - start
        if available < frames:
            where = "" if start == 0 and end is None else f" in its range [{start}, {end})"
            raise BadSample(path, f"has {max(available, 0)} video frames{where}, fewer than the {frames} requested")
        return even_indices(available, frames, start)

    found, decoded, indices = _count_and_decode(path, pick, convert)
    if len(found) == len(indices):
        return np.stack([found[i] for i in indices])
    # The packets promised more frames than the decoder gives: pick again from what was decoded.
    indices = pick(decoded)
    found, _ = decode_frames(path, indices, convert)
    if len(found) == len(indices):
        return np.stack([found[i] for i in indices])
    raise BadSample(path, "frames could not be decoded consistently")


# ----------------------------------------------------------------------------------------------------- images


def load_image(path: str | Path, size: int) -> np.ndarray:
    """An image as uint8 [size, size, 3] RGB (resized, aspect not kept, as the lineage's ``Resize((224, 224))``)."""
    from PIL import Image

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise BadSample(
                        path,
                        f"is {image.width} x {image.height} pixels, more than the "
                        f"{MAX_IMAGE_PIXELS} allowed (likely a decompression bomb)",
                    )
                image.load()  # truncated files fail here
                rgb = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample(path, f"is refused as a decompression bomb ({exc})") from None
    except (Image.UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise BadSample(path, f"is not a readable image ({exc})") from None
    except OSError as exc:
        raise BadSample(path, f"cannot be read as an image ({exc.strerror or exc})") from None
    return np.asarray(rgb, dtype=np.uint8)


# ------------------------------------------------------------------------------------------------------- text


def load_tokenizer(model: str):
    """A ``transformers`` tokenizer from a local folder or a hub id (the hub needs a network, unless cached)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DmglError(
            f"cannot load the tokenizer of text model {model!r} ({first}); pass --text-model a local folder that "
            "holds the model's tokenizer files, or a hub id with a network (or a filled Hugging Face cache)"
        ) from None


def tokenize(
    tokenizer, texts: Sequence[str], max_length: int, pairs: Sequence[str] | None = None, batch: int = 2048
) -> np.ndarray:
    """Token ids and attention masks, padded/truncated to ``max_length``: int64 [n, 2, max_length]."""
    out = np.zeros((len(texts), 2, max_length), dtype=np.int64)
    for begin in range(0, len(texts), batch):
        chunk = list(texts[begin : begin + batch])
        second = list(pairs[begin : begin + batch]) if pairs is not None else None
        encoded = tokenizer(
            chunk, second, padding="max_length", truncation=True, max_length=max_length, return_attention_mask=True
        )
        out[begin : begin + len(chunk), 0] = np.asarray(encoded["input_ids"], dtype=np.int64)
        out[begin : begin + len(chunk), 1] = np.asarray(encoded["attention_mask"], dtype=np.int64)
    return out
