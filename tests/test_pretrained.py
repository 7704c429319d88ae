"""kit.pretrained.load: a GPT-2 checkpoint in the Hugging Face layout, written here with
random weights (no model is downloaded), becomes the kit's decoder-only model, whose
logits and greedy generation equal GPT-2's forward pass written here in numpy from its
definition (Radford et al., 2019; the layout of transformers' GPT2LMHeadModel)."""

import dataclasses
import json
import math

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from helpers import slow_beyond
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


# ---------------------------------------------------------------- BERT


def _normal(rng):
    def normal(*shape, scale=0.2):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    return normal


def linear(normal, name, d_in, d_out):
    """A torch Linear's tensors: weight [out, in], bias [out]."""
    return {name + ".weight": normal(d_out, d_in), name + ".bias": normal(d_out)}


def layer_norm(normal, name, d):
    return {name + ".weight": 1 + normal(d), name + ".bias": normal(d)}


BERT_F, TYPES = 24, 2


def bert_weights(seed=0, *, mlm=True, pooler=True, legacy=False) -> dict[str, np.ndarray]:
    """BertForMaskedLM's tensors ("bert." prefix; the tied decoder is not stored) with
    random values; `legacy`: LayerNorm as gamma/beta, as old TF-converted files."""
    normal = _normal(np.random.default_rng(seed))
    e = "bert.embeddings."
    w = {
        e + "word_embeddings.weight": normal(V, D, scale=1.0),
        e + "position_embeddings.weight": normal(P, D),
        e + "token_type_embeddings.weight": normal(TYPES, D),
        **layer_norm(normal, e + "LayerNorm", D),
    }
    for i in range(L):
        h = f"bert.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            w.update(linear(normal, f"{h}attention.self.{name}", D, D))
        w.update(linear(normal, h + "attention.output.dense", D, D))
        w.update(layer_norm(normal, h + "attention.output.LayerNorm", D))
        w.update(linear(normal, h + "intermediate.dense", D, BERT_F))
        w.update(linear(normal, h + "output.dense", BERT_F, D))
        w.update(layer_norm(normal, h + "output.LayerNorm", D))
    if pooler:
        w.update(linear(normal, "bert.pooler.dense", D, D))
    if mlm:
        t = "cls.predictions."
        w.update(linear(normal, t + "transform.dense", D, D))
        w.update(layer_norm(normal, t + "transform.LayerNorm", D))
        w[t + "bias"] = normal(V)
    if legacy:
        w = {
            k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
                "LayerNorm.bias", "LayerNorm.beta"
            ): v
            for k, v in w.items()
        }
    return w


def write_checkpoint(folder, config, weights):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, str(folder / "model.safetensors"))
    return folder


BERT_EPS = 1e-12


def bert_config(**overrides):
    return {
        "model_type": "bert",
        "vocab_size": V,
        "hidden_size": D,
        "num_hidden_layers": L,
        "num_attention_heads": N,
        "intermediate_size": BERT_F,
        "hidden_act": "gelu",
        "max_position_embeddings": P,
        "type_vocab_size": TYPES,
        "layer_norm_eps": BERT_EPS,
        **overrides,
    }


def _ln(x, w, name, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]


def _lin(x, w, name):
    return x @ w[name + ".weight"].T + w[name + ".bias"]


_erf = np.vectorize(math.erf)


def gelu_exact(x):
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _softmax(scores):
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def reference_bert(w, ids, types, length):
    """BERT's forward (Devlin et al., 2019; transformers' BertForMaskedLM layout) over
    one text `[T]` whose first `length` tokens are real (the rest padding) or whose
    `length` is a mask `[T]` (True = token), in float64: (MLM logits [T, V], attention
    weights [L, N, T, T], pooled [D])."""
    w = {k.removeprefix("bert."): v.astype(np.float64) for k, v in w.items()}
    T, H = len(ids), D // N
    e = "embeddings."
    x = w[e + "word_embeddings.weight"][ids] + w[e + "position_embeddings.weight"][:T]
    x = _ln(x + w[e + "token_type_embeddings.weight"][types], w, e + "LayerNorm", BERT_EPS)
    live = np.arange(T) < length if np.ndim(length) == 0 else np.asarray(length, bool)
    maps = []
    for i in range(L):
        h = f"encoder.layer.{i}."
        q, k, v = (
            _lin(x, w, f"{h}attention.self.{n}").reshape(T, N, H).transpose(1, 0, 2)
            for n in ("query", "key", "value")
        )
        p = _softmax(np.where(live, q @ k.transpose(0, 2, 1) / math.sqrt(H), -np.inf))
        maps.append(p)
        z = (p @ v).transpose(1, 0, 2).reshape(T, D)
        x = _ln(
            x + _lin(z, w, h + "attention.output.dense"),
            w,
            h + "attention.output.LayerNorm",
            BERT_EPS,
        )
        f = gelu_exact(_lin(x, w, h + "intermediate.dense"))
        x = _ln(x + _lin(f, w, h + "output.dense"), w, h + "output.LayerNorm", BERT_EPS)
    pooled = np.tanh(_lin(x[0], w, "pooler.dense")) if "pooler.dense.weight" in w else None
    t = "cls.predictions.transform."
    y = _ln(gelu_exact(_lin(x, w, t + "dense")), w, t + "LayerNorm", BERT_EPS)
    logits = y @ w[e + "word_embeddings.weight"].T + w["cls.predictions.bias"]
    return logits, np.stack(maps), pooled


def test_bert_logits_attention_and_pooler_equal_the_definition(tmp_path):
    weights = bert_weights(legacy=True)
    model = pretrained.load(write_checkpoint(tmp_path / "bert", bert_config(), weights))
    plain = {k.replace("gamma", "weight").replace("beta", "bias"): v for k, v in weights.items()}
    ids = IDS[:9]
    types = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1], np.int32)
    length = 7  # two padding tokens: attention_mask [1] * 7 + [0] * 2
    args = (jnp.asarray(ids)[None], jnp.asarray([length]))
    kwargs = {"token_types": jnp.asarray(types)[None], "hooks": model.attention_hooks()}
    logits, aux = jax.jit(lambda *a: model(*a, **kwargs))(*args)
    weights_by_layer = model.attention_sets(aux["activations"])["encoder"][0]
    want_logits, want_maps, want_pooled = reference_bert(plain, ids, types, length)
    np.testing.assert_allclose(logits[0], want_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(weights_by_layer, want_maps, rtol=1e-4, atol=1e-5)
    pooled = model.pool(model.encode(*args, token_types=kwargs["token_types"]))
    np.testing.assert_allclose(pooled[0], want_pooled, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_bert_without_token_types_reads_type_zero_and_a_base_model_loads(tmp_path):
    weights = bert_weights(seed=3, mlm=True, pooler=False)
    model = pretrained.load(write_checkpoint(tmp_path / "mlm", bert_config(), weights))
    assert model.pooler is None
    ids = IDS[:6]
    logits, _ = model(jnp.asarray(ids)[None], jnp.asarray([6]))
    want, _, _ = reference_bert(weights, ids, np.zeros(6, np.int32), 6)
    np.testing.assert_allclose(logits[0], want, rtol=1e-4, atol=1e-4)
    # A BertModel file: no "bert." prefix, a pooler, no masked-LM head.
    base = {k.removeprefix("bert."): v for k, v in bert_weights(seed=4, mlm=False).items()}
    model = pretrained.load(write_checkpoint(tmp_path / "base", bert_config(), base))
    assert model.head_transform is None and model.embed.head_bias is None
    gpt2 = pretrained.load(write_gpt2(tmp_path / "gpt2", gpt2_weights()))
    with pytest.raises(ValueError, match=r"token_types: this model has no token-type"):
        gpt2.embed(jnp.asarray(ids)[None], jnp.arange(6)[None], None, jnp.zeros((1, 6), jnp.int32))
    with pytest.raises(ValueError, match=r"position_embedding_type 'relative_key' is not"):
        config = bert_config(position_embedding_type="relative_key")
        pretrained.load(write_checkpoint(tmp_path / "relative", config, weights))
    with pytest.raises(ValueError, match=r"hidden_act 'swish' is not supported for bert"):
        pretrained.load(
            write_checkpoint(tmp_path / "swish", bert_config(hidden_act="swish"), weights)
        )


# ---------------------------------------------------------------- ViT

IMAGE, PATCH, CHANNELS, CLASSES, VIT_F = 8, 4, 3, 5, 20
VIT_EPS = 1e-12


def vit_weights(seed=0) -> dict[str, np.ndarray]:
    """ViTForImageClassification's tensors ("vit." prefix) with random values."""
    normal = _normal(np.random.default_rng(seed))
    e = "vit.embeddings."
    patches = (IMAGE // PATCH) ** 2
    w = {
        e + "cls_token": normal(1, 1, D),
        e + "position_embeddings": normal(1, patches + 1, D),
        e + "patch_embeddings.projection.weight": normal(D, CHANNELS, PATCH, PATCH),
        e + "patch_embeddings.projection.bias": normal(D),
    }
    for i in range(L):
        h = f"vit.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            w.update(linear(normal, f"{h}attention.attention.{name}", D, D))
        w.update(linear(normal, h + "attention.output.dense", D, D))
        w.update(layer_norm(normal, h + "layernorm_before", D))
        w.update(linear(normal, h + "intermediate.dense", D, VIT_F))
        w.update(linear(normal, h + "output.dense", VIT_F, D))
        w.update(layer_norm(normal, h + "layernorm_after", D))
    w.update(layer_norm(normal, "vit.layernorm", D))
    w.update(linear(normal, "classifier", D, CLASSES))
    return w


def vit_config(**overrides):
    return {
        "model_type": "vit",
        "hidden_size": D,
        "num_hidden_layers": L,
        "num_attention_heads": N,
        "intermediate_size": VIT_F,
        "hidden_act": "gelu",
        "layer_norm_eps": VIT_EPS,
        "image_size": IMAGE,
        "patch_size": PATCH,
        "num_channels": CHANNELS,
        "qkv_bias": True,
        "id2label": {str(i): f"class {i}" for i in range(CLASSES)},
        **overrides,
    }


def reference_vit(w, pixels):
    """ViT's forward (Dosovitskiy et al., 2021; transformers' layout) over one image
    `[C, H, W]` in float64: (class logits [CLASSES], attention weights [L, N, T, T])."""
    w = {k.removeprefix("vit."): v.astype(np.float64) for k, v in w.items()}
    e = "embeddings."
    g = IMAGE // PATCH
    # The patch convolution, stride = kernel = PATCH, written as a sum over each patch.
    grid = pixels.reshape(CHANNELS, g, PATCH, g, PATCH)
    conv = w[e + "patch_embeddings.projection.weight"]
    x = np.einsum("cripj,dcij->rpd", grid, conv).reshape(g * g, D)
    x = x + w[e + "patch_embeddings.projection.bias"]
    x = np.concatenate([w[e + "cls_token"][0], x]) + w[e + "position_embeddings"][0]
    T, H = len(x), D // N
    maps = []
    for i in range(L):
        h = f"encoder.layer.{i}."
        y = _ln(x, w, h + "layernorm_before", VIT_EPS)
        q, k, v = (
            _lin(y, w, f"{h}attention.attention.{n}").reshape(T, N, H).transpose(1, 0, 2)
            for n in ("query", "key", "value")
        )
        p = _softmax(q @ k.transpose(0, 2, 1) / math.sqrt(H))
        maps.append(p)
        x = x + _lin((p @ v).transpose(1, 0, 2).reshape(T, D), w, h + "attention.output.dense")
        f = gelu_exact(_lin(_ln(x, w, h + "layernorm_after", VIT_EPS), w, h + "intermediate.dense"))
        x = x + _lin(f, w, h + "output.dense")
    return _lin(_ln(x, w, "layernorm", VIT_EPS)[0], w, "classifier"), np.stack(maps)


def test_vit_logits_and_attention_equal_the_definition(tmp_path):
    weights = vit_weights()
    model = pretrained.load(write_checkpoint(tmp_path / "vit", vit_config(), weights))
    assert model.cfg.vocab_size == CLASSES and model.cfg.channels == CHANNELS
    pixels = np.random.default_rng(7).standard_normal((2, CHANNELS, IMAGE, IMAGE))
    images = jnp.asarray(pixels.transpose(0, 2, 3, 1), jnp.float32)  # [B, H, W, C]
    logits, aux = jax.jit(lambda x: model(x, hooks=model.attention_hooks()))(images)
    maps = model.attention_sets(aux["activations"])["encoder"]
    for b in range(2):
        want_logits, want_maps = reference_vit(weights, pixels[b])
        np.testing.assert_allclose(logits[b], want_logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(maps[b], want_maps, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"images: expected \[B, 8, 8, 3\], got \[2, 8, 8\]"):
        model(images[..., 0])
    base = {k: v for k, v in weights.items() if not k.startswith("classifier")}
    with pytest.raises(ValueError, match=r"no classifier\.weight"):
        pretrained.load(write_checkpoint(tmp_path / "base", vit_config(), base))


# ---------------------------------------------------------------- T5

T5_F, T5_EPS = 20, 1e-6


def t5_weights(seed, *, heads, d_kv, gated, lm_head) -> dict[str, np.ndarray]:
    """T5ForConditionalGeneration's tensors (no biases anywhere; the relative-position
    table only in block 0 of each stack), random values."""
    normal = _normal(np.random.default_rng(seed))
    inner = heads * d_kv
    w = {"shared.weight": normal(V, D, scale=1.0)}

    def attention(key):
        for n in ("q", "k", "v"):
            w[f"{key}.{n}.weight"] = normal(inner, D)
        w[f"{key}.o.weight"] = normal(D, inner)

    def feed_forward(key):
        for n in ("wi_0", "wi_1") if gated else ("wi",):
            w[f"{key}.{n}.weight"] = normal(T5_F, D)
        w[f"{key}.wo.weight"] = normal(D, T5_F)

    for stack in ("encoder", "decoder"):
        w[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = normal(
            32, heads, scale=1.0
        )
        for i in range(L):
            b = f"{stack}.block.{i}.layer."
            attention(b + "0.SelfAttention")
            norms = [b + "0.layer_norm"]
            if stack == "decoder":
                attention(b + "1.EncDecAttention")
                norms.append(b + "1.layer_norm")
            ff = 2 if stack == "decoder" else 1
            feed_forward(f"{b}{ff}.DenseReluDense")
            norms.append(f"{b}{ff}.layer_norm")
            w.update({n + ".weight": 1 + normal(D) for n in norms})
        w[f"{stack}.final_layer_norm.weight"] = 1 + normal(D)
    if lm_head:
        w["lm_head.weight"] = normal(V, D)
    return w


def t5_bucket(relative, bidirectional, buckets=32, max_distance=128):
    """T5's bucket of key position minus query position (Raffel et al., 2020): exact
    buckets for short distances, logarithmic ones up to max_distance; both directions
    apart when bidirectional, else only the past."""
    out = 0
    if bidirectional:
        buckets //= 2
        out = buckets if relative > 0 else 0
        distance = abs(relative)
    else:
        distance = max(-relative, 0)
    exact = buckets // 2
    if distance < exact:
        return out + distance
    log = math.log(distance / exact) / math.log(max_distance / exact)
    return out + min(exact + int(log * (buckets - exact)), buckets - 1)


def reference_t5(w, src, length, tgt, *, heads, d_kv, gated, scale_output):
    """T5's forward in float64 over one source `[S]` (its first `length` tokens real)
    and decoder input `[T]`: (logits [T, V], {set: attention [L, N, T, S]})."""
    w = {k: v.astype(np.float64) for k, v in w.items()}

    def rms(x, name):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + T5_EPS) * w[name + ".weight"]

    def attention(key, x, memory, bias, live):
        q, k, v = (
            (a @ w[f"{key}.{n}.weight"].T).reshape(len(a), heads, d_kv).transpose(1, 0, 2)
            for n, a in (("q", x), ("k", memory), ("v", memory))
        )
        p = _softmax(np.where(live, q @ k.transpose(0, 2, 1) + bias, -np.inf))  # no 1/sqrt(d)
        z = (p @ v).transpose(1, 0, 2).reshape(len(x), heads * d_kv)
        return z @ w[f"{key}.o.weight"].T, p

    def feed_forward(key, x):
        if gated:
            gate = x @ w[key + ".wi_0.weight"].T
            gelu = 0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
            h = gelu * (x @ w[key + ".wi_1.weight"].T)
        else:
            h = np.maximum(x @ w[key + ".wi.weight"].T, 0)
        return h @ w[key + ".wo.weight"].T

    def position_bias(stack, T, S, bidirectional):
        table = w[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        buckets = [[t5_bucket(s - t, bidirectional) for s in range(S)] for t in range(T)]
        return table[np.array(buckets)].transpose(2, 0, 1)  # [N, T, S]

    maps = {"encoder": [], "decoder": [], "cross": []}
    S, T = len(src), len(tgt)
    live_src = np.arange(S) < length
    x = w["shared.weight"][src]
    bias = position_bias("encoder", S, S, True)
    for i in range(L):
        b = f"encoder.block.{i}.layer."
        n = rms(x, b + "0.layer_norm")
        h, p = attention(b + "0.SelfAttention", n, n, bias, live_src)
        maps["encoder"].append(p)
        x = x + h
        x = x + feed_forward(b + "1.DenseReluDense", rms(x, b + "1.layer_norm"))
    memory = rms(x, "encoder.final_layer_norm")
    y = w["shared.weight"][tgt]
    bias = position_bias("decoder", T, T, False)
    causal = np.tril(np.ones((T, T), bool))
    for i in range(L):
        b = f"decoder.block.{i}.layer."
        n = rms(y, b + "0.layer_norm")
        h, p = attention(b + "0.SelfAttention", n, n, bias, causal)
        maps["decoder"].append(p)
        y = y + h
        n = rms(y, b + "1.layer_norm")
        h, p = attention(b + "1.EncDecAttention", n, memory, 0.0, live_src)
        maps["cross"].append(p)
        y = y + h
        y = y + feed_forward(b + "2.DenseReluDense", rms(y, b + "2.layer_norm"))
    y = rms(y, "decoder.final_layer_norm")
    if scale_output:
        y = y * D**-0.5
    head = w.get("lm_head.weight", w["shared.weight"])
    return y @ head.T, {k: np.stack(v) for k, v in maps.items()}


def t5_config(heads, d_kv, gated, **overrides):
    return {
        "model_type": "t5",
        "vocab_size": V,
        "d_model": D,
        "d_kv": d_kv,
        "d_ff": T5_F,
        "num_layers": L,
        "num_heads": heads,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "layer_norm_epsilon": T5_EPS,
        **overrides,
    }


# v1.0 (ReLU, tied head on scaled states); v1.1 as transformers 4 wrote it (gated GELU,
# tie_word_embeddings false, lm_head stored) and as transformers 5 writes it (no
# lm_head, scale_decoder_outputs false); heads of 8 wide, 3 of them in D = 16.
T5_KINDS = {
    "v1.0": (dict(heads=2, d_kv=8, gated=False), {}, False, True),
    "v1.1": (dict(heads=3, d_kv=8, gated=True), {"tie_word_embeddings": False}, True, False),
    "v1.1, transformers 5": (
        dict(heads=3, d_kv=8, gated=True),
        {"scale_decoder_outputs": False},
        False,
        False,
    ),
}


# The inner loop keeps v1.1 (gated, untied, heads narrower than d_model / num_heads).
@pytest.mark.parametrize("kind", slow_beyond(list(T5_KINDS), ["v1.1"]))
def test_t5_logits_attention_and_generation_equal_the_definition(tmp_path, kind):
    shape, extra, lm_head, scale = T5_KINDS[kind]
    weights = t5_weights(5, **shape, lm_head=lm_head)
    model = pretrained.load(write_checkpoint(tmp_path / "t5", t5_config(**shape, **extra), weights))
    src, length = IDS, 8  # two padding tokens; distances up to 9 reach the log buckets
    # 12 decoder tokens: past distances from 10 on fall in other buckets one-directionally
    # (16 exact) than both ways (8 exact, then logarithmic).
    tgt = np.array([0, 7, 7, 30, 2, 11, 4, 19, 19, 1, 25, 6], np.int32)
    args = (jnp.asarray(src)[None], jnp.asarray([length]), jnp.asarray(tgt)[None])
    logits, aux = jax.jit(lambda *a: model(*a, hooks=model.attention_hooks()))(*args)
    sets = model.attention_sets(aux["activations"])
    want_logits, want_maps = reference_t5(weights, src, length, tgt, **shape, scale_output=scale)
    np.testing.assert_allclose(logits[0], want_logits, rtol=1e-4, atol=1e-4)
    for name, maps in want_maps.items():
        np.testing.assert_allclose(sets[name][0], maps, rtol=1e-4, atol=1e-5, err_msg=name)
    # Greedy generation from the start token (0) against argmax of full forwards.
    new = jax.jit(lambda s, n: decode.greedy_encoder_decoder(model, s, n, bos=0, length=5))(
        args[0], args[1]
    )
    ids = [0]
    for _ in range(5):
        step, _ = reference_t5(weights, src, length, np.array(ids), **shape, scale_output=scale)
        ids.append(int(np.argmax(step[-1])))
    assert np.asarray(new[0]).tolist() == ids[1:]


# ---------------------------------------------------------------- transformers' convention


@pytest.mark.slow  # experiments/against_transformers.py goes through it too
def test_the_transformers_convention_gives_logits_and_every_attention_map(tmp_path):
    # BERT with a padding gap in the middle (transformers' attention_mask may have one).
    weights = bert_weights(seed=6)
    bert = pretrained.load(write_checkpoint(tmp_path / "bert", bert_config(), weights))
    ids, types = IDS[:9], np.array([0, 0, 0, 1, 1, 1, 1, 1, 1], np.int32)
    mask = np.array([1, 1, 0, 1, 1, 1, 1, 0, 0], np.int32)
    out = bert(
        input_ids=ids[None], attention_mask=mask[None], token_type_ids=types[None],
        output_attentions=True,
    )  # fmt: skip
    logits, maps, pooled = reference_bert(weights, ids, types, mask)
    np.testing.assert_allclose(out.logits[0], logits, rtol=1e-4, atol=1e-4)
    assert len(out.attentions) == L and out.attentions[0].shape == (1, N, 9, 9)
    np.testing.assert_allclose(np.stack(out.attentions)[:, 0], maps, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.pooler_output[0], pooled, rtol=1e-4, atol=1e-5)
    # Positional calls are still the kit model's own (hooks, views, decode).
    kit_logits, _ = bert(jnp.asarray(ids)[None], jnp.asarray([9]), token_types=types[None])
    assert kit_logits.shape == (1, 9, V)
    # T5: encoder, decoder and cross maps; ViT: pixel_values [B, C, H, W].
    shape, extra, lm_head, scale = T5_KINDS["v1.1"]
    t5w = t5_weights(8, **shape, lm_head=lm_head)
    t5 = pretrained.load(write_checkpoint(tmp_path / "t5", t5_config(**shape, **extra), t5w))
    tgt = np.array([0, 7, 7, 30], np.int32)
    out = t5(
        input_ids=IDS[None], attention_mask=(np.arange(10) < 8)[None], decoder_input_ids=tgt[None],
        output_attentions=True,
    )  # fmt: skip
    logits, maps = reference_t5(t5w, IDS, 8, tgt, **shape, scale_output=scale)
    np.testing.assert_allclose(out.logits[0], logits, rtol=1e-4, atol=1e-4)
    for name in ("encoder", "decoder", "cross"):
        got = np.stack(getattr(out, f"{name}_attentions"))[:, 0]
        np.testing.assert_allclose(got, maps[name], rtol=1e-4, atol=1e-5, err_msg=name)
    vitw = vit_weights(seed=2)
    vit = pretrained.load(write_checkpoint(tmp_path / "vit", vit_config(), vitw))
    pixels = np.random.default_rng(3).standard_normal((1, CHANNELS, IMAGE, IMAGE))
    out = vit(pixel_values=pixels.astype(np.float32), output_attentions=True)
    logits, maps = reference_vit(vitw, pixels[0])
    np.testing.assert_allclose(out.logits[0], logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.stack(out.attentions)[:, 0], maps, rtol=1e-4, atol=1e-5)
    # Inputs a kind does not take, and T5's right padding, are refused by name.
    with pytest.raises(ValueError, match=r"pixel_values: this encoder-only model takes no such"):
        bert(input_ids=ids[None], pixel_values=pixels)
    with pytest.raises(ValueError, match=r"decoder_input_ids: an encoder-decoder call needs"):
        t5(input_ids=IDS[None])
    with pytest.raises(ValueError, match=r"attention_mask: an encoder-decoder model reads right"):
        gap = np.array([[1, 0, 1, 1, 1, 1, 1, 1, 1, 1]])
        t5(input_ids=IDS[None], attention_mask=gap, decoder_input_ids=tgt[None])
    with pytest.raises(ValueError, match=r"attention_mask: expected the shape of input_ids"):
        bert(input_ids=ids[None], attention_mask=mask[None, :5])
    with pytest.raises(ValueError, match=r"pixel_values: this vision model's call needs"):
        vit(output_attentions=True)
    with pytest.raises(ValueError, match=r"input_ids: transformers' inputs come alone"):
        bert(ids[None], input_ids=ids[None])


@pytest.mark.slow  # the inner loop keeps GPT-2's greedy generation against the definition
def test_generate_greedy_and_sampled(tmp_path):
    weights = gpt2_weights(seed=9)
    model = pretrained.load(write_gpt2(tmp_path / "gpt2", weights))
    prompt = IDS[None, :4]
    greedy = np.asarray(model.generate(prompt, max_new_tokens=6))
    ids = list(IDS[:4])
    for _ in range(6):
        ids.append(int(np.argmax(reference_logits(weights, np.array(ids))[-1])))
    assert greedy.tolist() == [ids]  # prompt + new, as transformers returns them
    # top_k=1 is greedy whatever the temperature; top_k=3 draws only among each step's
    # three most likely tokens (of the reference's logits at the drawn prefix).
    key = jax.random.key(4)
    one = model.generate(prompt, max_new_tokens=6, temperature=2.0, top_k=1, rng=key)
    assert np.asarray(one).tolist() == [ids]
    drawn = np.asarray(model.generate(prompt, max_new_tokens=6, temperature=5.0, top_k=3, rng=key))[
        0
    ]
    for t in range(4, 10):
        top3 = np.argsort(reference_logits(weights, drawn[:t])[-1])[-3:]
        assert drawn[t] in top3
    assert drawn.tolist() != ids  # at temperature 5 the draw leaves the argmax somewhere
    again = model.generate(prompt, max_new_tokens=6, temperature=5.0, top_k=3, rng=key)
    assert np.asarray(again)[0].tolist() == drawn.tolist()  # the same key, the same draw
    with pytest.raises(ValueError, match=r"max_new_tokens: expected 1 to 12 .* got 13"):
        model.generate(prompt, max_new_tokens=13)
    with pytest.raises(ValueError, match=r"rng: sampling \(temperature > 0\) needs"):
        model.generate(prompt, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match=r"temperature: expected >= 0, got -1"):
        model.generate(prompt, max_new_tokens=2, temperature=-1)
    with pytest.raises(ValueError, match=r"top_k: expected at least 1, got 0"):
        model.generate(prompt, max_new_tokens=2, temperature=1.0, top_k=0, rng=key)


TEXTS = [
    "Mark told Sam that he was leaving .",
    "When Mary and John went to the store , John gave a drink to",
    "When Mary and John went to the store , Mary gave a drink to",
]


def write_tokenizer(folder):
    """A word-level tokenizer trained here on TEXTS (22 words, within V), saved as
    tokenizer.json; returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    assert tokenizer.get_vocab_size() <= V
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer


def test_a_tokenizer_json_in_the_folder_is_model_tokenizer(tmp_path):
    folder = write_gpt2(tmp_path / "gpt2", gpt2_weights())
    assert pretrained.load(folder).tokenizer is None
    tokenizer = write_tokenizer(folder)
    model = pretrained.load(folder)
    encoded = model.tokenizer.encode("Mark told Sam that he was leaving .")
    assert encoded.tokens == ["Mark", "told", "Sam", "that", "he", "was", "leaving", "."]
    assert encoded.ids == tokenizer.encode("Mark told Sam that he was leaving .").ids
    logits = model(input_ids=np.array([encoded.ids])).logits
    assert logits.shape == (1, 8, V)


# ---------------------------------------------------------------- the tools on loaded models


@pytest.mark.slow
def test_probe_patching_and_head_measures_read_a_loaded_model(tmp_path):
    from kit import hf
    from kit.analysis import heads, patching, probe

    bert_w = bert_weights(seed=11)
    folder = write_checkpoint(tmp_path / "bert", bert_config(), bert_w)
    with pytest.raises(ValueError, match=r"model\.tokenizer: the checkpoint has no tokenizer"):
        hf.TokenizerTask.for_model(pretrained.load(folder), "bert")
    tokenizer = write_tokenizer(folder)
    bert = pretrained.load(folder)
    task = hf.TokenizerTask.for_model(bert, "bert")
    # The probe's reading: the tokenizer's tokens, the maps of the definition, the
    # prediction its argmax.
    reading = probe.read_attention(task, *nnx.split(bert), TEXTS[0])
    ids = np.array(tokenizer.encode(TEXTS[0]).ids)
    logits, maps, _ = reference_bert(bert_w, ids, np.zeros(len(ids), int), len(ids))
    entry = reading.attention["encoder"]
    assert entry["key_tokens"] == TEXTS[0].split()
    np.testing.assert_allclose(entry["weights"], maps, rtol=1e-4, atol=1e-5)
    assert reading.prediction == tokenizer.decode(logits.argmax(-1).tolist())
    # Head ablation's metric with every head kept: the definition's mean cross-entropy
    # of each token at its own position, padding left out (texts of 8 and 14 tokens).
    tokens, mask = heads.text_batch(task, TEXTS[:2], bert.cfg.max_len)
    assert tokens.shape == (2, 14) and mask.sum() == 8 + 14 and (tokens[0, 8:] == -1).all()
    measure = heads.text_loss(bert, tokens, mask)
    want = []
    for row, live in zip(tokens, mask, strict=True):
        ref, _, _ = reference_bert(bert_w, np.where(live, row, 0), np.zeros(14, int), live)
        shifted = ref - ref.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        want += [-logp[t, row[t]] for t in np.flatnonzero(live)]
    shapes = bert.attention_shapes()
    kept = measure({n: np.ones(s, np.float32) for n, s in shapes.items()})
    np.testing.assert_allclose(kept, np.mean(want), rtol=1e-4)
    assert measure({n: np.zeros(s, np.float32) for n, s in shapes.items()}) != kept
    # Patching a loaded GPT-2: the answers by the tokenizer, read at the last position.
    gpt2_w = gpt2_weights(seed=12)
    folder = write_gpt2(tmp_path / "gpt2", gpt2_w)
    write_tokenizer(folder)
    gpt2 = pretrained.load(folder)
    task = hf.TokenizerTask.for_model(gpt2, "gpt2")
    result = patching.patch_text(gpt2, task, TEXTS[1], TEXTS[2], answers=("Mary", "John"))
    mary, john = (tokenizer.encode(w).ids[0] for w in ("Mary", "John"))
    for text, got in ((TEXTS[1], result.clean), (TEXTS[2], result.corrupt)):
        ref = reference_logits(gpt2_w, np.array(tokenizer.encode(text).ids))
        np.testing.assert_allclose(got, ref[-1, mary] - ref[-1, john], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"answers: 'Mary John' is 2 tokens"):
        patching.patch_text(gpt2, task, TEXTS[1], TEXTS[2], answers=("Mary John", "John"))


@pytest.mark.slow
def test_the_commands_run_on_loaded_checkpoints(tmp_path):
    """visualize.py (BERT), patch.py and heads.py (GPT-2) with --pretrained, and
    generate.py (T5), on folders with a tokenizer (fresh processes, as users run them)."""
    import os
    import subprocess
    import sys

    from helpers import ROOT, command_env

    gpt2 = write_gpt2(tmp_path / "gpt2", gpt2_weights(seed=13))
    bert = write_checkpoint(tmp_path / "bert", bert_config(), bert_weights(seed=14))
    shape, extra, lm_head, _ = T5_KINDS["v1.0"]
    t5 = write_checkpoint(
        tmp_path / "t5", t5_config(**shape, **extra), t5_weights(15, **shape, lm_head=lm_head)
    )
    for folder in (gpt2, bert, t5):
        write_tokenizer(folder)
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")

    def run(script, *args):
        command = [sys.executable, os.path.join(ROOT, "experiments", script), *args]
        done = subprocess.run(
            command, env=command_env(), capture_output=True, text=True, timeout=300
        )
        return done

    views = run(
        "visualize.py", f"--pretrained={bert}", f"--text={TEXTS[0]}", f"--out={tmp_path / 'v'}"
    )
    assert views.returncode == 0, views.stderr[-3000:]
    for name in ("encoder.png", "index.html"):
        assert (tmp_path / "v" / name).stat().st_size > 1000
    patch = run(
        "patch.py", f"--pretrained={gpt2}", f"--clean={TEXTS[1]}", f"--corrupt={TEXTS[2]}",
        "--answers=Mary,John", f"--out={tmp_path / 'p'}",
    )  # fmt: skip
    assert patch.returncode == 0, patch.stderr[-3000:]
    assert "answer at position 13: 'Mary' (clean) vs 'John'" in patch.stdout
    report = json.loads((tmp_path / "p" / "patching.json").read_text())
    assert len(report["positions"]) == L
    texts = f"--texts={tmp_path / 'texts.txt'}"
    heads = run("heads.py", f"--pretrained={gpt2}", texts, f"--out={tmp_path / 'h'}")
    assert heads.returncode == 0, heads.stderr[-3000:]
    result = json.loads((tmp_path / "h" / "heads.json").read_text())
    assert result["metric"] == "loss"
    assert np.shape(result["sets"]["decoder"]["ablation"]["per_head"]) == (L, N)
    # T5 through generate.py: its decoder ids after the start token, as model.generate's.
    prompt = "--prompt=Mark told Sam"
    generated = run("generate.py", f"--pretrained={t5}", prompt, "--max_new_tokens=4")
    assert generated.returncode == 0, generated.stderr[-3000:]
    ids = [write_tokenizer(t5).encode("Mark told Sam").ids]
    want = pretrained.load(t5).generate(np.array(ids), max_new_tokens=4)
    assert f"ids:       {np.asarray(want)[0, 1:].tolist()}" in generated.stdout


# ---------------------------------------------------------------- back out: save


def _files(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    "family",
    slow_beyond(["gpt2", "bert", "bert_base", "t5_v1.0", "t5_v1.1", "vit"], ["gpt2", "t5_v1.1"]),
)
def test_save_writes_the_files_load_read(tmp_path, family):
    """load(save(m)) == m, and save(load(files)) gives back every tensor load read, under
    the same keys (transformers' buffers such as GPT-2's attn.bias are not parameters)."""
    if family == "gpt2":
        original = write_gpt2(tmp_path / "a", gpt2_weights(seed=20))
    elif family.startswith("bert"):
        weights = bert_weights(seed=21, mlm=family == "bert", pooler=True)
        if family == "bert_base":
            weights = {k.removeprefix("bert."): v for k, v in weights.items()}
        original = write_checkpoint(tmp_path / "a", bert_config(), weights)
    elif family.startswith("t5"):
        shape, extra, lm_head, _ = T5_KINDS["v1.0" if family == "t5_v1.0" else "v1.1"]
        weights = t5_weights(22, **shape, lm_head=lm_head)
        original = write_checkpoint(tmp_path / "a", t5_config(**shape, **extra), weights)
    else:
        original = write_checkpoint(tmp_path / "a", vit_config(), vit_weights(seed=23))
    write_tokenizer(original)
    model = pretrained.load(original)
    saved = pretrained.save(model, tmp_path / "b")
    again = pretrained.load(saved)
    assert again.cfg == model.cfg and type(again) is type(model)
    chex.assert_trees_all_equal(nnx.state(again, nnx.Param), nnx.state(model, nnx.Param))
    assert again.tokenizer.encode(TEXTS[0]).ids == model.tokenizer.encode(TEXTS[0]).ids
    theirs, ours = _files(original), _files(tmp_path / "b")
    theirs = {k: v for k, v in theirs.items() if not k.endswith(".attn.bias")}
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


@pytest.mark.slow
def test_a_kit_trained_model_saves_as_gpt2_or_says_what_does_not_fit(tmp_path):
    from kit import models

    # A decoder-only model of the kit's own (no key bias) with GPT-2's architecture.
    cfg = models.ModelConfig(
        kind="decoder_only", vocab_size=V, d_model=D, num_heads=N, num_layers=L, d_ff=24,
        max_len=P, positions="learned", norm_eps=1e-5, tie_embeddings=True,
    )  # fmt: skip
    model = models.build(cfg, jax.random.key(0))
    loaded = pretrained.load(pretrained.save(model, tmp_path / "gpt2"))
    tokens = jnp.asarray(IDS)[None]
    mask = jnp.ones(tokens.shape, bool)
    np.testing.assert_allclose(
        loaded(tokens, mask)[0], model(tokens, mask)[0], rtol=1e-6, atol=1e-6
    )
    k = _files(tmp_path / "gpt2")["transformer.h.0.attn.c_attn.bias"][D : 2 * D]
    assert not k.any()  # the kit model's missing key bias, written as zeros
    # Options a GPT-2 file cannot hold are named.
    with pytest.raises(
        ValueError, match=r"model\.positions: 'sinusoidal', but a gpt2 .* 'learned'"
    ):
        pretrained.save(
            models.build(dataclasses.replace(cfg, positions="sinusoidal"), jax.random.key(0)),
            tmp_path / "x",
        )
    with pytest.raises(ValueError, match=r"model\.tie_embeddings: False, but a gpt2 .* True"):
        pretrained.save(
            models.build(dataclasses.replace(cfg, tie_embeddings=False), jax.random.key(0)),
            tmp_path / "y",
        )
    # A T5 model with a nonzero bias (T5 has none) is refused by the parameter's name.
    shape, extra, lm_head, _ = T5_KINDS["v1.0"]
    t5 = pretrained.load(
        write_checkpoint(
            tmp_path / "t5", t5_config(**shape, **extra), t5_weights(3, **shape, lm_head=lm_head)
        )
    )
    t5.encoder.layers[0].feed_forward.up.bias.set_value(
        jnp.ones_like(t5.encoder.layers[0].feed_forward.up.bias[...])
    )
    with pytest.raises(
        ValueError, match=r"model\.encoder\.layers\.0\.feed_forward\.up\.bias: nonzero"
    ):
        pretrained.save(t5, tmp_path / "t5b")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"path: .* is a file"):
        pretrained.save(model, tmp_path / "file")
