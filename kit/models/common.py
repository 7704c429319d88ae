"""What every model kind shares: the hyperparameters and the encoder/decoder stack."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kit import attention, hooks, nn
from kit.attention import context, mods
from kit.attention.projections import HEAD_MASK_MODES, check_head_mask
from kit.models import packing

Array = jax.Array

# "none": no position information at all (the decoder still has its causal mask).
# "alibi" and "t5" are score functions (kit.mods): no [T, S] bias is ever built.
POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "t5", "none")
# The computation's dtypes a model takes (ModelConfig.dtype); float16 trains only with
# loss scaling, which the kit does not do.
COMPUTE_DTYPES = ("float32", "bfloat16")
# T5's relative-position buckets (Raffel et al., 2020): 32 buckets up to distance 128.
T5_BUCKETS, T5_MAX_DISTANCE = 32, 128


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a toy transformer (built from `config.model`)."""

    kind: str
    vocab_size: int
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int | None = None
    num_layers: int = 2
    num_decoder_layers: int = 2
    d_ff: int = 128
    max_len: int = 64
    dropout_rate: float = 0.0
    positions: str = "sinusoidal"
    # > 0: randomized absolute positions (Ruoss et al., 2023): each call reads its
    # positions through a sorted random subset of range(random_positions).
    random_positions: int = 0
    patch_size: int = 2  # vision_transformer: p x p pixels per token
    image_size: int = 0  # vision_transformer: the task's image side
    feed_forward: bool = True  # False: attention-only blocks
    share_layers: bool = False  # True: one block applied num_layers times (Universal Transformer)
    # The computation's dtype; parameters (and so gradients, optimizer state and
    # checkpoints) stay float32, and the softmax and the loss run in float32.
    dtype: str = "float32"
    # What pretrained architectures need (kit.pretrained): LayerNorm's epsilon (flax's
    # default 1e-6; GPT-2 1e-5), a bias on the key projection (GPT-2's fused c_attn has
    # one; the softmax cancels it, but the hook point "k" shows it), and an output head
    # tied to the token embedding (logits = x E^T, no bias).
    norm_eps: float = 1e-6
    key_bias: bool = False
    tie_embeddings: bool = False
    # Norms before each sublayer ("pre") or after its residual ("post": BERT, whose
    # stack then ends without a norm); RMSNorm instead of LayerNorm (T5).
    norm_position: str = "pre"
    rms_norm: bool = False
    # False: no 1/sqrt(H) on the scores (T5, whose initialization folds it in).
    scale_attention: bool = True
    # The feed-forward's nonlinearity (kit.nn.ACTIVATIONS) and whether it is gated.
    activation: str = "gelu_tanh"
    gated: bool = False
    # BERT: token-type (segment) embeddings, a LayerNorm on the embedding, the masked-LM
    # head's transform (dense, activation, LayerNorm) and a bias on the tied head, and
    # the pooler (dense and tanh on the first token).
    type_vocab_size: int = 0
    embed_norm: bool = False
    head_transform: bool = False
    head_bias: bool = False
    pooler: bool = False
    # Per-head width when it is not d_model / num_heads (T5 v1.1: 512 wide, 6 heads of 64),
    # and T5 v1.0's head, which reads the last states scaled by d_model ** -0.5.
    head_dim: int | None = None
    scale_head_input: bool = False
    # vision_transformer: colour channels per pixel (images [B, H, W] when 1, else
    # [B, H, W, C]).
    channels: int = 1


class TaskModel(nnx.Module):
    """A model kind as training reads it. Each kind defines `batch(task arrays)`,
    `positions_needed(task)`, `teacher_forced(mb, *, dropout_rng, hooks)` and
    `predict(mb, *, hooks)`; `eval_metrics` may add names to the held-out metrics.

    `hooks` (`kit.hooks.Hooks`) reads and writes the model's named activations;
    `hook_points()` lists them. A call with hooks returns the values read as
    `aux["activations"]` (name -> array).

    `ATTENTION_SETS` names each attention set as the viewer and head ablation do
    ("encoder", "decoder", "cross") -> (the Stack attribute, "attn" or "cross").
    """

    ATTENTION_SETS: ClassVar[dict[str, tuple[str, str]]] = {}
    # Whether the kind trains with its sequence split over devices (`split_batch`).
    SPLITS: ClassVar[bool] = False
    # How `packing.pack` lays out this kind's examples (None: not packable).
    PACKED: ClassVar[dict[str, tuple[str, ...]] | None] = None

    @classmethod
    def pack(cls, mb: dict[str, Any], rows: int, widths: tuple[int, ...]) -> dict[str, Any]:
        """A per-example model batch packed into `rows` rows of `widths` (`packing.pack`)."""
        if cls.PACKED is None:
            raise ValueError(
                f"mb: model kind {cls.__name__} does not pack examples; "
                "use encoder_decoder or encoder_only"
            )
        return packing.pack(mb, cls.PACKED, rows, widths)

    @staticmethod
    def eval_metrics(result: dict[str, float]) -> dict[str, float]:
        return result

    @classmethod
    def split_batch(cls, mb: dict[str, Any], split: context.SequenceSplit) -> dict[str, Any]:
        """A model batch laid out for the sequence split over devices (context
        parallelism): causal sequences permuted into the zig-zag order (tokens,
        positions, segments, targets and weights alike, once per batch), with each
        token's place in its row, for `teacher_forced(..., split=split)`; its
        targets and weights are the loss's. Kinds that split define it.

        Raises:
          ValueError: naming model.kind for a kind that does not split.
        """
        raise ValueError(
            f"model.kind: {cls.__name__} does not train with its sequence split over "
            "devices (mesh.seq > 1); use decoder_only or encoder_decoder"
        )

    @staticmethod
    def split_lengths(task: Any, widths: tuple[int, ...] | None) -> dict[str, tuple[int, bool]]:
        """The sequences the split cuts (a packed batch's `widths`, else the task's
        lengths): name -> (length, whether its attention is causal)."""
        raise NotImplementedError

    # Whether `predict` takes oracle_length (decoding to the target's true length).
    ORACLE_LENGTH: ClassVar[bool] = False

    @classmethod
    def layers_label(cls, m: Any) -> str:
        """How the run's header names the layers of config.model `m`: "2 layers", or
        "2+1 layers" for a kind with a decoder stack beside its encoder."""
        if "cross" in cls.ATTENTION_SETS:
            return f"{m.num_layers}+{m.num_decoder_layers} layers"
        return f"{m.num_layers} layer{'' if m.num_layers == 1 else 's'}"

    @classmethod
    def check(cls, m: Any, task: Any) -> None:
        """Checks `m` (a config's `model` section) against `task` for this kind.

        Raises:
          ValueError: naming the `model.<field>` that does not fit.
        """
        if task.image_size:
            raise ValueError(
                f"model.kind: task {task.name!r} is images; use 'vision_transformer', "
                f"got {m.kind!r}"
            )

    def read_text(self, task: Any, ids: list[int], words: list[str]):
        """One text through the model as the probe reads it (batch of one).

        Returns:
          (prediction text, a label per input position or None, the attention by
          set as `attention_sets` gives it, set -> (query tokens, key tokens)).
        """
        raise ValueError(f"text: a {self.cfg.kind} model does not read text")

    def attention_tokens(self, mb: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Attention set -> (query token ids `[B, T]`, key ids `[B, S]` or None for
        self-attention) of a model batch, for pattern scores (`kit.analysis.interp`)."""
        raise NotImplementedError

    def text_logits(self, task: Any, ids: list[int], hooks: hooks.Hooks | None = None):
        """Per-position logits `[1, T, V]` of one token sequence read as this kind reads
        `task`'s text, its aux, and the T input tokens as strings (for patching and
        plots). Only kinds whose every position predicts define it.

        Raises:
          ValueError: naming `model.kind` for a kind without per-position logits.
        """
        raise ValueError(
            f"model.kind: {self.cfg.kind} has no per-position logits over one token "
            "sequence; use an encoder_only or decoder_only model"
        )

    def attention_shapes(self) -> dict[str, tuple[int, int]]:
        """Attention set -> (layers L, heads N): the shape of its head mask."""
        return {
            name: (len(getattr(self, stack).layers), self.cfg.num_heads)
            for name, (stack, _) in self.ATTENTION_SETS.items()
        }

    def hook_points(self) -> list[str]:
        """Every hook point of this model, in the order the forward meets them."""
        stacks = {}
        for stack, attn in self.ATTENTION_SETS.values():
            layers = len(getattr(self, stack).layers)
            cross = stacks.get(stack, (0, False))[1] or attn == "cross"
            stacks[stack] = (layers, cross)
        return hooks.hook_points(stacks, feed_forward=self.cfg.feed_forward)

    def tap(self, hooks_: hooks.Hooks | None) -> hooks.Tap:
        """A Tap over `hooks_`, checked against this model's points."""
        if hooks_ is not None:
            if not isinstance(hooks_, hooks.Hooks):
                raise ValueError(f"hooks: expected a kit.hooks.Hooks, got {type(hooks_).__name__}")
            hooks_.check(self.hook_points())
        return hooks.Tap(hooks_)

    def head_ablation(self, head_mask: Any, mode: str = "zero") -> hooks.Hooks:
        """Hooks that ablate heads: `head_mask` maps attention sets to `[L, N]`
        (1 keeps a head, 0 ablates it; values between blend); a set left out is
        kept. "zero" zeroes a head's output before the output projection, "mean"
        puts its mean over the batch in its place (per position); the projection's
        bias stays.

        Raises:
          ValueError: naming `head_mask` for an unknown set, a shape other than
            `[L, N]` or a dtype other than bool or float, or `mode`.
        """
        if mode not in HEAD_MASK_MODES:
            raise ValueError(f"mode: expected one of {HEAD_MASK_MODES}, got {mode!r}")
        shapes = self.attention_shapes()
        if not isinstance(head_mask, dict):
            raise ValueError(
                f"head_mask: expected a dict {{attention set: [L, N] array}} over "
                f"{sorted(shapes)}, got {type(head_mask).__name__}"
            )
        unknown = sorted(set(head_mask) - set(shapes))
        if unknown:
            raise ValueError(
                f"head_mask: unknown attention set(s) {unknown}; this {self.cfg.kind} model "
                f"has {sorted(shapes)}"
            )
        write = {}
        for name, mask in head_mask.items():
            mask = check_head_mask(mask, shapes[name], f"head_mask[{name!r}]")
            stack, attn = self.ATTENTION_SETS[name]
            for layer in range(shapes[name][0]):
                where = (1 - mask[layer].astype(jnp.float32))[None, None, :, None]
                write[f"{stack}.{layer}.{attn}.heads"] = hooks.Edit(mode, where=where)
        return hooks.Hooks(write=write)

    def attention_hooks(self) -> hooks.Hooks:
        """Hooks that read what every attention did: q, k, v, weights and bias."""
        points = ("q", "k", "v", "weights", "bias")
        return hooks.Hooks(
            read=tuple(
                f"{stack}.*.{attn}.{p}"
                for stack, attn in self.ATTENTION_SETS.values()
                for p in points
            )
        )

    def attention_sets(self, activations: dict[str, Array]) -> dict[str, Any]:
        """What `attention_hooks()` read, by attention set, batch first (the one axis
        order from here to the page: `sets[name][b]` is example b's `[L, N, T, S]`):
        weights `[B, L, N, T, S]` per set and "vectors" (per set: query
        `[B, L, T, N, H]`, key and value `[B, L, S, K, H]`, value_norms
        `[B, L, N, S]` (`kit.head_value_norms`) and, with positions as a score
        function, bias `[B, L, N, T, S]`)."""
        out: dict[str, Any] = {"vectors": {}}
        for name, (stack, attn) in self.ATTENTION_SETS.items():
            layers = getattr(self, stack).layers

            def stacked(point, stack=stack, attn=attn, layers=layers):
                got = [activations.get(f"{stack}.{i}.{attn}.{point}") for i in range(len(layers))]
                return None if got[0] is None else jnp.stack(got, axis=1)

            module = "self_attention" if attn == "attn" else "cross_attention"
            norms = [
                attention.head_value_norms(
                    activations[f"{stack}.{i}.{attn}.v"], getattr(layer, module).out["kernel"][...]
                )
                for i, layer in enumerate(layers)
            ]
            out[name] = stacked("weights")
            vectors = {"query": stacked("q"), "key": stacked("k"), "value": stacked("v")}
            vectors["value_norms"] = jnp.stack(norms, axis=1)
            if stacked("bias") is not None:
                vectors["bias"] = stacked("bias")
            out["vectors"][name] = vectors
        return out


def attention_pass(graphdef: Any, params: Any, *args: Any):
    """`nnx.merge(graphdef, params)(*args)` reading every attention: its logits and
    `attention_sets` (a pure function, to jit)."""
    model = nnx.merge(graphdef, params)
    logits, aux = model(*args, hooks=model.attention_hooks())
    return logits, model.attention_sets(aux["activations"])


def until_eos(ids: Any, eos: int) -> list[int]:
    """ids up to (not including) the first `eos`."""
    ids = [int(i) for i in np.asarray(ids)]
    return ids[: ids.index(eos)] if eos in ids else ids


def position_score(alibi: bool, num_heads: int, causal: bool, positions, key_positions, *table):
    """A stack's positions as a score function: symmetric ALiBi, T5's relative bias
    from `table` (one-directional when `causal`), or None."""
    at = (positions, key_positions)
    if alibi:
        return mods.alibi(num_heads, symmetric=True, positions=at)
    if table:
        return mods.t5_relative(
            table[0], max_distance=T5_MAX_DISTANCE, bidirectional=not causal, positions=at
        )
    return None


class Stack(nnx.Module):
    """L transformer blocks and a final LayerNorm."""

    def __init__(self, cfg: ModelConfig, num_layers: int, *, cross: bool, rngs: nnx.Rngs):
        def block():
            return nn.TransformerBlock(
                cfg.d_model,
                cfg.num_heads,
                cfg.d_ff,
                num_kv_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim,
                cross_attention=cross,
                feed_forward=cfg.feed_forward,
                dropout_rate=cfg.dropout_rate,
                rope=cfg.positions == "rope",
                norm_eps=cfg.norm_eps,
                norm_position=cfg.norm_position,
                rms_norm=cfg.rms_norm,
                key_bias=cfg.key_bias,
                scale_attention=cfg.scale_attention,
                activation=cfg.activation,
                gated=cfg.gated,
                dtype=cfg.dtype,
                rngs=rngs,
            )

        # Shared layers (Dehghani et al., "Universal Transformers", 2019, without the
        # adaptive halting): the list holds one block num_layers times; nnx keeps one
        # set of parameters for it.
        shared = block() if cfg.share_layers else None
        self.layers = nnx.List([shared or block() for _ in range(num_layers)])
        # Post-norm blocks end normalized: the stack adds no norm of its own.
        self.norm = (
            nn.layer_norm(cfg.d_model, cfg.norm_eps, cfg.rms_norm, cfg.dtype, rngs)
            if cfg.norm_position == "pre"
            else None
        )
        self.alibi = cfg.positions == "alibi"
        # T5's learned relative-position bias, one table per stack shared by its layers.
        self.t5 = (
            nnx.Param(jnp.zeros((T5_BUCKETS, cfg.num_heads), jnp.float32))
            if cfg.positions == "t5"
            else None
        )
        self.num_heads = cfg.num_heads

    @staticmethod
    def document_masks(segments: Array, memory_segments: Array | None, causal: bool):
        """The block masks of packed examples: self-attention within each example
        (causal if `causal`), cross-attention to the memory's same example."""
        B, T = segments.shape
        own = mods.documents(segments)
        own = attention.and_masks(mods.causal, own) if causal else own
        masks = {"self_block_mask": attention.create_block_mask(own, B, None, T, T)}
        if memory_segments is not None:
            cross = mods.documents(segments, memory_segments)
            S = memory_segments.shape[1]
            masks["cross_block_mask"] = attention.create_block_mask(cross, B, None, T, S)
        return masks

    def score_mod(self, positions: Array, key_positions: Array, causal: bool):
        """The positions' score function (`kit.mods` ALiBi, symmetric, or T5), or None:
        query t of example b sits at positions[b, t], key s at key_positions[b, s]."""
        table = () if self.t5 is None else (self.t5[...],)
        return position_score(self.alibi, self.num_heads, causal, positions, key_positions, *table)

    def split_calls(self, split, positions, index, segments, memory_segments, causal, kwargs):
        """The attentions with the sequence split over devices (`kit.attention.context`):
        {"self_split": ..., "cross_split": ...} for the blocks. The sides carry each
        token's place in its row (`index`), its position, its segment and whether it
        is a live key (from the call's key mask or lengths)."""
        B, T = positions.shape
        q_side = {"index": index, "positions": positions}
        if segments is not None:
            q_side["segments"] = segments
        k_side = dict(q_side)
        every = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if kwargs.get("mask") is not None:
            k_side["live"] = jnp.broadcast_to(kwargs["mask"][:, 0, 0, :], (B, T))
        elif kwargs.get("lengths") is not None:
            k_side["live"] = every < kwargs["lengths"][:, None]
        score_fn, extras = None, ()
        if self.alibi or self.t5 is not None:
            score_fn = functools.partial(position_score, self.alibi, self.num_heads, causal)
            extras = () if self.t5 is None else (self.t5[...],)
        attend = functools.partial(context.split_attention, split)
        calls = {
            "self_split": functools.partial(
                attend,
                q_side=q_side,
                k_side=k_side,
                causal=causal,
                score_fn=score_fn,
                extras=extras,
            )
        }
        memory = kwargs.get("memory")
        if memory is not None:
            S = memory.shape[1]
            m_side = {"index": jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))}
            cross_q = {"index": index}
            if memory_segments is not None:
                m_side["segments"], cross_q["segments"] = memory_segments, segments
            if kwargs.get("memory_lengths") is not None:
                m_side["live"] = m_side["index"] < kwargs["memory_lengths"][:, None]
            calls["cross_split"] = functools.partial(attend, q_side=cross_q, k_side=m_side)
        return calls

    def __call__(
        self,
        x: Array,
        *,
        positions: Array,
        caches: list[dict[str, Array]] | None = None,
        dropout_rng: Array | None = None,
        tap: hooks.Tap | None = None,
        segments: Array | None = None,
        memory_segments: Array | None = None,
        split: context.SequenceSplit | None = None,
        order: Array | None = None,
        **block_kwargs: Any,
    ) -> tuple[Array, list[dict[str, Array]] | None]:
        """`segments` `[B, T]` (and the memory's `[B, S]`): packed examples
        (`kit.models.packing`), kept apart by document block masks. `tap`
        (scoped to this stack) names layer l's points "<l>.<point>".

        `split`: the sequence split over devices (context parallelism), the
        activations laid out split along it; `order` int `[B, T]`: each token's
        place in its row when the rows are permuted (the zig-zag order), which
        the causal mask compares (default: 0..T-1).

        Returns x and, when decoding, the updated caches (else None)."""
        tap = tap if tap is not None else hooks.Tap(None)
        # Self-attention's keys are the same tokens, or in decoding the cache slots.
        key_positions = positions
        if caches is not None:
            key_positions = jnp.arange(caches[0]["key"].shape[1], dtype=jnp.int32)[None]
        causal = block_kwargs.get("is_causal", False) or caches is not None
        score_mod = self.score_mod(positions, key_positions, causal)
        if split is not None:
            if caches is not None:
                raise ValueError("caches: decoding does not run with the sequence split")
            if order is None:
                order = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
            block_kwargs.update(
                self.split_calls(
                    split, positions, order, segments, memory_segments, causal, block_kwargs
                )
            )
            x = split.constrain(x)
        elif segments is not None:
            block_kwargs.update(self.document_masks(segments, memory_segments, causal))
            block_kwargs["is_causal"] = False  # in the block mask
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, cache = layer(
                x,
                self_score_mod=score_mod,
                positions=positions,
                cache=None if caches is None else caches[i],
                dropout_rng=None if dropout_rng is None else jax.random.fold_in(dropout_rng, i),
                tap=tap.scope(i),
                **block_kwargs,
            )
            new_caches.append(cache)
            x = x if split is None else split.constrain(x)
        x = x if self.norm is None else self.norm(x)
        return x, (None if caches is None else new_caches)
