"""Hugging Face checkpoints in the kit's own models: `kit.pretrained.load(path_or_name)`.

A checkpoint folder in the Hugging Face layout (config.json, and model.safetensors or a
sharded model.safetensors.index.json) becomes a kit model (`kit.models`), so that its
hooks, `kit.analysis`, `kit.views` and decoding work on it unchanged. No torch and no
transformers: the tensors are read with `safetensors`' numpy API (`pip install
"jax-attention-kit[pretrained]"`), and a hub name is fetched with `huggingface_hub` where
a network exists.

Families so far: GPT-2 (`GPT2LMHeadModel` / `GPT2Model` files, with or without the
`transformer.` prefix): the decoder-only model with learned positions, pre-LayerNorm
blocks with epsilon `layer_norm_epsilon`, GELU in its tanh form (`gelu_new`, jax's
default), a bias on the key projection and the head tied to the token embedding. GPT-2's
`Conv1D` weights are stored `[in, out]`, as the kit's kernels; its fused `c_attn`
`[D, 3D]` is split into the query, key and value `[D, N, H]`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kit import models

Tensors = dict[str, np.ndarray]


def _gpt2_config(config: dict[str, Any], dtype: str) -> models.ModelConfig:
    activation = config.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(
            f"config.json: activation_function {activation!r} is not supported for gpt2 "
            "(the kit's feed-forward is GELU's tanh form: gelu_new, gelu_pytorch_tanh)"
        )
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
    )


def _gpt2_state(cfg: models.ModelConfig, tensors: Tensors) -> dict[tuple, tuple[str, Any]]:
    """The kit state's path -> (checkpoint key, array) of a GPT-2 checkpoint."""
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    D, N = cfg.d_model, cfg.num_heads
    H = D // N

    def get(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in tensors:
            raise ValueError(f"checkpoint: tensor {key!r} is missing (a gpt2 checkpoint has it)")
        x = tensors[key]
        if tuple(x.shape) != shape:
            raise ValueError(
                f"checkpoint: tensor {key!r} has shape {tuple(x.shape)}, but the config "
                f"needs {shape}"
            )
        return x

    state = {
        ("embed", "tokens"): ("wte.weight", get("wte.weight", (cfg.vocab_size, D))),
        ("embed", "learned"): ("wpe.weight", get("wpe.weight", (cfg.max_len, D))),
        ("decoder", "norm", "scale"): ("ln_f.weight", get("ln_f.weight", (D,))),
        ("decoder", "norm", "bias"): ("ln_f.bias", get("ln_f.bias", (D,))),
    }
    for i in range(cfg.num_layers):
        h, layer = f"h.{i}.", ("decoder", "layers", i)
        qkv = get(h + "attn.c_attn.weight", (D, 3 * D))
        qkv_bias = get(h + "attn.c_attn.bias", (3 * D,))
        for j, name in enumerate(("query", "key", "value")):
            at = f"{h}attn.c_attn[{name}]"
            state[(*layer, "self_attention", name, "kernel")] = (
                at,
                qkv[:, j * D : (j + 1) * D].reshape(D, N, H),
            )
            state[(*layer, "self_attention", name, "bias")] = (
                at,
                qkv_bias[j * D : (j + 1) * D].reshape(N, H),
            )
        proj = get(h + "attn.c_proj.weight", (D, D))
        state[(*layer, "self_attention", "out", "kernel")] = (
            h + "attn.c_proj",
            proj.reshape(N, H, D),
        )
        state[(*layer, "self_attention", "out", "bias")] = (
            h + "attn.c_proj.bias",
            get(h + "attn.c_proj.bias", (D,)),
        )
        pairs = {
            "norm_self": ("ln_1", (D,), (D,)),
            "norm_ff": ("ln_2", (D,), (D,)),
            "feed_forward.up": ("mlp.c_fc", (D, cfg.d_ff), (cfg.d_ff,)),
            "feed_forward.down": ("mlp.c_proj", (cfg.d_ff, D), (D,)),
        }
        for ours, (theirs, weight_shape, bias_shape) in pairs.items():
            where = (*layer, *ours.split("."))
            weight = "scale" if ours.startswith("norm") else "kernel"
            w_key, b_key = f"{h}{theirs}.weight", f"{h}{theirs}.bias"
            state[(*where, weight)] = (w_key, get(w_key, weight_shape))
            state[(*where, "bias")] = (b_key, get(b_key, bias_shape))
    return state


# model_type -> (the kit ModelConfig of a config.json, the kit state of its tensors)
FAMILIES: dict[str, tuple[Callable, Callable]] = {"gpt2": (_gpt2_config, _gpt2_state)}


def load(path_or_name: str | os.PathLike, *, dtype: str = "float32") -> nnx.Module:
    """A Hugging Face checkpoint as a kit model, its parameters stored in float32.

    Args:
      path_or_name: a folder with config.json and model.safetensors (or a sharded
        model.safetensors.index.json), or a hub name ("gpt2") fetched through
        huggingface_hub where a network exists.
      dtype: the computation's dtype, "float32" or "bfloat16" (as config.model.dtype);
        a bfloat16 or float16 checkpoint loads either way.

    Returns:
      The kit model (`kit.models`), e.g. a `DecoderOnly` for GPT-2: `model(tokens,
      key_mask)` gives logits, `kit.decode.greedy_decoder_only` generates.

    Raises:
      ValueError: naming what is wrong: a folder without config.json, a model_type
        the kit does not load (listing those it does), a missing tensor (its key),
        a tensor of the wrong shape (its key and both shapes), a bad dtype.
    """
    if dtype not in models.COMPUTE_DTYPES:
        raise ValueError(f"dtype: expected one of {models.COMPUTE_DTYPES}, got {dtype!r}")
    folder = _folder(path_or_name)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"config.json: model_type {model_type!r} is not supported; the kit loads "
            f"{', '.join(sorted(FAMILIES))}"
        )
    make_config, make_state = FAMILIES[model_type]
    cfg = make_config(config, dtype)
    state = make_state(cfg, _tensors(folder))
    abstract = nnx.eval_shape(lambda: models.build(cfg, jax.random.key(0)))
    graphdef, params = nnx.split(abstract)
    leaves = dict(nnx.to_flat_state(params))
    missing = sorted(set(leaves) - set(state))
    if missing:  # a family's table that misses a parameter of the kit's model
        raise ValueError(f"checkpoint: no tensor for the model's parameters {missing}")
    for path, variable in leaves.items():
        key, array = state[path]
        if tuple(array.shape) != tuple(variable.shape):
            raise ValueError(
                f"checkpoint: tensor {key!r} reshaped to {tuple(array.shape)}, but the "
                f"model's {'.'.join(map(str, path))} is {tuple(variable.shape)}"
            )
        variable.set_value(jnp.asarray(np.asarray(array, np.float32)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _folder(path_or_name: str | os.PathLike) -> str:
    path = os.fspath(path_or_name)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(f"path_or_name: {path!r} has no config.json")
        return path
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ValueError(f"path_or_name: {path!r} is not a checkpoint folder")
    try:
        import huggingface_hub
    except ImportError as error:
        raise ValueError(
            f"path_or_name: {path!r} is no folder here, and a hub name needs "
            'huggingface_hub (pip install "jax-attention-kit[pretrained]")'
        ) from error
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*"]
    return huggingface_hub.snapshot_download(path, allow_patterns=patterns)


def _tensors(folder: str) -> Tensors:
    try:
        from safetensors.numpy import load_file
    except ImportError as error:
        raise ValueError(
            "checkpoint: reading safetensors needs the safetensors package (pip install "
            '"jax-attention-kit[pretrained]")'
        ) from error
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index):
        raise ValueError(
            f"path_or_name: {folder!r} has neither model.safetensors nor "
            "model.safetensors.index.json"
        )
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    tensors: Tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(folder, name)))
    return tensors
