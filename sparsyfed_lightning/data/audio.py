"""Audio decoding and features, without torchcodec or FFmpeg.

`datasets.Audio` decodes through torchcodec, which needs FFmpeg's shared libraries
(ENVIRONMENT.md). We never let `datasets` decode: audio columns are read as the raw
`{"bytes", "path"}` structs they are stored as, and WAV/FLAC/OGG bytes are decoded with
`soundfile` (its wheel bundles libsndfile).

Pipeline per clip:

1. decode, average the channels to mono, resample to 16 kHz if stored at another rate;
2. cut to 1 s windows: the first second, zero-padded at the end when shorter (the paper pads to the
   batch max, which is 1 s for Speech Commands). Clips flagged as "split" (long `_silence_`
   background-noise recordings) give one sample per whole second instead;
3. features, computed once for the whole split:
   * `waveform` (the paper's): resampled 16 kHz -> 8 kHz with `torchaudio.functional.resample`
     (its defaults: windowed-sinc, Hann, lowpass width 6, rolloff 0.99 - the same kernel as the
     paper's `torchaudio.transforms.Resample(16000, 8000)`), shape `(1, 8000)`;
   * `logmel`: `torchaudio.transforms.MelSpectrogram` at 16 kHz with a 30 ms window (`n_fft =
     win_length = 480`), 10 ms hop (`hop_length = 160`), 40 mel bands, power 2, centred frames,
     then `log(mel + 1e-6)`: shape `(1, 40, 101)`. No per-utterance normalisation (the models
     start with BatchNorm).

`torchaudio` and `soundfile` are the optional `audio` extra, imported only when audio is decoded.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch

from sparsyfed_lightning.data.stored import stored_source

SAMPLE_RATE = 16_000
CLIP_SAMPLES = SAMPLE_RATE  # 1 s
WAVEFORM_RATE = 8_000
LOGMEL_N_FFT = 480
LOGMEL_HOP = 160
LOGMEL_N_MELS = 40
LOGMEL_EPS = 1e-6

AudioFeatures = Literal["waveform", "logmel"]


def feature_shape(features: AudioFeatures) -> tuple[int, ...]:
    """Shape of one sample's features."""
    if features == "waveform":
        return (1, WAVEFORM_RATE * CLIP_SAMPLES // SAMPLE_RATE)
    return (1, LOGMEL_N_MELS, CLIP_SAMPLES // LOGMEL_HOP + 1)


def _import_audio_backends():
    try:
        import soundfile
        import torchaudio
    except ImportError as err:
        raise ImportError(
            f"audio datasets need the 'audio' extra ({err.name} is missing): "
            "pip install 'sparsyfed-lightning[audio]'"
        ) from err
    return soundfile, torchaudio


def decode_clip(value: dict | bytes | None) -> np.ndarray:
    """Decode one stored audio value (`{"bytes", "path"}` struct or raw bytes) to 16 kHz mono float32."""
    soundfile, torchaudio = _import_audio_backends()
    samples, rate = soundfile.read(stored_source(value), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = torchaudio.functional.resample(torch.from_numpy(mono), rate, SAMPLE_RATE).numpy()
    return mono


def one_second_windows(clip: np.ndarray, split: bool) -> list[np.ndarray]:
    """The first second of `clip` zero-padded to 1 s, or (`split`) every whole second of it."""
    if split and len(clip) >= 2 * CLIP_SAMPLES:
        count = len(clip) // CLIP_SAMPLES
        return [clip[i * CLIP_SAMPLES : (i + 1) * CLIP_SAMPLES] for i in range(count)]
    window = np.zeros(CLIP_SAMPLES, dtype=np.float32)
    head = clip[:CLIP_SAMPLES]
    window[: len(head)] = head
    return [window]


def compute_features(waves: torch.Tensor, features: AudioFeatures) -> torch.Tensor:
    """Features of a batch of 1 s, 16 kHz clips `(B, 16000)` -> `(B, *feature_shape(features))`."""
    _, torchaudio = _import_audio_backends()
    if features == "waveform":
        return torchaudio.functional.resample(waves, SAMPLE_RATE, WAVEFORM_RATE).unsqueeze(1)
    return torch.log(_mel_spectrogram()(waves) + LOGMEL_EPS).unsqueeze(1)


@functools.cache
def _mel_spectrogram() -> torch.nn.Module:
    _, torchaudio = _import_audio_backends()
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE,
        n_fft=LOGMEL_N_FFT,
        win_length=LOGMEL_N_FFT,
        hop_length=LOGMEL_HOP,
        n_mels=LOGMEL_N_MELS,
    )


def materialise_audio(
    values: Iterable[tuple[int, dict | bytes | None, int, bool]],
    *,
    features: AudioFeatures,
    describe: str,
    chunk: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode `(row, value, label, split)` items into one feature tensor and one label tensor.

    `describe` names the dataset, split and column in the error for an undecodable row.
    Work is chunked so that 16 kHz waveforms never exist for more than `chunk` clips at a time.
    """
    outputs: list[torch.Tensor] = []
    labels: list[int] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            outputs.append(compute_features(torch.from_numpy(np.stack(pending)), features))
            pending.clear()

    for row, value, label, split in values:
        try:
            clip = decode_clip(value)
        except ImportError:
            raise
        except Exception as err:  # soundfile raises LibsndfileError/RuntimeError/TypeError on bad bytes
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ValueError(f"{describe}: row {row} cannot be decoded as audio: {reason}") from err
        for window in one_second_windows(clip, split):
            pending.append(window)
            labels.append(label)
        if len(pending) >= chunk:
            flush()
    flush()
    if not outputs:
        return torch.zeros((0, *feature_shape(features))), torch.zeros(0, dtype=torch.long)
    return torch.cat(outputs), torch.tensor(labels, dtype=torch.long)
