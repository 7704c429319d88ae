"""The Hugging Face families `kit.pretrained` reads and writes: for each, its config.json
as a kit `ModelConfig` (and back), and a table from the kit model's parameters to the
file's tensors, which `load` fills from and `save` inverts.

Each family is checked against transformers itself
(experiments/against_transformers.py) and against a numpy forward written from its
definition (tests/test_pretrained.py):

- GPT-2 (`GPT2LMHeadModel` / `GPT2Model` files, with or without the `transformer.`
  prefix): the decoder-only model with learned positions, pre-LayerNorm blocks with
  epsilon `layer_norm_epsilon`, GELU in its tanh form (`gelu_new`), a bias on the key
  projection and the head tied to the token embedding. GPT-2's `Conv1D` weights are
  stored `[in, out]`, as the kit's kernels; its fused `c_attn` `[D, 3D]` is split into
  the query, key and value `[D, N, H]`.
- BERT (`BertForMaskedLM`, or `BertModel` with its pooler; `bert.` prefix or none;
  LayerNorm's legacy `gamma`/`beta` names): the encoder-only model with post-LayerNorm
  blocks (epsilon `layer_norm_eps`, 1e-12), exact GELU, token-type embeddings and a
  LayerNorm on the embedding; the masked-LM head's transform (dense, GELU, LayerNorm)
  and the decoder tied to the token embedding with its own bias. `model.encode` gives
  the last states, `model.pool` the pooler's output. A `BertModel` has no masked-LM
  head: its kit model's logits are the last states times the token embedding.
- ViT (`ViTForImageClassification`, `vit.` prefix): the vision transformer with
  pre-LayerNorm blocks (epsilon 1e-12), exact GELU, a class token, learned positions
  and the patch convolution as the kit's patch projection over p x p x C pixels
  (images `[B, H, W, C]`: transformers' `pixel_values` `[B, C, H, W]` transposed).

- T5 v1.0 and v1.1/flan (`T5ForConditionalGeneration`): the encoder-decoder model with
  RMSNorm before each sublayer, no 1/sqrt(d) in attention, no biases (the kit's are
  zero), T5's relative-position bias as a score function (`kit.mods.t5_relative`, block
  0's table per stack), ReLU (v1.0) or gated GELU (v1.1), and v1.0's head reading the
  last states scaled by d_model ** -0.5.

transformers' torch Linear weights are `[out, in]` and become the kit's `[in, out]`
kernels; separate query, key and value projections become `[D, N, H]`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from kit import models

Tensors = dict[str, np.ndarray]
State = dict[tuple, tuple[str, Any]]


class Recording:
    """In place of a checkpoint's tensors, for `save`: each tensor asked for is made of
    its elements' global indices, so that the family's table (the same one `load`
    reads with) tells where each element of each kit parameter goes."""

    def __init__(self):
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.offsets: dict[str, int] = {}
        self.size = 0

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.offsets:
            self.shapes[key], self.offsets[key] = tuple(shape), self.size
            self.size += int(np.prod(shape))
        start = self.offsets[key]
        return np.arange(start, start + int(np.prod(shape)), dtype=np.int64).reshape(shape)


class _Reader:
    """A checkpoint's tensors by key, checked as they are read: a missing key or a
    shape other than the config's is a ValueError naming the key."""

    def __init__(self, family: str, tensors: Tensors, prefixes: tuple[str, ...] = ()):
        # Keys with or without the task model's prefix ("transformer.", "bert.", "vit."),
        # and LayerNorm's legacy gamma/beta names.
        self.family = family
        self.recording = tensors if isinstance(tensors, Recording) else None
        self.tensors = {}
        if self.recording is not None:
            return
        for key, value in tensors.items():
            for prefix in prefixes:
                key = key.removeprefix(prefix)
            key = key.replace("LayerNorm.gamma", "LayerNorm.weight")
            key = key.replace("LayerNorm.beta", "LayerNorm.bias")
            self.tensors[key] = value

    def has(self, key: str) -> bool:
        return self.recording is not None or key in self.tensors

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if self.recording is not None:
            return self.recording.get(key, shape)
        if key not in self.tensors:
            raise ValueError(
                f"checkpoint: tensor {key!r} is missing (a {self.family} checkpoint has it)"
            )
        x = self.tensors[key]
        if tuple(x.shape) != shape:
            raise ValueError(
                f"checkpoint: tensor {key!r} has shape {tuple(x.shape)}, but the config "
                f"needs {shape}"
            )
        return x

    def linear(self, key: str, d_in: int, d_out: int, bias: bool = True) -> dict:
        """A torch Linear `key` (weight [out, in]) as the kit's kernel [in, out] and bias."""
        out = {"kernel": (key + ".weight", self.get(key + ".weight", (d_out, d_in)).T)}
        if bias:
            out["bias"] = (key + ".bias", self.get(key + ".bias", (d_out,)))
        return out

    def norm(self, key: str, d: int, bias: bool = True) -> dict:
        out = {"scale": (key + ".weight", self.get(key + ".weight", (d,)))}
        if bias:
            out["bias"] = (key + ".bias", self.get(key + ".bias", (d,)))
        return out

    def attention(self, keys: dict[str, str], cfg: models.ModelConfig, bias: bool = True):
        """Separate torch Linear query, key, value and output projections as the kit's
        `[D, N, H]` and `[N, H, D]` kernels (and `[N, H]`, `[D]` biases)."""
        D, N = cfg.d_model, cfg.num_heads
        H = D // N
        out = {}
        for name in ("query", "key", "value"):
            for leaf, (at, x) in self.linear(keys[name], D, D, bias).items():
                out[(name, leaf)] = (at, x.reshape((D, N, H) if leaf == "kernel" else (N, H)))
        for leaf, (at, x) in self.linear(keys["out"], D, D, bias).items():
            out[("out", leaf)] = (at, x.reshape(N, H, D) if leaf == "kernel" else x)
        return out


def _put(state: State, where: tuple, pairs: dict) -> None:
    """state[where + leaf] = pair, for each leaf (a name or a tuple of names)."""
    for leaf, pair in pairs.items():
        state[(*where, *(leaf if isinstance(leaf, tuple) else (leaf,)))] = pair


def _activation(config: dict[str, Any], key: str, family: str, supported: dict) -> str:
    theirs = config.get(key, next(iter(supported)))
    if theirs not in supported:
        raise ValueError(
            f"config.json: {key} {theirs!r} is not supported for {family} (the kit "
            f"runs {', '.join(sorted(supported))})"
        )
    return supported[theirs]


# transformers' names of the activations the kit's feed-forward runs (kit.nn.ACTIVATIONS).
_GELU = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _gpt2_config(config: dict[str, Any], tensors: Tensors, dtype: str) -> models.ModelConfig:
    d_model, num_heads = int(config["n_embd"]), int(config["n_head"])
    return models.ModelConfig(
        kind="decoder_only",
        vocab_size=int(config["vocab_size"]),
        d_model=d_model,
        num_heads=num_heads,
        num_layers=int(config["n_layer"]),
        d_ff=int(config.get("n_inner") or 4 * d_model),
        max_len=int(config["n_positions"]),
        positions="learned",
        dtype=dtype,
        norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        key_bias=True,
        tie_embeddings=True,
        activation=_activation(
            config,
            "activation_function",
            "gpt2",
            {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"},
        ),
    )


def _gpt2_state(cfg: models.ModelConfig, tensors: Tensors) -> State:
    """The kit state's path -> (checkpoint key, array) of a GPT-2 checkpoint."""
    read = _Reader("gpt2", tensors, ("transformer.",))
    D, N, F = cfg.d_model, cfg.num_heads, cfg.d_ff
    H = D // N
    state: State = {
        ("embed", "tokens"): ("wte.weight", read.get("wte.weight", (cfg.vocab_size, D))),
        ("embed", "learned"): ("wpe.weight", read.get("wpe.weight", (cfg.max_len, D))),
    }
    _put(state, ("decoder", "norm"), read.norm("ln_f", D))
    for i in range(cfg.num_layers):
        h, layer = f"h.{i}.", ("decoder", "layers", i)
        # Conv1D weights are [in, out], as the kit's kernels; c_attn fuses q, k and v.
        qkv = read.get(h + "attn.c_attn.weight", (D, 3 * D))
        qkv_bias = read.get(h + "attn.c_attn.bias", (3 * D,))
        for j, name in enumerate(("query", "key", "value")):
            at = f"{h}attn.c_attn[{name}]"
            _put(state, (*layer, "self_attention", name), {
                "kernel": (at, qkv[:, j * D : (j + 1) * D].reshape(D, N, H)),
                "bias": (at, qkv_bias[j * D : (j + 1) * D].reshape(N, H)),
            })  # fmt: skip
        proj = read.get(h + "attn.c_proj.weight", (D, D))
        _put(state, (*layer, "self_attention", "out"), {
            "kernel": (h + "attn.c_proj", proj.reshape(N, H, D)),
            "bias": (h + "attn.c_proj.bias", read.get(h + "attn.c_proj.bias", (D,))),
        })  # fmt: skip
        _put(state, (*layer, "norm_self"), read.norm(h + "ln_1", D))
        _put(state, (*layer, "norm_ff"), read.norm(h + "ln_2", D))
        for ours, theirs, shape in (("up", "mlp.c_fc", (D, F)), ("down", "mlp.c_proj", (F, D))):
            _put(state, (*layer, "feed_forward", ours), {
                "kernel": (h + theirs + ".weight", read.get(h + theirs + ".weight", shape)),
                "bias": (h + theirs + ".bias", read.get(h + theirs + ".bias", shape[1:])),
            })  # fmt: skip
    return state


def _bert_config(config: dict[str, Any], tensors: Tensors, dtype: str) -> models.ModelConfig:
    """BertForMaskedLM (the masked-LM head: transform, tied decoder with a bias) or
    BertModel (the pooler, no head: the kit's logits are then the last states times
    the token embedding, with no transform)."""
    kind = config.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(
            f"config.json: position_embedding_type {kind!r} is not supported for bert "
            "(the kit loads 'absolute')"
        )
    keys = {k.removeprefix("bert.") for k in tensors}
    mlm = "cls.predictions.transform.dense.weight" in keys
    return models.ModelConfig(
        kind="encoder_only",
        vocab_size=int(config["vocab_size"]),
        d_model=int(config["hidden_size"]),
        num_heads=int(config["num_attention_heads"]),
        num_layers=int(config["num_hidden_layers"]),
        d_ff=int(config["intermediate_size"]),
        max_len=int(config.get("max_position_embeddings", 512)),
        positions="learned",
        dtype=dtype,
        norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        key_bias=True,
        tie_embeddings=True,
        norm_position="post",
        activation=_activation(config, "hidden_act", "bert", _GELU),
        type_vocab_size=int(config.get("type_vocab_size", 2)),
        embed_norm=True,
        head_transform=mlm,
        head_bias=mlm,
        pooler="pooler.dense.weight" in keys,
    )


def _bert_state(cfg: models.ModelConfig, tensors: Tensors) -> State:
    read = _Reader("bert", tensors, ("bert.",))
    D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    e = "embeddings."
    state: State = {}
    _put(state, ("embed",), {
        "tokens": (e + "word_embeddings.weight", read.get(e + "word_embeddings.weight", (V, D))),
        "learned": (
            e + "position_embeddings.weight",
            read.get(e + "position_embeddings.weight", (cfg.max_len, D)),
        ),
        "types": (
            e + "token_type_embeddings.weight",
            read.get(e + "token_type_embeddings.weight", (cfg.type_vocab_size, D)),
        ),
    })  # fmt: skip
    _put(state, ("embed", "norm"), read.norm(e + "LayerNorm", D))
    for i in range(cfg.num_layers):
        h, layer = f"encoder.layer.{i}.", ("encoder", "layers", i)
        a = h + "attention."
        names = {n: f"{a}self.{n}" for n in ("query", "key", "value")}
        _put(
            state,
            (*layer, "self_attention"),
            read.attention({**names, "out": a + "output.dense"}, cfg),
        )
        _put(state, (*layer, "norm_self"), read.norm(a + "output.LayerNorm", D))
        _put(state, (*layer, "feed_forward", "up"), read.linear(h + "intermediate.dense", D, F))
        _put(state, (*layer, "feed_forward", "down"), read.linear(h + "output.dense", F, D))
        _put(state, (*layer, "norm_ff"), read.norm(h + "output.LayerNorm", D))
    if cfg.pooler:
        _put(state, ("pooler",), read.linear("pooler.dense", D, D))
    if cfg.head_transform:
        t = "cls.predictions.transform."
        _put(state, ("head_transform", "dense"), read.linear(t + "dense", D, D))
        _put(state, ("head_transform", "norm"), read.norm(t + "LayerNorm", D))
        bias = "cls.predictions.bias"
        if not read.has(bias):  # older checkpoints keep it on the decoder
            bias = "cls.predictions.decoder.bias"
        state[("embed", "head_bias")] = (bias, read.get(bias, (V,)))
    return state


def _vit_config(config: dict[str, Any], tensors: Tensors, dtype: str) -> models.ModelConfig:
    """ViTForImageClassification: pre-LN blocks, a class token, conv patches (the
    kit's patch projection over p x p x C pixels), the classifier on the class token."""
    if not any(k.startswith("classifier.") for k in tensors):
        raise ValueError(
            "checkpoint: no classifier.weight: the kit loads ViTForImageClassification "
            "checkpoints (a ViTModel has no head)"
        )
    labels = config.get("id2label") or {}
    return models.ModelConfig(
        kind="vision_transformer",
        vocab_size=int(config.get("num_labels") or len(labels) or 2),
        d_model=int(config["hidden_size"]),
        num_heads=int(config["num_attention_heads"]),
        num_layers=int(config["num_hidden_layers"]),
        d_ff=int(config["intermediate_size"]),
        positions="learned",
        patch_size=int(config["patch_size"]),
        image_size=int(config["image_size"]),
        channels=int(config.get("num_channels", 3)),
        dtype=dtype,
        norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        key_bias=bool(config.get("qkv_bias", True)),
        activation=_activation(config, "hidden_act", "vit", _GELU),
    )


def _vit_state(cfg: models.ModelConfig, tensors: Tensors) -> State:
    read = _Reader("vit", tensors, ("vit.",))
    D, F, p, C = cfg.d_model, cfg.d_ff, cfg.patch_size, cfg.channels
    P = (cfg.image_size // p) ** 2
    e = "embeddings."
    conv = e + "patch_embeddings.projection"
    # The conv's [D, C, p, p] as the kit's kernel over each patch's pixels in row-major
    # order, channels last: [p * p * C, D].
    kernel = read.get(conv + ".weight", (D, C, p, p)).transpose(2, 3, 1, 0).reshape(p * p * C, D)
    state: State = {
        ("class_token",): (e + "cls_token", read.get(e + "cls_token", (1, 1, D)).reshape(D)),
        ("learned",): (
            e + "position_embeddings",
            read.get(e + "position_embeddings", (1, P + 1, D)).reshape(P + 1, D),
        ),
        ("patch_embed", "kernel"): (conv + ".weight", kernel),
        ("patch_embed", "bias"): (conv + ".bias", read.get(conv + ".bias", (D,))),
    }
    bias = cfg.key_bias
    for i in range(cfg.num_layers):
        h, layer = f"encoder.layer.{i}.", ("encoder", "layers", i)
        a = h + "attention."
        names = {n: f"{a}attention.{n}" for n in ("query", "key", "value")}
        attn = read.attention({**names, "out": a + "output.dense"}, cfg, bias)
        if not bias:  # no q/k/v biases in the checkpoint: the kit's query and value ones are 0
            H = D // cfg.num_heads
            zero = np.zeros((cfg.num_heads, H), np.float32)
            attn[("query", "bias")] = attn[("value", "bias")] = ("(qkv_bias false)", zero)
            attn[("out", "bias")] = (
                a + "output.dense.bias",
                read.get(a + "output.dense.bias", (D,)),
            )
        _put(state, (*layer, "self_attention"), attn)
        _put(state, (*layer, "norm_self"), read.norm(h + "layernorm_before", D))
        _put(state, (*layer, "feed_forward", "up"), read.linear(h + "intermediate.dense", D, F))
        _put(state, (*layer, "feed_forward", "down"), read.linear(h + "output.dense", F, D))
        _put(state, (*layer, "norm_ff"), read.norm(h + "layernorm_after", D))
    _put(state, ("encoder", "norm"), read.norm("layernorm", D))
    _put(state, ("head",), read.linear("classifier", D, cfg.vocab_size))
    return state


# T5's feed_forward_proj -> (the kit's activation, gated); transformers runs "gated-gelu"
# with gelu_new, GELU's tanh form.
_T5_FEED_FORWARD = {
    "relu": ("relu", False),
    "gelu": ("gelu", False),
    "gated-gelu": ("gelu_tanh", True),
    "gated-relu": ("relu", True),
}


def _t5_config(config: dict[str, Any], tensors: Tensors, dtype: str) -> models.ModelConfig:
    """T5 (v1.0: ReLU, the head reading the last states scaled by d_model ** -0.5;
    v1.1 / flan: gated GELU, no scaling, often an untied head): the encoder-decoder
    model with RMSNorm before each sublayer, no 1/sqrt(d) in attention, no biases (the
    kit's are zero) and T5's relative-position bias as a score function, one table per
    stack."""
    proj = config.get("feed_forward_proj", "relu")
    if proj not in _T5_FEED_FORWARD:
        raise ValueError(
            f"config.json: feed_forward_proj {proj!r} is not supported for t5 (the kit "
            f"runs {', '.join(sorted(_T5_FEED_FORWARD))})"
        )
    activation, gated = _T5_FEED_FORWARD[proj]
    buckets = int(config.get("relative_attention_num_buckets", 32))
    distance = int(config.get("relative_attention_max_distance", 128))
    if (buckets, distance) != (models.common.T5_BUCKETS, models.common.T5_MAX_DISTANCE):
        raise ValueError(
            f"config.json: relative_attention_num_buckets {buckets} and _max_distance "
            f"{distance}; the kit's T5 positions have {models.common.T5_BUCKETS} and "
            f"{models.common.T5_MAX_DISTANCE}"
        )
    # Files written by transformers 4 say tie_word_embeddings false for v1.1 and store
    # lm_head.weight; transformers 5 writes scale_decoder_outputs (v1.0's scaling) and
    # always ties. The head is its own where the file has one.
    scale = config.get("scale_decoder_outputs", config.get("tie_word_embeddings", True))
    layers = int(config["num_layers"])
    return models.ModelConfig(
        kind="encoder_decoder",
        vocab_size=int(config["vocab_size"]),
        d_model=int(config["d_model"]),
        num_heads=int(config["num_heads"]),
        head_dim=int(config["d_kv"]),
        num_layers=layers,
        num_decoder_layers=int(config.get("num_decoder_layers") or layers),
        d_ff=int(config["d_ff"]),
        # Relative positions only: no table limits the length (the views' max_len).
        max_len=int(config.get("n_positions", 512)),
        positions="t5",
        dtype=dtype,
        norm_eps=float(config.get("layer_norm_epsilon", 1e-6)),
        rms_norm=True,
        scale_attention=False,
        activation=activation,
        gated=gated,
        tie_embeddings="lm_head.weight" not in tensors,
        scale_head_input=bool(scale),
    )


def _t5_state(cfg: models.ModelConfig, tensors: Tensors) -> State:
    read = _Reader("t5", tensors)
    D, F, V, N = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_heads
    H = cfg.head_dim
    shared = "shared.weight" if read.has("shared.weight") else "encoder.embed_tokens.weight"
    state: State = {("embed", "tokens"): (shared, read.get(shared, (V, D)))}

    def zero(*shape):  # a kit bias where T5 has none
        return ("(none in T5)", np.zeros(shape, np.float32))

    def attention(key: str) -> dict:
        out = {}
        for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
            w = read.get(f"{key}.{theirs}.weight", (N * H, D))
            out[(ours, "kernel")] = (f"{key}.{theirs}.weight", w.T.reshape(D, N, H))
        w = read.get(f"{key}.o.weight", (D, N * H))
        out[("out", "kernel")] = (f"{key}.o.weight", w.T.reshape(N, H, D))
        out[("query", "bias")] = out[("value", "bias")] = zero(N, H)
        out[("out", "bias")] = zero(D)
        return out

    def feed_forward(key: str) -> dict:
        ups = {"gate": "wi_0", "up": "wi_1"} if cfg.gated else {"up": "wi"}
        out = {}
        for ours, theirs in ups.items():
            w = read.get(f"{key}.{theirs}.weight", (F, D))
            out[(ours, "kernel")] = (f"{key}.{theirs}.weight", w.T)
            out[(ours, "bias")] = zero(F)
        out[("down", "kernel")] = (f"{key}.wo.weight", read.get(f"{key}.wo.weight", (D, F)).T)
        out[("down", "bias")] = zero(D)
        return out

    for stack, layers in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        state[(stack, "t5")] = (bias, read.get(bias, (models.common.T5_BUCKETS, N)))
        state[(stack, "norm", "scale")] = (
            f"{stack}.final_layer_norm.weight",
            read.get(f"{stack}.final_layer_norm.weight", (D,)),
        )
        for i in range(layers):
            b, layer = f"{stack}.block.{i}.layer.", (stack, "layers", i)
            _put(state, (*layer, "self_attention"), attention(b + "0.SelfAttention"))
            _put(state, (*layer, "norm_self"), read.norm(b + "0.layer_norm", D, bias=False))
            ff = 1
            if stack == "decoder":
                _put(state, (*layer, "cross_attention"), attention(b + "1.EncDecAttention"))
                _put(state, (*layer, "norm_cross"), read.norm(b + "1.layer_norm", D, bias=False))
                ff = 2
            _put(state, (*layer, "feed_forward"), feed_forward(f"{b}{ff}.DenseReluDense"))
            _put(state, (*layer, "norm_ff"), read.norm(f"{b}{ff}.layer_norm", D, bias=False))
    if not cfg.tie_embeddings:
        _put(state, ("head",), {
            "kernel": ("lm_head.weight", read.get("lm_head.weight", (V, D)).T),
            "bias": zero(V),
        })  # fmt: skip
    return state


# model_type -> (the kit ModelConfig of a config.json, the kit state of its tensors)
FAMILIES: dict[str, tuple[Callable, Callable]] = {
    "gpt2": (_gpt2_config, _gpt2_state),
    "bert": (_bert_config, _bert_state),
    "vit": (_vit_config, _vit_state),
    "t5": (_t5_config, _t5_state),
}


def _gpt2_json(cfg: models.ModelConfig) -> dict[str, Any]:
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}.get(cfg.activation, cfg.activation)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": cfg.d_ff,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": act,
        "tie_word_embeddings": True,
    }


def _bert_json(cfg: models.ModelConfig) -> dict[str, Any]:
    act = {"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation)
    return {
        "architectures": ["BertForMaskedLM" if cfg.head_transform else "BertModel"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": act,
        "max_position_embeddings": cfg.max_len,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps,
        "position_embedding_type": "absolute",
    }


def _t5_json(cfg: models.ModelConfig) -> dict[str, Any]:
    proj = {v: k for k, v in _T5_FEED_FORWARD.items()}.get((cfg.activation, cfg.gated), "?")
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.head_dim or cfg.d_model // cfg.num_heads,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": models.common.T5_BUCKETS,
        "relative_attention_max_distance": models.common.T5_MAX_DISTANCE,
        "layer_norm_epsilon": cfg.norm_eps,
        "feed_forward_proj": proj,
        # Both ways of saying the head's scaling: transformers 4 reads tie_word_embeddings,
        # 5 reads scale_decoder_outputs.
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_decoder_outputs": cfg.scale_head_input,
        "n_positions": cfg.max_len,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }


def _vit_json(cfg: models.ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["ViTForImageClassification"],
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.norm_eps,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.channels,
        "qkv_bias": cfg.key_bias,
        "num_labels": cfg.vocab_size,
        "id2label": {str(i): f"LABEL_{i}" for i in range(cfg.vocab_size)},
        "label2id": {f"LABEL_{i}": i for i in range(cfg.vocab_size)},
    }


# kind -> (model_type, its config.json, the file's keys that shape the config, the
# prefix of the keys in the file (none for the keys starting with the exception)).
SAVES: dict[str, tuple[str, Callable, Callable, Callable]] = {
    "decoder_only": ("gpt2", _gpt2_json, lambda cfg: {}, lambda key: "transformer." + key),
    "encoder_only": (
        "bert",
        _bert_json,
        lambda cfg: {
            **({"cls.predictions.transform.dense.weight": None} if cfg.head_transform else {}),
            **({"pooler.dense.weight": None} if cfg.pooler else {}),
        },
        lambda key: key,  # prefixed below when the file is a BertForMaskedLM
    ),
    "encoder_decoder": (
        "t5",
        _t5_json,
        lambda cfg: {} if cfg.tie_embeddings else {"lm_head.weight": None},
        lambda key: key,
    ),
    "vision_transformer": (
        "vit",
        _vit_json,
        lambda cfg: {"classifier.weight": None},
        lambda key: key if key.startswith("classifier.") else "vit." + key,
    ),
}
# What a config may hold that no checkpoint records (the kit model's training choices).
