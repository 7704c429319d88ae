"""The chunked kernel's passes split over a device mesh by batch and heads, with no collective.

On Auto mesh axes (`custom_partitioning`) the partitioner hands each pass the
shardings XLA's propagation chose; on Explicit axes the shardings are in the
types at trace time and `explicit_split` runs the call under `jax.shard_map`.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from kit.attention.passes import backward_all, forward_all

# Under jit on a mesh, the two passes are split over the devices by the batch
# and head axes of the inputs as XLA's sharding propagation chose them: each
# device runs the kernel on its own examples and heads, with no communication.
# (A loop over example indices would otherwise make XLA gather every input;
# the shardings of values traced under jit on a mesh of Auto axes are known
# only after propagation, hence custom_partitioning rather than shard_map.)


def _rule_names(shape, batch, heads, prefix):
    """Shardy factor names of a bias or mask `[B|1, K|1, G|1, Tp|1, Sp|1]`."""
    b = "b" if shape[0] == batch else f"{prefix}b"
    k = "k" if shape[1] == heads else f"{prefix}k"
    return [b, k, f"{prefix}g", f"{prefix}t", f"{prefix}s"]


def _sharding_rule(cfg, present, backward, mesh, operand_types, result_types):
    """The passes' Shardy rule: the batch (b) factor is shared by every operand;
    query (n) and key/value (k) heads are factors of their own, so that
    propagation never splits a head axis over part of a mesh axis (as it would
    K = 2 heads over 4 devices if they were one compound factor with N); the
    partition then splits them alike where it can. Everything else stays whole
    on each device: a programmed call's captured arrays (and their cotangents)
    are replicated, its block states split by batch only."""
    del mesh, result_types
    B, K = operand_types[0].shape[0], operand_types[1].shape[2]
    qh, kh = "b t n h", "b s k h"
    names = [n for n, given in zip(("bias", "mask"), present[:2], strict=True) if given]
    extra = [_rule_names(operand_types[3 + i].shape, B, K, n) for i, n in enumerate(names)]
    operands = [qh, kh, kh, *(" ".join(x) for x in extra), "b", "b"]
    if backward:
        operands += [qh, "b k x", qh]
        results = [qh, kh, kh] + ([" ".join(extra[0])] if present[0] else [])
    else:
        results = [qh, "b k x"]
    replicated = {"t", "s", "h", "x"} | {n for names in extra for n in names if n not in ("b", "k")}
    if present[2] is not None:  # the program's arrays: captures, states, examples, heads
        num_caps, has_states = present[2]
        rest = operand_types[len(operands) :]
        caps = [
            " ".join(f"c{i}d{d}" for d in range(len(c.shape)))
            for i, c in enumerate(rest[:num_caps])
        ]
        operands += caps
        if has_states:
            operands.append(("b" if rest[num_caps].shape[0] == B else "sb") + " sq sk")
        operands += ["b", "n"]
        replicated |= {"sb", "sq", "sk"} | {f for c in caps for f in c.split()}
        if backward:
            grads = [c for c, g in zip(caps, cfg.program.grad, strict=False) if g]
            results += grads
    rule = ", ".join(operands) + " -> " + ", ".join(results)
    # Shardy wants the special factors in the order in which the rule first names them.
    factors = dict.fromkeys(rule.replace(",", " ").split())
    return rule, {"need_replication_factors": tuple(f for f in factors if f in replicated)}


def _split_axes(mesh, q, k, q_spec=None, k_spec=None):
    """The mesh axes to split the batch and the heads over: the batch's from
    query (or key), the heads' from query (or key) where they divide both
    query's N and key's K heads; else the heads stay whole. The specs are
    q's and k's shardings' unless given."""
    q_spec, k_spec = (
        tuple(x.sharding.spec if spec is None else spec) + (None,) * 4
        for x, spec in ((q, q_spec), (k, k_spec))
    )

    def size(axes):
        return math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))

    N, K = q.shape[2], k.shape[2]
    heads = [a for a in (q_spec[2], k_spec[2]) if a is not None and N % size(a) == K % size(a) == 0]
    return q_spec[0] if q_spec[0] is not None else k_spec[0], heads[0] if heads else None


def _mesh_axes(*axes) -> tuple[str, ...]:
    return tuple(n for ax in axes if ax for n in (ax if isinstance(ax, tuple) else (ax,)))


def _partition(cfg, present, backward, mesh, arg_shapes, result_shape):
    del result_shape
    q, k, _, bias, mask, *_ = arg_shapes
    prog = arg_shapes[-1] if present[2] is not None else None
    batch, heads = _split_axes(mesh, q, k)

    def named(*spec):
        return NamedSharding(mesh, PartitionSpec(*spec))

    def extra(x):  # bias or mask: split where it is not broadcast
        if x is None:
            return None
        return named(batch if x.shape[0] != 1 else None, heads if x.shape[1] != 1 else None)

    qs, lse, lengths = named(batch, None, heads), named(batch, heads), named(batch)
    args = [qs, qs, qs, extra(bias), extra(mask), lengths, lengths]
    prog_shardings = None
    if prog is not None:  # captures whole, states by batch, example and head indices split
        captures, states, _, _ = prog
        states = None if states is None else named(batch if states.shape[0] != 1 else None)
        prog_shardings = (tuple(named() for _ in captures), states, lengths, named(heads))
    if not backward:
        return mesh, functools.partial(forward_all, cfg), (qs, lse), (*args, prog_shardings)

    def lower(*a):
        dq, dk, dv, dbias, dcaps = backward_all(cfg, *a)
        if dbias is not None:  # summed over the devices where bias is broadcast
            axes = [ax for ax, d in ((batch, 0), (heads, 1)) if ax and bias.shape[d] == 1]
            if axes := _mesh_axes(*axes):
                dbias = lax.psum(dbias, axes)
        if dcaps and (axes := _mesh_axes(batch, heads)):  # each device's examples and heads
            dcaps = tuple(lax.psum(d, axes) for d in dcaps)
        return (dq, dk, dv, dbias) if prog is None else (dq, dk, dv, dbias, dcaps)

    results = (qs, qs, qs, extra(bias))
    if prog is not None:
        grads = [c for c, g in zip(prog[0], cfg.program.grad, strict=False) if g]
        results += (tuple(named() for _ in grads),)
    return mesh, lower, results, (*args, qs, lse, qs, prog_shardings)


def _partitioned(fn, backward):
    partitioned = custom_partitioning(lambda static, *a: fn(static[0], *a), static_argnums=(0,))
    partitioned.def_partition(
        partition=lambda static, *a: _partition(*static, backward, *a),
        sharding_rule=lambda static, *a: _sharding_rule(*static, backward, *a),
    )

    def call(cfg, *args):
        # custom_partitioning has no batching rule: under jax.vmap the kernel
        # runs as it would without a mesh (vmapped over the loop, unpartitioned).
        prog = args[-1]
        layout = None if prog is None else (len(prog[0]), prog[1] is not None)
        static = (cfg, (args[3] is not None, args[4] is not None, layout))

        @custom_vmap
        def run(args):
            return partitioned(static, *args)

        @run.def_vmap
        def run_vmapped(axis_size, in_batched, args):
            del axis_size
            axes = jax.tree.map(lambda batched: 0 if batched else None, in_batched[0])
            out = jax.vmap(functools.partial(fn, cfg), in_axes=axes)(*args)
            return out, jax.tree.map(lambda _: True, out)

        return run(args)

    return call


def _backward_arrays(cfg, *args):
    """backward_all's results, without the (empty) capture cotangents when there is no program."""
    grads = backward_all(cfg, *args)
    return grads if args[-1] is not None else grads[:4]


forward = _partitioned(forward_all, backward=False)
backward = _partitioned(_backward_arrays, backward=True)


def explicit_split(run, q, k, v, bias, mask, q_len, kv_len, prog=None):
    """`run(q, k, v, bias, mask, q_len, kv_len, prog) -> (out, lse)` on each device's
    examples and heads, for inputs sharded over Explicit mesh axes.

    On such axes the sharding is part of each array's type, so it is known at
    trace time and `jax.shard_map` splits the work directly (custom_partitioning
    serves the Auto axes, whose shardings are chosen after tracing). The batch
    and heads keep their split as `_split_axes` chooses it; anything else
    sharded (a sequence or head-dim axis) is gathered first, as on Auto meshes.
    A programmed call's arrays (`prog`) are split likewise: the block states and
    example indices by batch, the head indices by heads, and the captured arrays
    whole on every device (their gradients summed over the devices).
    """
    mesh = jax.typeof(q).sharding.mesh
    batch, heads = _split_axes(mesh, q, k, jax.typeof(q).sharding.spec, jax.typeof(k).sharding.spec)

    def extra(x):  # bias, mask or states: split by batch (and heads) where not broadcast
        if x is None:
            return None
        spec = [batch if x.shape[0] != 1 else None]
        if x.ndim == 5:
            spec.append(heads if x.shape[1] != 1 else None)
        return PartitionSpec(*spec)

    qs, lengths = PartitionSpec(batch, None, heads), PartitionSpec(batch)
    specs = (qs, qs, qs, extra(bias), extra(mask), lengths, lengths)
    args = (q, k, v, bias, mask, q_len, kv_len)
    if prog is not None:
        captures, states, _, _ = prog
        whole = tuple(PartitionSpec() for _ in captures)
        specs += ((whole, extra(states), lengths, PartitionSpec(heads)),)
        args += (prog,)
    else:
        specs += (None,)
        args += (None,)
    args = jax.tree.map(
        lambda x, spec: None if x is None else jax.sharding.reshard(x, spec), args, specs,
        is_leaf=lambda x: x is None,
    )  # fmt: skip
    split = jax.shard_map(
        run, mesh=mesh, in_specs=specs, out_specs=(qs, PartitionSpec(batch, heads))
    )
    return split(*args)
