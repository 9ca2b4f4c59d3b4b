"""CNN14 embedding throughput on CPU: avfuse on precomputed log-mel vs the reference PANNs.

On the same 10 s clips, side by side in one run:

* ``reference``: ``panns_inference.models.Cnn14`` forward on raw 32 kHz waveforms (its
  torchlibrosa STFT + log-mel inside the network), float32, as the package runs it;
* ``avfuse fp32/cl``: :class:`avfuse.models.Cnn14` ``embed`` on the log-mel the feature stage
  stores once (computed here with the same torchlibrosa front end, outside the timing),
  float32, channels-last, batch norms folded into the convolutions (as ``avfuse embed`` runs);
* ``avfuse bf16/cl``: the same under bf16 autocast (fast where the CPU has native bf16).

Random weights (the speed does not depend on them; nothing is downloaded). Prints clips/s,
clips/s per core (torch intra-op threads) and the ratio to the reference, and what embedding
Kinetics-600 (about 420k clips of 10 s) would take on this machine.

    .venv/bin/python -m benchmarks.bench_embed                  # a few clips: ~1 min on 2 cores
    .venv/bin/python -m benchmarks.bench_embed --clips 32 --batch 8 --threads 16
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
    fn(batches[0][:1])  # first call: allocator and kernel selection are not throughput
    t0 = time.perf_counter()
    n = 0
    for b in batches:
        fn(b)
        n += len(b)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=4, help="10 s clips per measurement")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: as set)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cores = torch.get_num_threads()
    from panns_inference.models import Cnn14 as RefCnn14

    torch.manual_seed(0)
    ref = RefCnn14(32000, 1024, 320, 64, 50, 14000, 527).eval()
    ours = Cnn14(527, n_mels=64, frames=1001).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k in ours.state_dict()})
    ours_cl = fuse_for_inference(ours).to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    waves = [0.1 * torch.randn(args.batch, 320000) for _ in range(max(1, args.clips // args.batch))]
    with torch.inference_mode():
        mels = [ref.logmel_extractor(ref.spectrogram_extractor(w)) for w in waves]  # (B,1,T,64)
    mels = [m.contiguous(memory_format=torch.channels_last) for m in mels]

    def run_ref(w: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return ref(w)["embedding"]  # type: ignore[no-any-return]

    def run_ours(bf16: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def f(x: torch.Tensor) -> torch.Tensor:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with torch.inference_mode(), ctx:
                return ours_cl.embed(x)

        return f

    r_ref = _rate(run_ref, waves)
    rows = [("reference (waveform, fp32)", r_ref)]
    rows.append(("avfuse fp32/cl (log-mel)", _rate(run_ours(False), mels)))
    rows.append(("avfuse bf16/cl (log-mel)", _rate(run_ours(True), mels)))
    print(
        f"CNN14 embeddings of 10 s clips, {args.clips} clips, batch {args.batch}, {cores} threads"
    )
    print(f"{'path':30s} {'clips/s':>9s} {'per core':>9s} {'vs ref':>7s} {'K600 (h)':>9s}")
    for name, r in rows:
        hours = K600_CLIPS / r / 3600
        print(f"{name:30s} {r:9.2f} {r / cores:9.3f} {r / r_ref:6.2f}x {hours:9.1f}")


if __name__ == "__main__":
    main()
