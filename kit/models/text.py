"""Toy transformers over token sequences: encoder-decoder, decoder-only, encoder-only."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kit import decode, tasks
from kit.models import packing
from kit.models.common import ModelConfig, Stack, TaskModel, attention_pass, until_eos
from kit.models.embedder import Embedder, head_logits, head_transform, output_head

Array = jax.Array


def _positions(tokens: Array, start: Array | int = 0) -> Array:
    B, T = tokens.shape
    return jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))


def _permuted(mb: dict, names: tuple[str, ...], order) -> dict:
    """`mb` with the arrays `names` (those present) permuted along their rows by `order`."""
    return {k: (v[:, order] if k in names else v) for k, v in mb.items()}


def _padded(mb: dict, names: tuple[str, ...], length: int) -> dict:
    """`mb` with the arrays `names` (those present) zero-padded along their rows to
    `length` (PAD tokens, False weights and masks, segment and position 0)."""

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1])))

    return {k: (pad(v) if k in names else v) for k, v in mb.items()}


def _rows(order, B: int) -> Array:
    return jnp.broadcast_to(jnp.asarray(order, jnp.int32), (B, len(order)))


def _encode(
    model,
    src,
    src_lengths,
    dropout_rng,
    tap,
    packed=None,
    token_types=None,
    key_mask=None,
    split=None,
):
    """The bidirectional encoder stack of `model` over src `[B, S]` -> `[B, S, D]`.
    `packed`: a packed batch's src_positions and src_segments (`kit.models.packing`).
    `key_mask` bool `[B, S]` (False = padding, anywhere): instead of src_lengths."""
    positions = _positions(src) if packed is None else packed["src_positions"]
    extra = {} if key_mask is None else {"mask": key_mask[:, None, None, :]}
    x, _ = model.encoder(
        model.embed(src, positions, dropout_rng, token_types),
        **extra,
        positions=positions,
        segments=None if packed is None else packed["src_segments"],
        lengths=src_lengths,
        dropout_rng=dropout_rng,
        tap=tap.scope("encoder"),
        split=split,
    )
    return x


def _aux(hooks, tap, caches=None) -> dict:
    """A model call's aux: "activations" read by `hooks`, "caches" when decoding."""
    aux = {} if hooks is None else {"activations": tap.cache}
    if caches is not None:
        aux["caches"] = caches
    return aux


def _shifted_targets(batch: dict[str, np.ndarray], start: int) -> dict[str, np.ndarray]:
    """The decoder reads [start, tgt] and predicts [tgt, EOS]; loss weights cover tgt and EOS."""
    src, src_len = batch["src"], batch["src_lengths"]
    tgt, tgt_len = batch["tgt"], batch["tgt_lengths"]
    B, Lt = tgt.shape
    out = np.concatenate([tgt, np.full((B, 1), tasks.PAD, np.int32)], axis=1)
    out[np.arange(B), tgt_len] = tasks.EOS
    weights = np.arange(Lt + 1)[None, :] <= tgt_len[:, None]
    tgt_in = np.concatenate([np.full((B, 1), start, np.int32), tgt], axis=1)
    return {
        "src": src,
        "src_lengths": src_len,
        "tgt_in": tgt_in,
        "targets": out,
        "weights": weights,
    }


class EncoderDecoder(TaskModel):
    """Translation-style model: the decoder reads the source only through cross-attention."""

    ATTENTION_SETS: ClassVar[dict[str, tuple[str, str]]] = {
        "encoder": ("encoder", "attn"),
        "decoder": ("decoder", "attn"),
        "cross": ("decoder", "cross"),
    }
    SPLITS: ClassVar[bool] = True
    PACKED: ClassVar[dict[str, tuple[str, ...]]] = {
        "src": ("src_lengths", "src"),
        "tgt": ("weights", "tgt_in", "targets", "weights"),
    }

    @staticmethod
    def batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Task arrays -> src, src_lengths, tgt_in ([BOS, tgt]), targets ([tgt, EOS]), weights."""
        return _shifted_targets(batch, tasks.BOS)

    @staticmethod
    def positions_needed(task: tasks.Task) -> int:
        return max(task.src_len, task.tgt_len + 1)

    def teacher_forced(self, mb, *, dropout_rng=None, hooks=None, split=None):
        """Logits `[B, T, V]` aligned with mb["targets"], and aux (as `__call__`'s).
        A packed batch (`kit.models.packing`) is run as such; with `split`, mb is
        `split_batch`'s."""
        return self(
            mb["src"],
            mb["src_lengths"],
            mb["tgt_in"],
            dropout_rng=dropout_rng,
            hooks=hooks,
            packed=packing.fields(mb),
            split=split,
            tgt_order=mb.get("tgt_order"),
        )

    @classmethod
    def split_batch(cls, mb, split):
        """Both sequences padded to whole shares of the split (the target's to whole
        zig-zag chunks: 2 x mesh.seq), then the decoder's (causal) permuted into the
        zig-zag order with its places as "tgt_order"; the encoder's (not causal)
        stays in place. Padding is dead: past src_lengths, weight 0, segment 0."""
        src_names = ("src", "src_positions", "src_segments")
        tgt_names = ("tgt_in", "targets", "weights", "tgt_positions", "tgt_segments")
        B, T = mb["tgt_in"].shape
        out = _padded(mb, src_names, split.padded(mb["src"].shape[1], causal=False))
        out = _padded(out, tgt_names, split.padded(T, causal=True))
        Tp = out["tgt_in"].shape[1]
        order = split.order(Tp, causal=True)
        out = _permuted(out, tgt_names, order)
        out["tgt_order"] = _rows(order, B)
        return out

    @staticmethod
    def split_lengths(task, widths):
        src, tgt = (task.src_len, task.tgt_len + 1) if widths is None else widths
        return {"src": (src, False), "tgt": (tgt, True)}

    def predict(self, mb, *, oracle_length: bool = False, hooks=None) -> Array:
        """Greedy predictions `[B, T]` aligned with mb["targets"] (with `hooks`' writes
        at every step); with `oracle_length`, end-of-sequence is forbidden before each
        row's target length."""
        oracle = {}
        if oracle_length:
            until = jnp.sum(mb["weights"], axis=1, dtype=jnp.int32) - 1  # less the EOS
            oracle = {"forbid": tasks.EOS, "until": until}
        return decode.greedy_encoder_decoder(
            self,
            mb["src"],
            mb["src_lengths"],
            bos=tasks.BOS,
            length=mb["targets"].shape[1],
            **oracle,
            hooks=hooks,
        )

    ORACLE_LENGTH: ClassVar[bool] = True

    def read_text(self, task, ids, words):
        """Greedy decoding, then one teacher-forced pass over its own output; decoder
        queries are labelled with the token each position predicts, keys with the
        token each position reads."""
        graphdef, params = nnx.split(self)
        src = jnp.asarray([ids], jnp.int32)
        lengths = jnp.asarray([len(ids)], jnp.int32)
        length = task.tgt_len + 1
        out = jax.jit(
            lambda p, s, n: decode.greedy_encoder_decoder(
                nnx.merge(graphdef, p), s, n, bos=tasks.BOS, length=length
            )
        )(params, src, lengths)
        out_ids = until_eos(out[0], tasks.EOS)
        tgt_in = jnp.asarray([[tasks.BOS, *out_ids]], jnp.int32)
        _, sets = jax.jit(lambda p, *a: attention_pass(graphdef, p, *a))(
            params, src, lengths, tgt_in
        )
        produced = [*(task.vocab[i] for i in out_ids), "<eos>"]
        read = ["<bos>", *(task.vocab[i] for i in out_ids)]
        tokens = {
            "encoder": (words, words),
            "decoder": (produced, read),
            "cross": (produced, words),
        }
        return task.decode(out_ids), None, sets, tokens

    def attention_tokens(self, mb):
        return {
            "encoder": (mb["src"], None),
            "decoder": (mb["tgt_in"], None),
            "cross": (mb["tgt_in"], mb["src"]),
        }

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embedder(cfg, rngs=rngs)
        self.encoder = Stack(cfg, cfg.num_layers, cross=False, rngs=rngs)
        self.decoder = Stack(cfg, cfg.num_decoder_layers, cross=True, rngs=rngs)
        self.head_transform = head_transform(cfg, rngs)
        self.head = output_head(cfg, rngs)

    def encode(self, src, src_lengths, *, dropout_rng=None, hooks=None, packed=None, split=None):
        """src `[B, S]`, src_lengths `[B]` -> memory `[B, S, D]`, aux."""
        tap = self.tap(hooks)
        x = _encode(self, src, src_lengths, dropout_rng, tap, packed, split=split)
        return x, _aux(hooks, tap)

    def decode(
        self,
        tgt_in,
        memory,
        src_lengths,
        *,
        caches=None,
        start=0,
        dropout_rng=None,
        hooks=None,
        packed=None,
        split=None,
        order=None,
    ):
        """tgt_in `[B, T]` (from position `start`) -> logits `[B, T, V]`, aux.
        `order` int `[B, T]`: each token's place in a permuted row (`split_batch`)."""
        tap = self.tap(hooks)
        positions = _positions(tgt_in, start) if packed is None else packed["tgt_positions"]
        if order is not None and packed is None:
            # the split's padding sits past the row: its places may pass max_len
            positions = jnp.minimum(order, self.cfg.max_len - 1) + start
        x, caches = self.decoder(
            self.embed(tgt_in, positions, dropout_rng),
            positions=positions,
            segments=None if packed is None else packed["tgt_segments"],
            memory_segments=None if packed is None else packed["src_segments"],
            memory=memory,
            memory_lengths=src_lengths,
            is_causal=caches is None,
            caches=caches,
            dropout_rng=dropout_rng,
            tap=tap.scope("decoder"),
            split=split,
            order=order,
        )
        return head_logits(self, x), _aux(hooks, tap, caches)

    def __call__(
        self,
        src,
        src_lengths,
        tgt_in,
        *,
        dropout_rng=None,
        hooks=None,
        packed=None,
        split=None,
        tgt_order=None,
    ):
        """Teacher-forced logits `[B, T, V]` for tgt_in `[B, T]`, and aux.

        `hooks` (`kit.hooks.Hooks`) reads and writes the points of `hook_points()`
        ("encoder.<l>...", "decoder.<l>..."); what it reads comes back as
        aux["activations"]. `split` and `tgt_order`: the sequence split over devices
        (`split_batch`)."""
        enc_rng, dec_rng = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
        memory, enc_aux = self.encode(
            src, src_lengths, dropout_rng=enc_rng, hooks=hooks, packed=packed, split=split
        )
        logits, dec_aux = self.decode(
            tgt_in,
            memory,
            src_lengths,
            dropout_rng=dec_rng,
            hooks=hooks,
            packed=packed,
            split=split,
            order=tgt_order,
        )
        if hooks is None:
            return logits, {}
        return logits, {"activations": {**enc_aux["activations"], **dec_aux["activations"]}}


class DecoderOnly(TaskModel):
    """Causal language model over [source (padded), separator, target]."""

    ATTENTION_SETS: ClassVar[dict[str, tuple[str, str]]] = {"decoder": ("decoder", "attn")}
    SPLITS: ClassVar[bool] = True

    @staticmethod
    def batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """As EncoderDecoder's, with SEP for BOS, and key_mask `[B, Ls + Lt + 1]`
        (False = source padding) for the model's [src, SEP, tgt] input."""
        mb = _shifted_targets(batch, tasks.SEP)
        src, src_len = batch["src"], batch["src_lengths"]
        src_mask = np.arange(src.shape[1])[None, :] < src_len[:, None]
        live = np.ones(mb["tgt_in"].shape, bool)
        mb["key_mask"] = np.concatenate([src_mask, live], axis=1)
        return mb

    @staticmethod
    def positions_needed(task: tasks.Task) -> int:
        return task.src_len + task.tgt_len + 1

    def teacher_forced(self, mb, *, dropout_rng=None, hooks=None, split=None):
        """Logits of the target positions `[B, T, V]` aligned with mb["targets"], and aux;
        with `split`, of every position of `split_batch`'s rows."""
        if split is not None:
            return self(
                mb["tokens"],
                mb["key_mask"],
                dropout_rng=dropout_rng,
                hooks=hooks,
                split=split,
                order=mb["order"],
            )
        tokens = jnp.concatenate([mb["src"], mb["tgt_in"]], axis=1)
        logits, aux = self(tokens, mb["key_mask"], dropout_rng=dropout_rng, hooks=hooks)
        return logits[:, mb["src"].shape[1] :], aux

    @classmethod
    def split_batch(cls, mb, split):
        """The whole row [src, SEP, tgt], padded to whole zig-zag chunks (2 x mesh.seq;
        the padding is dead: key_mask False, weight 0), in the zig-zag order: tokens,
        key_mask, its places ("order"), and targets and weights over every position
        (the source's weigh nothing)."""
        src = mb["src"]
        B, Ls = src.shape
        row = {
            "tokens": jnp.concatenate([src, mb["tgt_in"]], axis=1),
            "key_mask": mb["key_mask"],
            "targets": jnp.concatenate([jnp.zeros_like(src), mb["targets"]], axis=1),
            "weights": jnp.concatenate(
                [jnp.zeros((B, Ls), mb["weights"].dtype), mb["weights"]], axis=1
            ),
        }
        row = _padded(row, tuple(row), split.padded(row["tokens"].shape[1], causal=True))
        L = row["tokens"].shape[1]
        order = split.order(L, causal=True)
        row = _permuted(row, tuple(row), order)
        row["order"] = _rows(order, B)
        return row

    @staticmethod
    def split_lengths(task, widths):
        return {"row": (task.src_len + task.tgt_len + 1, True)}

    def read_text(self, task, ids, words):
        """Greedy continuation of [text, SEP], then one pass over [text, SEP, output];
        position i is labelled with the token it predicts, i + 1 (the last: EOS)."""
        graphdef, params = nnx.split(self)
        prompt = jnp.asarray([[*ids, tasks.SEP]], jnp.int32)
        out = jax.jit(
            lambda p, t: decode.greedy_decoder_only(
                nnx.merge(graphdef, p), t, jnp.ones(t.shape, bool), length=task.tgt_len + 1
            )
        )(params, prompt)
        out_ids = until_eos(out[0], tasks.EOS)
        tokens = jnp.asarray([[*ids, tasks.SEP, *out_ids]], jnp.int32)
        _, sets = jax.jit(lambda p, t: attention_pass(graphdef, p, t, jnp.ones(t.shape, bool)))(
            params, tokens
        )
        read = [*words, "<sep>", *(task.vocab[i] for i in out_ids)]
        return task.decode(out_ids), None, sets, {"decoder": ([*read[1:], "<eos>"], read)}

    def attention_tokens(self, mb):
        return {"decoder": (np.concatenate([mb["src"], mb["tgt_in"]], axis=1), None)}

    def text_logits(self, task, ids, hooks=None):
        """The text as the task's source, [ids, SEP], or, for a task without a source
        (a language-model task such as induction), as its target, [SEP, ids]:
        position t predicts token t + 1."""
        tokens = [*ids, tasks.SEP] if task.src_len else [tasks.SEP, *ids]
        x = jnp.asarray([tokens], jnp.int32)
        logits, aux = self(x, jnp.ones(x.shape, bool), hooks=hooks)
        return logits, aux, [task.vocab[i] for i in tokens]

    def predict(self, mb, *, hooks=None) -> Array:
        """Greedy continuation `[B, T]` of [src, SEP], aligned with mb["targets"]."""
        Ls = mb["src"].shape[1]
        prompt = jnp.concatenate([mb["src"], mb["tgt_in"][:, :1]], axis=1)
        return decode.greedy_decoder_only(
            self, prompt, mb["key_mask"][:, : Ls + 1], length=mb["targets"].shape[1], hooks=hooks
        )

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embedder(cfg, rngs=rngs)
        self.decoder = Stack(cfg, cfg.num_layers, cross=False, rngs=rngs)
        self.head_transform = head_transform(cfg, rngs)
        self.head = output_head(cfg, rngs)

    def __call__(
        self,
        tokens,
        key_mask,
        *,
        caches=None,
        start=0,
        dropout_rng=None,
        hooks=None,
        split=None,
        order=None,
    ):
        """tokens `[B, T]`, key_mask bool `[B, S]` (False = padding) -> logits `[B, T, V]`, aux.

        Without caches S = T and attention is causal; with caches, S is the
        cache length and `tokens` sit at positions start..start + T - 1.
        `hooks` reads and writes "decoder.<l>..." points (`hook_points()`).
        `split`: the sequence split over devices, `order` int `[B, T]` each token's
        place in its permuted row (`split_batch`).
        """
        tap = self.tap(hooks)
        positions = _positions(tokens, start)
        if order is not None:  # the split's padding sits past the row: clamp its places
            positions = jnp.minimum(order, self.cfg.max_len - 1) + start
        x, caches = self.decoder(
            self.embed(tokens, positions, dropout_rng),
            positions=positions,
            mask=key_mask[:, None, None, :],
            is_causal=caches is None,
            caches=caches,
            dropout_rng=dropout_rng,
            tap=tap.scope("decoder"),
            split=split,
            order=order,
        )
        return head_logits(self, x), _aux(hooks, tap, caches)


class EncoderOnly(TaskModel):
    """Bidirectional encoder with a per-position classifier (tasks with aligned targets)."""

    ATTENTION_SETS: ClassVar[dict[str, tuple[str, str]]] = {"encoder": ("encoder", "attn")}
    PACKED: ClassVar[dict[str, tuple[str, ...]]] = {
        "src": ("src_lengths", "src", "targets", "weights")
    }

    @staticmethod
    def batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Task arrays -> src, src_lengths, targets (aligned with src) and weights."""
        tgt, tgt_len = batch["tgt"], batch["tgt_lengths"]
        weights = np.arange(tgt.shape[1])[None, :] < tgt_len[:, None]
        return {
            "src": batch["src"],
            "src_lengths": batch["src_lengths"],
            "targets": tgt,
            "weights": weights,
        }

    @staticmethod
    def positions_needed(task: tasks.Task) -> int:
        if not task.aligned:
            raise ValueError(
                f"model.kind: 'encoder_only' predicts one output per input position, "
                f"but task {task.name!r} has targets of another length"
            )
        return task.src_len

    def teacher_forced(self, mb, *, dropout_rng=None, hooks=None):
        """Per-position logits `[B, T, V]` and aux (a packed batch run as such)."""
        return self(
            mb["src"],
            mb["src_lengths"],
            dropout_rng=dropout_rng,
            hooks=hooks,
            packed=packing.fields(mb),
        )

    def read_text(self, task, ids, words):
        """One pass: a label per position."""
        graphdef, params = nnx.split(self)
        src = jnp.asarray([ids], jnp.int32)
        lengths = jnp.asarray([len(ids)], jnp.int32)
        logits, sets = jax.jit(lambda p, s, n: attention_pass(graphdef, p, s, n))(
            params, src, lengths
        )
        labels = [task.vocab[i] for i in np.asarray(jnp.argmax(logits[0], axis=-1))]
        joiner = " " if task.words else ""
        return joiner.join(labels), labels, sets, {"encoder": (words, words)}

    def attention_tokens(self, mb):
        return {"encoder": (mb["src"], None)}

    def text_logits(self, task, ids, hooks=None):
        """The text as the source: a label per position."""
        src = jnp.asarray([ids], jnp.int32)
        logits, aux = self(src, jnp.asarray([len(ids)], jnp.int32), hooks=hooks)
        return logits, aux, [task.vocab[i] for i in ids]

    def predict(self, mb, *, hooks=None) -> Array:
        """Argmax per position `[B, T]`."""
        logits, _ = self(mb["src"], mb["src_lengths"], hooks=hooks)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embedder(cfg, rngs=rngs)
        self.encoder = Stack(cfg, cfg.num_layers, cross=False, rngs=rngs)
        self.head_transform = head_transform(cfg, rngs)
        self.head = output_head(cfg, rngs)
        # BERT's pooler: dense and tanh on the first token's last state.
        self.pooler = (
            nnx.Linear(cfg.d_model, cfg.d_model, dtype=cfg.dtype, rngs=rngs) if cfg.pooler else None
        )

    def __call__(
        self,
        src,
        src_lengths,
        *,
        token_types=None,
        dropout_rng=None,
        hooks=None,
        packed=None,
    ):
        """src `[B, T]` -> per-position logits `[B, T, V]`, aux. `hooks` reads and
        writes "encoder.<l>..." points (`hook_points()`). `token_types` `[B, T]`:
        BERT's segment ids (a model with `type_vocab_size`)."""
        tap = self.tap(hooks)
        x = self.encode(
            src,
            src_lengths,
            token_types=token_types,
            dropout_rng=dropout_rng,
            tap=tap,
            packed=packed,
        )
        return head_logits(self, x), _aux(hooks, tap)

    def encode(
        self,
        src,
        src_lengths,
        *,
        token_types=None,
        key_mask=None,
        dropout_rng=None,
        tap=None,
        packed=None,
    ):
        """The encoder's last states `[B, T, D]` (before the head). `key_mask` bool
        `[B, T]` (False = padding, anywhere) may stand for `src_lengths` (None)."""
        tap = tap if tap is not None else self.tap(None)
        return _encode(self, src, src_lengths, dropout_rng, tap, packed, token_types, key_mask)

    def pool(self, states):
        """BERT's pooled output `[B, D]`: tanh(dense(first token's last state)).

        Raises:
          ValueError: for a model without a pooler (`model.pooler`)."""
        if self.pooler is None:
            raise ValueError("model.pooler: this model has no pooler")
        return jnp.tanh(self.pooler(states[:, 0]))
