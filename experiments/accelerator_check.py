"""Checks kit's attention on whatever backend jax has; writes a markdown report.

    python experiments/accelerator_check.py --out=accelerator.md

On every backend: `kit.dot_product_attention(..., implementation=None)` against
`implementation="xla"`, forward and gradients (q, k, v), in float32 and
bfloat16, over masks, key and query lengths, a window, a bias, grouped-query
heads, and a length at which None takes another path (chunked on CPU); and that
every query row with no live key returns exactly zero with finite gradients.

On a GPU only (`jax.default_backend() == "gpu"`), also:
  * `implementation="cudnn"` against "xla" in bfloat16 and float16, for the cases
    jax.nn's cuDNN path takes (rows with no live key are left out of that
    comparison, since cuDNN gives no promise there; what it returns is reported);
  * the speed of cudnn, chunked and xla, forward+backward, causal, bfloat16, at
    T = S = 2,048 to 16,384 (--lengths);
  * configs/copy.py trained in bfloat16 (config.model.dtype) to 100% exact
    match (--train_copy), and whether its compiled train step calls cuDNN's
    fused attention (a `__cudnn$fmha` custom call in the program).

The process exits with status 1 if any check failed.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
import sys
import tempfile
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import kit
from kit import training
from kit.attention.api import _choose_implementation
from kit.attention.inputs import check_inputs
from kit.training.loop import lower_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (forward, gradient) tolerances, absolute and relative alike: float32 paths agree
# to rounding; bfloat16 and float16 outputs are rounded once more at the end.
TOLERANCES = {"float32": (1e-5, 1e-4), "bfloat16": (2e-2, 2e-2), "float16": (2e-2, 2e-2)}

B, T, N, H = 2, 24, 4, 16
LONG = 512  # T = S here reaches _CHUNKED_MIN_PAIRS: None takes the chunked path on CPU


def _cases() -> dict[str, dict[str, Any]]:
    """Case name -> shapes and options. Every case with lengths or a mask leaves some
    query rows with no live key."""
    rng = np.random.default_rng(0)
    mask = rng.random((B, 1, T, T)) < 0.6
    mask[0, :, 3, :] = False  # row 3 of example 0 sees no key
    return {
        "plain": {},
        "causal": {"is_causal": True},
        "mask": {"mask": mask},
        "key lengths": {"key_value_seq_lengths": np.array([0, 7], np.int32)},
        "query lengths": {"query_seq_lengths": np.array([5, T], np.int32)},
        "causal window": {"is_causal": True, "local_window_size": (4, 0)},
        "bias": {"bias": rng.normal(size=(B, N, T, T)).astype(np.float32)},
        "GQA causal lengths": {
            "num_kv_heads": 2,
            "is_causal": True,
            "key_value_seq_lengths": np.array([0, 11], np.int32),
        },
        "long GQA causal lengths": {
            "length": LONG,
            "num_kv_heads": 2,
            "is_causal": True,
            "query_seq_lengths": np.array([LONG, 200], np.int32),
            "key_value_seq_lengths": np.array([0, 300], np.int32),
        },
    }


CASES = tuple(_cases())
# jax.nn's cuDNN path: no window with a right side (ours is causal with a left one),
# a full [B, N, T, S] bias; a mask becomes such a bias.
CUDNN_CASES = CASES


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Whether `got` matches `want` elementwise: |got - want| <= atol + rtol * |want|."""

    ok: bool
    max_abs: float  # largest |got - want|
    excess: float  # largest |got - want| / (atol + rtol * |want|); ok means <= 1


def compare(got, want, *, atol: float, rtol: float) -> Comparison:
    """Compares two arrays of one shape; a non-finite entry in `got` fails.

    Raises:
      ValueError: naming `got` if the shapes differ, or `atol`/`rtol` if negative.
    """
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol, rtol: expected >= 0, got {atol}, {rtol}")
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    if got.shape != want.shape:
        raise ValueError(f"got: shape {got.shape}, expected the shape of want {want.shape}")
    if got.size == 0:
        return Comparison(True, 0.0, 0.0)
    if not np.all(np.isfinite(got)):
        return Comparison(False, float("inf"), float("inf"))
    error = np.abs(got - want)
    excess = float(np.max(error / (atol + rtol * np.abs(want))))
    return Comparison(excess <= 1.0, float(np.max(error)), excess)


@dataclasses.dataclass(frozen=True)
class Check:
    """One row of the report."""

    section: str
    case: str
    dtype: str
    detail: str  # e.g. which path None took
    forward: Comparison
    gradients: Comparison
    dead_rows_zero: bool | None  # None: the case has no row without a live key
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.forward.ok and self.gradients.ok and self.dead_rows_zero is not False

    @property
    def compared(self) -> bool:
        """Whether two different paths ran (None may take xla itself: then the row only
        checks its rows with no live key)."""
        return self.section != "none_vs_xla" or self.detail != "xla"


def _inputs(case: str, dtype: str):
    """q, k, v, the attention options, a cotangent and the live-row mask `[B, T, N, 1]`."""
    spec = dict(_cases()[case])
    length = spec.pop("length", T)
    kv_heads = spec.pop("num_kv_heads", N)
    # A seed from the case's name that every run shares (str's hash() is salted per process).
    rq, rk, rv, rc = jax.random.split(jax.random.key(zlib.crc32(case.encode())), 4)
    q = jax.random.normal(rq, (B, length, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(rk, (B, length, kv_heads, H), jnp.float32).astype(dtype)
    v = jax.random.normal(rv, (B, length, kv_heads, H), jnp.float32).astype(dtype)
    cotangent = jax.random.normal(rc, q.shape, jnp.float32).astype(dtype)
    options = {name: jnp.asarray(x) if isinstance(x, np.ndarray) else x for name, x in spec.items()}
    bias, mask = options.pop("bias", None), options.pop("mask", None)
    if bias is not None:  # in the inputs' dtype, as jax.nn's cuDNN path takes it
        bias = bias.astype(dtype)
    weights = kit.attention_weights(q, k, bias, mask, **options)  # [B, N, T, S]
    live = jnp.transpose(jnp.sum(weights.astype(jnp.float32), axis=-1) > 0, (0, 2, 1))[..., None]
    return q, k, v, {"bias": bias, "mask": mask, **options}, cotangent, live


def _output_and_grads(implementation: str | None, options: dict[str, Any]):
    def run(q, k, v, cotangent):
        def attend(q, k, v):
            return kit.dot_product_attention(q, k, v, implementation=implementation, **options)

        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(cotangent)

    return run


def _gradients(grads, ref_grads, tol: float) -> Comparison:
    """Every gradient, flattened into one vector per side, compared at `tol`."""

    def flat(arrays):
        return jnp.concatenate([jnp.ravel(x.astype(jnp.float32)) for x in arrays])

    return compare(flat(grads), flat(ref_grads), atol=tol, rtol=tol)


def _taken(q, k, v, options) -> str:
    """The path `implementation=None` takes for these inputs."""
    x = check_inputs(
        q,
        k,
        v,
        options["bias"],
        options["mask"],
        **{n: options[n] for n in options if n not in ("bias", "mask")},
    )
    return _choose_implementation(None, x, 0.0)


def equality_checks(cases=CASES, dtypes=("float32", "bfloat16")) -> list[Check]:
    """implementation=None against "xla" on the current backend, with rows that see no
    key checked to be exactly zero (with finite gradients) on the None path."""
    checks = []
    for case in cases:
        for dtype in dtypes:
            q, k, v, options, cotangent, live = _inputs(case, dtype)
            both = jax.jit(
                lambda q, k, v, c, options=options: (
                    _output_and_grads(None, options)(q, k, v, c),
                    _output_and_grads("xla", options)(q, k, v, c),
                )
            )
            (out, grads), (ref_out, ref_grads) = both(q, k, v, cotangent)
            fwd_tol, grad_tol = TOLERANCES[dtype]
            dead = ~np.broadcast_to(np.asarray(live), out.shape)
            dead_zero = None
            if dead.any():
                finite = all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
                dead_zero = bool(np.all(np.asarray(out)[dead] == 0)) and finite
            checks.append(
                Check(
                    section="none_vs_xla",
                    case=case,
                    dtype=dtype,
                    detail=_taken(q, k, v, options),
                    forward=compare(out, ref_out, atol=fwd_tol, rtol=fwd_tol),
                    gradients=_gradients(grads, ref_grads, grad_tol),
                    dead_rows_zero=dead_zero,
                )
            )
    return checks


def cudnn_checks(cases=CUDNN_CASES, dtypes=("bfloat16", "float16")) -> list[Check]:
    """implementation="cudnn" (jax.nn's cuDNN path) against "xla" on rows with a live
    key (GPU only); what cuDNN returns on the other rows goes into the note."""
    checks = []
    for case in cases:
        for dtype in dtypes:
            q, k, v, options, cotangent, live = _inputs(case, dtype)
            cotangent = cotangent * live.astype(cotangent.dtype)  # dead rows weigh nothing
            try:
                got = jax.jit(_output_and_grads("cudnn", options))(q, k, v, cotangent)
            except (NotImplementedError, ValueError, jax.errors.JaxRuntimeError) as error:
                failed = Comparison(False, float("nan"), float("nan"))
                message = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                checks.append(
                    Check("cudnn_vs_xla", case, dtype, "cudnn", failed, failed, None, message)
                )
                continue
            want = jax.jit(_output_and_grads("xla", options))(q, k, v, cotangent)
            keep = live.astype(jnp.float32)
            (out, grads), (ref_out, ref_grads) = got, want
            fwd_tol, grad_tol = TOLERANCES[dtype]
            dead = ~np.broadcast_to(np.asarray(live), out.shape)
            note = ""
            if dead.any():
                largest = float(np.max(np.abs(np.asarray(out, np.float32)[dead])))
                note = f"cuDNN max abs {largest:.3g}"
            checks.append(
                Check(
                    section="cudnn_vs_xla",
                    case=case,
                    dtype=dtype,
                    detail="cudnn",
                    forward=compare(
                        out.astype(jnp.float32) * keep,
                        ref_out.astype(jnp.float32) * keep,
                        atol=fwd_tol,
                        rtol=fwd_tol,
                    ),
                    gradients=_gradients(grads, ref_grads, grad_tol),
                    dead_rows_zero=None,
                    note=note,
                )
            )
    return checks


def speed(lengths, *, batch: int = 1, heads: int = 16, head_dim: int = 64, repeats: int = 5):
    """Median ms of a jitted causal forward+backward per path and length, bfloat16
    (GPU only). A path that cannot run a length (out of memory) reports its error."""
    rows = []
    for length in lengths:
        rq, rk, rv = jax.random.split(jax.random.key(length), 3)
        shape = (batch, length, heads, head_dim)
        q, k, v = (
            jax.random.normal(r, shape, jnp.float32).astype(jnp.bfloat16) for r in (rq, rk, rv)
        )
        for implementation in ("cudnn", "chunked", "xla"):

            def loss(q, k, v, implementation=implementation):
                out = kit.dot_product_attention(
                    q, k, v, is_causal=True, implementation=implementation
                )
                return jnp.sum(out.astype(jnp.float32))

            step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            row = {"T": length, "implementation": implementation}
            try:
                jax.block_until_ready(step(q, k, v))  # compile and warm up
                times = []
                for _ in range(repeats):
                    began = time.perf_counter()
                    jax.block_until_ready(step(q, k, v))
                    times.append(time.perf_counter() - began)
                row["ms"] = 1e3 * statistics.median(times)
            except (jax.errors.JaxRuntimeError, NotImplementedError, ValueError) as error:
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
            rows.append(row)
    return rows


def train_copy() -> dict[str, Any]:
    """configs/copy.py trained in bfloat16 on the default devices, and how many cuDNN
    fused-attention calls its compiled train step makes."""
    config = training.from_file(os.path.join(ROOT, "configs", "copy.py"))
    dtype = config.model.dtype = "bfloat16"
    s = training.setup(config)
    batch = training.model_batch(
        s.kind, s.task.train_batch(config.seed, 0, config.train.batch_size)
    )
    program = lower_train_step(s, batch).compile().as_text()
    with tempfile.TemporaryDirectory() as workdir:
        began = time.perf_counter()
        result = training.train_and_evaluate(config, workdir, console=training.Console("off"))
    return {
        "dtype": dtype,
        "cudnn_calls": program.count("__cudnn$fmha"),
        "steps": result["step"],
        "exact_match": result["eval/exact_match"],
        "seconds": time.perf_counter() - began,
    }


def _cell(c: Comparison) -> str:
    return f"{c.max_abs:.2e}" if c.ok else f"**{c.max_abs:.2e}** (x{c.excess:.1f} tol)"


def _table(checks: list[Check], detail: str) -> list[str]:
    lines = [
        f"| case | dtype | {detail} | forward max err | gradient max err "
        "| rows with no live key | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        dead = {None: "-", True: "zero, finite grads", False: "**not zero**"}[c.dead_rows_zero]
        if c.note:
            dead = c.note
        lines.append(
            f"| {c.case} | {c.dtype} | {c.detail} | {_cell(c.forward)} | {_cell(c.gradients)} "
            f"| {dead} | {'pass' if c.ok else '**FAIL**'} |"
        )
    return lines


def render(
    checks: list[Check],
    *,
    speed_rows: list[dict] | None = None,
    copy_run: dict[str, Any] | None = None,
) -> str:
    """The markdown report. GPU sections that did not run say so."""
    backend = jax.default_backend()
    devices = jax.devices()
    # Counted: the rows where two different paths ran, and any row that failed.
    counted = [c for c in checks if c.compared or not c.ok]
    alone = len(checks) - sum(c.compared for c in checks)
    copy_ok = copy_run is None or copy_run["exact_match"] == 1.0
    total = len(counted) + (copy_run is not None)
    bad = sum(not c.ok for c in counted) + (not copy_ok)
    result = (
        f"**Result: all {total} checks passed.**"
        if not bad
        else f"**Result: {bad} of {total} checks FAILED.**"
    )
    if alone:
        result += (
            f" Not counted: {alone} rows where None took xla, so xla met itself (their "
            "rows with no live key are still checked)."
        )
    not_gpu = f"Not run: the backend is {backend}, not gpu."
    lines = [
        "# Accelerator check",
        "",
        f"`python experiments/accelerator_check.py` on {datetime.date.today().isoformat()}: "
        f"backend {backend}, {len(devices)} x {devices[0].device_kind}, jax {jax.__version__}.",
        "",
        result,
        "",
        '## implementation=None against implementation="xla"',
        "",
        f"B={B}, T=S={T} (the long case {LONG}), {N} query heads (GQA: 2 key/value heads), "
        f"H={H}; forward output and gradients of q, k, v against a random cotangent. "
        "Tolerance per element: atol = rtol = "
        + ", ".join(f"{d} {f:g} (gradients {g:g})" for d, (f, g) in TOLERANCES.items())
        + ". Rows with no live key must be exactly zero on the None path.",
        "",
        *_table([c for c in checks if c.section == "none_vs_xla"], "None took"),
        "",
        '## implementation="cudnn" against "xla" (GPU only)',
        "",
    ]
    cudnn = [c for c in checks if c.section == "cudnn_vs_xla"]
    if backend != "gpu":
        lines.append(not_gpu)
    else:
        lines += [
            "Rows with no live key are left out of the comparison (zero cotangent there); "
            "the last column says what cuDNN returned on them.",
            "",
            *_table(cudnn, "path"),
        ]
    lines += ["", "## Speed: causal forward+backward, bfloat16 (GPU only)", ""]
    if speed_rows is None:
        lines.append(not_gpu if backend != "gpu" else "Not run (--lengths is empty).")
    else:
        lines += [
            "B=1, 16 heads, H=64; median of 5 runs after a warm-up.",
            "",
            "| T = S | path | median ms | vs xla |",
            "|---|---|---|---|",
        ]
        xla = {r["T"]: r.get("ms") for r in speed_rows if r["implementation"] == "xla"}
        for r in speed_rows:
            if "ms" in r:
                ratio = f"{xla[r['T']] / r['ms']:.2f}x" if xla.get(r["T"]) else "-"
                lines.append(f"| {r['T']:,} | {r['implementation']} | {r['ms']:.1f} | {ratio} |")
            else:
                lines.append(f"| {r['T']:,} | {r['implementation']} | {r['error']} | - |")
    lines += ["", "## configs/copy.py trained (GPU only)", ""]
    if copy_run is None:
        lines.append(not_gpu if backend != "gpu" else "Not run (--train_copy=false).")
    else:
        calls = copy_run["cudnn_calls"]
        lines.append(
            f"{copy_run['dtype']} (config.model.dtype; float32 parameters): exact match "
            f"{copy_run['exact_match']:.4f} after {copy_run['steps']} steps, "
            f"{copy_run['seconds']:.1f} s ({'pass' if copy_ok else '**FAIL**: not 100%'}). "
            f"The compiled train step makes {calls} cuDNN fused-attention call"
            f"{'' if calls == 1 else 's'} (`__cudnn$fmha`; implementation=None takes cuDNN "
            "only for attention without lengths, bias or mask)."
        )
    return "\n".join(lines) + "\n"


def main(argv):
    from absl import flags

    del argv
    FLAGS = flags.FLAGS
    if os.path.isdir(FLAGS.out):
        sys.exit(f"error: out: {FLAGS.out} is a folder; give a file path such as report.md")
    training.report.quiet_library_logs(FLAGS.verbosity)
    checks = equality_checks()
    speed_rows = copy_run = None
    if jax.default_backend() == "gpu":
        checks += cudnn_checks()
        lengths = [int(n) for n in FLAGS.lengths if n]
        speed_rows = speed(lengths) if lengths else None
        copy_run = train_copy() if FLAGS.train_copy else None
    text = render(checks, speed_rows=speed_rows, copy_run=copy_run)
    with open(FLAGS.out, "w") as f:
        f.write(text)
    result = next(line for line in text.splitlines() if line.startswith("**Result"))
    print(result.replace("**", ""))
    print(f"report: {os.path.abspath(FLAGS.out)}")
    if "FAILED" in result:
        sys.exit(1)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("out", None, "Where the markdown report goes.")
    flags.DEFINE_list(
        "lengths", ["2048", "4096", "8192", "16384"], "T = S for the speed table (GPU only)."
    )
    flags.DEFINE_bool("train_copy", True, "Train configs/copy.py (GPU only).")
    flags.mark_flag_as_required("out")
    app.run(main)
