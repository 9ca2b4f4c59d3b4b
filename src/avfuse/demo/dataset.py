"""The demo dataset: the plan of its files, their encoding with PyAV, and its generation.

:func:`generate_dataset` writes ``ROOT/{train,val,heldout}/CLASS/YTID_SSSSSS_EEEEEE.ext``
deterministically from a seed and records every file and its defect in ``demo_dataset.json``.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avfuse.demo.synth import render, synthesize_audio
from avfuse.io import atomic_write, read_json, write_json
from avfuse.parallel import batched, executor_context, map_batches
from avfuse.workdir import DATASET_INFO

SPLIT_CODES = {"train": 0, "val": 1, "heldout": 2}
# RMS level of the hiss on a muted track: the noise floor of a muted or badly gated upload.
HISS_DBFS = -90.0
# Short clips (0.3-0.9 s) and muted tracks are concentrated in this share of the classes, as in
# real data where some classes are short events and some uploads are mostly muted.
FEW_CLASSES_SHARE = 0.25
# Videos per class and split when no ``per_split`` is given.
_PER_SPLIT = {"train": 30, "val": 10, "heldout": 10}

# name, visual signature, sound signature. Order matters: a dataset with N classes uses the
# first N; a class's clip names and content seeds do not depend on N (containers and defects,
# assigned per split, may).
CATALOGUE: tuple[tuple[str, str, str], ...] = (
    ("playing trumpet", "brass", "brass_high"),
    ("playing trombone", "brass", "brass_low"),
    ("vacuuming floor", "vacuum", "engine"),
    ("mowing lawn", "lawn", "engine"),
    ("whistling", "face", "whistle"),
    ("singing", "face", "voice"),
    ("jogging", "outdoor_run", "footsteps"),
    ("running on treadmill", "treadmill", "footsteps"),
    ("drumming", "drums", "drums"),
    ("ringing bell", "bell", "bell"),
    ("dribbling basketball", "court", "bounce"),
    ("typing", "keyboard", "keys"),
)


# ----------------------------------------------------------------------------------------------
# Plan: which files, with which defects


@dataclass(frozen=True)
class VideoSpec:
    """One file of the demo dataset; everything needed to write it in a worker."""

    split: str
    label: str
    class_pos: int
    index: int
    name: str  # file name, YTID_SSSSSS_EEEEEE.ext
    container: str  # mp4 | webm | mkv
    vcodec: str
    acodec: str | None  # None: no audio track
    sample_rate: int
    channels: int
    duration: float
    defect: str  # "" | no_audio | short | silent | hiss | garbage | truncated
    seed: tuple[int, ...]
    size: int
    fps: int

    @property
    def rel(self) -> str:
        return f"{self.split}/{self.label}/{self.name}"


_YT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _youtube_name(rng: np.random.Generator) -> str:
    ytid = "".join(_YT_ALPHABET[i] for i in rng.integers(0, 64, 11))
    start = int(rng.integers(0, 300))
    return f"{ytid}_{start:06d}_{start + 10:06d}"


def few_classes(seed: int, classes: int, salt: int) -> set[int]:
    """Positions of the few classes (``FEW_CLASSES_SHARE``, at least one) a defect kind is in."""
    k = max(1, round(FEW_CLASSES_SHARE * classes))
    pick = np.random.default_rng([seed, 555, salt]).permutation(classes)[:k]
    return {int(c) for c in pick}


def plan_dataset(
    seed: int = 0,
    classes: int = 12,
    per_split: dict[str, int] | None = None,
    seconds: float = 3.5,
    size: int = 64,
    fps: int = 10,
    no_audio_fraction: float = 0.03,
    short_fraction: float = 0.03,
    unreadable: int = 2,
    muted_fraction: float = 0.0,
) -> list[VideoSpec]:
    """Every file of the dataset, deterministic in the arguments.

    ``per_split``: videos per class for each split (default train 30, val 10, heldout 10).
    Each split of ``n`` videos gets ``max(1, round(no_audio_fraction * n))`` videos without
    audio, ``max(1, round(short_fraction * n))`` short clips (0.3-0.9 s, with audio) and
    ``max(2, round(muted_fraction * n))`` muted tracks (alternately digital silence, ``silent``,
    and hiss at ``HISS_DBFS`` RMS, ``hiss``); short and muted clips lie in a few classes
    (:func:`few_classes`). ``unreadable`` training files are random bytes or a truncated mp4.
    """
    if not 1 <= classes <= len(CATALOGUE):
        raise ValueError(f"classes must be between 1 and {len(CATALOGUE)}, got {classes}")
    per_split = per_split if per_split is not None else dict(_PER_SPLIT)
    short_cls, muted_cls = few_classes(seed, classes, 1), few_classes(seed, classes, 2)
    specs: list[VideoSpec] = []
    ordinal = 0
    for split, n_per in per_split.items():
        if n_per <= 0:
            continue
        code = SPLIT_CODES.get(split, 10 + sum(map(ord, split)))
        slots = [(c, i) for c in range(classes) for i in range(n_per)]
        pick = np.random.default_rng([seed, code, 999]).permutation(len(slots)).tolist()
        n_def = len(slots)
        k_na = max(1, round(no_audio_fraction * n_def)) if no_audio_fraction > 0 else 0
        k_sh = max(1, round(short_fraction * n_def)) if short_fraction > 0 else 0
        k_un = unreadable if split == "train" else 0
        defects: dict[tuple[int, int], str] = {}
        order = iter(pick)
        for kind, k in (("garbage", min(k_un, 1)), ("truncated", k_un - min(k_un, 1))):
            for _ in range(k):
                defects[slots[next(order)]] = kind
        for _ in range(k_na):
            nxt = next(order, None)
            if nxt is not None:
                defects[slots[nxt]] = "no_audio"
        k_mu = max(2, round(muted_fraction * n_def)) if muted_fraction > 0 else 0
        muted = [("silent", "hiss")[j % 2] for j in range(k_mu)]
        for kinds, cls in ((["short"] * k_sh, short_cls), (muted, muted_cls)):
            free = [p for p in pick if slots[p] not in defects and slots[p][0] in cls]
            for kind, p in zip(kinds, free, strict=False):
                defects[slots[p]] = kind
        for c, i in slots:
            label = CATALOGUE[c][0]
            rng = np.random.default_rng([seed, code, c, i])
            stem = _youtube_name(rng)  # drawn first: independent of container and defects
            defect = defects.get((c, i), "")
            # A fixed rotation (not chance) so that even a small dataset holds every container.
            slot = ordinal % 10
            ordinal += 1
            if slot == 3:
                container, vcodec, acodec, rate = "webm", "libvpx", "libopus", 48000
            elif slot == 7:
                container, vcodec, acodec, rate = "mkv", "mpeg4", "vorbis", 44100
            else:
                container, vcodec, acodec = "mp4", "mpeg4" if slot == 5 else "libx264", "aac"
                rate = int(rng.choice([44100, 48000, 22050, 32000]))
            if defect in ("garbage", "truncated"):
                container, vcodec, acodec, rate = "mp4", "libx264", "aac", 44100
            channels = int(rng.choice([1, 1, 2]))
            if acodec == "vorbis":  # FFmpeg's own Vorbis encoder writes stereo only
                channels = 2
            if defect == "short":
                duration = float(rng.uniform(0.3, 0.9))
            else:
                duration = float(seconds + rng.uniform(-0.5, 0.5))
            specs.append(
                VideoSpec(
                    split=split,
                    label=label,
                    class_pos=c,
                    index=i,
                    name=f"{stem}.{container}",
                    container=container,
                    vcodec=vcodec,
                    acodec=None if defect == "no_audio" else acodec,
                    sample_rate=rate,
                    channels=channels,
                    duration=round(duration, 3),
                    defect=defect,
                    seed=(seed, code, c, i, 1),
                    size=size,
                    fps=fps,
                )
            )
    return specs


# ----------------------------------------------------------------------------------------------
# Writing files


def _encode(path: Path, spec: VideoSpec, frames: np.ndarray, audio: np.ndarray | None) -> None:
    """Write ``frames (T, H, W, 3) uint8`` and ``audio (channels, samples)`` float32 with PyAV."""
    import av

    with av.open(
        str(path), "w", format={"mkv": "matroska"}.get(spec.container, spec.container)
    ) as out:
        vs: Any = out.add_stream(spec.vcodec, rate=spec.fps)
        vs.width = vs.height = spec.size
        vs.pix_fmt = "yuv420p"
        # One thread: generation is parallel over processes already, and the output is then
        # identical from run to run.
        vs.codec_context.thread_count = 1
        if spec.vcodec == "libx264":
            vs.codec_context.options = {
                "preset": "veryfast",
                # mbtree off: with it, x264 output was seen to vary between identical runs.
                "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:mbtree=0",
            }
        ast: Any = None
        if audio is not None and spec.acodec:
            ast = out.add_stream(spec.acodec, rate=spec.sample_rate)
            ast.layout = "stereo" if spec.channels == 2 else "mono"
            if spec.acodec == "vorbis":  # FFmpeg's own Vorbis encoder is flagged experimental
                ast.codec_context.options = {"strict": "experimental"}
            elif spec.acodec == "aac":  # 5-7x faster than the default "twoloop" search
                ast.codec_context.options = {"aac_coder": "fast"}
        blk, a_pos = 1024, 0
        n_audio = 0 if audio is None else audio.shape[1]
        for i, img in enumerate(frames):
            # Converted here, not by the encoder's implicit conversion: with that, x264 output
            # was seen to vary from run to run.
            vf = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            vf.pts = i
            out.mux(vs.encode(vf))
            # Interleave audio up to the end of this frame, as a camera would.
            while (
                ast is not None
                and audio is not None
                and a_pos < n_audio
                and a_pos <= (i + 1) * spec.sample_rate / spec.fps
            ):
                chunk = np.ascontiguousarray(audio[:, a_pos : a_pos + blk])
                af = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=ast.layout.name)
                af.sample_rate = spec.sample_rate
                af.pts = a_pos
                out.mux(ast.encode(af))
                a_pos += blk
        out.mux(vs.encode(None))
        if ast is not None:
            out.mux(ast.encode(None))


def write_video(spec: VideoSpec, root: Path) -> Path:
    """Render, synthesise and encode one file of the dataset (atomically). Returns its path."""
    path = root / spec.rel
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(list(spec.seed))
    if spec.defect == "garbage":
        with atomic_write(path) as tmp:
            tmp.write_bytes(rng.integers(0, 256, 30_000, dtype=np.uint8).tobytes())
        return path
    _, visual, sound = CATALOGUE[spec.class_pos]
    n_frames = max(1, round(spec.duration * spec.fps))
    frames = render(visual, rng, n_frames, spec.fps, spec.size)
    audio = None
    if spec.acodec is not None:
        n = round(n_frames / spec.fps * spec.sample_rate)
        mono = synthesize_audio(sound, rng, n, spec.sample_rate)
        if spec.defect == "silent":  # a muted upload: the track is there, its samples are zero
            mono = np.zeros(n, np.float32)
        elif spec.defect == "hiss":  # nothing but a noise floor at HISS_DBFS RMS
            noise = rng.standard_normal(n)
            mono = (noise / np.sqrt(np.mean(noise**2)) * 10 ** (HISS_DBFS / 20)).astype(np.float32)
        if spec.channels == 2:  # a slightly different mix per side, as a real stereo recording
            g = rng.uniform(0.7, 1.0, 2)[:, None].astype(np.float32)
            audio = mono[None, :] * g
        else:
            audio = mono[None, :]
    with atomic_write(path) as tmp:
        _encode(tmp, spec, frames, audio)
        if spec.defect == "truncated":
            # The mp4 index (moov) is written last: cutting the file leaves it undecodable.
            data = tmp.read_bytes()
            tmp.write_bytes(data[: len(data) * 2 // 5])
    return path


def _write_batch(batch: list[tuple[VideoSpec, str]]) -> list[str]:
    return [str(write_video(spec, Path(root))) for spec, root in batch]


@dataclass
class DatasetInfo:
    root: Path
    specs: list[VideoSpec]
    generated: int  # files written by this call (0 when an existing dataset was reused)
    settings: dict[str, Any] = field(default_factory=dict)  # as recorded in demo_dataset.json

    def count(self, defect: str, split: str | None = None) -> int:
        return sum(1 for s in self.specs if s.defect == defect and split in (None, s.split))

    def summary(self) -> str:
        splits = sorted({s.split for s in self.specs}, key=lambda x: SPLIT_CODES.get(x, 9))
        per = ", ".join(f"{sp} {sum(s.split == sp for s in self.specs)}" for sp in splits)
        defects = ", ".join(
            f"{d} {self.count(d)}"
            for d in ("no_audio", "short", "silent", "hiss", "garbage", "truncated")
        )
        n_cls = len({s.label for s in self.specs})
        return f"demo dataset {self.root}: {n_cls} classes; videos: {per}; defects: {defects}"


def generate_dataset(
    root: str | Path,
    seed: int = 0,
    classes: int = 12,
    per_split: dict[str, int] | None = None,
    seconds: float = 3.5,
    size: int = 64,
    fps: int = 10,
    no_audio_fraction: float = 0.03,
    short_fraction: float = 0.03,
    unreadable: int = 2,
    muted_fraction: float = 0.0,
    executor: Executor | None = None,
    num_workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> DatasetInfo:
    """Write the demo dataset under ``root`` (see :mod:`avfuse.demo`).

    Deterministic: the same arguments give the same files (same names, same decoded audio).
    Skipped when ``root/demo_dataset.json`` records the same arguments and every file exists;
    files left by a killed run are finished, not rewritten.
    """
    root = Path(root)
    plan: dict[str, Any] = {
        "seed": seed,
        "classes": classes,
        "per_split": per_split,
        "seconds": seconds,
        "size": size,
        "fps": fps,
        "no_audio_fraction": no_audio_fraction,
        "short_fraction": short_fraction,
        "unreadable": unreadable,
        "muted_fraction": muted_fraction,
    }
    specs = plan_dataset(**plan)
    # What demo_dataset.json records: the plan (its default split sizes spelled out).
    settings = {
        **plan,
        "per_split": per_split or dict(_PER_SPLIT),
        "generator": 8,  # bump when the generator's output changes
    }
    info_path = root / DATASET_INFO
    old = None
    if info_path.exists() and not force:
        old = read_json(info_path)
        if old.get("settings") != settings:
            raise ValueError(
                f"{root} holds a demo dataset made with other settings ({old.get('settings')}); "
                "use another folder or force (avfuse demo --force)"
            )
    elif force and info_path.exists():
        shutil.rmtree(root)  # only a folder the generator made (it holds demo_dataset.json)
    todo = [s for s in specs if not (root / s.rel).exists()]
    if todo:
        batches = batched([(s, str(root)) for s in todo], 8)
        with executor_context(executor, num_workers) as ex:
            for _ in map_batches(_write_batch, batches, ex, desc="generate", progress=progress):
                pass
    files = [
        {"video": s.rel, "defect": s.defect, "audio": s.acodec or "", "duration": s.duration}
        for s in specs
    ]
    info = {"settings": settings, "files": files}
    if todo or old != info:
        write_json(info_path, info)
    return DatasetInfo(root, specs, len(todo), settings)
