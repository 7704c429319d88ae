"""PyTorch FlexAttention on CPU for the shapes of bench_flex.py: the anchor, not a dependency.

Run it with a throwaway environment outside the repository (it imports torch only):

    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
    /tmp/torchenv/bin/python experiments/bench_flex_torch.py

Prints the median milliseconds of compiled `flex_attention` forwards (B=4, T=2048,
N=8, H=64 float32: causal block mask, + ALiBi score_mod, + softcap score_mod; B=1,
T=8192: causal and causal + 8 documents), each timed in consecutive runs after
warm-up, and what a backward pass on CPU does.
"""

import statistics
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

N, H = 8, 64
flex = torch.compile(flex_attention)


def causal(b, h, q, kv):
    return kv <= q


def median_ms(fn, repeats=6):
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def inputs(B, T):
    return [torch.randn(B, N, T, H) for _ in range(3)]  # FlexAttention's [B, N, T, H]


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| case | forward median ms |")
    print("|---|---|")
    q, k, v = inputs(4, 2048)
    mask = create_block_mask(causal, None, None, 2048, 2048, device="cpu")
    slopes = torch.linspace(0.5, 0.01, N)

    def alibi(score, b, h, qi, kv):
        return score + slopes[h] * (kv - qi)

    def softcap(score, b, h, qi, kv):
        return 20.0 * torch.tanh(score / 20.0)

    cases = {
        "T=2048 causal block mask": lambda: flex(q, k, v, block_mask=mask),
        "T=2048 + ALiBi score_mod": lambda: flex(q, k, v, score_mod=alibi, block_mask=mask),
        "T=2048 + softcap score_mod": lambda: flex(q, k, v, score_mod=softcap, block_mask=mask),
    }
    for name, fn in cases.items():
        with torch.no_grad():
            print(f"| {name} | {median_ms(fn):.0f} |", flush=True)
    T = 8192
    q, k, v = inputs(1, T)
    segments = torch.arange(T) // (T // 8)

    def documents(b, h, qi, kv):
        return (kv <= qi) & (segments[qi] == segments[kv])

    for name, fn in (("causal", causal), ("causal + 8 documents", documents)):
        mask = create_block_mask(fn, None, None, T, T, device="cpu")
        with torch.no_grad():
            ms = median_ms(lambda mask=mask: flex(q, k, v, block_mask=mask))
        print(f"| T={T} B=1 {name} | {ms:.0f} |", flush=True)
    q.requires_grad_(True)
    try:
        flex(q, k, v, block_mask=mask).sum().backward()
        print("backward on CPU: ran")
    except Exception as error:  # whatever torch raises is the answer
        print(f"backward on CPU: {type(error).__name__}: {str(error).splitlines()[0]}")


if __name__ == "__main__":
    main()
