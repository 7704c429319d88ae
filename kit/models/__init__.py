"""Toy transformers built from kit.nn, one class per model kind.

Each model's `__call__` returns `(logits, aux)`. Given `hooks` (`kit.hooks.Hooks`),
it reads and writes named activations (`model.hook_points()`) and returns what it
read as `aux["activations"]`; `model.attention_sets(...)` stacks the attention
that `model.attention_hooks()` read as `[B, L, N, T, S]` per set ("encoder",
"decoder", "cross").

Each model kind owns how it reads a task: `batch` turns the task's arrays into
its inputs, targets and loss weights, `positions_needed` says how long its
inputs get (and refuses a task it cannot read), `teacher_forced` gives logits
aligned with the targets and `predict` its greedy output. Training reads a kind
only through these, so a new kind is one class and one entry in `MODELS`.
"""

from flax import nnx

from kit.models.common import COMPUTE_DTYPES, POSITIONS, ModelConfig, Stack, TaskModel
from kit.models.text import DecoderOnly, Embedder, EncoderDecoder, EncoderOnly
from kit.models.vision import VisionTransformer

MODELS = {
    "encoder_decoder": EncoderDecoder,
    "decoder_only": DecoderOnly,
    "encoder_only": EncoderOnly,
    "vision_transformer": VisionTransformer,
}
KINDS = tuple(MODELS)


def build(cfg: ModelConfig, rng) -> nnx.Module:
    """The model of `cfg.kind`, initialized from `rng`."""
    return MODELS[cfg.kind](cfg, rngs=nnx.Rngs(params=rng))


__all__ = [
    "COMPUTE_DTYPES",
    "KINDS",
    "MODELS",
    "POSITIONS",
    "DecoderOnly",
    "Embedder",
    "EncoderDecoder",
    "EncoderOnly",
    "ModelConfig",
    "Stack",
    "TaskModel",
    "VisionTransformer",
    "build",
]
