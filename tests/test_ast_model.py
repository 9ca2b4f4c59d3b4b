"""The ``ast`` model: Hugging Face model folders loaded strictly from safetensors, the whole path
(stored log-mel -> model) against transformers' own (waveform -> extractor -> model), and
fine-tuning and embedding with it."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from avfuse.checkpoint import load_checkpoint
from avfuse.data import pad_window
from avfuse.embed import EmbedConfig, embed
from avfuse.predict import PredictConfig, predict
from avfuse.scores import ScoreFile
from avfuse.scoring import model_from_checkpoint
from avfuse.store import FeatureStore
from avfuse.train import TrainConfig, param_groups, resolve_normalize, train
from tests.synthetic import make_synthetic_work
from tests.test_train import TINY as TRAIN_TINY

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from avfuse import ast_model
from avfuse.melspec import FrontendConfig, log_mel
from avfuse.models import build_model, embed_dim, layer_scale, load_init, model_arch

TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_length": 100,
    "num_mel_bins": 128,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
SR = 16000


def save_folder(root: Path, labels: int = 5, seed: int = 0, **overrides: Any) -> Path:
    """A real model folder written by transformers: config.json, model.safetensors and a
    preprocessor_config.json with statistics other than AudioSet's."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    torch.manual_seed(seed)
    cfg = ASTConfig(**{**TINY, **overrides}, num_labels=labels)
    model = ASTForAudioClassification(cfg).eval()
    with torch.no_grad():
        # Zero-initialised tokens and position embeddings would hide a mis-mapped tensor.
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(root)
    ASTFeatureExtractor(max_length=cfg.max_length, mean=-5.5, std=3.25).save_pretrained(root)
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return save_folder(tmp_path / "tiny")


def _hf_model(folder: Path) -> Any:
    from transformers import ASTForAudioClassification

    return ASTForAudioClassification.from_pretrained(folder, local_files_only=True).eval()


def _signal(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SR)) / SR
    x = 0.05 * rng.standard_normal(len(t)) + 0.3 * np.sin(2 * np.pi * (300 + 900 * seed) * t)
    return x.astype(np.float32)


def test_logits_match_transformers_pipeline(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.models.audio_spectrogram_transformer import (
        feature_extraction_audio_spectrogram_transformer as fe_mod,
    )

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(fe_mod, "is_speech_available", lambda: False)  # the numpy path
    extractor = fe_mod.ASTFeatureExtractor.from_pretrained(folder, local_files_only=True)
    hf = _hf_model(folder)

    # avfuse: the front end the folder asks for, then the stored frames cut to the window.
    fe = ast_model.frontend_for(folder)
    assert (fe.norm_mean, fe.norm_std) == (-5.5, 3.25)
    arch = model_arch("ast", folder)
    assert arch is not None and arch["max_length"] == 100 and arch["hidden_size"] == 64
    ours = build_model("ast", 5, dropout=0.3, n_mels=128, frames=100, arch=arch)
    assert load_init(ours, folder) == []
    ours.eval()

    waves = [_signal(1.6, 0), _signal(1.05, 1), _signal(3.0, 2)]
    feats = [log_mel(x, fe)[:100] for x in waves]
    assert all(f.shape == (100, 128) for f in feats)
    with torch.no_grad():
        got = ours(torch.from_numpy(np.stack(feats)).unsqueeze(1))
        ref_in = extractor(waves, sampling_rate=SR, return_tensors="pt")["input_values"]
        want = hf(input_values=ref_in).logits
        emb = ours.embed(torch.from_numpy(np.stack(feats)))  # type: ignore[operator]
        want_emb = hf.audio_spectrogram_transformer(input_values=ref_in).pooler_output
    assert want.shape == got.shape == (3, 5)
    # Not a constant network: the three clips get different logits.
    assert float(want.std(0).min()) > 1e-3
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(emb, want_emb, atol=1e-4, rtol=0)
    assert embed_dim(ours) == 64


def test_every_tensor_loads_under_its_own_name(folder: Path) -> None:
    hf = _hf_model(folder)
    ours = build_model("ast", 5, n_mels=128, frames=100, arch=model_arch("ast", folder))
    load_init(ours, folder)
    theirs = hf.state_dict()
    mine = ours.state_dict()
    assert set(mine) == set(theirs)
    for k, v in mine.items():
        assert torch.equal(v, theirs[k]), k


def test_new_head_when_class_count_differs(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    hf = _hf_model(folder)
    ours = build_model("ast", 3, n_mels=128, frames=100, arch=model_arch("ast", folder))
    with caplog.at_level(logging.INFO, logger="avfuse.models"):
        ignored = load_init(ours, folder)
    assert sorted(ignored) == ["classifier.dense.bias", "classifier.dense.weight"]
    assert "new head" in caplog.text
    theirs = hf.state_dict()
    for k, v in ours.state_dict().items():
        if k.startswith("classifier.dense."):
            assert v.shape[0] == 3
        else:
            assert torch.equal(v, theirs[k]), k


def test_mismatched_backbone_is_refused_with_the_list(tmp_path: Path) -> None:
    wide = save_folder(tmp_path / "wide", hidden_size=32, intermediate_size=64)
    ours = build_model("ast", 5, n_mels=128, frames=100, arch={**ast_model.AST_BASE, **TINY})
    with pytest.raises(ValueError) as err:
        load_init(ours, wide)
    msg = str(err.value)
    assert "shape: audio_spectrogram_transformer.layers.0.attention.q_proj.weight" in msg
    assert "checkpoint (32, 32) vs model (64, 64)" in msg

    # A tensor missing from the file is named too.
    from safetensors.torch import load_file, save_file

    cut = save_folder(tmp_path / "cut")
    state = load_file(str(cut / "model.safetensors"))
    del state["audio_spectrogram_transformer.encoder.layer.1.output.dense.bias"]
    save_file(state, str(cut / "model.safetensors"), metadata={"format": "pt"})
    ours = build_model("ast", 5, n_mels=128, frames=100, arch=model_arch("ast", cut))
    with pytest.raises(ValueError, match=r"missing: audio_spectrogram_transformer\.layers\.1"):
        load_init(ours, cut)


class _Boom:
    """Unpickling this writes a marker file: proof that a .bin was (or was not) unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_pickle_weights_are_never_read(tmp_path: Path) -> None:
    src = save_folder(tmp_path / "src")
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    (pkl / "config.json").write_text((src / "config.json").read_text())
    marker = tmp_path / "unpickled"
    with open(pkl / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"w": _Boom(str(marker))}, fh)
    ours = build_model("ast", 5, n_mels=128, frames=100, arch=model_arch("ast", pkl))
    with pytest.raises(ValueError, match=r"no model\.safetensors .*never pickled"):
        load_init(ours, pkl)
    assert not marker.exists()


def test_sharded_folder_and_bad_index(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = save_folder(tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    keys = sorted(state)
    half = len(keys) // 2
    save_file({k: state[k] for k in keys[:half]}, str(src / "a.safetensors"))
    save_file({k: state[k] for k in keys[half:]}, str(src / "b.safetensors"))
    (src / "model.safetensors").unlink()
    index = {
        "weight_map": {k: ("a" if i < half else "b") + ".safetensors" for i, k in enumerate(keys)}
    }
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    got = ast_model.read_state(src)
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in keys)
    # A shard name from the index never leaves the folder.
    index["weight_map"][keys[0]] = "../b.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="is not a file name"):
        ast_model.read_state(src)


def test_config_is_checked(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="is not 'audio-spectrogram-transformer'"):
        model_arch("ast", d)
    (d / "config.json").write_text(
        json.dumps({"model_type": "audio-spectrogram-transformer", "hidden_size": "768"})
    )
    with pytest.raises(ValueError, match="hidden_size = '768' is not a int"):
        model_arch("ast", d)
    for bad, msg in (
        ({"max_length": 0}, "max_length = 0 must be >= 1"),
        ({"num_hidden_layers": True}, "num_hidden_layers = True is not a int"),
        ({"hidden_size": 100, "num_attention_heads": 3}, "not a multiple of"),
    ):
        (d / "config.json").write_text(
            json.dumps({"model_type": "audio-spectrogram-transformer", **bad})
        )
        with pytest.raises(ValueError, match=msg):
            model_arch("ast", d)
    (d / "config.json").write_text(json.dumps({"model_type": "audio-spectrogram-transformer"}))
    # Fields left out take AST-base's values: the AudioSet release's layout.
    assert model_arch("ast", d) == ast_model.AST_BASE
    with pytest.raises(ValueError, match="max_length 1024"):
        model_arch("ast", d, window=998)
    assert model_arch("cnn14", d) is None


def test_layer_wise_decay_scales(folder: Path) -> None:
    ours = build_model("ast", 5, n_mels=128, frames=100, arch=model_arch("ast", folder))
    p = "audio_spectrogram_transformer."
    assert layer_scale(ours, "classifier.dense.weight", 0.5) == 1.0
    assert layer_scale(ours, p + "layernorm.weight", 0.5) == 1.0
    assert layer_scale(ours, p + "layers.1.mlp.fc1.weight", 0.5) == 0.5
    assert layer_scale(ours, p + "layers.0.mlp.fc1.weight", 0.5) == 0.25
    assert layer_scale(ours, p + "embeddings.position_embeddings", 0.5) == 0.125


def test_window_must_be_the_checkpoints(folder: Path) -> None:
    ours = build_model("ast", 5, n_mels=128, frames=100, arch=model_arch("ast", folder))
    with pytest.raises(ValueError, match="exactly 100 frames x 128 bands"):
        ours(torch.zeros(1, 96, 128))
    with pytest.raises(ValueError, match="windows of 100 frames x 128 bands, the run has 96"):
        build_model("ast", 5, n_mels=128, frames=96, arch=model_arch("ast", folder))


def test_avfuse_imports_without_transformers(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "import avfuse.models, avfuse.train, avfuse.embed, avfuse.cli\n"
        "m = avfuse.models.build_model('cnn10', 2, width=0.25, n_mels=64, frames=96)\n"
        "try:\n"
        "    avfuse.models.build_model('ast', 2, n_mels=128, frames=100)\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert "refused: the ast model needs the transformers package" in out.stdout
    assert "avfuse[ast]" in out.stdout


def test_raw_frontend_matches_folder_without_preprocessor(tmp_path: Path) -> None:
    d = save_folder(tmp_path / "m")
    (d / "preprocessor_config.json").unlink()
    assert ast_model.frontend_for(d) == FrontendConfig.ast()


def test_store_of_another_front_end_is_named(folder: Path) -> None:
    want = ast_model.frontend_for(folder)
    assert ast_model.frontend_mismatch(want.hash(), folder) is None
    # AudioSet's statistics, where the folder states its own.
    msg = ast_model.frontend_mismatch(FrontendConfig.ast().hash(), folder)
    assert msg is not None and "mean=-5.5, std=3.25" in msg


def test_frontend_toml_reads_back_as_the_folders_front_end(folder: Path, tmp_path: Path) -> None:
    from avfuse.config import from_dict, read_mapping
    from avfuse.features import FeaturesConfig

    path = tmp_path / "ast.toml"
    path.write_text(ast_model.frontend_toml(folder))
    cfg = from_dict(FeaturesConfig, {**read_mapping(path), "work": str(tmp_path)})
    assert cfg.frontend == ast_model.frontend_for(folder)
    assert (cfg.frontend.norm_mean, cfg.frontend.norm_std) == (-5.5, 3.25)


# --------------------------------------------------------------- fine-tuning and embedding with AST


# The tiny training settings of test_train, at the model's own width.
RUN = {k: v for k, v in TRAIN_TINY.items() if k != "width"} | dict(
    model="ast", batch_size=4, windows_per_video=2, epochs=2, dropout=0.0, channels_last=False
)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    w = tmp_path / "work"
    make_synthetic_work(w, n_classes=3, videos_per_class=2, n_mels=128, frames_range=(60, 180))
    return w


@pytest.fixture
def five_class_folder(tmp_path: Path) -> Path:
    return save_folder(tmp_path / "tiny", labels=5, seed=3)


def test_freeze_backbone_fine_tunes_the_new_head_only(work: Path, five_class_folder: Path) -> None:
    cfg = TrainConfig(work, init=five_class_folder, freeze_backbone=True, **RUN)  # type: ignore[arg-type]
    assert resolve_normalize(cfg) == "none"
    res = train(cfg)
    assert res is not None
    ckpt = load_checkpoint(res.last_path)
    # The window is the checkpoint's max_length, and the architecture travels with the run.
    assert ckpt.window == 100
    assert ckpt.model_spec.arch["hidden_size"] == 64
    src = build_model("ast", 3, n_mels=128, frames=100, arch=model_arch("ast", five_class_folder))
    load_init(src, five_class_folder)
    for k, v in src.state_dict().items():
        if k.startswith("classifier.dense."):
            assert not torch.equal(ckpt.model[k], v), k
        else:
            assert torch.equal(ckpt.model[k], v), k

    # predict rebuilds the model from the checkpoint alone and scores 100-frame windows.
    out = predict(PredictConfig(work, checkpoint="last", split="val", device="cpu", amp="off"))
    assert out is not None
    sf = ScoreFile.load(out.path)
    model, norm, _ = model_from_checkpoint(ckpt)
    model.eval()
    store = FeatureStore(work / "features")
    vid = str(sf.ids[0])
    x = norm.apply(np.asarray(store[vid], np.float32))
    if len(x) < 100:
        wins = pad_window(x, 100, "repeat", 0.0)[None]
    else:
        wins = np.stack([x[s : s + 100] for s in range(0, len(x) - 99, 100)])
    with torch.no_grad():
        expect = torch.softmax(model(torch.from_numpy(wins)), 1).mean(0).numpy()
    np.testing.assert_allclose(sf.scores[0], expect, atol=1e-5)


def test_layer_decay_and_backbone_mult_rates(five_class_folder: Path) -> None:
    model = build_model("ast", 3, n_mels=128, frames=100, arch=model_arch("ast", five_class_folder))
    groups = param_groups(model, 0.05, lr=1e-3, backbone_lr_mult=0.5, layer_decay=0.8)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(rate) == len(list(model.parameters()))
    # 2 layers: depth 0 embeddings, 1-2 layers, 3 final norm; head at lr.
    expect = {
        "classifier.dense.weight": 1e-3,
        "classifier.layernorm.weight": 1e-3 * 0.5,
        "audio_spectrogram_transformer.layernorm.weight": 1e-3 * 0.5,
        "audio_spectrogram_transformer.layers.1.attention.q_proj.weight": 1e-3 * 0.5 * 0.8,
        "audio_spectrogram_transformer.layers.0.mlp.fc2.bias": 1e-3 * 0.5 * 0.8**2,
        "audio_spectrogram_transformer.embeddings.cls_token": 1e-3 * 0.5 * 0.8**3,
    }
    params = dict(model.named_parameters())
    for name, lr in expect.items():
        assert rate[id(params[name])] == pytest.approx(lr), name


def test_gradient_checkpointing_gives_the_same_gradients(five_class_folder: Path) -> None:
    arch = model_arch("ast", five_class_folder)
    x = torch.randn(2, 1, 100, 128, generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        model = build_model("ast", 3, dropout=0.0, n_mels=128, frames=100, arch=arch)
        load_init(model, five_class_folder)
        torch.manual_seed(0)
        model.classifier.dense.reset_parameters()
        if ckpt:
            model.enable_gradient_checkpointing()  # type: ignore[operator]
            layers = model.audio_spectrogram_transformer.layers
            assert all(getattr(m, "gradient_checkpointing", False) for m in layers)
        model.train()
        model(x).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-5, rtol=1e-4)


def test_grad_checkpointing_option_trains(work: Path, five_class_folder: Path) -> None:
    res = train(TrainConfig(work, init=five_class_folder, grad_checkpointing=True, **RUN))  # type: ignore[arg-type]
    assert res is not None
    assert load_checkpoint(res.last_path).config["grad_checkpointing"] is True
    with pytest.raises(ValueError, match="no gradient checkpointing"):
        train(TrainConfig(work, name="cnn", **{**RUN, "model": "cnn10"}, grad_checkpointing=True))  # type: ignore[arg-type]


def test_embed_ast_then_head(work: Path, five_class_folder: Path) -> None:
    ecfg = EmbedConfig(
        work,
        model="ast",
        init=five_class_folder,
        device="cpu",
        amp="off",
        channels_last=False,
        progress=False,
    )
    res = embed(ecfg)
    assert res.dim == 64
    store = FeatureStore(work / "features")
    emb = FeatureStore(work / "embeddings" / "ast")
    # Clips shorter than the 100-frame window are embedded from a padded window, not dropped.
    assert any(store.frames(v) < 100 for v in store.ids)
    assert set(emb.ids) == set(store.ids) and res.embedded == len(store)
    ref = build_model("ast", 5, n_mels=128, frames=100, arch=model_arch("ast", five_class_folder))
    load_init(ref, five_class_folder)
    ref.eval()
    for vid in emb.ids:
        x = np.asarray(store[vid], np.float32)
        if len(x) < 100:
            wins = pad_window(x, 100, "repeat", 0.0)[None]
        else:
            wins = np.stack([x[s : s + 100] for s in range(0, len(x) - 99, 100)])
        with torch.no_grad():
            want = ref.audio_spectrogram_transformer(
                input_values=torch.from_numpy(wins)
            ).pooler_output.numpy()
        np.testing.assert_allclose(np.asarray(emb[vid]), want, atol=1e-4, rtol=0)

    out = train(
        TrainConfig(
            work,
            name="head",
            from_embeddings="ast",
            **{**RUN, "model": "resnet", "epochs": 2},  # type: ignore[arg-type]
        )
    )
    assert out is not None
    assert load_checkpoint(out.last_path).model_spec.n_mels == 64
