"""Short sound excerpts a browser plays: Opus in Ogg, encoded with PyAV.

Reports link them with relative paths (``<audio>`` in HTML, a link in Markdown), so a copied
report folder keeps its players. Opus at 32 kbit/s keeps a 5 s excerpt near 20 kB; Chromium,
Firefox and Safari (17+) play Ogg Opus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import av
import numpy as np
import soxr

from avfuse.io import atomic_write

MIME = "audio/ogg"
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def write_excerpt(
    samples: np.ndarray, sample_rate: int, path: str | Path, seconds: float = 5.0
) -> Path:
    """Write the first ``seconds`` of ``(samples,)`` mono float audio to ``path`` (Ogg Opus).

    Audio at a rate Opus does not take is resampled to 48 kHz first. Raises ``ValueError`` for
    an empty excerpt.
    """
    path = Path(path)
    x = np.asarray(samples, dtype=np.float32).reshape(-1)[: max(1, int(seconds * sample_rate))]
    if not len(x):
        raise ValueError("no samples to write")
    rate = int(sample_rate)
    if rate not in _OPUS_RATES:
        x = soxr.resample(x, rate, 48000).astype(np.float32)
        rate = 48000
    x = np.clip(x, -1.0, 1.0)
    with atomic_write(path) as tmp, av.open(str(tmp), "w", format="ogg") as out:
        stream: Any = out.add_stream("libopus", rate=rate, layout="mono")
        stream.bit_rate = 32000
        frame = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


__all__ = ["MIME", "write_excerpt"]
