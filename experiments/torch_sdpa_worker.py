"""PyTorch's scaled_dot_product_attention timed on request: the other half of bench_torch.py.

It imports torch only and runs in a throwaway environment outside the repository
(torch is never a dependency of the kit):

    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 numpy

bench_torch.py and bench_decode.py start it (benchtools.Torch) with that environment's
python and write one JSON case a line to its stdin: {"B", "T", "N", "K", "H", "causal",
"mode" ("fwd" or "fwd_bwd"), "repeats", and optionally "S", the keys, T if absent}. For
each it answers one JSON line: {"seconds": [one per timed run, after an untimed one]}. It
waits on stdin between cases, so it takes no CPU while the kit runs. The first line it
writes names torch's version and threads.
"""

import contextlib
import json
import sys
import time

import torch


def run_case(case: dict) -> list[float]:
    B, T, N, K, H = (case[key] for key in ("B", "T", "N", "K", "H"))
    S = case.get("S", T)
    gen = torch.Generator().manual_seed(0)
    # SDPA's layout is head-major: q [B, N, T, H], k and v [B, K, S, H].
    q = torch.randn(B, N, T, H, generator=gen)
    k = torch.randn(B, K, S, H, generator=gen)
    v = torch.randn(B, K, S, H, generator=gen)
    backward = case["mode"] == "fwd_bwd"
    if backward:
        for x in (q, k, v):
            x.requires_grad_(True)
        cotangent = torch.randn(B, N, T, H, generator=gen)

    def once():
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=case["causal"], enable_gqa=K != N
        )
        if backward:
            out.backward(cotangent)
            for x in (q, k, v):
                x.grad = None

    times = []
    with contextlib.nullcontext() if backward else torch.no_grad():
        once()
        for _ in range(case["repeats"]):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
    return times


def main():
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}))
    sys.stdout.flush()
    for line in sys.stdin:
        print(json.dumps({"seconds": run_case(json.loads(line))}))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
