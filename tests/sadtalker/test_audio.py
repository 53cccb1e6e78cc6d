"""The mel features match the reference's recipe, checked against values derived by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sadtalker.audio import (
    amplitude_to_normalized_db,
    hz_to_mel,
    mel_filterbank,
    mel_spectrogram,
    mel_to_hz,
    mel_windows,
    preemphasize,
    speech_to_mel_windows,
    stft_magnitude,
    video_frame_count,
)
from sadtalker.errors import SadTalkerError

RATE = 16000


def tone(frequency: float, amplitude: float, seconds: float) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def test_slaney_mel_scale_anchor_points() -> None:
    # Linear at 200/3 Hz per mel up to 1 kHz (= 15 mels), then 27 mels per factor 6.4.
    assert hz_to_mel(500.0) == pytest.approx(7.5)
    assert hz_to_mel(1000.0) == pytest.approx(15.0)
    assert hz_to_mel(6400.0) == pytest.approx(42.0)
    assert mel_to_hz(42.0) == pytest.approx(6400.0)
    frequencies = np.array([0.0, 55.0, 999.0, 1000.0, 1234.5, 7600.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(frequencies)), frequencies, atol=1e-9)


def test_mel_filterbank_triangles() -> None:
    bank = mel_filterbank()
    assert bank.shape == (80, 401) and bank.dtype == np.float32
    # 82 edges evenly spaced in mel from 55 Hz (0.825 mel) to 7600 Hz (15 + 27 ln 7.6 / ln 6.4 mel).
    top = 15 + 27 * math.log(7.6) / math.log(6.4)
    step = (top - 0.825) / 81
    e0, e1, e2 = (55.0 + k * step * 200 / 3 for k in range(3))  # all below 1 kHz: linear region
    # Filter 0 at the 60 Hz bin (bin 3): rising edge, scaled to unit area.
    assert bank[0, 3] == pytest.approx((60 - e0) / (e1 - e0) * 2 / (e2 - e0), rel=1e-6)
    # 120 Hz (bin 6) is on its falling edge; 40 Hz (bin 2) and 140 Hz (bin 7) are outside it.
    assert bank[0, 6] == pytest.approx((e2 - 120) / (e2 - e1) * 2 / (e2 - e0), rel=1e-6)
    assert bank[0, 2] == 0 and bank[0, 7] == 0
    # Slaney normalisation: each triangle has unit area in Hz, so wide filters sum to ~1/20 per bin.
    np.testing.assert_allclose(bank[40:].sum(axis=1) * 20.0, 1.0, rtol=0.02)


def test_preemphasis() -> None:
    np.testing.assert_allclose(preemphasize(np.array([1.0, 1.0, 2.0]), 0.97), [1.0, 0.03, 1.03])


def test_stft_of_a_bin_centred_tone() -> None:
    # 1 kHz is exactly bin 50 (20 Hz bins). A periodic Hann window puts A*N/4 in that bin, A*N/8
    # in each neighbour and nothing elsewhere.
    magnitude = stft_magnitude(tone(1000.0, 0.5, 1.0).astype(np.float64))
    assert magnitude.shape == (1 + RATE // 200, 401)
    interior = magnitude[10:-10]
    np.testing.assert_allclose(interior[:, 50], 0.5 * 800 / 4, rtol=1e-5)
    np.testing.assert_allclose(interior[:, [49, 51]], 0.5 * 800 / 8, rtol=1e-5)
    others = np.delete(interior, [49, 50, 51], axis=1)
    assert others.max() < 1e-3


@pytest.mark.parametrize(
    ("amplitude", "expected"),
    [
        (1.0, 2.4),  # 0 dB - 20 = -20 dB -> 8 * 0.8 - 4
        (1e-3, -2.4),  # -60 - 20 = -80 dB -> 8 * 0.2 - 4
        (10.0, 4.0),  # 20 - 20 = 0 dB: the top of the range
        (10**1.5, 4.0),  # +10 dB: clipped
        (1e-4, -4.0),  # -100 dB: the bottom of the range
        (0.0, -4.0),  # floored at 1e-5 (-120 dB), clipped
    ],
)
def test_db_scaling_and_symmetric_normalisation(amplitude: float, expected: float) -> None:
    assert amplitude_to_normalized_db(np.array([amplitude]))[0] == pytest.approx(expected, abs=1e-9)


def test_mel_spectrogram_of_a_pure_tone() -> None:
    amplitude = 0.5
    mel = mel_spectrogram(tone(1000.0, amplitude, 2.0))
    assert mel.shape == (161, 80)  # 2 s: 1 + 32000 // 200 frames, as the reference produced
    # Pre-emphasis turns the tone into a tone scaled by |1 - 0.97 e^{-j w}|, w = 2 pi 1000 / 16000.
    gain = math.sqrt(1 + 0.97**2 - 2 * 0.97 * math.cos(math.pi / 8))
    bins = {49: 100.0, 50: 200.0, 51: 100.0}  # |STFT| / (amplitude * gain), see the STFT test
    bank = mel_filterbank().astype(np.float64)
    for band in range(80):
        energy = sum(bank[band, k] * amplitude * gain * weight for k, weight in bins.items())
        decibels = 20 * math.log10(max(1e-5, energy)) - 20
        expected = min(4.0, max(-4.0, 8 * (decibels + 100) / 100 - 4))
        assert mel[80, band] == pytest.approx(expected, abs=1e-6), band
    assert (mel[80] > -4).sum() >= 1
    assert np.all(mel_spectrogram(np.zeros(RATE, dtype=np.float32)) == -4.0)


def test_windows_follow_the_reference_slicing() -> None:
    spectrogram = np.repeat(np.arange(161, dtype=np.float64)[:, None], 80, axis=1)  # row t holds t
    windows = mel_windows(spectrogram, 50)
    assert windows.shape == (50, 80, 16) and windows.dtype == np.float32
    # Frame i starts at int(80 * (i - 2) / 25), truncated toward zero, clamped to [0, 160].
    assert windows[0, 0].tolist() == [0] * 7 + list(range(1, 10))  # start -6
    assert windows[1, 0].tolist() == [0] * 4 + list(range(1, 13))  # start int(-3.2) = -3
    assert windows[2, 0].tolist() == list(range(16))
    assert windows[27, 0].tolist() == list(range(80, 96))
    assert windows[49, 5].tolist() == list(range(150, 161)) + [160] * 5  # start int(150.4) = 150
    np.testing.assert_array_equal(mel_windows(spectrogram, 10, first_frame=20), windows[20:30])


def test_speech_to_mel_windows_trims_to_whole_video_frames() -> None:
    wav = tone(440.0, 0.3, 2.0399)  # 32638 samples: 50 whole frames of 640 samples
    assert video_frame_count(len(wav)) == 50
    windows = speech_to_mel_windows(wav)
    assert windows.shape == (50, 80, 16)
    np.testing.assert_array_equal(windows, mel_windows(mel_spectrogram(wav[:32000]), 50))
    with pytest.raises(SadTalkerError, match="shorter than one video frame"):
        speech_to_mel_windows(np.zeros(639, dtype=np.float32))
