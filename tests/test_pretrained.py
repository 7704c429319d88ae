"""kit.pretrained.load: a GPT-2 checkpoint in the Hugging Face layout, written here with
random weights (no model is downloaded), becomes the kit's decoder-only model, whose
logits and greedy generation equal GPT-2's forward pass written here in numpy from its
definition (Radford et al., 2019; the layout of transformers' GPT2LMHeadModel)."""

import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from kit import decode, pretrained
from kit.hooks import Hooks

V, P, D, L, N = 40, 16, 16, 2, 2  # vocabulary, positions, width, layers, heads
EPS = 1e-5


def gpt2_weights(seed=0) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel's tensors (Conv1D weights [in, out]) with random values."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=0.2):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    w = {"wte.weight": normal(V, D, scale=1.0), "wpe.weight": normal(P, D)}
    for i in range(L):
        h = f"h.{i}."
        w.update({
            h + "ln_1.weight": 1 + normal(D), h + "ln_1.bias": normal(D),
            h + "attn.c_attn.weight": normal(D, 3 * D), h + "attn.c_attn.bias": normal(3 * D),
            h + "attn.c_proj.weight": normal(D, D), h + "attn.c_proj.bias": normal(D),
            h + "ln_2.weight": 1 + normal(D), h + "ln_2.bias": normal(D),
            h + "mlp.c_fc.weight": normal(D, 4 * D), h + "mlp.c_fc.bias": normal(4 * D),
            h + "mlp.c_proj.weight": normal(4 * D, D), h + "mlp.c_proj.bias": normal(D),
            # transformers' causal-mask buffers, in older checkpoints: not parameters
            h + "attn.bias": np.tril(np.ones((1, 1, P, P), np.float32)),
        })  # fmt: skip
    w.update({"ln_f.weight": 1 + normal(D), "ln_f.bias": normal(D)})
    return w


def write_gpt2(folder, weights, *, prefix="transformer.", dtype=None, **config):
    folder.mkdir(parents=True, exist_ok=True)
    body = {
        "model_type": "gpt2",
        "vocab_size": V,
        "n_positions": P,
        "n_embd": D,
        "n_layer": L,
        "n_head": N,
        "n_inner": None,
        "layer_norm_epsilon": EPS,
        "activation_function": "gelu_new",
        **config,
    }
    (folder / "config.json").write_text(json.dumps(body))
    tensors = {prefix + k: v.astype(dtype) if dtype else v for k, v in weights.items()}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def reference_logits(w, ids):
    """GPT-2's forward pass over token ids `[T]` in float64 numpy -> logits `[T, V]`."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    T, H = len(ids), D // N

    def norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + EPS) * w[name + ".weight"] + w[name + ".bias"]

    def gelu(x):  # gelu_new
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    x = w["wte.weight"][ids] + w["wpe.weight"][:T]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(L):
        h = f"h.{i}."
        qkv = norm(x, h + "ln_1") @ w[h + "attn.c_attn.weight"] + w[h + "attn.c_attn.bias"]
        q, k, v = (a.reshape(T, N, H).transpose(1, 0, 2) for a in np.split(qkv, 3, axis=-1))
        scores = np.where(causal, q @ k.transpose(0, 2, 1) / math.sqrt(H), -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        z = (p @ v).transpose(1, 0, 2).reshape(T, D)
        x = x + z @ w[h + "attn.c_proj.weight"] + w[h + "attn.c_proj.bias"]
        f = gelu(norm(x, h + "ln_2") @ w[h + "mlp.c_fc.weight"] + w[h + "mlp.c_fc.bias"])
        x = x + f @ w[h + "mlp.c_proj.weight"] + w[h + "mlp.c_proj.bias"]
    return norm(x, "ln_f") @ w["wte.weight"].T


IDS = np.array([3, 17, 5, 5, 39, 0, 12, 8, 21, 33], np.int32)


def _logits(model, ids):
    tokens = jnp.asarray(ids)[None]
    return np.asarray(jax.jit(lambda t: model(t, jnp.ones(t.shape, bool))[0])(tokens)[0])


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_gpt2_logits_equal_the_definition(tmp_path, prefix):
    weights = gpt2_weights()
    model = pretrained.load(write_gpt2(tmp_path / "gpt2", weights, prefix=prefix))
    assert model.cfg.norm_eps == EPS and model.head is None  # tied to the embedding
    got = _logits(model, IDS)
    want = reference_logits(weights, IDS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # The keys as GPT-2 computes them, bias included (the softmax cancels the key bias,
    # so the logits alone cannot tell; the hook point and the views show it).
    tokens = jnp.asarray(IDS)[None]
    _, aux = model(tokens, jnp.ones(tokens.shape, bool), hooks=Hooks(read="decoder.0.attn.k"))
    x = weights["wte.weight"][IDS] + weights["wpe.weight"][: len(IDS)]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    x = (x - mu) / np.sqrt(var + EPS) * weights["h.0.ln_1.weight"] + weights["h.0.ln_1.bias"]
    qkv = x @ weights["h.0.attn.c_attn.weight"] + weights["h.0.attn.c_attn.bias"]
    k = qkv[:, D : 2 * D].reshape(len(IDS), N, D // N)
    np.testing.assert_allclose(aux["activations"]["decoder.0.attn.k"][0], k, rtol=1e-4, atol=1e-4)


def test_gpt2_greedy_generation_equals_the_definitions_argmax_loop(tmp_path):
    weights = gpt2_weights(seed=1)
    model = pretrained.load(write_gpt2(tmp_path / "gpt2", weights))
    prompt = IDS[:4]
    length = 8
    out = jax.jit(
        lambda t: decode.greedy_decoder_only(model, t, jnp.ones(t.shape, bool), length=length)
    )(jnp.asarray(prompt)[None])
    ids = list(prompt)
    for _ in range(length):  # the KV cache against full forward passes
        ids.append(int(np.argmax(reference_logits(weights, np.array(ids))[-1])))
    assert np.asarray(out[0]).tolist() == ids[len(prompt) :]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_half_precision_checkpoints_load(tmp_path, dtype):
    weights = gpt2_weights(seed=2)
    model = pretrained.load(write_gpt2(tmp_path / "gpt2", weights, dtype=dtype))
    rounded = {k: v.astype(dtype).astype(np.float32) for k, v in weights.items()}
    np.testing.assert_allclose(
        _logits(model, IDS), reference_logits(rounded, IDS), rtol=1e-4, atol=1e-4
    )


def test_bad_checkpoints_name_what_is_wrong(tmp_path):
    weights = gpt2_weights()
    with pytest.raises(ValueError, match=r"model_type 'llama' is not supported; .* gpt2"):
        pretrained.load(write_gpt2(tmp_path / "a", weights, model_type="llama"))
    partial = {k: v for k, v in weights.items() if k != "h.1.mlp.c_fc.bias"}
    with pytest.raises(ValueError, match=r"tensor 'h\.1\.mlp\.c_fc\.bias' is missing"):
        pretrained.load(write_gpt2(tmp_path / "b", partial))
    wrong = {**weights, "h.0.attn.c_proj.weight": np.zeros((D, D + 1), np.float32)}
    with pytest.raises(
        ValueError, match=r"'h\.0\.attn\.c_proj\.weight' has shape \(16, 17\), .* needs \(16, 16\)"
    ):
        pretrained.load(write_gpt2(tmp_path / "c", wrong))
    with pytest.raises(ValueError, match=r"path_or_name: .* has no config\.json"):
        (tmp_path / "empty").mkdir()
        pretrained.load(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"dtype: expected one of"):
        pretrained.load(tmp_path / "a", dtype="float16")
    model = pretrained.load(write_gpt2(tmp_path / "d", weights))
    too_long = jnp.zeros((1, P + 1), jnp.int32)
    with pytest.raises(ValueError, match=r"tokens: 17 positions, but the model has 16"):
        model(too_long, jnp.ones(too_long.shape, bool))
