"""transformers' call convention on the kit's models, for checkpoints `kit.pretrained` loads.

`kit.pretrained.load` returns one of the classes here: the kit's own model kind (a
`DecoderOnly` for GPT-2, an `EncoderOnly` for BERT, an `EncoderDecoder` for T5, a
`VisionTransformer` for ViT) that also answers as transformers' models do:

    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    out.logits, out.attentions          # per layer [B, N, T, S]
    model.generate(ids, max_new_tokens=20)                 # greedy, with the KV cache
    model.generate(ids, max_new_tokens=20, temperature=0.8, top_k=40, rng=key)

A call with positional arguments is the kit model's own (`model(tokens, key_mask)`),
so hooks, `kit.analysis`, `kit.views` and `kit.decode` work unchanged; `model.tokenizer`
is the checkpoint's `tokenizers.Tokenizer` (None without a tokenizer.json).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from kit import decode, models
from kit.models.embedder import head_logits

Array = jax.Array


@struct.dataclass
class Output:
    """What a transformers-style call returns (a pytree: it can leave a jit).

    logits: `[B, T, V]` (ViT: `[B, classes]`). attentions: a tuple of `[B, N, T, S]`
    per layer, with `output_attentions` (T5: encoder_attentions, decoder_attentions,
    cross_attentions). last_hidden_state `[B, T, D]` and pooler_output `[B, D]`:
    BERT's encoder output and pooler (a `BertModel` checkpoint's outputs)."""

    logits: Array
    attentions: tuple | None = None
    encoder_attentions: tuple | None = None
    decoder_attentions: tuple | None = None
    cross_attentions: tuple | None = None
    last_hidden_state: Array | None = None
    pooler_output: Array | None = None


def _per_layer(maps: Array | None) -> tuple | None:
    """`[B, L, N, T, S]` -> L arrays `[B, N, T, S]`, as transformers gives them."""
    return None if maps is None else tuple(maps[:, i] for i in range(maps.shape[1]))


def _mask(attention_mask: Any, input_ids: Array) -> Array:
    """attention_mask (1 = token, 0 = padding; default all tokens) as bool `[B, T]`."""
    if attention_mask is None:
        return jnp.ones(input_ids.shape, bool)
    mask = jnp.asarray(attention_mask)
    if mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    return mask.astype(bool)


def _ids(name: str, ids: Any) -> Array:
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name}: expected integer ids [B, T], got {ids.dtype} {list(ids.shape)}")
    return ids.astype(jnp.int32)


def _check_sampling(temperature: float, top_k: int | None, rng: Any) -> None:
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected at least 1, got {top_k}")
    if temperature > 0 and rng is None:
        raise ValueError("rng: sampling (temperature > 0) needs a jax.random key")


def sampler(temperature: Any, top_k: int | None, rng: Any):
    """A token picker for `kit.decode` (`select`): a draw from softmax(logits /
    temperature) over the top_k most likely tokens (all with None), from `rng` folded
    with the step. `temperature` and `rng` may be traced."""

    def select(logits: Array, step: Array) -> Array:
        logits = logits.astype(jnp.float32) / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(jax.random.fold_in(rng, step), logits).astype(jnp.int32)

    return select


class TokenizerTask:
    """A pretrained model's tokenizer in the place of a kit task, for the probe, patching
    and the views (`kit.analysis`): `encode`, `split` (the tokens as text, GPT-2's "Ġ"
    and SentencePiece's "▁" shown as spaces dropped), `vocab` (token strings by id),
    `decode`, and the lengths a reading may take (`src_len`: the model's positions;
    `tgt_len`: tokens generated for a reading).

    Raises (`for_model`):
      ValueError: naming `model.tokenizer` when the checkpoint has none."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, max_len: int, *, name: str, new_tokens: int
    ):
        self.tokenizer = tokenizer
        self.name = name
        self.src_len = max_len
        self.tgt_len = new_tokens
        self.words = False
        by_id = {i: t for t, i in tokenizer.get_vocab().items()}
        self.vocab = [by_id.get(i, f"<{i}>") for i in range(vocab_size)]

    @classmethod
    def for_model(cls, model: Any, name: str, new_tokens: int = 8) -> TokenizerTask:
        if getattr(model, "tokenizer", None) is None:
            raise ValueError(
                "model.tokenizer: the checkpoint has no tokenizer.json; the commands read "
                "text through it"
            )
        return cls(
            model.tokenizer,
            model.cfg.vocab_size,
            model.cfg.max_len,
            name=name,
            new_tokens=new_tokens,
        )

    def encode(self, text: str, name: str = "text") -> list[int]:
        ids = self.tokenizer.encode(text).ids
        if not ids:
            raise ValueError(f"{name}: no tokens in {text!r}")
        bad = [i for i in ids if i >= len(self.vocab)]
        if bad:
            raise ValueError(f"{name}: token ids {bad} are outside the model's {len(self.vocab)}")
        return ids

    def token_id(self, text: str, name: str = "text") -> int:
        """The id of `text`: a token of the vocabulary as it is written there ("ĠMary",
        GPT-2's " Mary"), else the one token the tokenizer reads it as.

        Raises:
          ValueError: naming `name` when `text` is no token or several."""
        vocab = self.tokenizer.get_vocab()
        if text in vocab:
            return vocab[text]
        ids = self.tokenizer.encode(text).ids
        if len(ids) != 1:
            raise ValueError(f"{name}: {text!r} is {len(ids)} tokens for this tokenizer, not one")
        return ids[0]

    def split(self, text: str) -> list[str]:
        return [_shown(t) for t in self.tokenizer.encode(text).tokens]

    def decode(self, ids: Any) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def _shown(token: str) -> str:
    return token.replace("Ġ", "").replace("▁", "") or token


# transformers' keyword inputs; a call with any of them is a transformers-style call.
KEYWORDS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "decoder_input_ids",
    "pixel_values",
    "output_attentions",
)


class _Calls:
    """The convention's shared parts; `tokenizer` is set by `kit.pretrained.load`.

    A call with transformers' keywords (`KEYWORDS`) goes to the class's `_keywords`
    with the inputs it takes (`INPUTS`, the first required); any other call is the kit
    model's own."""

    tokenizer: Any = None
    KIND: str = ""
    INPUTS: tuple[str, ...] = ()

    def __call__(self, *args, **kwargs):
        given = {k: kwargs.pop(k) for k in KEYWORDS if k in kwargs}
        if not given:
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        if args or kwargs:
            raise ValueError(
                f"{', '.join(given)}: transformers' inputs come alone, without the kit "
                "model's own arguments"
            )
        output_attentions = bool(given.pop("output_attentions", False))
        extra = sorted(k for k, v in given.items() if v is not None and k not in self.INPUTS)
        if extra:
            raise ValueError(f"{', '.join(extra)}: this {self.KIND} model takes no such input")
        if given.get(self.INPUTS[0]) is None:
            raise ValueError(f"{self.INPUTS[0]}: this {self.KIND} model's call needs them")
        return self._keywords(output_attentions, *(given.get(k) for k in self.INPUTS))

    def _with_maps(self, args: tuple, output_attentions: bool):
        """The kit model's call on `args` in one jit (an eager T5 call compiled its
        score function's pieces one by one: seconds), with the maps by set."""
        graphdef, state = nnx.split(self)
        return _maps_call(graphdef, state, bool(output_attentions), args)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _maps_call(graphdef, state, output_attentions: bool, args: tuple):
    model = nnx.merge(graphdef, state)
    hooks = model.attention_hooks() if output_attentions else None
    logits, aux = super(_Calls, model).__call__(*args, hooks=hooks)
    if not output_attentions:
        return logits, {}
    sets = model.attention_sets(aux["activations"])
    return logits, {name: sets[name] for name in model.ATTENTION_SETS}


@functools.partial(jax.jit, static_argnums=(0, 2))
def _encoder_call(graphdef, state, output_attentions: bool, ids, mask, types):
    model = nnx.merge(graphdef, state)
    tap = model.tap(model.attention_hooks() if output_attentions else None)
    states = model.encode(ids, None, token_types=types, key_mask=mask, tap=tap)
    maps = model.attention_sets(tap.cache)["encoder"] if output_attentions else None
    pooled = None if model.pooler is None else model.pool(states)
    return head_logits(model, states), maps, states, pooled


class PretrainedDecoderOnly(_Calls, models.DecoderOnly):
    """GPT-2: `model(input_ids=, attention_mask=, output_attentions=)`, `generate`."""

    KIND, INPUTS = "decoder-only", ("input_ids", "attention_mask")

    def _keywords(self, output_attentions, input_ids, attention_mask):
        ids = _ids("input_ids", input_ids)
        logits, sets = self._with_maps((ids, _mask(attention_mask, ids)), output_attentions)
        return Output(logits=logits, attentions=_per_layer(sets.get("decoder")))

    def generate(
        self,
        input_ids,
        *,
        max_new_tokens: int = 20,
        attention_mask=None,
        temperature: float = 0.0,
        top_k: int | None = None,
        rng=None,
    ) -> Array:
        """The prompt and `max_new_tokens` more `[B, T + new]`, as transformers'
        generate returns them: greedy by default, through the KV cache, in one jit.

        Raises:
          ValueError: naming `max_new_tokens` when the prompt and the new tokens
            pass the model's positions, and as `sampler`."""
        ids = _ids("input_ids", input_ids)
        if max_new_tokens < 1 or ids.shape[1] + max_new_tokens > self.cfg.max_len:
            raise ValueError(
                f"max_new_tokens: expected 1 to {self.cfg.max_len - ids.shape[1]} (the "
                f"prompt's {ids.shape[1]} and the new tokens within the model's "
                f"{self.cfg.max_len} positions), got {max_new_tokens}"
            )
        _check_sampling(temperature, top_k, rng)
        mask = _mask(attention_mask, ids)
        new = _jit_generate(self, ids, mask, max_new_tokens, temperature, top_k, rng)
        return jnp.concatenate([ids, new], axis=1)

    def text_logits(self, task, ids, hooks=None):
        """The tokens as they are (no separator): position t predicts token t + 1."""
        x = jnp.asarray([ids], jnp.int32)
        logits, aux = self(x, jnp.ones(x.shape, bool), hooks=hooks)
        return logits, aux, [_shown(task.vocab[i]) for i in ids]

    def read_text(self, task, ids, words):
        """Greedy continuation by `task.tgt_len` tokens (fewer where the model's
        positions end), then one pass over text and continuation; query t is labelled
        with the token it predicts."""
        new = min(task.tgt_len, self.cfg.max_len - len(ids))
        out = np.asarray(ids)
        if new > 0:
            out = np.asarray(self.generate(np.asarray([ids]), max_new_tokens=new))[0]
        tokens = jnp.asarray([out], jnp.int32)
        graphdef, params = nnx.split(self)
        logits, sets = jax.jit(
            lambda p, t: models.common.attention_pass(graphdef, p, t, jnp.ones(t.shape, bool))
        )(params, tokens)
        read = [_shown(task.vocab[i]) for i in out]
        predicted = [_shown(task.vocab[i]) for i in np.asarray(logits[0].argmax(-1))]
        return task.decode(out[len(ids) :]), None, sets, {"decoder": (predicted, read)}


class PretrainedEncoderOnly(_Calls, models.EncoderOnly):
    """BERT: `model(input_ids=, attention_mask=, token_type_ids=, output_attentions=)`."""

    KIND, INPUTS = "encoder-only", ("input_ids", "attention_mask", "token_type_ids")

    def _keywords(self, output_attentions, input_ids, attention_mask, token_type_ids):
        ids = _ids("input_ids", input_ids)
        mask = _mask(attention_mask, ids)
        types = None if token_type_ids is None else _ids("token_type_ids", token_type_ids)
        graphdef, state = nnx.split(self)
        logits, maps, states, pooled = _encoder_call(
            graphdef, state, bool(output_attentions), ids, mask, types
        )
        return Output(
            logits=logits,
            attentions=_per_layer(maps),
            last_hidden_state=states,
            pooler_output=pooled,
        )

    def text_logits(self, task, ids, hooks=None):
        """The tokens as the model reads them: the prediction at each position (BERT's
        masked-LM head)."""
        x = jnp.asarray([ids], jnp.int32)
        logits, aux = self(x, jnp.asarray([len(ids)]), hooks=hooks)
        return logits, aux, [_shown(task.vocab[i]) for i in ids]

    def read_text(self, task, ids, words):
        """One pass; the prediction is the most likely token at each position."""
        logits, aux = self.text_logits(task, ids, self.attention_hooks())[:2]
        sets = self.attention_sets(aux["activations"])
        best = np.asarray(jnp.argmax(logits[0], axis=-1))
        return task.decode(best), None, sets, {"encoder": (words, words)}


class PretrainedEncoderDecoder(_Calls, models.EncoderDecoder):
    """T5: `model(input_ids=, attention_mask=, decoder_input_ids=, output_attentions=)`,
    `generate` (decoder ids from the start token, 0)."""

    START = 0  # T5's decoder_start_token_id (its pad token)

    KIND = "encoder-decoder"
    INPUTS = ("input_ids", "attention_mask", "decoder_input_ids")

    def _keywords(self, output_attentions, input_ids, attention_mask, decoder_input_ids):
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids: an encoder-decoder call needs them")
        ids = _ids("input_ids", input_ids)
        lengths = _lengths(_mask(attention_mask, ids))
        tgt = _ids("decoder_input_ids", decoder_input_ids)
        logits, sets = self._with_maps((ids, lengths, tgt), output_attentions)
        return Output(
            logits=logits,
            encoder_attentions=_per_layer(sets.get("encoder")),
            decoder_attentions=_per_layer(sets.get("decoder")),
            cross_attentions=_per_layer(sets.get("cross")),
        )

    def generate(
        self,
        input_ids,
        *,
        max_new_tokens: int = 20,
        attention_mask=None,
        temperature: float = 0.0,
        top_k: int | None = None,
        rng=None,
    ) -> Array:
        """Decoder ids `[B, 1 + new]` from the start token, as transformers' generate
        returns them (it stops at the end-of-sequence token; these do not)."""
        ids = _ids("input_ids", input_ids)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected at least 1, got {max_new_tokens}")
        _check_sampling(temperature, top_k, rng)
        lengths = _lengths(_mask(attention_mask, ids))
        new = _jit_generate(self, ids, lengths, max_new_tokens, temperature, top_k, rng)
        start = jnp.full((ids.shape[0], 1), self.START, jnp.int32)
        return jnp.concatenate([start, new], axis=1)

    def read_text(self, task, ids, words):
        """Greedy decoding of `task.tgt_len` tokens from the start token, then one
        teacher-forced pass; decoder queries are labelled with the token each
        position predicts, keys with the token each position reads."""
        src = np.asarray([ids])
        out = np.asarray(self.generate(src, max_new_tokens=task.tgt_len))[0]
        graphdef, params = nnx.split(self)
        lengths = jnp.asarray([len(ids)], jnp.int32)
        _, sets = jax.jit(lambda p, s, n, t: models.common.attention_pass(graphdef, p, s, n, t))(
            params, jnp.asarray(src, jnp.int32), lengths, jnp.asarray([out], jnp.int32)
        )
        read = [_shown(task.vocab[i]) for i in out]
        produced = [*read[1:], "…"]
        tokens = {
            "encoder": (words, words),
            "decoder": (produced, read),
            "cross": (produced, words),
        }
        return task.decode(out[1:]), None, sets, tokens


class PretrainedVisionTransformer(_Calls, models.VisionTransformer):
    """ViT: `model(pixel_values=[B, C, H, W], output_attentions=)`."""

    KIND, INPUTS = "vision", ("pixel_values",)

    def _keywords(self, output_attentions, pixel_values):
        pixels = jnp.asarray(pixel_values)
        if pixels.ndim != 4:
            raise ValueError(f"pixel_values: expected [B, C, H, W], got {list(pixels.shape)}")
        images = jnp.transpose(pixels, (0, 2, 3, 1))
        if self.cfg.channels == 1:
            images = images[..., 0]
        logits, sets = self._with_maps((images,), output_attentions)
        return Output(logits=logits, attentions=_per_layer(sets.get("encoder")))


def _lengths(mask: Array) -> Array:
    """The per-row token count of a right-padded mask (the kit's encoder-decoder reads
    lengths). A concrete mask with a gap or left padding is refused."""
    if not isinstance(mask, jax.core.Tracer):
        host = np.asarray(mask)
        counts = host.sum(axis=1)
        if not (host == (np.arange(host.shape[1])[None] < counts[:, None])).all():
            raise ValueError(
                "attention_mask: an encoder-decoder model reads right-padded inputs "
                "(ones, then zeros)"
            )
    return jnp.sum(mask, axis=1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(graphdef, state, first, second, length, greedy, top_k, temperature, rng):
    model = nnx.merge(graphdef, state)
    select = decode.argmax if greedy else sampler(temperature, top_k, rng)
    if isinstance(model, models.EncoderDecoder):
        return decode.greedy_encoder_decoder(
            model, first, second, bos=model.START, length=length, select=select
        )
    return decode.greedy_decoder_only(model, first, second, length=length, select=select)


def _jit_generate(model, first, second, length, temperature, top_k, rng):
    """Generation in one jit per model structure, length and top_k (the temperature
    and the key are traced)."""
    graphdef, state = nnx.split(model)
    greedy = temperature == 0
    rng = jax.random.key(0) if rng is None else rng
    temperature = jnp.float32(1.0 if greedy else temperature)
    return _generate(graphdef, state, first, second, length, greedy, top_k, temperature, rng)


CLASSES = {
    "decoder_only": PretrainedDecoderOnly,
    "encoder_only": PretrainedEncoderOnly,
    "encoder_decoder": PretrainedEncoderDecoder,
    "vision_transformer": PretrainedVisionTransformer,
}
