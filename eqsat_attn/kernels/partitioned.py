"""Attention kernels under a device mesh: split over batch and heads, never gathered.

XLA's SPMD partitioner cannot split a Pallas call (on GPU a custom call, in interpret mode a
loop over the grid), so under ``jax.jit`` with sharded inputs it would all-gather q, k and v
onto every device (../shared/SHARDING.md). `shard_attention` runs the kernel through
`partitioned_call`: a primitive whose lowering is a ``jax.experimental.custom_partitioning``
call that runs the kernel on each device's shard of the batch and head axes (and of any vmapped
axis), with a Shardy sharding rule. The sequence and head-dim axes must be whole on a device
(flash attention reads all of K and V), so those are gathered if they arrive sharded.

It is a primitive, with the custom partitioning only in its lowering (as jax's own cuDNN
attention does), so ``vmap`` (a batching rule: the vmapped axis becomes one more shardable
axis) and ``grad`` (a ``custom_vjp`` whose backward is partitioned the same way) still apply.
The backward recomputes the forward on each shard (the kernel's residuals stay inside it), so
this is used only when JAX sees more than one device; on one device the kernel is called as is.
GQA: query head h reads kv head h // G, so q's heads and k/v's heads are split over the same
mesh axes, in contiguous blocks, when both head counts divide by the number of shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.experimental.custom_partitioning import SdyShardingRule, custom_partitioning
from jax.extend.core import Primitive, jaxpr_as_fun
from jax.interpreters import batching, mlir
from jax.sharding import NamedSharding, PartitionSpec

#: Factors a shard may split: the batch, the query heads, and axes added by vmap ("v0", "v1", ...).
#: "hk" (kv heads, GQA) follows the query heads' split.
BATCH, HEADS, KV_HEADS = "b", "h", "hk"

Factors = tuple[str, ...]  # one factor name per axis of an operand or result

_NOT_MAPPED = None  # how a batching rule is told an operand is not vmapped (jax.interpreters.batching)

partitioned_call_p = Primitive("eqsat_attn_partitioned_call")
partitioned_call_p.multiple_results = True


def _shardable(factor: str) -> bool:
    return factor in (BATCH, HEADS) or (factor[0] == "v" and factor[1:].isdigit())


def partitioned_call(fn: Callable[..., Sequence[Any]], args: Sequence[Any], operand_factors: Sequence[Factors],
                     result_factors: Sequence[Factors]) -> list[Any]:
    """``fn(*args)`` (a tuple of arrays), run per shard of its shardable factors under a mesh.

    The primitive holds ``fn``'s jaxpr at these shapes (what runs unpartitioned; tools that walk
    jaxprs see the kernel in it) and ``fn`` itself, traced again at each shard's shapes."""
    jaxpr = jax.make_jaxpr(lambda *xs: tuple(fn(*xs)))(*(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args))
    return partitioned_call_p.bind(*args, jaxpr=jaxpr, fn=fn, operand_factors=tuple(map(tuple, operand_factors)),
                                   result_factors=tuple(map(tuple, result_factors)))


def _impl(*args, jaxpr, fn, operand_factors, result_factors):
    return list(jaxpr_as_fun(jaxpr)(*args))


def _abstract_eval(*avals, jaxpr, fn, operand_factors, result_factors):
    return list(jaxpr.out_avals)


def _batch(args, dims, *, jaxpr, fn, operand_factors, result_factors):
    """vmap: the mapped axis (moved to the front) is a new shardable factor of every operand."""
    level = 1 + max((int(f[1:]) for fs in (*operand_factors, *result_factors) for f in fs
                     if f[0] == "v" and f[1:].isdigit()), default=-1)
    axis = f"v{level}"
    in_axes = tuple(None if d is _NOT_MAPPED else 0 for d in dims)
    moved = [x if d is _NOT_MAPPED else jax.numpy.moveaxis(x, d, 0) for x, d in zip(args, dims)]
    factors = [fs if d is _NOT_MAPPED else (axis, *fs) for fs, d in zip(operand_factors, dims)]
    mapped = jax.vmap(lambda *xs: tuple(fn(*xs)), in_axes=in_axes)
    outs = partitioned_call(mapped, moved, factors, [(axis, *fs) for fs in result_factors])
    return outs, [0] * len(outs)


def _lowering(ctx, *args, jaxpr, fn, operand_factors, result_factors):
    return mlir.lower_fun(_custom_partitioned(fn, operand_factors, result_factors),
                          multiple_results=True)(ctx, *args)


partitioned_call_p.def_impl(_impl)
partitioned_call_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[partitioned_call_p] = _batch
mlir.register_lowering(partitioned_call_p, _lowering)
# Its lowering (custom_partitioning) needs the device assignment, as jax's own cuDNN attention
# primitives declare (no public API for this in jax 0.11/0.12).
from jax._src import dispatch as _dispatch  # noqa: E402

_dispatch.prim_requires_devices_during_lowering.add(partitioned_call_p)


# ---------------------------------------------------------------------------- partitioning
def _spec_entries(sharding: Any, ndim: int) -> list[tuple[str, ...]]:
    """Mesh axes per array axis of a NamedSharding (anything else: unsplit)."""
    if not isinstance(sharding, NamedSharding):
        return [()] * ndim
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec[:ndim]]


def _split_factors(mesh, shapes: Sequence[Any], factors: Sequence[Factors]) -> dict[str, tuple[str, ...]]:
    """Mesh axes for each shardable factor, taken from how the operands arrive: the first
    operand that splits a factor decides it, if every axis with that factor divides evenly and
    no mesh axis is used twice. KV heads follow the query heads (or neither is split)."""
    sizes: dict[str, list[int]] = {}
    for shape, fs in zip(shapes, factors):
        for n, f in zip(shape.shape, fs):
            sizes.setdefault(f, []).append(n)
    chosen: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    for shape, fs in zip(shapes, factors):
        for f, axes in zip(fs, _spec_entries(shape.sharding, len(fs))):
            if not axes or not _shardable(f) or f in chosen or used & set(axes):
                continue
            shards = math.prod(mesh.shape[a] for a in axes)
            if all(n % shards == 0 for n in sizes[f]):
                chosen[f] = axes
                used |= set(axes)
    if KV_HEADS in sizes and HEADS in chosen:
        shards = math.prod(mesh.shape[a] for a in chosen[HEADS])
        if all(n % shards == 0 for n in sizes[KV_HEADS]):
            chosen[KV_HEADS] = chosen[HEADS]
        else:
            del chosen[HEADS]
    return chosen


def _sharding(mesh, factors: Factors, chosen: dict[str, tuple[str, ...]]) -> NamedSharding:
    spec = [chosen.get(f) for f in factors]
    return NamedSharding(mesh, PartitionSpec(*(None if s is None else s[0] if len(s) == 1 else s for s in spec)))


def _custom_partitioned(fn: Callable[..., Sequence[Any]], operand_factors: tuple[Factors, ...],
                        result_factors: tuple[Factors, ...]) -> Callable[..., tuple]:
    def run(*xs):
        return tuple(fn(*xs))

    wrapped = custom_partitioning(run)

    def infer(mesh, arg_shapes, result_shape):
        chosen = _split_factors(mesh, arg_shapes, operand_factors)
        return tuple(_sharding(mesh, fs, chosen) for fs in result_factors)

    def partition(mesh, arg_shapes, result_shape):
        chosen = _split_factors(mesh, arg_shapes, operand_factors)
        arg_shardings = tuple(_sharding(mesh, fs, chosen) for fs in operand_factors)
        out_shardings = tuple(_sharding(mesh, fs, chosen) for fs in result_factors)
        return mesh, run, out_shardings, arg_shardings

    every = dict.fromkeys(f for fs in (*operand_factors, *result_factors) for f in fs)  # in first use: Shardy
    rule = SdyShardingRule(  # wants special factors in the order they are numbered
        operand_mappings=tuple(operand_factors), result_mappings=tuple(result_factors),
        need_replication_factors=tuple(f for f in every if not _shardable(f) and f != KV_HEADS),
    )
    wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule)
    return wrapped


# ---------------------------------------------------------------------------- attention
def attention_factors(q_layout: str, k_layout: str, v_layout: str, o_layout: str,
                      grouped: bool) -> tuple[tuple[Factors, Factors, Factors], Factors]:
    """Factor names of q, k, v and o from their layouts (strings over "BHSD")."""
    kv_heads = KV_HEADS if grouped else HEADS
    names = {
        "q": {"B": BATCH, "H": HEADS, "S": "sq", "D": "d"},
        "k": {"B": BATCH, "H": kv_heads, "S": "sk", "D": "d"},
        "v": {"B": BATCH, "H": kv_heads, "S": "sk", "D": "dv"},
        "o": {"B": BATCH, "H": HEADS, "S": "sq", "D": "dv"},
    }
    q, k, v, o = (tuple(names[r][a] for a in layout) for r, layout in zip("qkvo", (q_layout, k_layout, v_layout,
                                                                                   o_layout)))
    return (q, k, v), o


def mask_factors(shape: Sequence[int], name: str) -> Factors:
    """Factor names of a mask or bias operand broadcastable to [B, H, Sq, Sk] (numpy's rules:
    its axes are the last ones): split with the batch and query heads where it has them, whole
    along the sequences, and a unit (broadcast) axis its own factor, never split."""
    if len(shape) > 4:
        raise ValueError(f"a mask or bias broadcastable to [B, H, Sq, Sk] has at most 4 axes, got shape {tuple(shape)}")
    logical = ("B", "H", "Sq", "Sk")[4 - len(shape):]
    names = {"B": BATCH, "H": HEADS, "Sq": "sq", "Sk": "sk"}
    return tuple(f"{name}{i}" if n == 1 else names[a] for i, (a, n) in enumerate(zip(logical, shape)))


def _full_batch_and_heads(mask: Any, batch: int, heads: int) -> Any:
    """A bias broadcast along the batch or heads made full along them (a boolean mask as it is):
    each shard's gradient of a broadcast bias is a partial sum, so the broadcast stays outside the
    partitioned call, where XLA sums its transpose across shards."""
    if not jax.numpy.issubdtype(mask.dtype, jax.numpy.inexact):
        return mask
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    full = (batch, heads) + shape[2:]
    return mask if shape == full and mask.ndim == 4 else jax.numpy.broadcast_to(mask.reshape(shape), full)


def shard_attention(kernel: Callable[..., Any], q: Any, k: Any, v: Any, *masks: Any, q_layout: str,
                    k_layout: str, v_layout: str, o_layout: str) -> Any:
    """``kernel(q, k, v, *masks)`` split over batch and heads under a device mesh (this module's
    doc); ``masks``: a bias and/or a boolean mask, each broadcastable to [B, H, Sq, Sk], split
    with the batch and heads too (`mask_factors`).

    On one device (``jax.device_count() == 1``) it is ``kernel(q, k, v, *masks)`` itself."""
    if jax.device_count() == 1:
        return kernel(q, k, v, *masks)
    grouped = q.shape[q_layout.index("H")] != k.shape[k_layout.index("H")]
    batch_heads = (q.shape[q_layout.index("B")], q.shape[q_layout.index("H")])
    masks = tuple(_full_batch_and_heads(m, *batch_heads) for m in masks)
    operands, out = attention_factors(q_layout, k_layout, v_layout, o_layout, grouped)
    operands += tuple(mask_factors(m.shape, f"m{i}_") for i, m in enumerate(masks))
    return _with_partitioned_vjp(kernel, operands, out)(q, k, v, *masks)


def shard_packed_attention(kernel: Callable[[Any], Any], qkv: Any, *, packed_layout: str, o_layout: str) -> Any:
    """``kernel(qkv)`` for packed Q/K/V (``packed_layout`` over "BHSD3", "3" the Q/K/V axis),
    split over batch and heads under a device mesh, as `shard_attention`."""
    if jax.device_count() == 1:
        return kernel(qkv)
    names = {"B": BATCH, "H": HEADS, "S": "s", "D": "d", "3": "qkv"}
    operand, out = tuple(names[a] for a in packed_layout), tuple(names[a] for a in o_layout)
    return _with_partitioned_vjp(kernel, (operand,), out)(qkv)


def _with_partitioned_vjp(kernel: Callable[..., Any], operands: tuple[Factors, ...], out: Factors) -> Callable:
    """``kernel`` as a custom_vjp whose forward and backward both run through `partitioned_call`
    (the backward recomputes the forward per shard and takes the kernel's own vjp there, with
    respect to its floating operands: a boolean mask has no cotangent)."""

    def forward(*xs):
        return partitioned_call(lambda *a: (kernel(*a),), xs, operands, (out,))[0]

    @jax.custom_vjp
    def run(*xs):
        return forward(*xs)

    def run_fwd(*xs):
        return forward(*xs), xs

    def run_bwd(xs, g):
        floating = [i for i, x in enumerate(xs) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]

        def backward_shard(*a):
            *ys, g = a

            def of_floating(*zs):
                full = list(ys)
                for i, z in zip(floating, zs):
                    full[i] = z
                return kernel(*full)

            _, vjp = jax.vjp(of_floating, *(ys[i] for i in floating))
            return tuple(vjp(g))

        cotangents = partitioned_call(backward_shard, (*xs, g), (*operands, out), [operands[i] for i in floating])
        by_index = dict(zip(floating, cotangents))
        return tuple(by_index.get(i) for i in range(len(xs)))

    run.defvjp(run_fwd, run_bwd)
    return run
