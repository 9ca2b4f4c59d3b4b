"""Hostile inputs that aim at memory or at silently wrong numbers: every reader bounds what it
allocates from a declared size before allocating, and no number read from a user is NaN,
infinite or a boolean in disguise. Each refusal is one line naming the file."""

from __future__ import annotations

import dataclasses
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from avfuse import cli
from avfuse.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from avfuse.config import apply_overrides, read_mapping
from avfuse.data import NormStats
from avfuse.io import write_table
from avfuse.model_config import TrainConfig
from avfuse.models import build_model, load_init
from avfuse.predict import PredictConfig, predict
from avfuse.safe_pickle import CorruptCheckpointError, OversizeError, load_pickle, load_torch
from avfuse.scores import ScoreFile
from avfuse.store import FeatureStore, ShardWriter, commit_index
from avfuse.video_scores import ScoreBounds, VideoScoreError, read_one
from tests.checkpoints import make_checkpoint
from tests.synthetic import make_synthetic_work


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --------------------------------------------------------------------------- config files

_YAML_BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("bomb.yaml", _YAML_BOMB, "aliases"),
        ("tag.yaml", 'work: !!python/object/apply:os.system ["true"]\n', "python/object"),
        ("tag2.yaml", "work: !!python/name:os.system\n", "python/name"),
        ("deep.json", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper"),
        ("deep2.json", '{"a": ' + "[" * 500 + "]" * 500 + "}", "nested deeper"),
        ("deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper"),
        ("deep.toml", "a = " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper"),
        ("bin.toml", "work = '\xff'", "not"),
    ],
)
def test_hostile_config_files_are_one_line_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, says: str
) -> None:
    path = tmp_path / name
    if name == "bin.toml":
        path.write_bytes(b"work = '\xff'\n")
    else:
        path.write_text(text, "utf-8")
    with pytest.raises(ValueError, match=says) as info:
        read_mapping(path)
    assert str(path) in str(info.value)
    assert cli.main(["train", str(tmp_path / "w"), "--config", str(path)]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and says in line


def test_oversized_config_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_text("# " + "x" * (5 << 20) + "\n", "utf-8")
    with pytest.raises(ValueError, match="MiB"):
        read_mapping(path)


def test_yaml_anchor_without_alias_and_plain_yaml_still_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("work: w\ntrain: &t {epochs: 3}\n", "utf-8")
    assert read_mapping(path) == {"work": "w", "train": {"epochs": 3}}


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("lr=nan", "lr: nan is not a finite number"),
        ("lr=inf", "lr: inf is not a finite number"),
        ("weight_decay=-inf", "weight_decay: -inf is not a finite number"),
        ("epochs=true", "epochs: True is not an integer"),
        ("lr=true", "lr: True is not a number"),
        ("width=0", "width: 0.0 is out of range"),
        ("width=-1", "width: -1.0 is out of range"),
        ("window=1000000000", "window: 1000000000 is out of range"),
        ('epochs="3"', None),
    ],
)
def test_non_finite_boolean_and_absurd_numbers_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, says: str | None
) -> None:
    (tmp_path / "w").mkdir()
    rc = cli.main(["train", str(tmp_path / "w"), "--set", override])
    line = _one_error_line(capsys)
    if says is None:  # a number written as text is still that number: fails later, on WORK
        assert "epochs" not in line and "not an avfuse work folder" in line
        return
    assert rc == 2
    assert says in line


def test_non_finite_number_in_a_config_file_and_direct_construction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"work = '{tmp_path / 'w'}'\ntolerance = nan\n", "utf-8")
    assert cli.main(["fuse", "--config", str(path), "--video-scores", "v.npz"]) == 2
    assert "tolerance: nan is not a finite number" in _one_error_line(capsys)
    with pytest.raises(ValueError, match="dropout: nan is not a finite"):
        TrainConfig(work=Path("w"), dropout=float("nan"))
    with pytest.raises(ValueError, match="epochs: True is a boolean"):
        TrainConfig(work=Path("w"), epochs=True)


def test_config_file_need_not_repeat_work_given_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("epochs = 5\n", "utf-8")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "manifest.parquet").touch()  # a work folder, its store not yet built
    assert cli.main(["train", str(tmp_path / "w"), "--config", str(path)]) == 2
    line = _one_error_line(capsys)
    assert "missing required" not in line and "feature store" in line
    assert cli.main(["train", "--config", str(path)]) == 2
    assert "missing required key(s) for TrainConfig: work" in _one_error_line(capsys)


# --------------------------------------------------------------------------- pickles


class _Call:
    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.fn, self.args)


def _legacy_blob(numel_bytes: bytes) -> bytes:
    """A tensor storage as a plain pickle carries it (legacy torch.save) declaring the element
    count given (pickle opcode bytes) for a 3-element float storage."""
    buf = io.BytesIO()
    torch.save(torch.zeros(3).untyped_storage(), buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    real = b"cpuq\x03K\x0c"  # untyped storage: 12 bytes
    assert raw.count(real) == 1
    return raw.replace(real, b"cpuq\x03" + numel_bytes)


def test_pickled_array_constructor_cannot_allocate_beyond_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pkl"
    recon = np._core.multiarray._reconstruct  # type: ignore[attr-defined]
    path.write_bytes(pickle.dumps([_Call(recon, np.ndarray, (1 << 40,), b"b")]))
    with pytest.raises(OversizeError, match="declared with no data") as info:
        load_pickle(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_pickled_legacy_storage_declaring_more_than_it_holds_is_refused(tmp_path: Path) -> None:
    # 2^38 bytes declared by LONG1 (5 bytes), 12 bytes held.
    blob = _legacy_blob(b"\x8a\x05\x00\x00\x00\x00\x40")
    path = tmp_path / "bomb.pkl"
    path.write_bytes(pickle.dumps([_Call(torch.storage._load_from_bytes, blob)]))
    with pytest.raises(OversizeError, match="declares 274877906944 bytes") as info:
        load_pickle(path)
    assert str(path) in str(info.value)
    # the same record, honest, still loads
    path.write_bytes(pickle.dumps([torch.arange(3.0)]))
    assert torch.equal(load_pickle(path)[0], torch.arange(3.0))


def test_shared_references_cannot_expand_beyond_the_file(tmp_path: Path) -> None:
    row = [0.5] * 1000
    block = [row] * 1000  # a thousand references to one list: a few KB pickled
    path = tmp_path / "laughs.pkl"
    path.write_bytes(pickle.dumps([block] * 1000, protocol=4))
    assert path.stat().st_size < 20_000
    with pytest.raises(OversizeError, match="shared references"):
        load_pickle(path)
    with pytest.raises(VideoScoreError, match="shared references"):
        read_one(path, ids_file=tmp_path / "ids.txt")


def test_deeply_nested_pickle_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "deep.pkl"
    n = 100_000
    path.write_bytes(b"\x80\x02" + b"(" * n + b"l" * n + b".")
    with pytest.raises(OversizeError, match="nested deeper than") as info:
        load_pickle(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- checkpoints


def _checkpoint(**change: Any) -> dict[str, Any]:
    """A checkpoint file's dict with entries changed as a damaged or hostile file would."""
    return make_checkpoint(spec=ModelSpec("resnet", 1.0, 0.3, 4, 8)).to_state() | change


def test_checkpoint_zip_with_compressed_records_is_refused_before_loading(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(_checkpoint(), good)
    # Re-pack: the weights record grows to 64 MB of zeros, deflated to ~64 KB.
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data/0"):
                data = data + bytes(64 << 20)
            dst.writestr(info.filename, data)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(OversizeError, match="declare") as info:
        load_checkpoint(bomb)
    assert str(bomb) in str(info.value)
    assert load_checkpoint(good).classes == ("a", "b")


def test_legacy_checkpoint_declaring_huge_storage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    real = b"cpuq\x06K\x03N"
    assert raw.count(real) == 1
    path.write_bytes(raw.replace(real, b"cpuq\x06\x8a\x05\x00\x00\x00\x00\x40N"))
    with pytest.raises(OversizeError, match="bytes in a"):
        load_torch(path)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"window": 10**9}, "window (1000000000; must be 1 to 65536)"),
        ({"window": True}, "window (True"),
        ({"model_spec": {"name": "resnet", "width": 1e6, "dropout": 0.1}}, "model_spec.width"),
        ({"model_spec": {"name": "resnet", "width": 0.0, "dropout": 0.1}}, "model_spec.width"),
        (
            {"model_spec": {"name": "resnet", "width": 1, "dropout": 0, "n_mels": 10**9}},
            "model_spec.n_mels",
        ),
        ({"norm": {"mean": torch.zeros(4), "std": torch.tensor([1.0, 0.0, 1, 1])}}, "norm.std"),
        ({"norm": {"mean": torch.zeros(4), "std": -torch.ones(4)}}, "norm.std"),
    ],
)
def test_absurd_checkpoint_values_are_refused(
    tmp_path: Path, change: dict[str, Any], says: str
) -> None:
    path = tmp_path / "c.pt"
    torch.save(_checkpoint(**change), path)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    assert says in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["model", "norm"])
def test_non_finite_checkpoint_tensors_are_refused(tmp_path: Path, bad: float, where: str) -> None:
    w = torch.ones(2, 3)
    std = torch.ones(4)
    (w if where == "model" else std)[1, ...] = bad
    path = tmp_path / "c.pt"
    torch.save(_checkpoint(model={"fc.weight": w}, norm={"mean": torch.zeros(4), "std": std}), path)
    with pytest.raises(CorruptCheckpointError, match="NaN or infinite") as info:
        load_checkpoint(path)
    assert ("fc.weight" if where == "model" else "norm.std") in str(info.value)


def test_init_with_a_nan_weight_is_refused_naming_the_file(tmp_path: Path) -> None:
    model = build_model("resnet", 3, 0.25)
    state = model.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name][0] = float("nan")
    path = tmp_path / "init.pt"
    torch.save(state, path)
    with pytest.raises(CorruptCheckpointError, match=f"tensor {name} holds NaN") as info:
        load_init(build_model("resnet", 3, 0.25), path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- score files


def _npy_header_only(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """An .npy stream declaring ``shape`` followed by a few bytes: what a compressed bomb's
    first kilobyte looks like (its zeros need not be written for the header to be read)."""
    buf = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + bytes(64)


@pytest.mark.parametrize(
    ("shape", "bounds", "says"),
    [
        ((1 << 20, 400), ScoreBounds.for_dataset(100, 400), "rows"),
        ((50, 1 << 20), ScoreBounds.for_dataset(100, 400), "columns"),
        ((10, 1 << 20), ScoreBounds(), "columns"),
    ],
)
@pytest.mark.parametrize("kind", ["npz", "npy"])
def test_score_arrays_are_bounded_from_their_header(
    tmp_path: Path, shape: tuple[int, int], bounds: ScoreBounds, says: str, kind: str
) -> None:
    path = tmp_path / f"scores.{kind}"
    if kind == "npz":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("ids.npy", _npy_header_only((shape[0],), "<U8"))
            zf.writestr("scores.npy", _npy_header_only(shape))
    else:
        path.write_bytes(_npy_header_only(shape))
    with pytest.raises(VideoScoreError, match=f"declares shape .*{says}") as info:
        read_one(path, ids_file=tmp_path / "ids.txt", bounds=bounds)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_score_npz_with_long_strings_or_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ids.npy", _npy_header_only((10,), "<U100000000"))
        zf.writestr("scores.npy", _npy_header_only((10, 3)))
    with pytest.raises(VideoScoreError, match="strings over"):
        read_one(path)


def test_csv_with_a_huge_cell_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    rows = ["video_id,a,b"] + [f"v{i},0.1,0.9" for i in range(1500)]
    rows[1200] = "v1199," + "9" * (5 << 20) + ",0.5"
    path.write_text("\n".join(rows) + "\n", "utf-8")
    bounds = ScoreBounds.for_dataset(2000, 2)
    with pytest.raises(VideoScoreError, match="line 1201 is over") as info:
        read_one(path, bounds=bounds)
    assert len(str(info.value)) < 300
    with pytest.raises(VideoScoreError, match="non-numeric") as info:  # generous bounds
        read_one(path)
    assert len(str(info.value)) < 300
    # In the first rows the csv module's own limit would raise a bare csv.Error.
    rows[1200] = "v1199,0.1,0.9"
    rows[3] = "v2," + "7" * (5 << 20) + ",0.5"
    path.write_text("\n".join(rows) + "\n", "utf-8")
    with pytest.raises(VideoScoreError, match="line 4 is over"):
        read_one(path, bounds=bounds)
    with pytest.raises(VideoScoreError, match=r"malformed CSV \(field larger") as info:
        read_one(path)
    assert len(str(info.value)) < 300


def test_csv_with_more_columns_than_the_classes_need_is_refused_from_its_header(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.csv"
    cols = [f"c{j}" for j in range(3000)]
    path.write_text("video_id," + ",".join(cols) + "\nv0," + ",".join(["0"] * 3000) + "\n")
    with pytest.raises(VideoScoreError, match="3001 columns, over the 1005"):
        read_one(path, bounds=ScoreBounds.for_dataset(10, 5))
    wide = tmp_path / "wide.csv"  # 10^6 columns: the header line alone is refused
    with open(wide, "w") as fh:
        fh.write("video_id," + ",".join(f"c{j}" for j in range(10**6)) + "\n")
    with pytest.raises(VideoScoreError, match="line 1 is over"):
        read_one(wide)


def test_annotation_file_with_a_huge_cell_is_one_line(tmp_path: Path) -> None:
    scores = tmp_path / "s.npy"
    np.save(scores, np.zeros((2, 3), np.float32))
    ann = tmp_path / "ann.csv"
    ann.write_text("video_id,label\nv0,a\nv1," + "x" * (5 << 20) + "\n", "utf-8")
    with pytest.raises(VideoScoreError, match="field larger than") as info:
        read_one(scores, ids_file=ann)
    assert str(ann) in str(info.value) and len(str(info.value)) < 300
    ann.write_text("video_id,label\nv0,a\nv1," + "x" * (8 << 20) + "\n", "utf-8")
    with pytest.raises(VideoScoreError, match="line 3 is over") as info:
        read_one(scores, ids_file=ann)
    assert len(str(info.value)) < 300


# --------------------------------------------------------------------------- non-finite data


def _work_with_a_nan_video(work: Path, split: str) -> str:
    """A generated work folder plus one video of ``split`` whose features hold a NaN."""
    man = make_synthetic_work(work, n_classes=2, videos_per_class=3, frames_range=(100, 200))
    vid = f"{split}/class_01/nan"
    x = np.full((150, 64), -4.0, np.float32)
    x[70, 5] = np.nan
    sw = ShardWriter(work / "features", n_mels=64, prefix="extra")
    sw.add(vid, x)
    index = pd.read_parquet(work / "features" / "index.parquet")
    commit_index(work / "features", index.to_dict("records") + sw.close())
    row = man.iloc[[-1]].assign(video_id=vid, split=split, label="class_01", label_index=1)
    write_table(pd.concat([man, row], ignore_index=True), work / "manifest.parquet")
    return vid


def test_nan_features_never_give_ok_scores(tmp_path: Path) -> None:
    work = tmp_path / "w"
    vid = _work_with_a_nan_video(work, "val")
    model = build_model("resnet", 2, 0.25, 0.0, n_mels=64, frames=96)
    ckpt = make_checkpoint(
        model=model.state_dict(),
        spec=ModelSpec("resnet", 0.25, 0.0, 64, 96),
        classes=("class_00", "class_01"),
        norm=NormStats(np.full(64, -4.0, np.float32), np.ones(64, np.float32)),
        frontend_hash=FeatureStore(work / "features").frontend_hash,
    )
    path = tmp_path / "c.pt"
    save_checkpoint(path, ckpt)
    res = predict(PredictConfig(work, checkpoint=str(path), amp="off", device="cpu"))
    assert res is not None
    sf = ScoreFile.load(res.path)
    st = dict(zip(sf.ids.tolist(), sf.status.tolist(), strict=True))
    assert st[vid] == "non_finite"
    assert np.isnan(sf.select([vid]).scores).all()
    others = sf.has_scores
    assert others.sum() == len(sf.ids) - 1
    assert np.isfinite(sf.scores[others]).all()
    np.testing.assert_allclose(sf.scores[others].sum(1), 1.0, rtol=1e-5)


def test_training_on_nan_features_stops_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "w"
    _work_with_a_nan_video(work, "train")
    args = ["train", str(work), "--model", "resnet", "--width", "0.125", "--epochs", "2"]
    args += ["--device", "cpu", "--amp", "off", "--num-workers", "0", "--no-progress"]
    args += ["--set", "min_steps=1", "--set", "batch_size=4"]
    assert cli.main(args) == 2
    line = _one_error_line(capsys)
    assert "training stopped" in line and "loss nan" in line and "NaN or infinite features" in line
    assert not (work / "runs" / "audio" / "best.pt").exists()


def test_our_score_file_loader_checks_headers_first(tmp_path: Path) -> None:
    path = tmp_path / "audio_val.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ids.npy", _npy_header_only((100_000,), "<U8"))
        zf.writestr("scores.npy", _npy_header_only((100_000, 10_000)))
    with pytest.raises(ValueError, match="over 268435456 values") as info:
        ScoreFile.load(path)
    assert str(path) in str(info.value)


def test_deeply_nested_json_in_a_store_is_one_line(tmp_path: Path) -> None:
    from avfuse.store import CorruptStoreError

    root = tmp_path / "w" / "features"
    root.mkdir(parents=True)
    (root / "store.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "index.parquet").write_bytes(b"x")
    with pytest.raises(CorruptStoreError, match="nested too deeply") as info:
        FeatureStore(root)
    assert str(root / "store.json") in str(info.value)


def test_pickle_memo_index_cannot_allocate(tmp_path: Path) -> None:
    """``LONG_BINPUT 2^30``: ten bytes that make the C unpickler zero a 16 GB memo table. Run
    under an address-space limit, so that a loader without the bound fails instead of
    exhausting the machine."""
    import subprocess
    import sys

    path = tmp_path / "memo.pkl"
    path.write_bytes(b"\x80\x02]r" + (1 << 30).to_bytes(4, "little") + b".")
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
        "from avfuse.safe_pickle import load_pickle; print(load_pickle(sys.argv[1]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() == "[]"


def test_csv_rows_are_bounded_before_pandas_reads_them(tmp_path: Path) -> None:
    bounds = ScoreBounds.for_dataset(10, 3)  # at most 10020 rows
    wide = tmp_path / "wide.csv"
    wide.write_text("video_id,a,b,c\n" + "v,0,0,1\n" * 10_100)
    with pytest.raises(VideoScoreError, match="10100 data lines, over the 10020"):
        read_one(wide, bounds=bounds)
    long = tmp_path / "long.csv"  # a line per (video, class): bounded by rows x columns
    long.write_text("video_id,class,score\n" + "".join(f"v{i},a,0.5\n" for i in range(10_100)))
    assert len(read_one(long, bounds=bounds).ids) == 10_100
    ann = tmp_path / "ids.txt"
    ann.write_text("v\n" * 10_100)
    np.save(tmp_path / "s.npy", np.zeros((10_100, 3), np.float32))
    assert len(read_one(tmp_path / "s.npy", ids_file=ann).ids) == 10_100  # default bounds


@pytest.mark.parametrize(
    "override", ["batch_size=100000000", "windows_per_video=0", "windows_per_video=100000000"]
)
def test_allocation_sizes_in_settings_are_bounded(override: str) -> None:
    with pytest.raises(ValueError, match="out of range"):
        apply_overrides(TrainConfig(work=Path("w")), [override])


def test_a_spec_describing_a_network_larger_than_its_weights_is_refused_unbuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from avfuse import scoring

    small = build_model("resnet", 2, 0.25, 0.0, n_mels=64, frames=96)
    spec = ModelSpec("resnet", 16.0, 0.0, 64, 96)
    ckpt = make_checkpoint(model=small.state_dict(), spec=spec)
    built: list[bool] = []
    real = scoring.build_model

    def counting(*a: Any, **k: Any) -> Any:
        built.append(torch.empty(0).device.type != "meta")
        return real(*a, **k)

    monkeypatch.setattr(scoring, "build_model", counting)
    with pytest.raises(ValueError, match=r"describes a network of .* bytes, its weights hold"):
        scoring.model_from_checkpoint(ckpt)
    assert built == [False]  # only the meta-device probe was built
    spec_ok = dataclasses.replace(spec, width=0.25)
    model, _, _ = scoring.model_from_checkpoint(dataclasses.replace(ckpt, model_spec=spec_ok))
    assert built == [False, False, True]
    assert torch.equal(model.state_dict()["fc.weight"], small.state_dict()["fc.weight"])


def test_label_map_is_bounded_before_it_is_read(tmp_path: Path) -> None:
    scores = tmp_path / "s.npy"
    np.save(scores, np.zeros((2, 3), np.float32))
    ids = tmp_path / "ids.txt"
    ids.write_text("v0\nv1\n")
    big = tmp_path / "labels.txt"
    big.write_text("".join(f"c{i}\n" for i in range(5000)))
    with pytest.raises(VideoScoreError, match="5000 lines, over the 1003 classes"):
        read_one(scores, ids_file=ids, label_map=big, bounds=ScoreBounds.for_dataset(2, 3))
    long = tmp_path / "long.txt"
    long.write_text("a\nb\n" + "c" * (1 << 20) + "\n")
    with pytest.raises(VideoScoreError, match="line 3 is over"):
        read_one(scores, ids_file=ids, label_map=long)
    ok = tmp_path / "ok.txt"
    ok.write_text("a\nb\nc\n")
    assert read_one(scores, ids_file=ids, label_map=ok).classes == ["a", "b", "c"]
