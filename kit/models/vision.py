"""A small Vision Transformer: image patches as tokens, a class token, the kit's encoder.

x = [cls; patches(image) W_E] + positions; encoder blocks; logits = head(x_cls).
Images are `[B, H, W]` with one channel (H = W = the task's image size); a
patch of p x p pixels is one token, in row-major order, after the class token
at position 0.

References:
  Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
  Recognition at Scale", 2021.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kit import positional, tasks
from kit.models.common import ModelConfig, Stack, TaskModel

Array = jax.Array

# The class token's position among the tokens: its attention row is what the views show.
CLASS_TOKEN = 0


def patchify(images: Array, patch_size: int) -> Array:
    """`[B, H, W]` or `[B, H, W, C]` -> `[B, (H / p) * (W / p), p * p * C]`: row-major
    patches, each row-major with its channels last.

    Raises:
      ValueError: naming `patch_size` when it does not divide H and W.
    """
    if images.ndim == 3:
        images = images[..., None]
    B, H, W, C = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"patch_size: must divide the image size {H}x{W}, got {p}")
    x = images.reshape(B, H // p, p, W // p, p, C)  # [B, rows, p, cols, p, C]
    return jnp.swapaxes(x, 2, 3).reshape(B, (H // p) * (W // p), p * p * C)


def sinusoidal_2d(grid: int, dim: int) -> Array:
    """Fixed 2-D positions `[grid * grid, dim]`: the first half of the features encode
    the patch's row, the second half its column (each as `kit.positional.sinusoidal`)."""
    half = positional.sinusoidal(grid, dim // 2)  # [grid, dim / 2]
    rows = jnp.repeat(half, grid, axis=0)
    cols = jnp.tile(half, (grid, 1))
    return jnp.concatenate([rows, cols], axis=-1)


class VisionTransformer(TaskModel):
    """Classifies an image from its class token (positions "learned" or "sinusoidal", 2-D)."""

    ATTENTION_SETS: ClassVar[dict[str, tuple[str, str]]] = {"encoder": ("encoder", "attn")}

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        init = nnx.initializers.normal(0.02)
        self.patch_embed = nnx.Linear(
            cfg.patch_size**2 * cfg.channels, cfg.d_model, dtype=cfg.dtype, rngs=rngs
        )
        self.class_token = nnx.Param(init(rngs.params(), (cfg.d_model,)))
        self.learned = (
            nnx.Param(init(rngs.params(), (grid * grid + 1, cfg.d_model)))
            if cfg.positions == "learned"
            else None
        )
        self.grid = grid
        self.encoder = Stack(cfg, cfg.num_layers, cross=False, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, dtype=cfg.dtype, rngs=rngs)

    def __call__(
        self,
        images: Array,
        *,
        dropout_rng=None,
        hooks=None,
    ):
        """images `[B, H, W]` (or `[B, H, W, C]` with `cfg.channels` C > 1) -> class
        logits `[B, classes]` and aux. `hooks` reads and
        writes "encoder.<l>..." points (`hook_points()`), over T = 1 + number of
        patches tokens, the class token first."""
        tap = self.tap(hooks)
        want = (self.cfg.image_size,) * 2 + ((self.cfg.channels,) if self.cfg.channels > 1 else ())
        if tuple(images.shape[1:]) != want:
            raise ValueError(
                f"images: expected [B, {', '.join(map(str, want))}], got {list(images.shape)}"
            )
        x = self.patch_embed(patchify(images, self.cfg.patch_size))  # [B, P, D]
        B, P, D = x.shape
        cls = jnp.broadcast_to(self.class_token[...].astype(x.dtype), (B, 1, D))
        x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + P, D]
        if self.learned is not None:
            x = x + self.learned[...].astype(x.dtype)[None]
        else:  # a trace-time constant; the class token gets no position
            fixed = sinusoidal_2d(self.grid, D).astype(x.dtype)
            x = x + jnp.concatenate([jnp.zeros((1, D), fixed.dtype), fixed])[None]
        positions = jnp.broadcast_to(jnp.arange(1 + P, dtype=jnp.int32), (B, 1 + P))
        x, _ = self.encoder(
            x, positions=positions, dropout_rng=dropout_rng, tap=tap.scope("encoder")
        )
        logits = self.head(x[:, CLASS_TOKEN])
        return logits, ({} if hooks is None else {"activations": tap.cache})

    @staticmethod
    def batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Task arrays -> images, targets `[B, 1]` (the class) and weights `[B, 1]`."""
        labels = batch["labels"]
        return {
            "images": batch["images"],
            "targets": labels[:, None].astype(np.int32),
            "weights": np.ones((len(labels), 1), bool),
        }

    @staticmethod
    def positions_needed(task: tasks.Task) -> int:
        if not task.image_size:
            raise ValueError(f"model.kind: 'vision_transformer' reads images, not {task.name!r}")
        return 1  # its positions come from the patch grid, not from model.max_len

    @classmethod
    def check(cls, m, task) -> None:
        """The patches must tile the image, positions are the patch grid's (learned or
        sinusoidal 2-D, not randomized)."""
        if m.random_positions:
            raise ValueError(
                "model.random_positions: a vision_transformer's positions are its "
                "patch grid's; expected 0"
            )
        if task.image_size and task.image_size % m.patch_size:
            raise ValueError(
                f"model.patch_size: must divide the image size {task.image_size}, "
                f"got {m.patch_size}"
            )
        if m.positions not in ("learned", "sinusoidal"):
            raise ValueError(
                f"model.positions: a vision_transformer takes 'learned' or "
                f"'sinusoidal' (2-D) positions, got {m.positions!r}"
            )

    def attention_tokens(self, mb):
        """Patches have no ids: each token (the class token, then the patches) is its own."""
        B, T = len(mb["images"]), 1 + self.grid**2
        return {"encoder": (np.broadcast_to(np.arange(T), (B, T)), None)}

    @staticmethod
    def eval_metrics(result: dict[str, float]) -> dict[str, float]:
        """A class per image: exact match is the accuracy, logged as eval/accuracy."""
        return {**result, "eval/accuracy": result["eval/exact_match"]}

    def teacher_forced(self, mb, *, dropout_rng=None, hooks=None):
        """Logits `[B, 1, C]` aligned with mb["targets"], and aux."""
        logits, aux = self(mb["images"], dropout_rng=dropout_rng, hooks=hooks)
        return logits[:, None], aux

    def predict(self, mb, *, hooks=None) -> Array:
        """The most likely class `[B, 1]`."""
        logits, _ = self(mb["images"], hooks=hooks)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None]
