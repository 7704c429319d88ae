"""Largest differences between kit.dot_product_attention and jax.nn's xla path.

    python experiments/compare_jax_nn.py

Prints a markdown table: for each case and dtype, the max abs error of the
output and of dq, dk, dv (and dbias) against
jax.nn.dot_product_attention(implementation="xla"). Rows with no live key
are excluded (kit returns zeros there, jax.nn the mean of the values).
kit runs under jit; jax.nn runs eagerly (under jit on CPU it asks for a
float16 dot the CPU lacks).
"""

import jax
import jax.numpy as jnp
import numpy as np

import kit

B, T, N, K, H = 2, 64, 8, 2, 32
rng = np.random.default_rng(0)
LENGTHS = np.array([40, 64], np.int32)
CASES = {
    "plain": {},
    "bias": {"bias": True},
    "causal": {"is_causal": True},
    "mask": {"mask": rng.random((B, 1, T, T)) < 0.7},
    "lengths": {"query_seq_lengths": LENGTHS, "key_value_seq_lengths": LENGTHS[::-1].copy()},
    "causal+window": {"is_causal": True, "local_window_size": (8, 0)},
}


def grads(fn, q, k, v, bias, mask, kw, live, jit=False):
    def loss(q, k, v, bias):
        out = fn(q, k, v, bias, mask, **kw).astype(jnp.float32)
        return jnp.sum(jnp.sin(out) * live), out * live

    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    grad = jax.grad(loss, argnums=argnums, has_aux=True)
    return (jax.jit(grad) if jit else grad)(q, k, v, bias)


def main():
    print("| case | dtype | out | dq | dk | dv | dbias |")
    print("|---|---|---|---|---|---|---|")
    for name, case in CASES.items():
        for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
            kw = dict(case)
            keys = jax.random.split(jax.random.key(0), 4)
            q = jax.random.normal(keys[0], (B, T, N, H)).astype(dtype)
            k, v = (jax.random.normal(r, (B, T, K, H)).astype(dtype) for r in keys[1:3])
            bias = jax.random.normal(keys[3], (B, N, T, T)) if kw.pop("bias", False) else None
            mask = kw.pop("mask", None)
            live_rows = np.asarray(kit.attention_weights(q, k, bias, mask, **kw)).sum(-1) > 0
            live = jnp.asarray(live_rows.transpose(0, 2, 1)[..., None], jnp.float32)
            (g_kit, out_kit) = grads(
                kit.dot_product_attention, q, k, v, bias, mask, kw, live, jit=True
            )
            g_ref, out_ref = grads(jax.nn.dot_product_attention, q, k, v, bias, mask, kw, live)
            errors = [jnp.max(jnp.abs(out_kit - out_ref))]
            errors += [
                jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                for a, b in zip(g_kit, g_ref, strict=True)
            ]
            cells = [f"{float(e):.1e}" for e in errors] + ["-"] * (5 - len(errors))
            print(f"| {name} | {jnp.dtype(dtype).name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
