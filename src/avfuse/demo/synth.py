"""Pictures and sounds of the demo dataset, one renderer per visual and sound signature.

Everything is drawn from the generator passed in, so a clip's content is fixed by its seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Shares of clips whose picture (sound) is hard to recognise, drawn independently: each model
# then also errs outside its blind pairs, and fusion can rescue one modality with the other.
HARD_VIDEO_SHARE = 0.2
HARD_AUDIO_SHARE = 0.2

# ----------------------------------------------------------------------------------------------
# Pictures: (frames, H, W, 3) uint8, one renderer per visual signature


class _Canvas:
    def __init__(self, size: int) -> None:
        ax = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.yy, self.xx = np.meshgrid(ax, ax, indexing="ij")
        self.size = size

    def gradient(
        self, top: np.ndarray, bottom: np.ndarray, split: float | None = None
    ) -> np.ndarray:
        # split: a horizon, two flat areas instead of a gradient
        w = self.yy[..., None] if split is None else (self.yy[..., None] > split).astype(np.float32)
        return (1 - w) * top + w * bottom

    def disk(self, img: np.ndarray, cx: float, cy: float, r: float, col: np.ndarray) -> None:
        img[(self.xx - cx) ** 2 + (self.yy - cy) ** 2 <= r * r] = col

    def ellipse(
        self, img: np.ndarray, cx: float, cy: float, rx: float, ry: float, col: np.ndarray
    ) -> None:
        img[((self.xx - cx) / rx) ** 2 + ((self.yy - cy) / ry) ** 2 <= 1] = col

    def rect(
        self, img: np.ndarray, x0: float, y0: float, x1: float, y1: float, col: np.ndarray
    ) -> None:
        img[(self.xx >= x0) & (self.xx <= x1) & (self.yy >= y0) & (self.yy <= y1)] = col


def _col(
    rng: np.random.Generator, base: Sequence[float] | np.ndarray, jitter: float = 18.0
) -> np.ndarray:
    return np.clip(np.asarray(base, np.float32) + rng.normal(0, jitter, 3), 0, 255)


def render(visual: str, rng: np.random.Generator, n: int, fps: int, size: int) -> np.ndarray:
    cv = _Canvas(size)
    t = np.arange(n) / fps
    frames = np.empty((n, size, size, 3), np.float32)
    u = rng.uniform
    phase = u(0, 2 * np.pi)
    shirt = _col(rng, rng.uniform(40, 220, 3), 0)
    skin = _col(rng, (225, 180, 145), 15)

    def figure(img: np.ndarray, x: float, y: float) -> None:
        cv.rect(img, x - 0.05, y, x + 0.05, y + 0.28, shirt)
        cv.disk(img, x, y - 0.06, 0.06, skin)

    if visual == "brass":
        bg = cv.gradient(_col(rng, (110, 35, 40)), _col(rng, (60, 30, 25)))
        gold = _col(rng, (220, 180, 60))
        f, amp = u(0.4, 0.8), u(0.03, 0.07)
        for k in range(n):
            img = bg.copy()
            dy = amp * np.sin(2 * np.pi * f * t[k] + phase)
            cv.disk(img, 0.17, 0.45 + dy, 0.12, skin)
            cv.rect(img, 0.25, 0.47 + dy, 0.68, 0.53 + dy, gold)
            cv.disk(img, 0.76, 0.5 + dy, 0.11, gold)
            frames[k] = img
    elif visual == "face":
        bg = cv.gradient(_col(rng, (205, 195, 170)), _col(rng, (185, 175, 150)))
        f, sway = u(1.5, 3.0), u(0.01, 0.04)
        for k in range(n):
            img = bg.copy()
            dx = sway * np.sin(2 * np.pi * 0.5 * t[k] + phase)
            cv.disk(img, 0.5 + dx, 0.5, 0.3, skin)
            cv.disk(img, 0.4 + dx, 0.42, 0.035, np.zeros(3, np.float32))
            cv.disk(img, 0.6 + dx, 0.42, 0.035, np.zeros(3, np.float32))
            ry = 0.035 + 0.025 * np.sin(2 * np.pi * f * t[k] + phase)
            cv.ellipse(img, 0.5 + dx, 0.64, 0.08, max(ry, 0.01), np.array([90, 20, 30], np.float32))
            frames[k] = img
    elif visual in ("vacuum", "lawn"):
        if visual == "vacuum":
            bg = cv.gradient(_col(rng, (200, 200, 210)), _col(rng, (120, 125, 150)), 0.45)
            body, f = _col(rng, (60, 60, 70)), u(0.5, 0.9)
            xs = 0.5 + 0.25 * np.sin(2 * np.pi * f * t + phase)
        else:
            bg = cv.gradient(_col(rng, (120, 170, 230)), _col(rng, (60, 160, 60)), 0.3)
            body, speed = _col(rng, (200, 40, 30)), u(0.1, 0.2)
            xs = 0.15 + (u(0, 0.6) + speed * t) % 0.7
        for k in range(n):
            img = bg.copy()
            cv.rect(img, xs[k] - 0.1, 0.7, xs[k] + 0.1, 0.82, body)
            cv.rect(img, xs[k] + 0.06, 0.4, xs[k] + 0.09, 0.7, body * 0.6)
            frames[k] = img
    elif visual in ("outdoor_run", "treadmill"):
        f, amp = u(2.6, 3.2), u(0.02, 0.04)
        if visual == "outdoor_run":
            bg = cv.gradient(_col(rng, (130, 180, 235)), _col(rng, (110, 140, 90)), 0.5)
            xs = 0.1 + (u(0, 0.8) + u(0.15, 0.25) * t) % 0.8
        else:
            bg = cv.gradient(_col(rng, (150, 150, 150)), _col(rng, (120, 115, 110)), 0.6)
            xs = np.full(n, 0.5 + u(-0.1, 0.1))
        for k in range(n):
            img = bg.copy()
            if visual == "treadmill":
                cv.rect(img, 0.2, 0.8, 0.8, 0.88, np.array([20, 20, 20], np.float32))
                stripe = (
                    (0.2 + (0.6 * t[k]) % 0.6) if k % 2 == 0 else 0.2 + (0.6 * t[k] + 0.3) % 0.6
                )
                cv.rect(img, stripe, 0.8, stripe + 0.03, 0.88, np.array([90, 90, 90], np.float32))
            y = 0.5 - amp * abs(np.sin(np.pi * f * t[k] + phase))
            figure(img, xs[k], y)
            frames[k] = img
    elif visual == "drums":
        bg = cv.gradient(_col(rng, (30, 30, 45)), _col(rng, (15, 15, 20)))
        wood, f = _col(rng, (140, 80, 40)), u(3.0, 5.0)
        for k in range(n):
            img = bg.copy()
            cv.ellipse(img, 0.3, 0.75, 0.16, 0.08, wood)
            cv.ellipse(img, 0.7, 0.75, 0.16, 0.08, wood)
            for j, x in enumerate((0.3, 0.7)):
                h = 0.12 * abs(np.sin(np.pi * f * t[k] + phase + j * np.pi / 2))
                cv.rect(img, x - 0.02, 0.45 - h, x + 0.02, 0.65 - h, np.full(3, 235, np.float32))
            frames[k] = img
    elif visual == "bell":
        bg = cv.gradient(_col(rng, (235, 230, 215)), _col(rng, (200, 195, 180)))
        gold, f, amp = _col(rng, (200, 160, 40)), u(0.8, 1.2), u(0.1, 0.18)
        for k in range(n):
            img = bg.copy()
            dx = amp * np.sin(2 * np.pi * f * t[k] + phase)
            cv.rect(img, 0.49, 0.0, 0.51, 0.35, np.array([80, 60, 40], np.float32))
            cv.disk(img, 0.5 + dx, 0.45, 0.12, gold)
            cv.rect(img, 0.36 + dx, 0.45, 0.64 + dx, 0.6, gold)
            frames[k] = img
    elif visual == "court":
        bg = cv.gradient(_col(rng, (50, 80, 160)), _col(rng, (40, 70, 140)))
        ball, f = _col(rng, (240, 120, 30), 10), u(1.8, 2.2)
        bx = u(0.35, 0.65)
        for k in range(n):
            img = bg.copy()
            cv.rect(img, 0.0, 0.9, 1.0, 0.93, np.full(3, 240, np.float32))
            figure(img, bx - 0.18, 0.45)
            cv.disk(img, bx, 0.88 - 0.4 * abs(np.sin(np.pi * f * t[k] + phase)), 0.07, ball)
            frames[k] = img
    elif visual == "keyboard":
        bg = cv.gradient(_col(rng, (70, 55, 45)), _col(rng, (50, 40, 30)))
        cv.rect(bg, 0.25, 0.08, 0.75, 0.4, _col(rng, (60, 90, 160)))
        keys = [(0.12 + 0.08 * i, 0.6 + 0.08 * j) for i in range(10) for j in range(3)]
        for x, y in keys:
            cv.rect(bg, x, y, x + 0.06, y + 0.06, np.full(3, 170, np.float32))
        rate = u(8, 14) / fps
        for k in range(n):
            img = bg.copy()
            for _ in range(rng.poisson(rate)):
                x, y = keys[int(rng.integers(len(keys)))]
                cv.rect(img, x, y, x + 0.06, y + 0.06, np.full(3, 255, np.float32))
            frames[k] = img
    else:  # pragma: no cover - catalogue and renderers are defined together
        raise ValueError(visual)

    # Per-video nuisances: a drifting distractor, brightness, fixed texture, sensor noise.
    if rng.random() < 0.5:
        col, r = rng.uniform(0, 255, 3).astype(np.float32), u(0.05, 0.1)
        x0, y0, vx, vy = u(0, 1), u(0, 1), u(-0.2, 0.2), u(-0.2, 0.2)
        for k in range(n):
            cv.disk(frames[k], (x0 + vx * t[k]) % 1, (y0 + vy * t[k]) % 1, r, col)
    frames *= u(0.75, 1.2)
    if rng.random() < HARD_VIDEO_SHARE:  # a bad camera: dark, colour cast, grainy, a big occluder
        frames *= u(0.35, 0.6) * rng.uniform(0.6, 1.4, 3).astype(np.float32)
        frames += rng.normal(0, 12, frames.shape).astype(np.float32)
        col = rng.uniform(0, 255, 3).astype(np.float32)
        x0, y0, vx = u(0.2, 0.8), u(0.2, 0.8), u(-0.3, 0.3)
        for k in range(n):
            cv.disk(frames[k], (x0 + vx * t[k]) % 1, y0, u(0.18, 0.25), col)
    frames += rng.normal(0, 6, (1, size, size, 3)).astype(np.float32)
    frames += rng.normal(0, 3, frames.shape).astype(np.float32)
    return np.clip(frames, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Sounds: (samples,) float32 at the source rate, one synthesiser per sound signature


def _band_noise(rng: np.random.Generator, n: int, sr: int, lo: float, hi: float) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / sr)
    spec[(f < lo) | (f > hi)] = 0
    x = np.fft.irfft(spec, n)
    return x / (np.std(x) + 1e-9)


def _harmonics(
    f0: np.ndarray, sr: int, amps: Callable[[np.ndarray, int], Any], max_k: int = 24
) -> np.ndarray:
    """Sum of harmonics k*f0(t) with amplitude amps(k*f0, k) (formants, roll-off), below Nyquist."""
    ph = 2 * np.pi * np.cumsum(f0) / sr
    out = np.zeros_like(f0)
    for k in range(1, max_k + 1):
        fk = k * f0
        if fk.min() >= 0.45 * sr:
            break
        a = amps(fk, k) * (fk < 0.45 * sr)
        out += a * np.sin(k * ph)
    return out


def _notes(
    rng: np.random.Generator, n: int, sr: int, scale: np.ndarray, lo: float, hi: float
) -> tuple[np.ndarray, np.ndarray]:
    """Piecewise-constant f0 (notes of ``scale``) and a per-note attack/release envelope."""
    f0 = np.empty(n)
    env = np.empty(n)
    pos = 0
    while pos < n:
        ln = int(rng.uniform(lo, hi) * sr)
        seg = slice(pos, min(n, pos + ln))
        m = seg.stop - seg.start
        f0[seg] = rng.choice(scale)
        ramp = np.minimum(1.0, np.minimum(np.arange(m), m - np.arange(m)) / (0.02 * sr))
        env[seg] = ramp
        pos += ln
    return f0, env


def _impacts(
    rng: np.random.Generator, n: int, sr: int, times: np.ndarray, make: Callable[[], np.ndarray]
) -> np.ndarray:
    out = np.zeros(n)
    for t0 in times:
        s = int(t0 * sr)
        if 0 <= s < n:
            hit = make()
            m = min(len(hit), n - s)
            out[s : s + m] += hit[:m]
    return out


def _decay_tone(sr: int, f: float, tau: float, dur: float, sweep: float = 0.0) -> np.ndarray:
    tt = np.arange(int(dur * sr)) / sr
    freq = f * (1 + sweep * np.exp(-tt / 0.02))
    return np.exp(-tt / tau) * np.sin(2 * np.pi * np.cumsum(freq) / sr)


def _synth(sound: str, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    u = rng.uniform
    pent = np.array([1, 9 / 8, 5 / 4, 3 / 2, 5 / 3, 2.0])
    if sound == "brass_high" or sound == "brass_low":
        base = u(392, 523) if sound == "brass_high" else u(98, 131)
        f0, env = _notes(rng, n, sr, base * pent, 0.25, 0.6)
        if sound == "brass_low":  # slide between notes
            from scipy.ndimage import uniform_filter1d

            f0 = uniform_filter1d(f0, int(0.06 * sr), mode="nearest")
        roll = 0.6 if sound == "brass_high" else 1.0
        x = env * _harmonics(f0, sr, lambda fk, k: float(k) ** -roll)
    elif sound == "whistle":
        f0, env = _notes(rng, n, sr, u(1000, 1400) * pent, 0.2, 0.5)
        f0 = f0 * (1 + 0.02 * np.sin(2 * np.pi * u(5, 6.5) * t))
        x = env * np.sin(2 * np.pi * np.cumsum(f0) / sr) + 0.05 * _band_noise(
            rng, n, sr, 1000, 6000
        )
    elif sound == "voice":
        f0, env = _notes(rng, n, sr, u(160, 260) * pent, 0.3, 0.7)
        f0 = f0 * (1 + 0.03 * np.sin(2 * np.pi * u(5, 6.5) * t))
        f1, f2 = u(500, 800), u(1000, 2000)

        def formants(fk: np.ndarray, k: int) -> np.ndarray:
            return (
                np.exp(-(((fk - f1) / 150) ** 2)) + 0.6 * np.exp(-(((fk - f2) / 250) ** 2)) + 0.05
            )

        x = env * _harmonics(f0, sr, formants)
    elif sound == "engine":
        f0 = u(80, 120) * (1 + 0.04 * np.sin(2 * np.pi * u(0.2, 0.6) * t + u(0, 6)))
        x = _harmonics(f0, sr, lambda fk, k: 80 / fk) + 0.5 * _band_noise(rng, n, sr, 200, 3000)
    elif sound == "footsteps":
        rate = u(2.6, 3.2)
        times = np.arange(u(0, 0.3), n / sr, 1 / rate)
        times = times + rng.normal(0, 0.015, len(times))
        f = u(60, 100)

        def step() -> np.ndarray:
            click = rng.standard_normal(int(0.03 * sr)) * np.exp(
                -np.arange(int(0.03 * sr)) / (0.005 * sr)
            )
            hit = _decay_tone(sr, f, 0.03, 0.15)
            hit[: len(click)] += 0.3 * click
            return hit

        x = _impacts(rng, n, sr, times, step)
    elif sound == "drums":
        beat = 60 / u(100, 140)
        x = np.zeros(n)
        for j, t0 in enumerate(np.arange(u(0, 0.2), n / sr, beat / 2)):
            s = int(t0 * sr)
            if j % 4 == 0:
                hit = _decay_tone(sr, u(50, 65), 0.12, 0.4, sweep=1.5)
            elif j % 4 == 2:
                m = int(0.2 * sr)
                hit = rng.standard_normal(m) * np.exp(-np.arange(m) / (0.04 * sr)) * 0.6
                hit += 0.5 * _decay_tone(sr, 180, 0.05, 0.2)
            else:
                m = int(0.05 * sr)
                hit = _band_noise(rng, m, sr, 6000, 0.45 * sr) * np.exp(-np.arange(m) / (0.01 * sr))
                hit *= 0.3
            m = min(len(hit), n - s)
            if m > 0:
                x[s : s + m] += hit[:m]
    elif sound == "bell":
        f = u(450, 900)
        x = np.zeros(n)
        for t0 in np.sort(rng.uniform(0, max(0.01, n / sr - 0.3), int(rng.integers(1, 4)))):
            s = int(t0 * sr)
            tt = np.arange(n - s) / sr
            for ratio, a, tau in ((1, 1, 1.2), (2.0, 0.6, 0.8), (2.76, 0.5, 0.6), (5.4, 0.3, 0.3)):
                if f * ratio < 0.45 * sr:
                    x[s:] += a * np.exp(-tt / tau) * np.sin(2 * np.pi * f * ratio * tt)
    elif sound == "bounce":
        rate, f = u(1.8, 2.2), u(150, 250)
        times = np.arange(u(0, 0.3), n / sr, 1 / rate)
        x = _impacts(rng, n, sr, times, lambda: _decay_tone(sr, f, 0.04, 0.2, sweep=0.3))
        for t0 in rng.uniform(0, n / sr, int(rng.integers(0, 3))):  # sneaker squeaks
            s, m = int(t0 * sr), int(0.08 * sr)
            m = min(m, n - s)
            if m > 0:
                tt = np.arange(m) / sr
                x[s : s + m] += 0.3 * np.sin(2 * np.pi * (2200 * tt + 4000 * tt**2))
    elif sound == "keys":
        times = np.cumsum(rng.exponential(1 / u(8, 14), int(n / sr * 20) + 5))
        res = u(3000, 5000)

        def click() -> np.ndarray:
            m = int(0.02 * sr)
            c = _band_noise(rng, m, sr, 2000, 0.45 * sr) * np.exp(-np.arange(m) / (0.003 * sr))
            return c + 0.5 * _decay_tone(sr, min(res, 0.4 * sr), 0.004, 0.02)

        x = _impacts(rng, n, sr, times, click)
    else:  # pragma: no cover
        raise ValueError(sound)
    return np.asarray(x, dtype=np.float64)


def _background(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Class-independent background: pink noise, mains hum, wind, distant babble or silence."""
    kind = rng.choice(["pink", "hum", "wind", "babble", "none"])
    t = np.arange(n) / sr
    if kind == "pink":
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n, 1 / sr)
        spec /= np.sqrt(np.maximum(f, 20.0))
        x = np.fft.irfft(spec, n)
    elif kind == "hum":
        mains = rng.choice([50.0, 60.0])
        x = sum(np.sin(2 * np.pi * mains * k * t) / k for k in (1, 2, 3, 5))
        x = x + 0.1 * rng.standard_normal(n)
    elif kind == "wind":
        x = _band_noise(rng, n, sr, 20, 400) * (
            1 + 0.8 * np.sin(2 * np.pi * rng.uniform(0.2, 0.7) * t)
        )
    elif kind == "babble":
        x = np.zeros(n)
        for _ in range(4):
            f0 = rng.uniform(100, 250) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(2, 4) * t))
            x += _harmonics(f0, sr, lambda fk, k: 1 / (1 + fk / 500), max_k=8)
        x = x * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t) ** 2)
    else:
        return np.zeros(n)
    return x / (np.std(x) + 1e-9)


def synthesize_audio(sound: str, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """One class sound plus a random background. ``-> (samples,)`` float32.

    The background is 5-25 dB below the class sound, except in a share of recordings
    (``HARD_AUDIO_SHARE``) where it drowns it (-10 to 0 dB), as wind or a crowd does.
    """
    x = _synth(sound, rng, n, sr)
    x = x / (np.std(x) + 1e-9)
    snr_db = rng.uniform(5, 25) if rng.random() >= HARD_AUDIO_SHARE else rng.uniform(-10, 0)
    x = x + _background(rng, n, sr) * 10 ** (-snr_db / 20)
    peak = np.max(np.abs(x)) + 1e-9
    return (x / peak * 10 ** (rng.uniform(-12, -1) / 20)).astype(np.float32)
