"""Generate the embedded AV-digits dataset (``mmdiag/examples_data/data/avdigits.npz``).

AV-digits pairs each of the 1,797 handwritten 8x8 digits of scikit-learn's
bundled ``load_digits`` (the UCI "Optical Recognition of Handwritten Digits"
set) with a spoken rendition of its label ("zero" .. "nine") synthesised by
``espeak-ng``.  Only compact log-spectral features of the audio are shipped,
never waveforms, so the package needs neither espeak-ng nor scikit-learn at
run time.  This script is a development-time tool; the package never imports
it (``--check`` imports the package's loader to validate it).

How to regenerate
-----------------
On a Debian/Ubuntu machine::

    apt-get update && apt-get install -y espeak-ng
    python3 -m venv .genvenv
    .genvenv/bin/pip install numpy scipy scikit-learn
    .genvenv/bin/python tools/make_avdigits.py            # writes mmdiag/examples_data/data/avdigits.npz
    .genvenv/bin/python tools/make_avdigits.py --check    # also validates the noise model

The output is deterministic for a given espeak-ng version (the one used is
recorded in the file under ``espeak_version``).

Audio synthesis
---------------
For sample ``i`` a generator seeded with ``(BASE_SEED, i)`` picks

* an English espeak-ng voice (accent) from :data:`VOICES`,
* a voice variant (speaker timbre, male/female) from :data:`VARIANTS`,
* a speaking rate ``-s`` in words per minute from ``SPEED_RANGE``,
* a pitch ``-p`` (0..99) from ``PITCH_RANGE``.

The 22.05 kHz waveform is resampled to 8 kHz, leading/trailing silence is
trimmed (40 dB below the clip's peak frame energy), the clip is scaled to unit
mean power over the kept speech, and it is centred in a fixed window of
``WINDOW`` samples (0.81 s; longer words are centre-cropped), zero-padded.

Features
--------
A short-time Fourier transform with a Hann window of ``FRAME`` = 400 samples
(50 ms) and hop ``HOP`` = 320 samples (40 ms) gives ``N_FRAMES`` = 20 frames.
Per-bin power is normalised by the window energy, ``S_t(k) = |X_t(k)|^2 /
sum(w^2)``, so white noise of variance ``s2`` has expected per-bin power
``s2``.  A triangular mel filterbank ``M`` (``N_BANDS`` = 20 bands, 80 Hz to
4 kHz, written here from the standard mel formula) gives the linear band
power ``B[b, t] = sum_k M[b, k] S_t(k)``.

Shipped arrays (see ``mmdiag/examples_data/avdigits.py`` for how they are used):

* ``images``       uint8 [N, 8, 8], values 0..16, as in ``load_digits``.
* ``labels``       int64 [N].
* ``clean_logpow`` float16 [N, 20, 20], ``ln(max(B, 1e-12))`` of the clean clip
  (bands x frames, band 0 lowest).
* ``clip_power``   float32 [N], mean power of the speech part of the clip
  (1.0 by construction; kept so the loader does not depend on that choice).
* ``mel_fb``       float32 [20, 201], the filterbank ``M``.
* ``log_floor``    float32 scalar, added to the band power before the log.
* ``audio_mean``, ``audio_std`` float32 scalars: mean/std of
  ``ln(B + log_floor)`` over the whole clean set (fixed standardisation).
* provenance: ``voice_id``, ``variant_id``, ``speed``, ``pitch`` per sample and
  the name tables ``voice_names``, ``variant_names``, ``words``, plus
  ``sample_rate``, ``frame``, ``hop``, ``fmin``, ``fmax``, ``espeak_version``
  and ``sklearn_version``.

Noise at load time
------------------
Waveforms are not shipped, yet noise can be added at any SNR at load time.
``mmdiag.examples_data.avdigits.noisy_band_power`` takes noise variance
``s2 = clip_power / 10**(snr/10)`` and, per band and frame, forms

    B_noisy = max(B + N + X, 0)

* ``N`` is exact: a fresh white Gaussian waveform of ``WINDOW`` samples goes
  through the same STFT and filterbank (cheap: 20 FFTs of 400 points per
  clip), so its statistics, including the strong correlation of neighbouring
  Hann-window bins and between overlapping frames and bands, are right.
* ``X`` is the speech-noise cross term ``sum_k M 2 Re(S_k N_k*) / sum(w**2)``,
  which needs the speech phase and so cannot be computed from ``B``.  It has
  zero mean (it averages out over a band); it is drawn conditionally on the
  drawn noise by standing in for the speech spectrum with a windowed
  white-noise spectrum of flat power ``B / sum M`` inside the band.  That
  gives the cross term's exact variance for locally noise-like speech (and
  for a sinusoid in a flat band), and keeps it coupled to the noise
  actually drawn, so ``B + N + X`` rarely dips below 0 (it is clipped at 0).
  It only matters where speech and noise power are comparable.
* Neglected: the true speech phase structure, i.e. how the cross term is
  distributed over bins inside a band.

Validation (``--check``: 60 clips, noise added to the real waveforms compared
with the approximation; mean and std of the log band power with the shipped
floor, and the mean over cells of the std across clips):

    SNR   0 dB: mean real 2.293 approx 2.290, std 0.813 vs 0.827, per-cell std 0.557 vs 0.571
    SNR  -5 dB: mean real 3.310 approx 3.305, std 0.693 vs 0.717, per-cell std 0.467 vs 0.483
    SNR -10 dB: mean real 4.388 approx 4.384, std 0.661 vs 0.676, per-cell std 0.425 vs 0.436
    SNR -15 dB: mean real 5.497 approx 5.500, std 0.664 vs 0.663, per-cell std 0.405 vs 0.407

Per-band means differed by at most 0.064 (natural-log units).  An earlier
variant that drew the cross term unconditionally as a Gaussian inflated the
std by ~0.09, which is why the cross term is now conditioned on the noise.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

BASE_SEED = 20240611
SAMPLE_RATE = 8000
FRAME = 400
HOP = 320
N_FRAMES = 20
WINDOW = FRAME + HOP * (N_FRAMES - 1)  # 6480 samples = 0.81 s
N_BANDS = 20
FMIN = 80.0
FMAX = 4000.0
TRIM_DB = 40.0
LOG_FLOOR_REL = 1e-4  # log floor relative to the mean clean band power of speech frames

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = (
    "en",
    "en-us",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
VARIANTS = ("", "m1", "m2", "m3", "m4", "m7", "f1", "f2", "f3", "f4")
SPEED_RANGE = (130, 210)  # words per minute, inclusive
PITCH_RANGE = (25, 75)  # espeak-ng pitch 0..99, inclusive

OUT_PATH = Path(__file__).resolve().parents[1] / "mmdiag" / "examples_data" / "data" / "avdigits.npz"


def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_bands: int, n_fft: int, sr: int, fmin: float, fmax: float) -> np.ndarray:
    """Triangular mel filters, shape [n_bands, n_fft // 2 + 1], peak weight 1."""
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_bands + 2))
    fb = np.zeros((n_bands, freqs.size))
    for b in range(n_bands):
        lo, mid, hi = edges[b], edges[b + 1], edges[b + 2]
        rise = (freqs - lo) / (mid - lo)
        fall = (hi - freqs) / (hi - mid)
        fb[b] = np.clip(np.minimum(rise, fall), 0.0, None)
    if np.any(fb.sum(axis=1) <= 0):
        raise RuntimeError("empty mel band; lower N_BANDS or raise the FFT size")
    return fb


def choose_params(i: int) -> tuple[int, int, int, int]:
    rng = np.random.default_rng([BASE_SEED, i])
    voice = int(rng.integers(len(VOICES)))
    variant = int(rng.integers(len(VARIANTS)))
    speed = int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1))
    pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
    return voice, variant, speed, pitch


def synthesise(word: str, voice: int, variant: int, speed: int, pitch: int) -> np.ndarray:
    """Run espeak-ng and return the waveform resampled to SAMPLE_RATE (float64)."""
    name = VOICES[voice] + (f"+{VARIANTS[variant]}" if VARIANTS[variant] else "")
    wav = subprocess.run(
        ["espeak-ng", "-v", name, "-s", str(speed), "-p", str(pitch), "--stdout", word],
        check=True,
        capture_output=True,
    ).stdout
    with wave.open(io.BytesIO(wav)) as w:
        sr = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64) / 32768.0
    if sr != 22050:
        raise RuntimeError(f"unexpected espeak-ng sample rate {sr}")
    return resample_poly(x, 160, 441)  # 22050 * 160 / 441 = 8000


def trim_and_place(x: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Trim silence, scale to unit speech power, centre in WINDOW samples.

    Returns the windowed clip and the [start, stop) range of speech inside it.
    """
    sub = 80  # 10 ms energy frames
    n = len(x) // sub
    e = (x[: n * sub].reshape(n, sub) ** 2).mean(axis=1)
    keep = np.nonzero(e > e.max() * 10.0 ** (-TRIM_DB / 10.0))[0]
    seg = x[keep[0] * sub : (keep[-1] + 1) * sub]
    seg = seg / np.sqrt(np.mean(seg**2))
    if len(seg) > WINDOW:
        off = (len(seg) - WINDOW) // 2
        seg = seg[off : off + WINDOW]
    out = np.zeros(WINDOW)
    start = (WINDOW - len(seg)) // 2
    out[start : start + len(seg)] = seg
    return out, start, start + len(seg)


def bin_power(clip: np.ndarray) -> np.ndarray:
    """Window-energy normalised power per FFT bin, shape [N_FRAMES, FRAME // 2 + 1]."""
    w = np.hanning(FRAME)
    idx = np.arange(N_FRAMES)[:, None] * HOP + np.arange(FRAME)[None, :]
    spec = np.fft.rfft(clip[idx] * w, axis=1)
    return (np.abs(spec) ** 2) / np.sum(w**2)


def build(workers: int = 2) -> dict[str, np.ndarray]:
    import sklearn
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)
    labels = digits.target.astype(np.int64)
    n = len(labels)
    params = np.array([choose_params(i) for i in range(n)], dtype=np.int64)

    def job(i):
        v, var, s, p = params[i]
        clip, a, b = trim_and_place(synthesise(WORDS[labels[i]], v, var, s, p))
        return clip, float(np.mean(clip[a:b] ** 2))

    with ThreadPoolExecutor(max_workers=workers) as ex:
        results = list(ex.map(job, range(n)))

    fb = mel_filterbank(N_BANDS, FRAME, SAMPLE_RATE, FMIN, FMAX)
    band = np.stack([bin_power(c) @ fb.T for c, _ in results]).transpose(0, 2, 1)  # [N, F, T]
    clip_power = np.array([p for _, p in results], dtype=np.float32)
    logpow = np.log(np.maximum(band, 1e-12)).astype(np.float16)

    # Statistics from the values the loader will actually reconstruct (float16 round trip).
    band_rt = np.exp(logpow.astype(np.float64))
    speech = band_rt.sum(axis=1) > 0.01 * band_rt.sum(axis=1).max(axis=1, keepdims=True)
    log_floor = LOG_FLOOR_REL * band_rt.transpose(0, 2, 1)[speech].mean()
    feat = np.log(band_rt + log_floor)

    version = subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True).stdout
    version = version.split("Data at")[0].strip()  # drop the local data path
    return {
        "images": images,
        "labels": labels,
        "clean_logpow": logpow,
        "clip_power": clip_power,
        "mel_fb": fb.astype(np.float32),
        "log_floor": np.float32(log_floor),
        "audio_mean": np.float32(feat.mean()),
        "audio_std": np.float32(feat.std()),
        "voice_id": params[:, 0].astype(np.uint8),
        "variant_id": params[:, 1].astype(np.uint8),
        "speed": params[:, 2].astype(np.uint8),
        "pitch": params[:, 3].astype(np.uint8),
        "voice_names": np.array(VOICES),
        "variant_names": np.array(VARIANTS),
        "words": np.array(WORDS),
        "sample_rate": np.int32(SAMPLE_RATE),
        "frame": np.int32(FRAME),
        "hop": np.int32(HOP),
        "fmin": np.float32(FMIN),
        "fmax": np.float32(FMAX),
        "espeak_version": np.array(version),
        "sklearn_version": np.array(sklearn.__version__),
    }


def check_noise_model(data: dict[str, np.ndarray], n_clips: int = 60, snrs=(0.0, -5.0, -10.0, -15.0)) -> None:
    """Compare the loader's noise model with noise added to real waveforms."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mmdiag.examples_data.avdigits import noisy_band_power

    fb = data["mel_fb"].astype(np.float64)
    floor = float(data["log_floor"])
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(data["labels"]), n_clips, replace=False))
    clips = []
    for i in idx:
        v, var, s, p = (int(data[k][i]) for k in ("voice_id", "variant_id", "speed", "pitch"))
        clip, a, b = trim_and_place(synthesise(WORDS[data["labels"][i]], v, var, s, p))
        clips.append((clip, np.mean(clip[a:b] ** 2)))
    clean_band = np.exp(data["clean_logpow"][idx].astype(np.float64))
    for snr in snrs:
        s2 = np.array([pw for _, pw in clips]) / 10 ** (snr / 10)
        real = np.stack(
            [
                np.log((bin_power(c + rng.normal(0.0, np.sqrt(v), c.shape)) @ fb.T).T + floor)
                for (c, _), v in zip(clips, s2)
            ]
        )
        approx = np.log(noisy_band_power(clean_band, s2, fb, FRAME, HOP, rng) + floor)
        print(
            f"SNR {snr:+5.1f} dB: log band power mean real {real.mean():.3f} approx {approx.mean():.3f}, "
            f"std real {real.std():.3f} approx {approx.std():.3f}; "
            f"max |per-band mean diff| {np.abs(real.mean(axis=(0, 2)) - approx.mean(axis=(0, 2))).max():.3f}; "
            f"per-cell std real {real.std(axis=0).mean():.3f} approx {approx.std(axis=0).mean():.3f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_PATH)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="validate the load-time noise approximation")
    args = ap.parse_args()
    data = build(args.workers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **data)
    print(f"wrote {args.out.name}: {args.out.stat().st_size / 1e6:.2f} MB, N={len(data['labels'])}")
    if args.check:
        check_noise_model(data)


if __name__ == "__main__":
    main()
