"""Speech -> the per-video-frame mel windows SadTalker's audio networks were trained on (numpy only).

The features reproduce the reference pipeline (a Wav2Lip-style log-mel spectrogram) so the official
weights see the inputs they expect:

* 16 kHz mono audio, trimmed to a whole number of 25 fps video frames (640 samples each);
* pre-emphasis ``y[n] = x[n] - 0.97 x[n-1]``;
* centred STFT: ``n_fft / 2`` ZEROS padded on both sides, as librosa 0.9's ``stft(center=True)`` does
  (its ``pad_mode`` default is ``"constant"`` since 0.9.0; the reference pins librosa 0.9.2), periodic
  Hann window of 800 samples, hop 200 (80 spectrogram frames per second). The padding decides the
  first two and last two spectrogram frames of every clip, hence the expression of the first and
  last video frames and the head pose of whole pose windows at both ends; reflect padding (librosa
  0.8 and earlier) would differ there by up to ~0.9 on the [-4, 4] scale;
* magnitudes projected on 80 Slaney-style mel filters (area-normalised triangles, 55-7600 Hz);
* ``20 log10(max(1e-5, x)) - 20`` dB, mapped linearly from [-100, 0] dB to [-4, 4] and clipped;
* for video frame ``i``, a window of 16 consecutive spectrogram frames starting at
  ``int(80 * (i - 2) / 25)`` (i.e. from 80 ms before the frame), indices clamped to the clip.

Arrays are time-major: a spectrogram is ``(frames, 80)``, the windows are ``(T, 80, 16)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sadtalker.errors import SadTalkerError


@dataclass(frozen=True)
class MelSettings:
    """The reference's audio parameters (its ``hparams``); every field matches the trained weights."""

    sample_rate: int = 16000
    n_fft: int = 800
    hop_length: int = 200
    win_length: int = 800
    n_mels: int = 80
    fmin: float = 55.0
    fmax: float = 7600.0
    preemphasis: float = 0.97
    min_level_db: float = -100.0
    ref_level_db: float = 20.0
    max_abs_value: float = 4.0
    fps: int = 25
    window_steps: int = 16

    @property
    def mel_frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def samples_per_video_frame(self) -> float:
        return self.sample_rate / self.fps


DEFAULT_SETTINGS = MelSettings()

# Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per 6.4x).
_LINEAR_HZ_PER_MEL = 200.0 / 3.0
_LOG_START_HZ = 1000.0
_LOG_START_MEL = _LOG_START_HZ / _LINEAR_HZ_PER_MEL
_LOG_STEP = np.log(6.4) / 27.0


def hz_to_mel(frequencies: np.ndarray | float) -> np.ndarray:
    """Slaney mel value of frequencies in Hz (librosa's default, non-HTK scale)."""
    hz = np.asarray(frequencies, dtype=np.float64)
    linear = hz / _LINEAR_HZ_PER_MEL
    logarithmic = _LOG_START_MEL + np.log(np.maximum(hz, _LOG_START_HZ) / _LOG_START_HZ) / _LOG_STEP
    return np.where(hz >= _LOG_START_HZ, logarithmic, linear)


def mel_to_hz(mels: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mels, dtype=np.float64)
    linear = mel * _LINEAR_HZ_PER_MEL
    logarithmic = _LOG_START_HZ * np.exp(_LOG_STEP * (np.maximum(mel, _LOG_START_MEL) - _LOG_START_MEL))
    return np.where(mel >= _LOG_START_MEL, logarithmic, linear)


def mel_filterbank(settings: MelSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """``(n_mels, n_fft // 2 + 1)`` float32 triangular filters, each with unit area in Hz (Slaney norm).

    Filter ``m`` rises from edge ``m`` to edge ``m + 1`` and falls to edge ``m + 2``, the edges
    being ``n_mels + 2`` points evenly spaced on the mel scale between ``fmin`` and ``fmax``.
    float32 like librosa's filters, so the projection rounds the same way as the reference.
    """
    if settings.fmax > settings.sample_rate / 2:
        raise ValueError("fmax must not exceed the Nyquist frequency")
    bin_hz = np.linspace(0.0, settings.sample_rate / 2, settings.n_fft // 2 + 1)
    edges_mel = np.linspace(hz_to_mel(settings.fmin), hz_to_mel(settings.fmax), settings.n_mels + 2)
    edges_hz = mel_to_hz(edges_mel)
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bin_hz[None, :] - lower) / (centre - lower)
    falling = (upper - bin_hz[None, :]) / (upper - centre)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    return (triangles * (2.0 / (upper - lower))).astype(np.float32)


def preemphasize(wav: np.ndarray, coefficient: float) -> np.ndarray:
    """First-order high-pass ``y[n] = x[n] - k x[n-1]`` (with ``x[-1] = 0``), in float64."""
    signal = np.asarray(wav, dtype=np.float64)
    emphasized = signal.copy()
    emphasized[1:] -= coefficient * signal[:-1]
    return emphasized


def stft_magnitude(signal: np.ndarray, settings: MelSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """``(frames, n_fft // 2 + 1)`` magnitudes of the centred, Hann-windowed STFT.

    Frame ``t`` is centred on sample ``t * hop``; there are ``1 + len(signal) // hop`` frames. The
    signal is padded with ``n_fft // 2`` zeros on each side, exactly as librosa 0.9.2 (the reference's
    pin) does by default, so the edge frames equal the reference's
    (``tests/sadtalker/test_mel_reference.py`` holds them to librosa 0.9.2's values).
    """
    if settings.win_length != settings.n_fft:
        raise ValueError("this STFT expects win_length == n_fft (the reference's setting)")
    if len(signal) == 0:
        raise SadTalkerError("The audio is empty: use a recording of at least a few video frames.")
    half = settings.n_fft // 2
    padded = np.pad(np.asarray(signal, dtype=np.float64), half, mode="constant", constant_values=0.0)
    frames = np.lib.stride_tricks.sliding_window_view(padded, settings.n_fft)[:: settings.hop_length]
    positions = np.arange(settings.n_fft)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * positions / settings.n_fft)  # periodic Hann
    return np.abs(np.fft.rfft(frames * window, axis=1))


def amplitude_to_normalized_db(amplitude: np.ndarray, settings: MelSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """Amplitudes -> dB below ``ref_level_db`` -> [min_level_db, 0] mapped linearly onto [-4, 4], clipped."""
    floor = 10.0 ** (settings.min_level_db / 20.0)
    decibels = 20.0 * np.log10(np.maximum(floor, amplitude)) - settings.ref_level_db
    span = 2.0 * settings.max_abs_value
    scaled = span * (decibels - settings.min_level_db) / (-settings.min_level_db) - settings.max_abs_value
    return np.clip(scaled, -settings.max_abs_value, settings.max_abs_value)


def mel_spectrogram(wav: np.ndarray, settings: MelSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """``(frames, n_mels)`` normalised log-mel spectrogram of a mono waveform at ``settings.sample_rate``."""
    magnitude = stft_magnitude(preemphasize(wav, settings.preemphasis), settings)
    mel = magnitude @ mel_filterbank(settings).T.astype(np.float64)
    return amplitude_to_normalized_db(mel, settings)


def video_frame_count(sample_count: int, settings: MelSettings = DEFAULT_SETTINGS) -> int:
    """Whole video frames covered by ``sample_count`` samples (a trailing partial frame is dropped)."""
    return int(sample_count / settings.samples_per_video_frame)


def trim_to_video_frames(wav: np.ndarray, settings: MelSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """The waveform cut to a whole number of video frames, as the reference does before the STFT."""
    frames = video_frame_count(len(wav), settings)
    return wav[: int(frames * settings.samples_per_video_frame)]


def window_start(frame_index: int, settings: MelSettings = DEFAULT_SETTINGS) -> int:
    """First spectrogram frame of video frame ``frame_index``'s window (may be negative: clamped later).

    Evaluated exactly as the reference does (float product, then truncation toward zero), so the
    rare products that land a hair below an integer round the same way.
    """
    return int(settings.mel_frames_per_second * ((frame_index - 2) / float(settings.fps)))


def mel_windows(
    spectrogram: np.ndarray, frame_count: int, settings: MelSettings = DEFAULT_SETTINGS, first_frame: int = 0
) -> np.ndarray:
    """``(frame_count, n_mels, window_steps)`` float32 windows for video frames ``first_frame`` onward.

    ``first_frame`` lets a streaming renderer build the windows of one batch of frames at a time.
    """
    starts = np.array(
        [window_start(index, settings) for index in range(first_frame, first_frame + frame_count)],
        dtype=np.int64,
    )
    indices = np.clip(starts[:, None] + np.arange(settings.window_steps)[None, :], 0, len(spectrogram) - 1)
    return np.ascontiguousarray(spectrogram[indices].transpose(0, 2, 1), dtype=np.float32)


def speech_to_mel_windows(wav: np.ndarray, settings: MelSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """A 16 kHz mono waveform -> ``(T, 80, 16)`` mel windows, one per 25 fps video frame."""
    trimmed = trim_to_video_frames(np.asarray(wav), settings)
    frame_count = video_frame_count(len(trimmed), settings)
    if frame_count == 0:
        raise SadTalkerError(
            f"The audio is shorter than one video frame ({len(wav)} samples at {settings.sample_rate} Hz)."
        )
    return mel_windows(mel_spectrogram(trimmed, settings), frame_count, settings)
