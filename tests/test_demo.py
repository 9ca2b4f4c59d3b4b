"""The demo dataset generator and the stand-in video model, checked by decoding with PyAV."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import av
import numpy as np
import pytest

from avfuse import demo
from avfuse.io import read_json
from avfuse.workdir import DATASET_INFO

SPLITS = {"train": 3, "val": 2}


def _decode_audio(path: Path) -> tuple[np.ndarray, int, str]:
    """All audio of a file as (channels, samples) float32, its rate and codec name."""
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        rate, codec = stream.rate, stream.codec_context.name
        chunks = []
        for frame in c.decode(stream):
            a = frame.to_ndarray()
            if not frame.format.is_planar:  # packed: (1, samples * channels)
                a = a.reshape(-1, len(frame.layout.channels)).T
            chunks.append(a.astype(np.float32))
    return np.concatenate(chunks, axis=1), rate, codec


def _decode_video(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> demo.DatasetInfo:
    root = tmp_path_factory.mktemp("demo") / "data"
    return demo.generate_dataset(
        root,
        seed=3,
        classes=4,
        per_split=SPLITS,
        muted_fraction=0.1,
        num_workers=0,
        progress=False,
    )


def test_plan_is_deterministic_and_seed_dependent() -> None:
    a = demo.plan_dataset(seed=1, classes=4, per_split=SPLITS)
    b = demo.plan_dataset(seed=1, classes=4, per_split=SPLITS)
    c = demo.plan_dataset(seed=2, classes=4, per_split=SPLITS)
    assert a == b
    assert [s.rel for s in a] != [s.rel for s in c]
    # A class's clip names and content seeds do not depend on how many classes there are.
    more = demo.plan_dataset(seed=1, classes=6, per_split=SPLITS)
    first = {(s.split, s.label, s.index): s for s in more}
    for s in a:
        other = first[(s.split, s.label, s.index)]
        assert (Path(other.name).stem, other.seed) == (Path(s.name).stem, s.seed)


def test_layout_sizes_and_names(dataset: demo.DatasetInfo) -> None:
    root = dataset.root
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.*") if p.parent != root)
    assert files == sorted(s.rel for s in dataset.specs)
    assert len(files) == 4 * (3 + 2)
    labels = {p.split("/")[1] for p in files}
    assert labels == {name for name, _, _ in demo.CATALOGUE[:4]}
    for rel in files:
        stem = Path(rel).stem  # Kinetics-style YTID_SSSSSS_EEEEEE
        ytid, start, end = stem[:11], stem[12:18], stem[19:]
        assert len(stem) == 25 and int(end) - int(start) == 10, rel
        assert all(ch.isalnum() or ch in "-_" for ch in ytid)


def test_same_seed_same_files_and_audio(tmp_path: Path) -> None:
    kw = {"seed": 5, "classes": 2, "per_split": {"val": 5}, "num_workers": 0, "progress": False}
    one = demo.generate_dataset(tmp_path / "one", **kw)  # type: ignore[arg-type]
    two = demo.generate_dataset(tmp_path / "two", **kw)  # type: ignore[arg-type]
    files = sorted(p.relative_to(one.root).as_posix() for p in one.root.rglob("*.*"))
    assert files == sorted(p.relative_to(two.root).as_posix() for p in two.root.rglob("*.*"))
    compared = 0
    for s in one.specs:
        # Pictures too (Matroska files carry a random segment id, so bytes may differ).
        np.testing.assert_array_equal(
            _decode_video(one.root / s.rel), _decode_video(two.root / s.rel)
        )
        if s.acodec is None:
            continue
        x, rate_x, _ = _decode_audio(one.root / s.rel)
        y, rate_y, _ = _decode_audio(two.root / s.rel)
        assert rate_x == rate_y == s.sample_rate
        np.testing.assert_array_equal(x, y)
        compared += 1
    assert compared >= 4


def test_second_call_reuses_and_other_settings_refuse(dataset: demo.DatasetInfo) -> None:
    again = demo.generate_dataset(
        dataset.root,
        seed=3,
        classes=4,
        per_split=SPLITS,
        muted_fraction=0.1,
        num_workers=0,
        progress=False,
    )
    assert again.generated == 0
    # The settings it reports are the ones recorded next to the files (the demo's video-model
    # stamp compares against them).
    assert again.settings == read_json(dataset.root / DATASET_INFO)["settings"]
    assert again.settings["per_split"] == SPLITS and again.settings["seed"] == 3
    with pytest.raises(ValueError, match="other settings"):
        demo.generate_dataset(dataset.root, seed=4, classes=4, per_split=SPLITS, num_workers=0)


def test_defects_are_real(dataset: demo.DatasetInfo) -> None:
    by_defect: dict[str, list[demo.VideoSpec]] = {}
    for s in dataset.specs:
        by_defect.setdefault(s.defect, []).append(s)
    assert {"no_audio", "short", "garbage", "truncated", ""} <= set(by_defect)
    # At least one of each per split for the kinds every split has.
    for split in SPLITS:
        assert any(s.split == split for s in by_defect["no_audio"])
        assert any(s.split == split for s in by_defect["short"])

    for s in by_defect["no_audio"]:
        with av.open(str(dataset.root / s.rel)) as c:
            assert len(c.streams.audio) == 0
            assert len(c.streams.video) == 1
            assert sum(1 for _ in c.decode(video=0)) >= 1
    for s in by_defect["garbage"] + by_defect["truncated"]:
        with (
            pytest.raises((av.error.FFmpegError, ValueError, IndexError)),
            av.open(str(dataset.root / s.rel)) as c,
        ):
            for _ in c.decode(c.streams.audio[0]):
                pass
    for s in by_defect["short"]:
        x, rate, _ = _decode_audio(dataset.root / s.rel)
        assert 0.25 <= x.shape[1] / rate < 1.0
    for s in by_defect[""]:
        x, rate, _ = _decode_audio(dataset.root / s.rel)
        assert 2.9 <= x.shape[1] / rate <= 4.2
        assert x.shape[0] == s.channels
        assert 0.01 < np.abs(x).max() <= 1.0


def test_containers_and_codecs(dataset: demo.DatasetInfo) -> None:
    seen = set()
    for s in dataset.specs:
        if s.defect in ("garbage", "truncated", "no_audio"):
            continue
        _, _, codec = _decode_audio(dataset.root / s.rel)
        with av.open(str(dataset.root / s.rel)) as c:
            vcodec = c.streams.video[0].codec_context.name
        seen.add((Path(s.rel).suffix, vcodec, codec))
    assert (".mp4", "h264", "aac") in seen
    assert (".webm", "vp8", "opus") in seen
    assert (".mkv", "mpeg4", "vorbis") in seen


def _band_profile(x: np.ndarray, sr: int) -> np.ndarray:
    """Log energy in 24 log-spaced bands, 50 Hz-7 kHz (plain FFT, independent of avfuse)."""
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / sr)
    edges = np.geomspace(50, 7000, 25)
    e = np.array([spec[(f >= lo) & (f < hi)].sum() for lo, hi in itertools.pairwise(edges)])
    e = np.log(e + 1e-9)
    return e - e.mean()


def test_sound_signatures_differ_and_sound_alike_pairs_match() -> None:
    sr, n = 16000, 16000 * 3
    sounds = {name: sound for name, _, sound in demo.CATALOGUE}
    profiles = {
        name: np.stack(
            [
                _band_profile(
                    demo.synthesize_audio(sound, np.random.default_rng([k, 7]), n, sr), sr
                )
                for k in range(4)
            ]
        )
        for name, sound in sounds.items()
    }
    centroid = {k: v.mean(axis=0) for k, v in profiles.items()}
    spread = np.mean([np.linalg.norm(v - v.mean(axis=0), axis=1).mean() for v in profiles.values()])

    def dist(a: str, b: str) -> float:
        return float(np.linalg.norm(centroid[a] - centroid[b]))

    # Pairs that look alike must sound clearly different ...
    assert dist("playing trumpet", "playing trombone") > 2 * spread
    assert dist("whistling", "singing") > 2 * spread
    # ... pairs that sound alike must be closer than any two different-sounding classes.
    alike = max(dist("vacuuming floor", "mowing lawn"), dist("jogging", "running on treadmill"))
    names = list(sounds)
    different = min(
        dist(a, b) for i, a in enumerate(names) for b in names[i + 1 :] if sounds[a] != sounds[b]
    )
    assert alike < 0.5 * different
    # Whistling is a tone between 1 and 2.8 kHz; the trombone sits low.
    w = demo.synthesize_audio("whistle", np.random.default_rng(0), n, sr)
    spec = np.abs(np.fft.rfft(w))
    peak = np.fft.rfftfreq(n, 1 / sr)[np.argmax(spec)]
    assert 1000 <= peak <= 2800
    t = demo.synth._synth("brass_low", np.random.default_rng(0), n, sr)  # without background
    ts = np.abs(np.fft.rfft(t)) ** 2
    f = np.fft.rfftfreq(n, 1 / sr)
    assert ts[f < 1000].sum() > 0.8 * ts.sum()


def test_look_alike_pairs_share_their_picture() -> None:
    def mean_frame(label_pos: int, k: int) -> np.ndarray:
        visual = demo.CATALOGUE[label_pos][1]
        return demo.render(visual, np.random.default_rng([k, 5]), 10, 10, 32).mean(axis=0)

    trumpet = np.mean([mean_frame(0, k) for k in range(4)], axis=0)
    trombone = np.mean([mean_frame(1, k) for k in range(4)], axis=0)
    vacuum = np.mean([mean_frame(2, k) for k in range(4)], axis=0)
    same = np.abs(trumpet - trombone).mean()
    other = np.abs(trumpet - vacuum).mean()
    assert same < 0.25 * other


def test_fit_logistic_learns_a_separable_problem() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 5))
    y = np.repeat(np.arange(3), 40)
    x = centres[y] + rng.normal(0, 0.5, (120, 5))
    model = demo.fit_logistic(x, y, ["a", "b", "c"])
    assert (model.logits(x).argmax(axis=1) == y).mean() == 1.0
    # Softmax of the logits is a distribution and the true class dominates.
    z = model.logits(centres)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    assert np.all(np.diag(p) > 0.9)


def test_video_baseline_scores_file(dataset: demo.DatasetInfo, tmp_path: Path) -> None:
    from avfuse.video_scores import normalize_id, read_video_scores

    res = demo.train_video_baseline(
        dataset.root, tmp_path / "vb", score_splits=("val",), num_workers=0, progress=False
    )
    # Both unreadable training files are reported, nothing else.
    broken = {
        s.rel.rsplit(".", 1)[0] for s in dataset.specs if s.defect in ("garbage", "truncated")
    }
    assert set(res.failed) == broken
    path = res.score_files["val"]
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    classes = sorted({s.label for s in dataset.specs})
    assert header == ["filename", *classes]
    val = [s for s in dataset.specs if s.split == "val"]
    assert sorted(r[0] for r in body) == sorted(Path(s.rel).name for s in val)
    # The reported accuracy is the CSV's argmax against the folder labels.
    label_of = {Path(s.rel).name: s.label for s in val}
    hits = [classes[int(np.argmax([float(v) for v in r[1:]]))] == label_of[r[0]] for r in body]
    assert res.accuracy["val"] == pytest.approx(np.mean(hits))
    # The fusion stage's reader takes it as is, with ids that match manifest video ids.
    vs = read_video_scores([path])
    assert vs.classes == classes
    assert {normalize_id(i) for i in vs.ids} == {normalize_id(s.rel) for s in val}


def test_video_features_shape_and_motion(tmp_path: Path) -> None:
    spec = demo.plan_dataset(
        seed=0, classes=1, per_split={"val": 1}, short_fraction=0, no_audio_fraction=0
    )[0]
    path = demo.write_video(spec, tmp_path)
    f = demo.video_features(path)
    grid = demo.GRID * demo.GRID
    assert f.shape == (grid * 3 + grid + 3 * demo.HIST_BINS,)
    hist = f[grid * 4 :].reshape(3, demo.HIST_BINS)
    np.testing.assert_allclose(hist.sum(axis=1), 1.0, atol=1e-5)
    assert f[grid * 3 : grid * 4].max() > 0  # the instrument sways: some motion


def _dbfs(x: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return 20 * np.log10(rms) if rms > 0 else -np.inf


def test_short_clips_and_muted_tracks(dataset: demo.DatasetInfo) -> None:
    by_defect: dict[str, list[demo.VideoSpec]] = {}
    for s in dataset.specs:
        by_defect.setdefault(s.defect, []).append(s)
    # Every split has short clips and both kinds of muted track, each kind in one class of 4.
    for kind in ("short", "silent", "hiss"):
        assert {s.split for s in by_defect[kind]} == set(SPLITS), kind
        assert len({s.label for s in by_defect[kind]}) == 1, kind
    for s in by_defect["short"]:
        assert 0.3 <= s.duration <= 0.9 and s.acodec is not None
        with av.open(str(dataset.root / s.rel)) as c:
            assert len(c.streams.audio) == 1
    for s in by_defect["silent"] + by_defect["hiss"]:
        x, rate, _ = _decode_audio(dataset.root / s.rel)
        assert 2.9 <= x.shape[1] / rate <= 4.2  # full-length clips: only the sound is missing
        if s.defect == "silent":  # digital silence decodes to exact zeros
            assert not np.any(x)
        else:  # hiss at -90 dBFS RMS (stereo sides 0-3 dB lower), no louder peaks
            assert -95.0 <= _dbfs(x) <= -87.0, s.rel
            assert 0 < np.abs(x).max() < 10 ** (-60 / 20)
    # The ordinary clips are far louder than the hiss.
    loud = [_dbfs(_decode_audio(dataset.root / s.rel)[0]) for s in by_defect[""][:4]]
    assert min(loud) > -45.0
    # demo_dataset.json records every file's defect, as the files are.
    info = read_json(dataset.root / DATASET_INFO)
    recorded = {f["video"]: f["defect"] for f in info["files"]}
    assert recorded == {s.rel: s.defect for s in dataset.specs}
    assert all((dataset.root / rel).is_file() for rel in recorded)
    assert info["settings"]["muted_fraction"] == 0.1
    assert "silent 2, hiss 2" in dataset.summary()


def test_demo_plan_counts() -> None:
    """The demo's default dataset: 5 % short clips and 3 % muted tracks per split."""
    cfg = demo.DemoConfig()
    specs = demo.plan_dataset(
        seed=cfg.seed,
        classes=cfg.classes,
        per_split={"train": 30, "val": 10, "heldout": 10},
        short_fraction=cfg.short_fraction,
        muted_fraction=cfg.muted_fraction,
    )
    count: dict[tuple[str, str], int] = {}
    for s in specs:
        count[(s.split, s.defect)] = count.get((s.split, s.defect), 0) + 1
    # 360 train videos: 18 short, 11 muted (6 silent, 5 hiss); 120 val or heldout: 6 and 4.
    assert (count[("train", "short")], count[("val", "short")], count[("heldout", "short")]) == (
        18,
        6,
        6,
    )
    assert [count[("train", k)] for k in ("silent", "hiss")] == [6, 5]
    assert [count[(sp, k)] for sp in ("val", "heldout") for k in ("silent", "hiss")] == [2] * 4
    # Each kind in a few classes: 3 of the 12.
    assert len({s.label for s in specs if s.defect == "short"}) == 3
    assert len({s.label for s in specs if s.defect in ("silent", "hiss")}) == 3
    assert all(0.3 <= s.duration <= 0.9 for s in specs if s.defect == "short")


def test_demo_refuses_an_odd_frame_size_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from avfuse.cli import main

    assert main(["demo", "-o", str(tmp_path / "w"), "--size", "17", "--classes", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "size" in err[0] and "even" in err[0], err


def test_demo_force_cleans_only_a_folder_a_scan_wrote(tmp_path: Path) -> None:
    from avfuse.demo.runner import _clean_work

    theirs = tmp_path / "home"
    (theirs / "audio").mkdir(parents=True)
    (theirs / "audio" / "song.flac").write_bytes(b"fLaC")
    (theirs / "report.md").write_text("my report", "utf-8")
    _clean_work(theirs)
    assert (theirs / "audio" / "song.flac").read_bytes() == b"fLaC"
    assert (theirs / "report.md").read_text("utf-8") == "my report"
    (theirs / "manifest.parquet").touch()  # a work folder: its outputs are the demo's to redo
    _clean_work(theirs)
    assert not (theirs / "audio").exists() and not (theirs / "report.md").exists()
