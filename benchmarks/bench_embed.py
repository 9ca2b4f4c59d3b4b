"""CNN14 and AST embedding throughput on CPU: avfuse on stored log-mel vs the reference paths.

On the same 10 s clips, side by side in one run:

* ``reference``: ``panns_inference.models.Cnn14`` forward on raw 32 kHz waveforms (its
  torchlibrosa STFT + log-mel inside the network), float32, as the package runs it;
* ``avfuse fp32/cl``: :class:`avfuse.models.Cnn14` ``embed`` on the log-mel the feature stage
  stores once (computed here with the same torchlibrosa front end, outside the timing),
  float32, channels-last, batch norms folded into the convolutions (as ``avfuse embed`` runs);
* ``avfuse bf16/cl``: the same under bf16 autocast (fast where the CPU has native bf16).

With ``--models ast`` (AST-base: the AudioSet release's layout built in code, random weights):

* ``transformers``: ``ASTFeatureExtractor`` (its numpy Kaldi fbank, padded to 1024 frames) on the
  raw 16 kHz waveform, then ``ASTModel``'s pooled output, float32, as a transformers user runs
  it;
* ``avfuse fp32``: :class:`avfuse.ast_model.AST` ``embed`` on the stored 1024 x 128 log-mel
  (computed once by the feature stage, outside the timing), and the same under bf16 autocast.

Random weights (the speed does not depend on them; nothing is downloaded). Prints clips/s,
clips/s per core (torch intra-op threads) and the ratio to the reference, and what embedding
Kinetics-600 (about 420k clips of 10 s) would take on this machine.

    .venv/bin/python -m benchmarks.bench_embed                  # a few clips: ~1 min on 2 cores
    .venv/bin/python -m benchmarks.bench_embed --clips 32 --batch 8 --threads 16
    .venv/bin/python -m benchmarks.bench_embed --device cuda --clips 8192 --batch 512 --no-reference
    .venv/bin/python -m benchmarks.bench_embed --models ast --clips 2 --batch 1
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch

from avfuse.models import Cnn14, fuse_for_inference

K600_CLIPS = 420_000


def _rate(fn: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor]) -> float:
    fn(batches[0])  # first call: allocator and kernel selection are not throughput
    _sync()
    t0 = time.perf_counter()
    n = 0
    for b in batches:
        fn(b)
        n += len(b)
    _sync()
    return n / (time.perf_counter() - t0)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=4, help="10 s clips per measurement")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: as set)")
    ap.add_argument("--models", default="cnn14", help="cnn14, ast or both (comma-separated)")
    ap.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda (cnn14: log-mel batches copied from pinned host memory, as embed does)",
    )
    ap.add_argument("--no-reference", action="store_true", help="skip the reference model")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        {"cnn14": bench_cnn14, "ast": bench_ast}[name](args)


def _table(title: str, rows: list[tuple[str, float]], cores: int) -> None:
    print(title)
    print(f"{'path':30s} {'clips/s':>9s} {'per core':>9s} {'vs ref':>7s} {'K600 (h)':>9s}")
    r_ref = rows[0][1]
    for name, r in rows:
        hours = K600_CLIPS / r / 3600
        print(f"{name:30s} {r:9.2f} {r / cores:9.3f} {r / r_ref:6.2f}x {hours:9.1f}")
    print()


def bench_ast(args: argparse.Namespace) -> None:
    """AST-base: transformers' waveform pipeline vs avfuse's stored log-mel path."""
    import numpy as np
    from transformers.models.audio_spectrogram_transformer import (
        feature_extraction_audio_spectrogram_transformer as fe_mod,
    )

    from avfuse.ast_model import base_arch
    from avfuse.melspec import FrontendConfig, log_mel
    from avfuse.models import build_model

    cores = torch.get_num_threads()
    torch.manual_seed(0)
    ours = build_model("ast", 527, dropout=0.0, n_mels=128, frames=1024, arch=base_arch()).eval()
    fe_mod.is_speech_available = lambda: False  # the numpy path: no torchaudio dependency
    extractor = fe_mod.ASTFeatureExtractor()
    rng = np.random.default_rng(0)
    n_batches = max(1, args.clips // args.batch)
    waves = [
        [(0.1 * rng.standard_normal(160000)).astype(np.float32) for _ in range(args.batch)]
        for _ in range(n_batches)
    ]
    fe = FrontendConfig.ast()

    def stored(batch: list[np.ndarray]) -> torch.Tensor:
        # What the store holds for a 10 s clip (998 frames), padded to the 1024-frame window.
        m = [log_mel(w, fe) for w in batch]
        return torch.from_numpy(np.stack([np.resize(x, (1024, 128)) for x in m]))

    mels = [stored(b) for b in waves]

    def run_ref(batch: list[np.ndarray]) -> torch.Tensor:
        with torch.inference_mode():
            x = extractor(batch, sampling_rate=16000, return_tensors="pt")["input_values"]
            return ours.audio_spectrogram_transformer(input_values=x).pooler_output  # type: ignore[operator,no-any-return]

    def run_ours(bf16: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def f(x: torch.Tensor) -> torch.Tensor:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with torch.inference_mode(), ctx:
                return ours.embed(x)  # type: ignore[operator,no-any-return]

        return f

    rows = [("transformers (waveform, fp32)", _rate_lists(run_ref, waves))]
    rows.append(("avfuse ast fp32 (log-mel)", _rate(run_ours(False), mels)))
    rows.append(("avfuse ast bf16 (log-mel)", _rate(run_ours(True), mels)))
    _table(
        f"AST-base embeddings of 10 s clips, {args.clips} clips, batch {args.batch}, "
        f"{cores} threads",
        rows,
        cores,
    )


def _rate_lists(fn: Callable[[list], torch.Tensor], batches: list[list]) -> float:  # type: ignore[type-arg]
    fn(batches[0][:1])
    t0 = time.perf_counter()
    n = 0
    for b in batches:
        fn(b)
        n += len(b)
    return n / (time.perf_counter() - t0)


def bench_cnn14(args: argparse.Namespace) -> None:
    """CNN14: the reference PANNs forward on waveforms vs avfuse on stored log-mel."""
    cores = torch.get_num_threads()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    from panns_inference.models import Cnn14 as RefCnn14

    torch.manual_seed(0)
    ref = RefCnn14(32000, 1024, 320, 64, 50, 14000, 527).eval()
    ours = Cnn14(527, n_mels=64, frames=1001).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k in ours.state_dict()})
    ours_cl = fuse_for_inference(ours).to(dev, memory_format=torch.channels_last)  # type: ignore[call-overload]
    ref = ref.to(dev)

    # The speed does not depend on the content: a few distinct batches, repeated.
    n_batches = max(1, args.clips // args.batch)
    waves = [0.1 * torch.randn(args.batch, 320000) for _ in range(min(n_batches, 4))]
    with torch.inference_mode():
        mels = [
            ref.logmel_extractor(ref.spectrogram_extractor(w.to(dev))).half().cpu() for w in waves
        ]  # (B,1,T,64), stored as float16 like the feature store
    if cuda:
        mels = [m.pin_memory() for m in mels]
    mels = [mels[i % len(mels)] for i in range(n_batches)]

    def run_ref(w: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return ref(w.to(dev))["embedding"]  # type: ignore[no-any-return]

    def run_ours(bf16: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def f(x: torch.Tensor) -> torch.Tensor:
            ctx = (
                torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            )
            with torch.inference_mode(), ctx:
                x = x.to(dev, non_blocking=True).float()
                return ours_cl.embed(x.contiguous(memory_format=torch.channels_last))

        return f

    rows = []
    if not args.no_reference:
        rows.append(("reference (waveform, fp32)", _rate(run_ref, waves)))
    rows.append(("avfuse fp32/cl (log-mel)", _rate(run_ours(False), mels)))
    rows.append(("avfuse bf16/cl (log-mel)", _rate(run_ours(True), mels)))
    where = f"{torch.cuda.get_device_name(dev)}" if cuda else f"{cores} threads"
    _table(
        f"CNN14 embeddings of 10 s clips, {n_batches * args.batch} clips, batch {args.batch}, "
        f"{where}",
        rows,
        1 if cuda else cores,
    )


if __name__ == "__main__":
    main()
