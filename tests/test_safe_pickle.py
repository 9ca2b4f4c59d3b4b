"""The pickle and checkpoint allowlist: hostile pickles are refused before anything runs, and
nothing read allocates beyond what the file holds."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.testing._private.utils as np_test_utils
import pytest
import torch
import torch.utils.cpp_extension

from avfuse.checkpoint import load_checkpoint
from avfuse.models import build_model, load_init
from avfuse.safe_pickle import (
    CorruptCheckpointError,
    OversizeError,
    UnsafePickleError,
    load_pickle,
    load_torch,
)
from avfuse.video_scores import VideoScoreError, read_one


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


def test_legacy_checkpoint_declaring_huge_storage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    real = b"cpuq\x06K\x03N"
    assert raw.count(real) == 1
    path.write_bytes(raw.replace(real, b"cpuq\x06\x8a\x05\x00\x00\x00\x00\x40N"))
    with pytest.raises(OversizeError, match="bytes in a"):
        load_torch(path)


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


class _Call:
    """Pickles as a call of ``fn(*args)``: what a hostile file hides among normal items."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.fn, self.args)


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def _dump_items(n: int = 4, classes: int = 5) -> list[dict[str, Any]]:
    """What mmaction2's test tool dumps (mmengine ``dump``): one dict per video."""
    rng = np.random.default_rng(0)
    return [
        {
            "pred_score": torch.from_numpy(rng.random(classes, dtype=np.float32)),
            "pred_label": torch.tensor([i % classes]),
            "gt_label": torch.tensor([i % classes]),
            "num_classes": classes,
            "frame_inds": np.arange(8, dtype=np.int64) * (i + 1),
            "clip_len": np.int64(8),
            "img_shape": (224, 224),
        }
        for i in range(n)
    ]


def _payloads(marker: Path) -> dict[str, tuple[Any, str, bool]]:
    """name -> (payload object, global the loader must name, whether plain pickle runs it)."""
    touch = f"touch {marker}"
    # torch.storage._load_from_bytes hides a second pickle: here one that runs a shell command.
    inner = pickle.dumps(_Call(os.system, touch), protocol=2)
    return {
        "runstring": (
            _Call(np_test_utils.runstring, f"open({str(marker)!r}, 'w').close()", {}),
            _qualname(np_test_utils.runstring),
            True,
        ),
        "os.system": (_Call(os.system, touch), _qualname(os.system), True),
        "exec": (_Call(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec", True),
        "storage_from_bytes": (
            _Call(torch.storage._load_from_bytes, inner),
            _qualname(os.system),
            True,
        ),
        "torch.load": (_Call(torch.load, str(marker)), _qualname(torch.load), False),
        "cpp_extension": (
            _Call(torch.utils.cpp_extension.load_inline, "x", "int f();"),
            _qualname(torch.utils.cpp_extension.load_inline),
            False,
        ),
    }


PAYLOADS = ["runstring", "os.system", "exec", "storage_from_bytes", "torch.load", "cpp_extension"]


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("name", PAYLOADS)
def test_hostile_pickle_is_refused_before_it_runs(tmp_path: Path, name: str, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload, refused, live = _payloads(marker)[name]
    items = _dump_items()
    # Hidden in the middle of an otherwise normal dump, as one value of one item.
    items[2]["pred_score"] = payload
    path = tmp_path / "results.pkl"
    path.write_bytes(pickle.dumps(items, protocol=protocol))

    with pytest.raises(UnsafePickleError, match=rf"refusing to load {refused}\b") as err:
        load_pickle(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(VideoScoreError, match=rf"refusing to load {refused}\b"):
        read_one(path, ids_file=tmp_path / "ids.txt")
    assert not marker.exists()

    if live:  # the payload is real: an unrestricted unpickler does run it
        with contextlib.suppress(Exception):  # torch.load fails after the command has run
            pickle.loads(path.read_bytes())
        assert marker.exists()


def test_genuine_mmaction2_dump_loads(tmp_path: Path) -> None:
    items = _dump_items(n=6)
    # A tensor that is a view into a larger storage, as slices of a batch output are.
    batch = torch.arange(30, dtype=torch.float32).reshape(5, 6)
    items[1]["pred_score"] = batch.t()[2]  # 5 values, stride 6, offset 2
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(items, protocol=protocol))
        got = load_pickle(path)
        assert len(got) == len(items)
        for a, b in zip(got, items, strict=True):
            assert set(a) == set(b)
            for key in ("pred_score", "pred_label", "gt_label"):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])
            assert np.array_equal(a["frame_inds"], b["frame_inds"])
            assert a["frame_inds"].dtype == np.int64
            assert type(a["clip_len"]) is np.int64 and a["clip_len"] == 8
            assert a["img_shape"] == (224, 224) and a["num_classes"] == 5

    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"clip{i}\n" for i in range(6)), "utf-8")
    vs = read_one(tmp_path / "p2.pkl", ids_file=ids)
    expected = np.stack([it["pred_score"].numpy().astype(np.float64) for it in items])
    np.testing.assert_array_equal(vs.scores, expected)
    assert list(vs.ids) == [f"clip{i}" for i in range(6)]


def _panns_like_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], np.random.RandomState]:
    """A released-PANNs-style file: weights plus a data sampler holding a numpy RandomState."""
    model = build_model("panns", 4, 0.25)
    rng = np.random.RandomState(1234)
    rng.randint(0, 100, size=37)  # a state some way into the stream
    ckpt = {
        "iteration": 5000,
        "model": model.state_dict(),
        "sampler": {
            "indexes": np.arange(50, dtype=np.int64),
            "pointer": np.int64(17),
            "random_state": rng,
        },
    }
    torch.save(ckpt, path)
    return model.state_dict(), rng


def test_checkpoint_with_numpy_randomstate_loads(tmp_path: Path) -> None:
    path = tmp_path / "Cnn14.pth"
    weights, rng = _panns_like_checkpoint(path)
    got = load_torch(path)
    sampler = got["sampler"]
    assert got["iteration"] == 5000 and sampler["pointer"] == 17
    np.testing.assert_array_equal(sampler["indexes"], np.arange(50))
    # The restored generator continues the saved stream exactly.
    np.testing.assert_array_equal(
        sampler["random_state"].randint(0, 10**6, size=20), rng.randint(0, 10**6, size=20)
    )
    for k, v in weights.items():
        assert torch.equal(got["model"][k], v)

    # --init takes such a file as it is.
    model = build_model("panns", 4, 0.25)
    assert load_init(model, path) == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])

    # Without the numpy RNG globals the same file is refused, naming a numpy global.
    with pytest.raises(UnsafePickleError, match=r"refusing to load numpy\."):
        load_torch(path, allow_numpy_rng=False)


_OLD_CTOR = getattr(np.random, "__RandomState_ctor")


class _OldRandomState:
    """Pickles like a RandomState written by numpy < 1.17 (a constructor, then its state)."""

    def __init__(self, rng: np.random.RandomState) -> None:
        self.state = rng.get_state()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_OLD_CTOR, (), self.state)


def test_checkpoint_with_an_old_numpy_randomstate_loads(tmp_path: Path) -> None:
    rng = np.random.RandomState(99)
    rng.random_sample(5)
    torch.save({"sampler": _OldRandomState(rng)}, tmp_path / "old.pth")
    got = load_torch(tmp_path / "old.pth")["sampler"]
    assert isinstance(got, np.random.RandomState)
    np.testing.assert_array_equal(got.random_sample(10), rng.random_sample(10))


def test_hostile_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    weights = build_model("panns", 4, 0.25).state_dict()
    torch.save({"model": weights, "x": _Call(os.system, f"touch {marker}")}, tmp_path / "e.pt")
    for load in (load_torch, load_checkpoint, lambda p: load_init(build_model("panns", 4), p)):
        with pytest.raises(UnsafePickleError, match=rf"refusing to load {_qualname(os.system)}"):
            load(tmp_path / "e.pt")
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.97])
def test_truncated_checkpoint_is_one_clean_error(tmp_path: Path, keep: float) -> None:
    whole = tmp_path / "whole.pt"
    _panns_like_checkpoint(whole)
    blob = whole.read_bytes()
    cut = tmp_path / "last.pt"
    cut.write_bytes(blob[: int(len(blob) * keep)])
    for load in (load_torch, load_checkpoint, lambda p: load_init(build_model("panns", 4), p)):
        with pytest.raises(CorruptCheckpointError) as err:
            load(cut)
        assert str(cut) in str(err.value) and "\n" not in str(err.value)


def test_damaged_pickle_inside_a_checkpoint_is_corrupt_not_hostile(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "ok.pt")
    with (
        zipfile.ZipFile(tmp_path / "ok.pt") as zin,
        zipfile.ZipFile(tmp_path / "bad.pt", "w") as zout,
    ):
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("data.pkl"):
                data = data[:2] + b"\xff" + data[3:]  # an opcode no pickle has
            zout.writestr(name, data)
    with pytest.raises(CorruptCheckpointError, match=r"bad\.pt.*Unsupported operand") as err:
        load_torch(tmp_path / "bad.pt")
    assert "\n" not in str(err.value) and "documentation" not in str(err.value)
