"""Torch datasets and samplers over the feature store.

Training examples are windows of a video's full log-mel sequence (``window`` frames: the store's
``frontend.window_frames`` unless a model fixes its own, 96 frames = 0.96 s for VGGish), drawn
anywhere in the video; evaluation enumerates every window with a hop. Videos are addressed by
``video_id``; positions are only used inside one dataset object and mapped back to ids.

Randomness lives in the sampler (run in the main process), never in ``__getitem__``: a sampler
item is ``(video position, start frame)``, drawn from a generator seeded by ``(seed, epoch)``.
That makes the data order independent of the DataLoader's worker count, identical on a resumed
run (the sampler skips the samples already consumed) and easy to shard across ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from avfuse.model_config import SHORT_CLIPS, ShortClips
from avfuse.store import FeatureStore


def pad_window(x: np.ndarray, length: int, short_clips: str, floor: float) -> np.ndarray:
    """``(frames, n_mels)`` with ``0 < frames < length`` -> ``(length, n_mels)`` per policy."""
    x = np.asarray(x)
    if len(x) == 0:
        raise ValueError("cannot pad a clip without frames")
    if short_clips == "repeat":
        reps = -(-length // len(x))
        return np.tile(x, (reps, 1))[:length]
    if short_clips == "zeros":
        out = np.full((length, x.shape[1]), floor, dtype=x.dtype)
        out[: len(x)] = x
        return out
    raise ValueError(f"short_clips={short_clips!r}: one of repeat, zeros (drop scores nothing)")


@dataclass(frozen=True)
class NormStats:
    """Per-band mean and standard deviation, shape (n_mels,) each."""

    mean: np.ndarray
    std: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(..., n_mels) -> (..., n_mels) float32, standardised per band."""
        return ((np.asarray(x, dtype=np.float32) - self.mean) / self.std).astype(np.float32)

    def to_state(self) -> dict[str, torch.Tensor]:
        return {
            "mean": torch.from_numpy(self.mean.copy()),
            "std": torch.from_numpy(self.std.copy()),
        }

    @classmethod
    def identity(cls, n_mels: int) -> NormStats:
        """No standardisation: ``apply`` returns the features unchanged (as float32)."""
        return cls(np.zeros(n_mels, np.float32), np.ones(n_mels, np.float32))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> NormStats:
        return cls(
            np.asarray(state["mean"].cpu().numpy(), np.float32),
            np.asarray(state["std"].cpu().numpy(), np.float32),
        )


def compute_norm_stats(
    store: FeatureStore, ids: Sequence[str], max_videos: int = 0, seed: int = 0
) -> NormStats:
    """Per-band mean/std over every frame of ``ids`` (or of ``max_videos`` of them, chosen by
    ``seed``, when ``max_videos`` > 0: a few thousand videos pin the statistics down).

    Sums are accumulated in float64 so millions of frames do not lose precision.
    """
    ids = list(ids)
    if not ids:
        raise ValueError("no videos to compute normalisation statistics from")
    if 0 < max_videos < len(ids):
        rng = np.random.default_rng(seed)
        ids = [ids[i] for i in sorted(rng.choice(len(ids), max_videos, replace=False))]
    n = 0
    s = np.zeros(store.feature_dim, np.float64)
    s2 = np.zeros(store.feature_dim, np.float64)
    for vid in ids:
        x = np.asarray(store[vid], dtype=np.float64)
        n += len(x)
        s += x.sum(0)
        s2 += (x * x).sum(0)
    mean = s / n
    var = np.maximum(s2 / n - mean * mean, 0.0)
    # A constant band (e.g. above the audio's bandwidth) must not divide by zero.
    std = np.sqrt(var) + 1e-5
    return NormStats(mean.astype(np.float32), std.astype(np.float32))


def _window(
    store: FeatureStore,
    vid: str,
    start: int,
    length: int,
    short_clips: str,
    floor: float,
) -> np.ndarray:
    frames = store.frames(vid)
    if frames >= start + length:
        return np.asarray(store.window(vid, start, length))
    # Shorter than one window: pad per the policy.
    return pad_window(np.asarray(store[vid]), length, short_clips, floor)


class WindowDataset(Dataset[tuple[torch.Tensor, int, int]]):
    """Map-style dataset: ``ds[(video_pos, start)] -> (x (window, n_mels) float32, label, video_pos)``.

    Used with :class:`TrainWindowSampler` (random windows) or through :class:`EvalWindows`
    (every window). ``labels`` is aligned with ``ids``; -1 for unlabelled videos.
    """

    def __init__(
        self,
        store: FeatureStore,
        ids: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        norm: NormStats,
        window: int,
        short_clips: ShortClips = "repeat",
        raw: bool = False,
    ) -> None:
        if short_clips not in SHORT_CLIPS:
            raise ValueError(f"short_clips={short_clips!r} is not one of {SHORT_CLIPS}")
        self.store = store
        # raw: batches of __getitems__ keep the store's dtype, unstandardised (the trainer
        # standardises them on the GPU after a copy of half the bytes for a float16 store).
        self.raw = raw
        self.short_clips = short_clips
        # Padding with zeros means padding with what digital silence gives under the store's
        # front end (dB, offset log or normalised Kaldi log alike).
        self.floor = store.frontend.silence_value()
        self.ids = list(ids)
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self.ids):
            raise ValueError("labels must be aligned with ids")
        self.norm = norm
        self.window = window
        self.frames = store.frames_array(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int]:  # type: ignore[override]
        pos, start = int(item[0]), int(item[1])
        raw = _window(self.store, self.ids[pos], start, self.window, self.short_clips, self.floor)
        x = np.ascontiguousarray(raw) if self.raw else self.norm.apply(raw)
        return torch.from_numpy(x), int(self.labels[pos]), pos

    def __getitems__(self, items: Sequence[tuple[int, int]]) -> list[tuple[torch.Tensor, int, int]]:
        """A whole batch at once (the DataLoader calls this when present): the same samples as
        ``[self[i] for i in items]``, read with one gather (:meth:`FeatureStore.windows`) and
        normalised in one pass instead of a Python call chain per window."""
        arr = np.asarray(items, dtype=np.int64).reshape(-1, 2)
        pos, starts = arr[:, 0], arr[:, 1]
        x = np.empty((len(arr), self.window, self.store.feature_dim), dtype=self.store.dtype)
        fits = self.frames[pos] >= starts + self.window
        if fits.all():  # the usual batch: gather straight into x
            self.store.windows([self.ids[p] for p in pos], starts, self.window, out=x)
        elif fits.any():
            sel = np.flatnonzero(fits)
            x[sel] = self.store.windows([self.ids[p] for p in pos[sel]], starts[sel], self.window)
        for i in np.flatnonzero(~fits):  # shorter than a window: the one padding rule
            x[i] = _window(
                self.store,
                self.ids[pos[i]],
                int(starts[i]),
                self.window,
                self.short_clips,
                self.floor,
            )
        t = torch.from_numpy(x if self.raw else self.norm.apply(x))
        return [(t[i], int(self.labels[p]), int(p)) for i, p in enumerate(pos)]


class TrainWindowSampler(Sampler[tuple[int, int]]):
    """Random ``(video_pos, start)`` pairs: ``windows_per_video`` per video per epoch.

    Windows lie anywhere in the video (``0 <= start <= frames - window``).

    * ``balanced``: videos are drawn with replacement with probability inverse to their class
      size (every class equally often), instead of each video ``windows_per_video`` times.
    * Sharding: the epoch's global order is the same on every rank (seeded by seed and epoch);
      rank ``r`` takes items ``r, r + W, ...`` after truncating to a multiple of ``W`` so every
      rank runs the same number of steps.
    * Resume: ``set_epoch(e, skip=k)`` drops this rank's first ``k`` items.
    * Locality (``blocks``, one number per video, e.g. :meth:`FeatureStore.blocks`): the same
      items, reordered so the epoch walks a random sequence of groups of ``group`` blocks,
      each group's items in random order. A store larger than memory is then read about once
      per epoch, a group (``group`` x block size, e.g. 1 GB) at a time, from the page cache,
      instead of one cold random read per window. Class mix per batch: two items of a batch
      come from one block with probability about ``1 / group``, so even a class-sorted store
      raises the expected chi-square of a batch's class histogram only from ``C - 1``
      (random sampling) to about ``C - 1 + C (B - 1) / group`` (``C`` classes, batch ``B``).
    """

    def __init__(
        self,
        frames: np.ndarray,
        labels: np.ndarray | None = None,
        windows_per_video: int = 1,
        *,
        window: int,
        balanced: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        blocks: np.ndarray | None = None,
        group: int = 1024,
    ) -> None:
        self.frames = np.asarray(frames, dtype=np.int64)
        self.blocks = None if blocks is None else np.asarray(blocks, dtype=np.int64)
        if self.blocks is not None and len(self.blocks) != len(self.frames):
            raise ValueError("blocks must be aligned with frames")
        if group < 1:
            raise ValueError("group must be >= 1")
        self.group = group
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if balanced and self.labels is None:
            raise ValueError("balanced sampling needs labels")
        self.windows_per_video = windows_per_video
        self.window = window
        self.balanced = balanced
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip

    def total(self) -> int:
        """Items per epoch over all ranks (after truncation to a multiple of the world size)."""
        n = len(self.frames) * self.windows_per_video
        return n - n % self.world_size

    def __len__(self) -> int:
        return self.total() // self.world_size - self.skip

    def epoch_items(self) -> np.ndarray:
        """(items, 2) int64 array of (video_pos, start): this rank's full epoch, no skip."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n_videos = len(self.frames)
        n = n_videos * self.windows_per_video
        if self.balanced:
            assert self.labels is not None
            _, inverse, counts = np.unique(self.labels, return_inverse=True, return_counts=True)
            p = 1.0 / counts[inverse]
            vids = rng.choice(n_videos, size=n, replace=True, p=p / p.sum())
        else:
            vids = rng.permutation(np.repeat(np.arange(n_videos), self.windows_per_video))
        # Draw the window's centre uniformly over the video, then clip the window inside it:
        # uniform starts would cover the first and last frames only once in (T - 95) draws,
        # this covers every frame at least about half as often as a frame in the middle.
        t = self.frames[vids]
        centre = np.floor(rng.random(n) * t).astype(np.int64)
        starts = np.clip(centre - self.window // 2, 0, np.maximum(t - self.window, 0))
        items = np.stack([vids, starts], axis=1)
        if self.blocks is not None:
            # Number the blocks in a random order; group g holds blocks g*group ... A stable
            # sort by group keeps the random order of the items inside each group.
            _, block = np.unique(self.blocks, return_inverse=True)
            rank_of = np.empty(int(block.max()) + 1 if len(block) else 0, np.int64)
            rank_of[rng.permutation(len(rank_of))] = np.arange(len(rank_of))
            items = items[np.argsort(rank_of[block[vids]] // self.group, kind="stable")]
        items = items[: self.total()]
        return items[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        items = self.epoch_items()[self.skip :]
        return iter([(int(v), int(s)) for v, s in items])


def eval_windows(frames: np.ndarray, hop: int, window: int) -> np.ndarray:
    """Every window start of each video: (items, 2) int64 of (video_pos, start).

    Starts are ``0, hop, 2*hop, ...`` while the window fits; a video shorter than one window
    gets one (padded) window at 0, so no video is scored from nothing.
    """
    if hop < 1:
        raise ValueError("hop must be >= 1")
    out = []
    for pos, t in enumerate(np.asarray(frames, dtype=np.int64)):
        starts = np.arange(0, max(int(t) - window, 0) + 1, hop, dtype=np.int64)
        out.append(np.stack([np.full(len(starts), pos, np.int64), starts], axis=1))
    if not out:
        return np.zeros((0, 2), np.int64)
    return np.concatenate(out, axis=0)


class EvalWindows(Dataset[tuple[torch.Tensor, int, int]]):
    """Every window of every video: ``ds[i] -> (x (window, n_mels), label, video_pos)``."""

    def __init__(self, base: WindowDataset, hop: int) -> None:
        self.base = base
        self.items = eval_windows(base.frames, hop, base.window)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        v, s = self.items[i]
        return self.base[(int(v), int(s))]

    def __getitems__(self, idx: Sequence[int]) -> list[tuple[torch.Tensor, int, int]]:
        """A batch with one gather from the store (:meth:`WindowDataset.__getitems__`)."""
        return self.base.__getitems__([(int(v), int(s)) for v, s in (self.items[i] for i in idx)])


class WholeClips(Dataset[tuple[torch.Tensor, int, int]]):
    """One window per video, the whole clip: ``ds[i] -> (x (frames_i, n_mels), label, i)``.

    For models with global pooling (the PANNs networks were trained on 10 s clips); lengths
    differ between videos, so batches hold one video each.
    """

    def __init__(self, base: WindowDataset, min_frames: int = 1) -> None:
        self.base = base
        self.min_frames = min_frames

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        b = self.base
        raw = np.asarray(b.store[b.ids[i]])
        if len(raw) < self.min_frames:
            # A clip shorter than the training windows is padded as those were.
            raw = pad_window(raw, self.min_frames, b.short_clips, b.floor)
        x = b.norm.apply(raw)
        return torch.from_numpy(x), int(b.labels[i]), i
