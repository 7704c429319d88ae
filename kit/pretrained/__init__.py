"""Hugging Face checkpoints in the kit's own models: `load(path_or_name)` and `save`.

A checkpoint folder in the Hugging Face layout (config.json, and model.safetensors or a
sharded model.safetensors.index.json, and tokenizer.json when present) becomes a kit
model (`kit.models`), so that its hooks, `kit.analysis`, `kit.views` and decoding work on
it unchanged; it also answers in transformers' call convention (`kit.hf`). `save` writes
a model back in that layout, through the same tensor tables. No torch and no
transformers: the tensors are read with `safetensors`' numpy API (`pip install
"jax-attention-kit[pretrained]"`), and a hub name is fetched with `huggingface_hub` where
a network exists. The families and their tensor tables are `kit.pretrained.families`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx

from kit import hf, models
from kit.pretrained.families import FAMILIES, SAVES, Recording, Tensors


def load(path_or_name: str | os.PathLike, *, dtype: str = "float32") -> nnx.Module:
    """A Hugging Face checkpoint as a kit model, its parameters stored in float32.

    Args:
      path_or_name: a folder with config.json and model.safetensors (or a sharded
        model.safetensors.index.json), or a hub name ("gpt2") fetched through
        huggingface_hub where a network exists.
      dtype: the computation's dtype, "float32" or "bfloat16" (as config.model.dtype);
        a bfloat16 or float16 checkpoint loads either way.

    Returns:
      The kit model (`kit.models`): a `DecoderOnly` for GPT-2, an `EncoderOnly` for
      BERT, an `EncoderDecoder` for T5, a `VisionTransformer` for ViT, which also takes
      transformers' call convention (`kit.hf`): `model(input_ids=...,
      output_attentions=True).logits`, `model.generate(ids, max_new_tokens=...)`.
      `model.tokenizer`: the folder's tokenizer.json as a `tokenizers.Tokenizer`, or
      None.

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
    tensors = _tensors(folder)
    cfg = make_config(config, tensors, dtype)
    state = make_state(cfg, tensors)
    kind = hf.CLASSES[cfg.kind]
    abstract = nnx.eval_shape(lambda: kind(cfg, rngs=nnx.Rngs(params=jax.random.key(0))))
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
        # device_put: jnp.asarray compiles an identity program for each new shape.
        variable.set_value(jax.device_put(np.asarray(array, np.float32)))
    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    model.tokenizer = _tokenizer(folder)
    return model


def _tokenizer(folder: str):
    """The folder's tokenizer.json as a `tokenizers.Tokenizer`, or None without one."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        return None
    try:
        import tokenizers
    except ImportError as error:
        raise ValueError(
            f"path_or_name: {folder!r} has a tokenizer.json, which needs the tokenizers "
            'package (pip install "jax-attention-kit[pretrained]")'
        ) from error
    return tokenizers.Tokenizer.from_file(path)


_NOT_IN_FILES = ("dropout_rate", "dtype", "key_bias")


def save(model: nnx.Module, path: str | os.PathLike) -> str:
    """Writes `model` in the Hugging Face layout (config.json, model.safetensors in
    float32, and tokenizer.json when `model.tokenizer` is set) to the folder `path`, for
    transformers, BertViz or `load`: `load(save(m, p))` equals `m`.

    The model's architecture must be one of the families (`FAMILIES`): a decoder-only
    model as GPT-2 (learned positions, the head tied, pre-LayerNorm), an encoder-only
    one as BERT, an encoder-decoder as T5, a vision transformer as ViT. A kit model
    without GPT-2's or BERT's key bias saves with a zero one (the same function).

    Returns:
      The folder.

    Raises:
      ValueError: naming the model option a family's file cannot hold (its value and
        the family's), a parameter of the model with no place in the file (e.g. a
        nonzero bias, which T5 has none of), or `path` when it is a file.
    """
    cfg = model.cfg
    if cfg.kind not in SAVES:
        raise ValueError(f"model: a {cfg.kind} model has no Hugging Face family")
    model_type, to_json, keys, prefix = SAVES[cfg.kind]
    make_config, make_state = FAMILIES[model_type]
    config = {"model_type": model_type, **to_json(cfg)}
    expected = make_config(config, keys(cfg), cfg.dtype)
    for field in dataclasses.fields(cfg):
        ours, theirs = getattr(cfg, field.name), getattr(expected, field.name)
        if field.name not in _NOT_IN_FILES and ours != theirs:
            raise ValueError(
                f"model.{field.name}: {ours!r}, but a {model_type} checkpoint holds "
                f"{theirs!r}; this model has no Hugging Face family to be saved as"
            )
    recording = Recording()
    table = make_state(expected, recording)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    extra = sorted(".".join(map(str, p)) for p in set(params) - set(table))
    if extra:
        raise ValueError(f"model: parameters {extra} have no place in a {model_type} checkpoint")
    flat = np.full(recording.size, np.nan, np.float32)
    for where, (key, index) in table.items():
        name = ".".join(map(str, where))
        value = params.get(where)
        value = np.zeros(index.shape, np.float32) if value is None else np.asarray(value[...])
        if key.startswith("("):  # a parameter the family does not have: it must be zero
            if np.any(value != 0):
                raise ValueError(
                    f"model.{name}: nonzero, but a {model_type} checkpoint has no such parameter"
                )
            continue
        flat[index] = value.astype(np.float32)
    tensors = {}
    for key, shape in recording.shapes.items():
        start = recording.offsets[key]
        tensors[key] = flat[start : start + int(np.prod(shape))].reshape(shape)
    unwritten = sorted(k for k, v in tensors.items() if np.isnan(v).any())
    if unwritten:  # a table that reads a tensor element no parameter fills
        raise ValueError(f"checkpoint: tensors {unwritten} got no value from the model")
    mlm = model_type == "bert" and cfg.head_transform
    names = {
        key: ("bert." + key if mlm and not key.startswith("cls.") else prefix(key))
        for key in tensors
    }
    folder = os.fspath(path)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"path: {folder!r} is a file")
    os.makedirs(folder, exist_ok=True)
    from safetensors.numpy import save_file

    save_file(
        {names[k]: np.ascontiguousarray(v) for k, v in tensors.items()},
        os.path.join(folder, "model.safetensors"),
    )
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    if getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save(os.path.join(folder, "tokenizer.json"))
    return folder


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
