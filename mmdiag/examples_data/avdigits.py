"""AV-digits: a small embedded audio-visual dataset with a known dominance dial.

AV-digits pairs each of the 1,797 handwritten 8x8 digits of the UCI optical
recognition set (as bundled with scikit-learn's ``load_digits``) with a spoken
rendition of its label synthesised by espeak-ng with a varied voice, accent,
speaking rate and pitch. Only log-spectral audio features are shipped (see
``tools/make_avdigits.py`` for how they were made and ``data/AVDIGITS.md`` for
provenance and licences), so loading needs nothing beyond numpy.

Clean speech is the easier modality, and a jointly trained fusion model leans
on it. White noise added to the audio at a chosen SNR weakens it, so the SNR is
a ground-truth dial for modality dominance. The image halves ("top" and
"bottom") form a balanced control pair.

Arrays returned by :func:`load_avdigits` (``N = 1797``):

* ``"audio"``: float32 ``[N, 1, 20, 20]``: log mel-band power spectrogram, axis 2
  = 20 mel bands from 80 Hz (index 0) to 4 kHz, axis 3 = 20 frames of 50 ms
  with a 40 ms hop (0.81 s centred on the word). Values are
  ``(ln(P + floor) - audio_mean) / audio_std`` with constants fixed at
  generation time from the clean data, so clean and noisy versions share one
  scale (clean values have mean 0 and std 1 over the whole set; noise shifts
  them up).
* ``"visual"``: float32 ``[N, 1, 8, 8]``: the digit image, ``pixel / 16`` in [0, 1].
* ``"top"``: float32 ``[N, 1, 4, 8]``: rows 0-3 of ``"visual"``.
* ``"bottom"``: float32 ``[N, 1, 4, 8]``: rows 4-7 of ``"visual"``.
* ``"label"``: int64 ``[N]``: the digit, 0-9, shared by all views.

Noise model: for SNR ``s`` dB, white Gaussian noise of variance
``clip_power / 10**(s/10)`` is passed through the same STFT and mel filterbank
as the speech, so its band powers are exact (including correlations between
bins, bands and overlapping frames). They are added to the stored clean band
power together with a speech-noise cross term. The clip waveforms are not
shipped, so the cross term is drawn conditionally on the noise, with the
speech treated as locally noise-like inside each band (see
:func:`noisy_band_power`). ``tools/make_avdigits.py --check`` compares this
approximation against noise added to the real waveforms.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np

from mmdiag.errors import ConfigError, LoadError

__all__ = ["VIEWS", "load_avdigits", "noisy_band_power", "split_indices"]

#: Names accepted in ``views``.
VIEWS = ("audio", "visual", "top", "bottom")

_DATA_FILE = "avdigits.npz"
_CHUNK = 256  # clips per noise chunk (bounds peak memory to a few tens of MB)


@lru_cache(maxsize=1)
def _raw() -> dict[str, np.ndarray]:
    """Read the shipped npz once; callers must not modify the returned arrays."""
    try:
        ref = resources.files("mmdiag.examples_data").joinpath("data", _DATA_FILE)
        with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise LoadError(
            f"could not read the embedded AV-digits data mmdiag/examples_data/data/{_DATA_FILE}: {exc}. "
            "Reinstall mmdiag, or regenerate the file with tools/make_avdigits.py."
        ) from exc
    for arr in out.values():
        arr.setflags(write=False)
    return out


def noisy_band_power(
    band_power: np.ndarray,
    noise_var: np.ndarray,
    mel_fb: np.ndarray,
    frame: int,
    hop: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Add white noise to linear mel-band power spectrograms.

    The power spectrum of speech plus noise is
    ``|S_k + N_k|**2 = |S_k|**2 + |N_k|**2 + 2 Re(S_k conj(N_k))``. Summed over
    a band with weights ``M[b, k]``, the first term is the stored clean band
    power ``B``. The second term is computed exactly from a fresh white
    Gaussian waveform passed through the same Hann-window STFT and filterbank.
    The cross term needs the speech phase, which is not stored. It is drawn
    conditionally on the noise, with the speech spectrum replaced by a
    windowed white-noise spectrum ``Z_k`` of flat power ``B / sum_k M[b, k]``
    inside the band:
    ``X = 2 sqrt(B / sum M) Re(sum_k M[b, k] Z_k conj(N_k))``. This has zero mean
    and the cross term's variance for locally noise-like speech (which also
    holds for a sinusoid in a flat band).

    Args:
        band_power: Clean band power ``B`` (float64, shape ``[n, F, T]``). The spectra
            are window-energy normalised, so white noise of variance ``v`` has
            expected power ``v`` per bin.
        noise_var: Noise variance per clip (float64, shape ``[n]``).
        mel_fb: Mel filterbank ``M`` (shape ``[F, frame // 2 + 1]``).
        frame: STFT frame length (Hann window) in samples.
        hop: STFT hop in samples.
        rng: Random generator that supplies the noise.

    Returns:
        float64 array ``[n, F, T]``: ``max(B + N + X, 0)``.
    """
    n, _, t = band_power.shape
    length = frame + hop * (t - 1)
    window = np.hanning(frame)
    scale = 1.0 / np.sqrt(np.sum(window**2))
    idx = np.arange(t)[:, None] * hop + np.arange(frame)[None, :]
    fb_t = np.asarray(mel_fb, dtype=np.float64).T  # [bins, F]
    band_sum = fb_t.sum(axis=0)  # [F]
    out = np.empty(band_power.shape, dtype=np.float64)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        sd = np.sqrt(noise_var[lo:hi])[:, None, None]
        noise = np.fft.rfft(rng.standard_normal((hi - lo, length))[:, idx] * window, axis=2) * (scale * sd)
        pseudo = np.fft.rfft(rng.standard_normal((hi - lo, length))[:, idx] * window, axis=2) * scale
        noise_band = (noise.real**2 + noise.imag**2) @ fb_t  # [c, T, F]
        cross_unit = np.real(pseudo * np.conj(noise)) @ fb_t  # [c, T, F]
        b = band_power[lo:hi]
        cross = 2.0 * np.sqrt(b / band_sum[None, :, None]) * cross_unit.transpose(0, 2, 1)
        out[lo:hi] = np.maximum(b + noise_band.transpose(0, 2, 1) + cross, 0.0)
    return out


def load_avdigits(
    snr_db: float | None = None,
    seed: int = 0,
    views: tuple[str, ...] = ("audio", "visual"),
) -> dict[str, np.ndarray]:
    """Load AV-digits, optionally with white noise added to the audio.

    Args:
        snr_db: Signal-to-noise ratio of the audio in dB, relative to each clip's
            mean speech power. ``None`` gives clean audio. Lower values weaken the
            audio modality. For the demo model (``mmdiag.examples_data.demo_model``) audio
            dominates clean, the two are roughly balanced around -5 dB, and the
            image dominates at -10 dB and below.
        seed: Seed of the noise. The same ``(snr_db, seed)`` always gives identical
            arrays. The clean data and the image views do not depend on it.
        views: Which modalities to return, any of ``"audio"``, ``"visual"``,
            ``"top"`` and ``"bottom"`` (see the module docstring for their
            definitions).

    Returns:
        Dict with one float32 array per requested view, plus ``"label"`` (int64
        ``[N]``). Arrays are fresh copies that the caller may modify.

    Raises:
        ConfigError: If a view name is unknown, no view is requested, or
            ``snr_db`` is not a finite number.
    """
    views = tuple(views)
    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise ConfigError(f"load_avdigits: views must be a non-empty selection of {VIEWS}, got {views!r}.")
    if snr_db is not None and not np.isfinite(float(snr_db)):
        raise ConfigError(f"load_avdigits: snr_db must be a finite number of dB or None, got {snr_db!r}.")

    raw = _raw()
    out: dict[str, np.ndarray] = {}
    if "audio" in views:
        band = np.exp(raw["clean_logpow"].astype(np.float64))
        if snr_db is not None:
            noise_var = raw["clip_power"].astype(np.float64) / 10.0 ** (float(snr_db) / 10.0)
            band = noisy_band_power(
                band,
                noise_var,
                raw["mel_fb"],
                int(raw["frame"]),
                int(raw["hop"]),
                np.random.default_rng(seed),
            )
        logp = np.log(band + float(raw["log_floor"]))
        audio = (logp - float(raw["audio_mean"])) / float(raw["audio_std"])
        out["audio"] = audio[:, None].astype(np.float32)
    image = raw["images"].astype(np.float32) / 16.0
    if "visual" in views:
        out["visual"] = image[:, None].copy()
    if "top" in views:
        out["top"] = image[:, None, :4, :].copy()
    if "bottom" in views:
        out["bottom"] = image[:, None, 4:, :].copy()
    out["label"] = raw["labels"].astype(np.int64)
    return out


def split_indices(n: int, val_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic random train/validation split.

    Args:
        n: Number of samples.
        val_fraction: Fraction of samples for validation, rounded to the nearest
            count and kept within ``[1, n - 1]``.
        seed: Seed of the permutation.

    Returns:
        ``(train_idx, val_idx)``: sorted int64 index arrays that partition ``range(n)``.

    Raises:
        ConfigError: If ``n < 2`` or ``val_fraction`` is not in ``(0, 1)``.
    """
    if n < 2:
        raise ConfigError(f"split_indices: need at least 2 samples to split, got n={n}.")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"split_indices: val_fraction must be in (0, 1), got {val_fraction}.")
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)
