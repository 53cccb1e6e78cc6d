"""Our mel features equal the reference's, computed once with the real librosa 0.9.2 (issue #14 item 7).

``fixtures/mel_librosa092.npz`` was written by ``fixtures/make_mel_reference.py`` (run it in a
throwaway librosa 0.9.2 environment; its docstring says how). The signal is non-zero at both ends,
so the edge frames tell zero padding (librosa 0.9's default, the reference's) from reflect padding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sadtalker.audio import (
    DEFAULT_SETTINGS,
    amplitude_to_normalized_db,
    mel_filterbank,
    mel_spectrogram,
    preemphasize,
    speech_to_mel_windows,
)

FIXTURE = Path(__file__).parent / "fixtures" / "mel_librosa092.npz"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {name: data[name] for name in data.files}


def test_the_fixture_is_librosa_0_9_2_on_an_awkward_length(reference: dict[str, np.ndarray]) -> None:
    assert str(reference["librosa_version"]) == "0.9.2"
    signal = reference["signal"]
    assert signal.dtype == np.float32 and len(signal) % DEFAULT_SETTINGS.hop_length != 0
    assert len(signal) % 640 != 0  # not a whole number of video frames either
    assert reference["mel"].shape == (80, 1 + len(signal) // DEFAULT_SETTINGS.hop_length)


def test_spectrogram_equals_librosa_0_9_2_at_every_frame(reference: dict[str, np.ndarray]) -> None:
    ours = mel_spectrogram(reference["signal"])
    theirs = reference["mel"].T  # librosa is frequency-major, we are time-major
    assert ours.shape == theirs.shape
    worst_per_frame = np.abs(ours - theirs).max(axis=1)
    bad = [(frame, float(error)) for frame, error in enumerate(worst_per_frame) if error > TOLERANCE]
    assert not bad, f"frames differing from librosa 0.9.2 (frame, largest error): {bad}"
    # The edges, spelled out: the first two and last two frames are where padding matters.
    for frame in (0, 1, len(theirs) - 2, len(theirs) - 1):
        np.testing.assert_allclose(ours[frame], theirs[frame], rtol=0, atol=TOLERANCE)


def test_per_video_frame_windows_equal_the_reference(reference: dict[str, np.ndarray]) -> None:
    ours = speech_to_mel_windows(reference["signal"])
    theirs = reference["windows"]
    assert ours.shape == theirs.shape == (7, 80, 16)
    # Our windows are float32 (what the networks take): 1e-5 is well above float32 rounding at |x| <= 4.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)


def test_the_fixture_tells_zero_padding_from_reflect_padding(reference: dict[str, np.ndarray]) -> None:
    """Guards the test itself: reflect padding (the old behaviour) is far off at the edges."""
    signal = reference["signal"]
    settings = DEFAULT_SETTINGS
    half = settings.n_fft // 2
    padded = np.pad(preemphasize(signal, settings.preemphasis), half, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, settings.n_fft)[:: settings.hop_length]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(settings.n_fft) / settings.n_fft)
    magnitude = np.abs(np.fft.rfft(frames * window, axis=1))
    reflected = amplitude_to_normalized_db(magnitude @ mel_filterbank().T.astype(np.float64))
    error = np.abs(reflected - reference["mel"].T).max(axis=1)
    assert error[0] > 0.05 and error[-1] > 0.05
    assert error[2:-2].max() < TOLERANCE  # the interior never sees the padding
