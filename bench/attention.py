"""Forward attention benchmark (issue 5): our Pallas kernels (standard and transposed-V) against
the stock Pallas Triton kernel, cuDNN and XLA, side by side on one GPU.

    python bench/attention.py [--quick] [--out bench/results/attention-<device>-<date>.md]
    python bench/attention.py --cpu-smoke --out /tmp/smoke.md   # tiny interpret-mode run on CPU
    python bench/attention.py --fp8 [--quick]   # issue 10: fp8 kernels (V [B,H,S,D] and [B,H,D,S]),
                                                # our bf16 kernel, cuDNN bf16 and fp8
    python bench/attention.py --decode [--quick]  # issue 21: decode steps (Sq 1/16, B32, caches of
                                                  # 4096 / 32768 keys): our decode kernel vs cuDNN, XLA
    python bench/attention.py --masks [--quick]   # issue 21: key padding (half the keys in half the
                                                  # batch), sliding window 1024, bias, soft-cap, ALiBi
                                                  # (slopes computed in the Mosaic GPU kernel, or read
                                                  # as a bias): ours (Mosaic GPU, Triton) vs cuDNN, XLA

TFLOP/s counts 4*B*H*Sq*Sk*D flops (halved when causal); time is the median of --reps timed calls
after warm-up, the rows of a shape called in turn over --rounds interleaved rounds (one kernel's
rate moved up to 30% between runs on an H200, so rows are not timed one after another). The plain
"ours Mosaic GPU" rows run attention_mgpu's schedule, the "overlapped schedule" ones
FlashAttention-3's; "auto" takes the faster per shape (`TUNED_BLOCKS`). Each row's output is checked
against the plain-JAX reference on batch 0, heads 0-1 (the "max err" column). fp8 rows read q, k, v
quantized per tensor to float8_e4m3fn (descale = max|x| / 448) and are checked against the reference
on the dequantized operands with the fp8 tolerance of eqsat_attn.kernels.fp8_attention
(FP8_ATOL·max|v| + FP8_RTOL·max|ref|).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import pathlib
import re
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from eqsat_attn.kernels import attention_reference, flash_attention  # noqa: E402
from eqsat_attn.kernels.alibi import Alibi  # noqa: E402
from eqsat_attn.kernels.decode_attention import decode_attention  # noqa: E402
from eqsat_attn.kernels.fp8_attention import (FP8_ATOL, FP8_RTOL, compute_scale,  # noqa: E402
                                              dequantize, flash_attention_fp8, quantize)
from eqsat_attn.kernels.masks import HIDDEN, tile_classes  # noqa: E402
from eqsat_attn.kernels.mosaic_attention import COMPUTE_WARPGROUPS, MosaicBlocks, default_blocks  # noqa: E402
from eqsat_attn.kernels.reference import causal_mask  # noqa: E402

ERR_TOL = 2e-2  # bf16 outputs: max abs error allowed, relative to 1 + max |reference|


@dataclasses.dataclass(frozen=True)
class Shape:
    b: int
    h: int
    s: int
    d: int
    causal: bool
    dtype: str = "bfloat16"

    @property
    def flops(self) -> float:
        f = 4.0 * self.b * self.h * self.s * self.s * self.d
        return f / 2 if self.causal else f

    def label(self) -> str:
        return f"{self.dtype} B{self.b} H{self.h} S{self.s} D{self.d}"


def gpu_shapes(quick: bool) -> list[Shape]:
    """Issue 5's rows: bf16 B4 H32 at S4096/8192 D128 and S4096 D64, causal and not; then the
    f16 S4096 D128 rows, where jax's own Mosaic GPU kernel (f16 only) runs beside ours."""
    out = []
    for s, d in [(4096, 128), (8192, 128), (4096, 64)]:
        if quick and s != 4096:
            continue
        for causal in (False, True):
            out.append(Shape(4, 32, s, d, causal))
    out += [Shape(4, 32, 4096, 128, causal, "float16") for causal in (False, True)]
    return out


SMOKE_SHAPES = [Shape(1, 2, 64, 32, True), Shape(1, 2, 256, 64, True)]  # the second runs Mosaic GPU rows
FP8_SMOKE_SHAPES = [Shape(1, 2, 128, 128, True)]  # inside the Mosaic GPU fp8 contract (D128)


def fp8_shapes(quick: bool) -> list[Shape]:
    """Issue 10's shapes: B4 H32 D128, S4096 and 8192, causal and not."""
    return [Shape(4, 32, s, 128, causal) for s in ((4096,) if quick else (4096, 8192))
            for causal in (False, True)]


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """A decode step: Sq new queries per head against a cache of Sk keys per kv head (GQA)."""

    b: int
    h: int
    hkv: int
    sq: int
    sk: int
    d: int
    causal: bool = False  # the op's causal is top-left aligned: a decode step is not causal
    dtype: str = "bfloat16"

    @property
    def flops(self) -> float:
        return 4.0 * self.b * self.h * self.sq * self.sk * self.d

    @property
    def cache_bytes(self) -> float:
        """K and V read once: the memory traffic a decode kernel cannot avoid."""
        return 2.0 * self.b * self.hkv * self.sk * self.d * jnp.dtype(self.dtype).itemsize

    def label(self) -> str:
        return f"{self.dtype} B{self.b} H{self.h} Hkv{self.hkv} Sq{self.sq} cache{self.sk} D{self.d}"


def decode_shapes(quick: bool) -> list[DecodeShape]:
    """Issue 21's decode rows: bf16 B32 H32, caches of 4096 and 32768 keys, D128; one query (GQA
    groups of 4, and MHA at 4096) and 16 queries (speculative decoding) per head."""
    out = [DecodeShape(32, 32, 8, 1, sk, 128) for sk in (4096, 32768)]
    if not quick:
        out += [DecodeShape(32, 32, 32, 1, 4096, 128), DecodeShape(32, 32, 8, 16, 4096, 128)]
    return out


DECODE_SMOKE_SHAPES = [DecodeShape(1, 4, 2, 1, 256, 32), DecodeShape(1, 4, 1, 4, 256, 16)]  # the kernel called directly


def decode_implementations(shape: DecodeShape, interpret: bool) -> dict[str, tuple[Callable, str]]:
    """name -> (fn over the decode inputs, the layout of its output). Ours: the decode kernel in
    both V layouts and with per-batch cache lengths (all full, so every row has the same values),
    the flash kernel on the same call (no split, K/V read per query head); cuDNN and XLA through
    jax.nn.dot_product_attention ([B,S,H,D], GQA by fewer K/V heads; cuDNN also with key lengths).
    The "ours Mosaic GPU decode" rows run the decode kernel's Mosaic GPU path (backend="mosaic_gpu")."""
    scale = shape.d ** -0.5
    ours = functools.partial(decode_attention, scale=scale, causal=False, interpret=interpret)
    full = jnp.full((shape.b,), shape.sk, jnp.int32)
    impls: dict[str, tuple[Callable, str]] = {
        "ours decode (V [B,H,S,D])": (lambda a: ours(a["q"], a["k"], a["v"]), "BHSD"),
        "ours decode transposed-V (V [B,H,D,S])": (lambda a: ours(a["q"], a["k"], a["vt"], v_layout="BHDS"), "BHSD"),
        "ours decode, cache lengths": (lambda a: ours(a["q"], a["k"], a["v"], kv_lengths=full), "BHSD"),
        # the Mosaic GPU path (kernels/mosaic_decode.py): the same rows and key splits on the Mosaic forward
        "ours Mosaic GPU decode (V [B,H,S,D])": (lambda a: ours(a["q"], a["k"], a["v"], backend="mosaic_gpu"), "BHSD"),
        "ours Mosaic GPU decode transposed-V (V [B,H,D,S])":
            (lambda a: ours(a["q"], a["k"], a["vt"], v_layout="BHDS", backend="mosaic_gpu"), "BHSD"),
        "ours Mosaic GPU decode, cache lengths":
            (lambda a: ours(a["q"], a["k"], a["v"], kv_lengths=full, backend="mosaic_gpu"), "BHSD"),
        "ours Triton flash (no key split)":
            (lambda a: flash_attention(a["q"], a["k"], a["v"], scale=scale, causal=False, backend="triton",
                                       interpret=interpret), "BHSD"),
    }
    for impl in ("cudnn", "xla"):
        impls[f"jax.nn.dot_product_attention {impl}"] = (
            functools.partial(lambda a, impl: jax.nn.dot_product_attention(
                a["q_bshd"], a["k_bshd"], a["v_bshd"], scale=scale, implementation=impl), impl=impl), "BSHD")
    impls["jax.nn.dot_product_attention cudnn, key lengths"] = (
        lambda a: jax.nn.dot_product_attention(a["q_bshd"], a["k_bshd"], a["v_bshd"], scale=scale,
                                               key_value_seq_lengths=full, implementation="cudnn"), "BSHD")
    return impls


def make_decode_inputs(shape: DecodeShape, seed: int = 0) -> dict[str, jax.Array]:
    """q [B,H,Sq,D], the caches k, v [B,Hkv,Sk,D], vt (V transposed) and [B,S,H,D] copies: one jit."""
    @jax.jit
    def make(key):
        kq, kk, kv = jax.random.split(key, 3)
        dtype = jnp.dtype(shape.dtype)
        q = jax.random.normal(kq, (shape.b, shape.h, shape.sq, shape.d), dtype)
        k, v = (jax.random.normal(key, (shape.b, shape.hkv, shape.sk, shape.d), dtype) for key in (kk, kv))
        a = {"q": q, "k": k, "v": v, "vt": jnp.swapaxes(v, 2, 3)}
        for name in ("q", "k", "v"):
            a[f"{name}_bshd"] = jnp.swapaxes(a[name], 1, 2)
        return a

    return jax.block_until_ready(make(jax.random.key(seed)))


def decode_reference_subset(shape: DecodeShape, a: dict[str, jax.Array]) -> jax.Array:
    """Reference output for batch 0, query heads 0-1 (and the kv heads they read), float32."""
    kv_heads = 1 if shape.h // shape.hkv >= 2 else 2
    reference = jax.jit(lambda q, k, v: attention_reference(
        q[:1, :2].astype(jnp.float32), k[:1, :kv_heads].astype(jnp.float32), v[:1, :kv_heads].astype(jnp.float32),
        scale=shape.d ** -0.5, causal=False))
    return reference(a["q"], a["k"], a["v"])


# --- issue 21: masked, biased and soft-capped forwards (--masks) ------------------------------

MASK_VARIANTS = ("key padding", "sliding window", "bias", "soft-cap", "alibi")
SOFTCAP = 50.0  # Gemma 2's attention soft-cap


def mask_shapes(quick: bool) -> list[Shape]:
    """Issue 21's masked rows: bf16 B4 H32 S4096 (and S8192) at D128 and D64, causal and not."""
    return [Shape(4, 32, s, d, causal) for s in ((4096,) if quick else (4096, 8192)) for d in (128, 64)
            for causal in (False, True)]


MASK_SMOKE_SHAPES = [Shape(2, 2, 128, 64, True)]  # inside the Mosaic GPU contract; window 32 there


def alibi_of_shape(shape: Shape) -> Alibi:
    """The paper's ALiBi for the shape's heads: slopes 2^(-8(h+1)/H), bias slope·(j - i), rounded
    to bf16 (kernels/alibi.py)."""
    return Alibi.from_array([2.0 ** (-8.0 * (h + 1) / shape.h) for h in range(shape.h)], row_coef=-1,
                            dtype="bfloat16")


def key_lengths(shape: Shape) -> jax.Array:
    """int32 [B]: every key in the first half of the batch, half the keys in the second."""
    return jnp.asarray([shape.s if b < shape.b // 2 else shape.s // 2 for b in range(shape.b)], jnp.int32)


def add_mask_inputs(shape: Shape, a: dict[str, jax.Array]) -> dict:
    """The variants' operands: key lengths and the same key padding as a [B, 1, 1, S] mask and as
    an additive bf16 bias (finfo.min on padded keys, BERT's extended mask), and a [1, H, S, S] bf16
    bias (one per head, broadcast over the batch, as T5's relative bias)."""
    lengths = key_lengths(shape)
    pad = (jnp.arange(shape.s)[None, :] < lengths[:, None])[:, None, None, :]
    pad_bias = jnp.where(pad, 0.0, jnp.finfo(jnp.bfloat16).min).astype(jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(7), (1, shape.h, shape.s, shape.s), jnp.bfloat16)
    alibi_bias = alibi_of_shape(shape).bias(shape.s, shape.s)  # [1, H, S, S] bf16: ALiBi read from memory
    return jax.block_until_ready(dict(a, lengths=lengths, pad=pad, pad_bias=pad_bias, bias=bias,
                                      alibi_bias=alibi_bias))


def variant_keep(shape: Shape, variant: str, window: int, a: dict) -> jax.Array | None:
    """bool [B or 1, 1, S, S]: the positions a variant keeps besides the causal flag (None: all)."""
    if variant == "key padding":
        return jnp.broadcast_to(a["pad"], (shape.b, 1, shape.s, shape.s))
    if variant == "sliding window":
        i, j = jnp.arange(shape.s)[:, None], jnp.arange(shape.s)[None, :]
        return ((j <= i) & (j > i - window))[None, None]
    return None


def kept_flops(shape: Shape, variant: str, window: int) -> float:
    """4·D·H times the (query, key) pairs the variant keeps, summed over the batch: the work the op
    needs (the plain rows' count, halved for causal, is 4·B·H·S²·D / 2)."""
    s = shape.s
    rows = jnp.arange(1, s + 1) if shape.causal else jnp.full((s,), s)
    if variant == "key padding":
        pairs = sum(int(jnp.minimum(rows, n).sum()) for n in key_lengths(shape).tolist())
    elif variant == "sliding window":
        pairs = shape.b * int(jnp.minimum(jnp.arange(1, s + 1), window).sum())
    else:
        return shape.flops
    return 4.0 * shape.d * shape.h * pairs


def computed_tile_flops(shape: Shape, variant: str, window: int) -> float | None:
    """4·D times the (query, key) pairs of the tiles our Mosaic GPU kernel computes (its default
    tiles, one row of tiles per CTA: the tiles its lists name, or the causal CTA triangle), for
    the per-tile rate issue 21 asks of masked rows; None where the contract has no tiles."""
    try:
        blocks = default_blocks(jnp.bfloat16, shape.d, shape.s, causal=shape.causal)
    except KeyError:
        return None
    rows = COMPUTE_WARPGROUPS * blocks.block_q
    windowed = variant == "sliding window"
    classes = tile_classes(shape.s, shape.s, rows, blocks.block_kv, shape.s, shape.s,
                           causal=shape.causal or windowed, window=window if windowed else None,
                           kv_lengths=key_lengths(shape) if variant == "key padding" else None)
    computed = int((classes != HIDDEN).sum()) * (shape.b // classes.shape[0]) * shape.h
    return 4.0 * shape.d * computed * rows * blocks.block_kv


def masked_reference(shape: Shape, variant: str, window: int, a: dict) -> jax.Array:
    """The variant's reference output on batches 0 and B-1 (a padded one), heads 0-1, float32."""
    pick = lambda x: x[jnp.asarray([0, shape.b - 1])][:, :2].astype(jnp.float32)  # noqa: E731
    keep = variant_keep(shape, variant, window, a)
    return attention_reference(
        pick(a["q"]), pick(a["k"]), pick(a["v"]), scale=shape.d ** -0.5,
        causal=shape.causal or variant == "sliding window",
        mask=None if keep is None else keep[jnp.asarray([0, shape.b - 1]) if keep.shape[0] > 1 else slice(None)],
        bias=a["bias"][:, :2] if variant == "bias" else a["alibi_bias"][:, :2] if variant == "alibi" else None,
        softcap=SOFTCAP if variant == "soft-cap" else 0.0)


def masked_implementations(shape: Shape, variant: str, window: int, interpret: bool) -> dict:
    """name -> (fn over the input dict, output layout) for one variant: ours on Mosaic GPU (its
    measured tiles) and Triton, cuDNN and XLA through jax.nn.dot_product_attention (key lengths,
    local_window_size, bias; it has no soft-cap argument: those rows read n/a)."""
    scale = shape.d ** -0.5
    causal = shape.causal or variant == "sliding window"
    ours = functools.partial(flash_attention, scale=scale, causal=causal, interpret=interpret)
    mods = {
        "key padding": lambda a: dict(mask=a["pad"]),
        "sliding window": lambda a: dict(window=window),
        "bias": lambda a: dict(bias=a["bias"]),
        "soft-cap": lambda a: dict(softcap=SOFTCAP),
        "alibi": lambda a: dict(alibi=alibi_of_shape(shape)),  # Mosaic GPU computes it; Triton reads it
    }[variant]
    impls: dict[str, tuple[Callable | None, str]] = {
        f"ours Mosaic GPU {variant}": (lambda a: ours(a["q"], a["k"], a["v"], backend="mosaic_gpu", **mods(a)), "BHSD"),
        f"ours Triton {variant}": (lambda a: ours(a["q"], a["k"], a["v"], backend="triton", **mods(a)), "BHSD"),
    }
    if variant == "key padding":
        impls["ours Mosaic GPU key padding as kv_lengths"] = (
            lambda a: ours(a["q"], a["k"], a["v"], backend="mosaic_gpu", kv_lengths=a["lengths"]), "BHSD")
        # the additive form (its one row per batch read in place: no [S, S] bias in memory, no tiles skipped)
        impls["ours Mosaic GPU key padding as a [B, 1, 1, S] bias"] = (
            lambda a: ours(a["q"], a["k"], a["v"], backend="mosaic_gpu", bias=a["pad_bias"]), "BHSD")
    if variant == "alibi":  # the same values read from memory ([1, H, S, S] bf16), as before ALiBi slopes
        impls["ours Mosaic GPU alibi as a [1, H, S, S] bias"] = (
            lambda a: ours(a["q"], a["k"], a["v"], backend="mosaic_gpu", bias=a["alibi_bias"]), "BHSD")
    for impl in ("cudnn", "xla"):
        name = f"jax.nn.dot_product_attention {impl} {variant}"
        if variant == "soft-cap":
            impls[name] = (None, "BSHD")  # prepare_row: n/a
            continue
        extra = {
            "key padding": lambda a: dict(key_value_seq_lengths=a["lengths"]),
            "sliding window": lambda a: dict(local_window_size=(window - 1, 0)),
            "bias": lambda a: dict(bias=a["bias"]),
            "alibi": lambda a: dict(bias=a["alibi_bias"]),
        }[variant]
        impls[name] = (functools.partial(
            lambda a, impl, extra: jax.nn.dot_product_attention(
                a["q_bshd"], a["k_bshd"], a["v_bshd"], scale=scale, is_causal=causal, implementation=impl,
                **extra(a)), impl=impl, extra=extra), "BSHD")
    return impls


def _stock_mha() -> Callable | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu import attention as stock
        return stock
    except Exception:  # noqa: BLE001 - module absent in some jax builds
        return None


def _stock_mgpu() -> Callable | None:
    """jax's Pallas Mosaic GPU attention (FlashAttention-3 style, f16 only), or None."""
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu
        return attention_mgpu
    except Exception:  # noqa: BLE001 - needs a CUDA jaxlib
        return None


def _schedule(dtype, shape: Shape, overlap: bool) -> MosaicBlocks | None:
    """The Mosaic GPU kernel's default tiles in one schedule: FlashAttention-3's intra-warpgroup
    overlap (``overlap=True``) or attention_mgpu's alternation; None where the table has no row
    (the row then reads n/a with the contract's reason). Without a schedule named, the kernel
    takes the one measured faster for the shape (`TUNED_BLOCKS`)."""
    try:
        return default_blocks(dtype, shape.d, shape.s, overlap=overlap, causal=shape.causal)
    except KeyError:
        return None


def _p_in_registers(dtype, shape: Shape) -> MosaicBlocks | None:
    """The fp8 kernel's default tiles with P kept in registers for P·V (`fp8_p_registers`)."""
    blocks = _schedule(dtype, shape, False)
    return None if blocks is None else dataclasses.replace(blocks, fp8_p_registers=True)


def implementations(shape: Shape, interpret: bool, blocks: tuple[int | None, int | None]):
    """name -> (fn over (q, k, v_bhsd, v_bhds, q_bshd, k_bshd, v_bshd), how to read its output).

    Our kernels appear once per Pallas backend: Triton (any GPU) and Mosaic GPU (Hopper; rows
    outside its contract read n/a with the reason), the Mosaic GPU ones in each schedule
    (attention_mgpu's, and FlashAttention-3's overlap: "overlapped schedule"). The "read in
    place" and "materialise" rows take what flash_attention picks by itself ("auto", the
    measured tiles).
    """
    scale = shape.d ** -0.5
    ours = functools.partial(flash_attention, scale=scale, causal=shape.causal, interpret=interpret)
    triton = functools.partial(ours, block_q=blocks[0], block_k=blocks[1], backend="triton")
    mosaic = functools.partial(ours, backend="mosaic_gpu")
    bool_mask = causal_mask(shape.s, shape.s) if shape.causal else jnp.ones((shape.s, shape.s), bool)
    impls: dict[str, tuple[Callable, str]] = {
        "ours Triton standard (V [B,H,S,D])":
            (lambda a: triton(a["q"], a["k"], a["v"], v_layout="BHSD"), "BHSD"),
        "ours Triton transposed-V (V [B,H,D,S])":
            (lambda a: triton(a["q"], a["k"], a["vt"], v_layout="BHDS"), "BHSD"),
        "ours Mosaic GPU standard (V [B,H,S,D])":
            (lambda a: mosaic(a["q"], a["k"], a["v"], v_layout="BHSD",
                              mosaic_blocks=_schedule(a["q"].dtype, shape, False)), "BHSD"),
        "ours Mosaic GPU transposed-V (V [B,H,D,S])":
            (lambda a: mosaic(a["q"], a["k"], a["vt"], v_layout="BHDS",
                              mosaic_blocks=_schedule(a["q"].dtype, shape, False)), "BHSD"),
        "ours Mosaic GPU standard, overlapped schedule":
            (lambda a: mosaic(a["q"], a["k"], a["v"], v_layout="BHSD",
                              mosaic_blocks=_schedule(a["q"].dtype, shape, True)), "BHSD"),
        "ours Mosaic GPU transposed-V, overlapped schedule":
            (lambda a: mosaic(a["q"], a["k"], a["vt"], v_layout="BHDS",
                              mosaic_blocks=_schedule(a["q"].dtype, shape, True)), "BHSD"),
        "ours Mosaic GPU, q/k/o/V [B,S,H,D] read in place":
            (lambda a: mosaic(a["q_bshd"], a["k_bshd"], a["v_bshd"], v_layout="BSHD",
                              q_layout="BSHD", k_layout="BSHD", o_layout="BSHD"), "BSHD"),
        "materialise V^T + ours transposed-V":
            (lambda a: ours(a["q"], a["k"], jnp.swapaxes(a["v"], 2, 3), v_layout="BHDS"), "BHSD"),
        "materialise V from V^T + ours standard":
            (lambda a: ours(a["q"], a["k"], jnp.swapaxes(a["vt"], 2, 3), v_layout="BHSD"), "BHSD"),
    }
    # score modifications whose values equal the plain call's, so the same reference checks
    # them: the causal (or an all-visible) [S, S] mask as a boolean mask (tile map, guard), key
    # lengths that keep every key, and a soft-cap of 1e4, which changes these scores by < 1e-6.
    # Interpreted (CPU smoke) on the small shape only, for time.
    if not interpret or shape.s <= 64:
        impls.update({
            "ours Triton boolean mask (causal or all-visible [S,S])":
                (lambda a: triton(a["q"], a["k"], a["v"], v_layout="BHSD", causal=False, mask=bool_mask), "BHSD"),
            "ours Triton key lengths (kv_lengths = S)":
                (lambda a: triton(a["q"], a["k"], a["v"], v_layout="BHSD",
                                  kv_lengths=jnp.full((shape.b,), shape.s, jnp.int32)), "BHSD"),
            "ours Triton soft-cap 1e4":
                (lambda a: triton(a["q"], a["k"], a["v"], v_layout="BHSD", softcap=1e4), "BHSD"),
        })
    stock = _stock_mha()
    if stock is not None:
        bs = stock.BlockSizes(block_q=min(128, shape.s), block_k=min(128, shape.s))
        impls["stock Pallas Triton mha"] = (
            lambda a: stock.mha(a["q_bshd"], a["k_bshd"], a["v_bshd"], None, sm_scale=scale,
                                causal=shape.causal, block_sizes=bs, interpret=interpret),
            "BSHD")
    mgpu = None if interpret else _stock_mgpu()
    if mgpu is not None:  # it applies no softmax scale: q is pre-scaled (outside the timing)
        config = mgpu.TuningConfig(block_q=64, block_kv=128 if shape.d > 64 else 256,
                                   max_concurrent_steps=2, causal=shape.causal)
        impls["stock Pallas Mosaic GPU attention_mgpu"] = (
            lambda a: mgpu.attention(a["q_bshd_scaled"], a["k_bshd"], a["v_bshd"], config), "BSHD")
    for impl in ("cudnn", "xla"):
        impls[f"jax.nn.dot_product_attention {impl}"] = (
            functools.partial(
                lambda a, impl: jax.nn.dot_product_attention(
                    a["q_bshd"], a["k_bshd"], a["v_bshd"], scale=scale, is_causal=shape.causal,
                    implementation=impl), impl=impl),
            "BSHD")
    return impls


def _cudnn_fp8() -> Callable | None:
    """cuDNN's fp8 attention as this jax exposes it (private module), or None."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except Exception:  # noqa: BLE001 - module absent in some jax builds
        return None
    if not hasattr(fa, "fp8_params_keys") or not hasattr(fa, "MaskType"):
        return None

    def run(q8, k8, v8, scales, *, scale: float, causal: bool) -> jax.Array:
        one = jnp.ones((1, 1, 1, 1), jnp.float32)
        params = {key: one for key in fa.fp8_params_keys}
        for name, s in zip(("descale_q", "descale_k", "descale_v"), scales):
            params[name] = jnp.reshape(s, (1, 1, 1, 1)).astype(jnp.float32)
        out = fa.dot_product_attention(
            q8, k8, v8, fp8_params=params, scale=scale, qkv_layout="BNTH", use_fp8=True,
            mask_type=fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK)[0]
        return out.astype(jnp.bfloat16)  # fp8 output, scale_o = 1

    return run


def fp8_implementations(shape: Shape, interpret: bool, blocks: tuple[int | None, int | None]):
    """name -> (fn over the input dict, output layout, kind "fp8" or "bf16") for the --fp8 run."""
    scale = shape.d ** -0.5
    kw = dict(scale=scale, causal=shape.causal, interpret=interpret)
    triton = dict(kw, block_q=blocks[0], block_k=blocks[1], backend="triton")
    bf16 = functools.partial(flash_attention, **triton)
    bf16_mosaic = functools.partial(flash_attention, **kw, backend="mosaic_gpu")
    fp8 = functools.partial(flash_attention_fp8, **triton)
    fp8_mosaic = functools.partial(flash_attention_fp8, **kw, backend="mosaic_gpu")
    impls = {
        "ours bf16 Triton standard (V [B,H,S,D])":
            (lambda a: bf16(a["q"], a["k"], a["v"], v_layout="BHSD"), "BHSD", "bf16"),
        "ours bf16 Triton transposed-V (V [B,H,D,S])":
            (lambda a: bf16(a["q"], a["k"], a["vt"], v_layout="BHDS"), "BHSD", "bf16"),
        "ours bf16 Mosaic GPU transposed-V (V [B,H,D,S])":
            (lambda a: bf16_mosaic(a["q"], a["k"], a["vt"], v_layout="BHDS",
                                   mosaic_blocks=_schedule(a["q"].dtype, shape, False)), "BHSD", "bf16"),
        "ours bf16 Mosaic GPU transposed-V, overlapped schedule":
            (lambda a: bf16_mosaic(a["q"], a["k"], a["vt"], v_layout="BHDS",
                                   mosaic_blocks=_schedule(a["q"].dtype, shape, True)), "BHSD", "bf16"),
        "ours fp8 Triton standard (V [B,H,S,D])":
            (lambda a: fp8(a["q8"], a["k8"], a["v8"], *a["scales"], v_layout="BHSD"), "BHSD", "fp8"),
        "ours fp8 Triton transposed-V (V [B,H,D,S])":
            (lambda a: fp8(a["q8"], a["k8"], a["vt8"], *a["scales"], v_layout="BHDS"), "BHSD", "fp8"),
        "ours fp8 Mosaic GPU transposed-V (V [B,H,D,S])":
            (lambda a: fp8_mosaic(a["q8"], a["k8"], a["vt8"], *a["scales"], v_layout="BHDS"),
             "BHSD", "fp8"),
        "ours fp8 Mosaic GPU transposed-V, overlapped schedule":
            (lambda a: fp8_mosaic(a["q8"], a["k8"], a["vt8"], *a["scales"], v_layout="BHDS",
                                  mosaic_blocks=_schedule(a["q8"].dtype, shape, True)), "BHSD", "fp8"),
        "ours fp8 Mosaic GPU transposed-V, P in registers":
            (lambda a: fp8_mosaic(a["q8"], a["k8"], a["vt8"], *a["scales"], v_layout="BHDS",
                                  mosaic_blocks=_p_in_registers(a["q8"].dtype, shape)), "BHSD", "fp8"),
        "materialise V^T + ours fp8 transposed-V":
            (lambda a: fp8(a["q8"], a["k8"], jnp.swapaxes(a["v8"], 2, 3), *a["scales"],
                           v_layout="BHDS"), "BHSD", "fp8"),
        "jax.nn.dot_product_attention cudnn (bf16)":
            (lambda a: jax.nn.dot_product_attention(a["q_bshd"], a["k_bshd"], a["v_bshd"], scale=scale,
                                                    is_causal=shape.causal, implementation="cudnn"),
             "BSHD", "bf16"),
    }
    cudnn = _cudnn_fp8()
    name = "cuDNN fp8 (jax._src.cudnn.fused_attention_stablehlo, fp8 out)"
    if cudnn is None:
        impls[name] = (None, "BHSD", "fp8")  # reported as not exposed by this jax
    else:
        impls[name] = (lambda a: cudnn(a["q8"], a["k8"], a["v8"], a["scales"], scale=scale,
                                       causal=shape.causal), "BHSD", "fp8")
    return impls


def add_fp8_inputs(a: dict[str, jax.Array]) -> dict:
    """Per-tensor e4m3 quantization of q, k, v (and V^T) with their float32 descales."""
    scales = tuple(compute_scale(a[n]) for n in ("q", "k", "v"))
    q8, k8, v8 = (quantize(a[n], s) for n, s in zip(("q", "k", "v"), scales))
    out = dict(a, q8=q8, k8=k8, v8=v8, vt8=jnp.swapaxes(v8, 2, 3), scales=scales)
    return jax.block_until_ready(out)


def fp8_reference_subset(shape: Shape, a: dict) -> tuple[jax.Array, float]:
    """Reference on the dequantized fp8 operands (batch 0, heads 0-1) and max|v| dequantized."""
    sub = [dequantize(a[n][:1, :2], s) for n, s in zip(("q8", "k8", "v8"), a["scales"])]
    ref = attention_reference(*sub, scale=shape.d ** -0.5, causal=shape.causal)
    return ref, float(jnp.abs(sub[2]).max())


def make_inputs(shape: Shape, seed: int = 0) -> dict[str, jax.Array]:
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    dims = (shape.b, shape.h, shape.s, shape.d)
    dtype = jnp.dtype(shape.dtype)
    q, k, v = (jax.random.normal(key, dims, dtype) for key in (kq, kk, kv))
    a = {"q": q, "k": k, "v": v, "vt": jnp.swapaxes(v, 2, 3)}
    for name in ("q", "k", "v"):
        a[f"{name}_bshd"] = jnp.swapaxes(a[name], 1, 2)
    a["q_bshd_scaled"] = (a["q_bshd"] * shape.d ** -0.5).astype(dtype)
    return jax.block_until_ready(a)


def time_calls(fn: Callable, args, calls: int) -> list[float]:
    """Seconds of each of ``calls`` calls of a jitted fn (jax.block_until_ready after each)."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(args))
        times.append(time.perf_counter() - t0)
    return times


def reference_subset(shape: Shape, a: dict[str, jax.Array]) -> jax.Array:
    """Reference output for batch 0, heads 0-1, float32, [1, 2, S, D]."""
    sub = {n: a[n][:1, :2].astype(jnp.float32) for n in ("q", "k", "v")}
    return attention_reference(sub["q"], sub["k"], sub["v"], scale=shape.d ** -0.5,
                               causal=shape.causal)


def time_fn(fn: Callable, args, warmup: int, reps: int) -> float:
    """Median seconds per call of a jitted fn, after ``warmup`` calls."""
    time_calls(fn, args, warmup)
    return statistics.median(time_calls(fn, args, reps))


def prepare_row(name: str, fn: Callable | None, layout: str, shape: Shape, a, ref, warmup: int,
                bound: float | None = None, batches: tuple[int, ...] = (0,),
                missing: str = "not exposed by this jax") -> tuple[dict, Callable | None]:
    """Compile ``fn``, check its output on ``batches``, heads 0-1 against ``ref`` (max abs error <=
    ``bound``, default ERR_TOL·(1 + max|ref|)) and warm it up: (row, jitted fn, or None when it
    is not available (``fn`` None: ``missing`` says why) or failed, the row then saying why)."""
    row = {"shape": shape.label(), "causal": shape.causal, "kernel": name, "ms": None,
           "tflops": None, "err": None}
    if fn is None:
        row["check"] = f"n/a ({missing})"
        return row, None
    try:
        jfn = jax.jit(fn)
        out = jax.block_until_ready(jfn(a))
        if layout == "BSHD":
            out = jnp.swapaxes(out, 1, 2)
        err = float(jnp.abs(out[jnp.asarray(batches)][:, :2].astype(jnp.float32) - ref).max())
        if bound is None:
            bound = ERR_TOL * (1.0 + float(jnp.abs(ref).max()))
        row.update(err=err, check="ok" if err <= bound else "FAIL")
        time_calls(jfn, a, warmup)
        return row, jfn
    except Exception as e:  # noqa: BLE001 - a failing baseline is a result, not a crash
        print(f"--- {name} on {shape.label()} causal={shape.causal} failed:", file=sys.stderr)
        traceback.print_exc(limit=8, file=sys.stderr)
        msg = re.sub(r"\s+", " ", f"{type(e).__name__}: {e}")[:120].replace("|", "/")
        row["check"] = f"n/a ({msg})"
        return row, None


def time_rows(prepared: list[tuple[dict, Callable | None]], shape: Shape, a, reps: int,
              rounds: int) -> None:
    """Time the prepared rows side by side: ``rounds`` rounds, each calling every row in turn
    (``reps`` calls in all per row, split over the rounds), so that a drift of the GPU's clocks
    during the run reaches every row alike; each row gets the median of its calls."""
    rounds = max(1, min(rounds, reps))
    times: dict[int, list[float]] = {i: [] for i, (_, jfn) in enumerate(prepared) if jfn is not None}
    for r in range(rounds):
        calls = reps // rounds + (1 if r < reps % rounds else 0)
        for i in times:
            times[i] += time_calls(prepared[i][1], a, calls)
    for i, calls in times.items():
        secs = statistics.median(calls)
        row = prepared[i][0]
        row.update(ms=secs * 1e3, tflops=row.get("flops", shape.flops) / secs / 1e12)
        if row.get("tile_flops"):
            row["tile_tflops"] = row["tile_flops"] / secs / 1e12


def device_slug(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "device"


def render(rows: list[dict], header: list[str]) -> str:
    lines = header + ["", "| shape | causal | kernel | ms | TFLOP/s | max err | check |",
                      "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "–"
        tf = f"{r['tflops']:.1f}" if r["tflops"] is not None else "–"
        err = f"{r['err']:.2e}" if r["err"] is not None else "–"
        lines.append(f"| {r['shape']} | {r['causal']} | {r['kernel']} | {ms} | {tf} | {err} | "
                     f"{r['check']} |")
    # Side-by-side summary: TFLOP/s per kernel (columns) and shape (rows).
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    lines += ["", "TFLOP/s side by side:", "",
              "| shape | causal | " + " | ".join(kernels) + " |",
              "|---|---|" + "---:|" * len(kernels)]
    for key in dict.fromkeys((r["shape"], r["causal"]) for r in rows):
        cells = []
        for kname in kernels:
            hit = [r for r in rows if (r["shape"], r["causal"]) == key and r["kernel"] == kname]
            cells.append(f"{hit[0]['tflops']:.1f}" if hit and hit[0]["tflops"] else "–")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_tile_rates(rows: list[dict]) -> str:
    """Our Mosaic GPU rows' TFLOP/s on the tiles they compute, beside the unmodified kernel's on the
    same shape (issue 21's target for masked rows: at least 90% of it)."""
    lines = ["", "Ours Mosaic GPU on computed tiles (issue 21 target: masked rows ≥ 90% of the unmasked kernel):",
             "", "| shape | causal | kernel | TFLOP/s on computed tiles | vs unmasked |", "|---|---|---|---:|---:|"]
    for r in rows:
        if not r.get("tile_tflops"):
            continue
        base = [b["tflops"] for b in rows if (b["shape"], b["causal"]) == (r["shape"], r["causal"])
                and b["kernel"] == "ours Mosaic GPU, no modification" and b["tflops"]]
        ratio = f"{r['tile_tflops'] / base[0]:.0%}" if base else "–"
        lines.append(f"| {r['shape']} | {r['causal']} | {r['kernel']} | {r['tile_tflops']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def render_decode_bandwidth(rows: list[dict]) -> str:
    """GB/s of the KV cache read per kernel (columns) and shape (rows): a decode step's measure."""
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    lines = ["", "KV cache GB/s side by side (issue 21 target: ours decode at or above cuDNN):", "",
             "| shape | " + " | ".join(kernels) + " |", "|---|" + "---:|" * len(kernels)]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        cells = []
        for kname in kernels:
            hit = [r for r in rows if r["shape"] == shape and r["kernel"] == kname and r.get("gbps")]
            cells.append(f"{hit[0]['gbps']:.0f}" if hit else "–")
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_fp8_ratios(rows: list[dict]) -> str:
    """Issue 10's targets per shape: fp8 transposed-V vs fp8 standard, our bf16 and cuDNN fp8."""
    def tf(key, prefix, contains=""):
        """Best TFLOP/s among this shape's rows whose kernel starts with prefix (and has contains)."""
        hit = [r["tflops"] for r in rows if (r["shape"], r["causal"]) == key and r["tflops"]
               and r["kernel"].startswith(prefix) and contains in r["kernel"]]
        return max(hit, default=None)

    lines = ["", "fp8 transposed-V speed-ups (targets: ≥ 1.5x fp8 standard, ≥ 1.3x our bf16; "
             "aim > 1x cuDNN fp8):", "",
             "| shape | causal | vs ours fp8 standard | vs ours bf16 (best layout and backend) | vs cuDNN fp8 |",
             "|---|---|---:|---:|---:|"]
    for key in dict.fromkeys((r["shape"], r["causal"]) for r in rows):
        tv = tf(key, "ours fp8", "transposed-V (")  # best backend; not the materialise row
        others = (tf(key, "ours fp8", "standard"), tf(key, "ours bf16"), tf(key, "cuDNN fp8"))
        cells = [f"{tv / o:.2f}x" if tv and o else "–" for o in others]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="S4096 shapes only, 5 repetitions")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="markdown file (default bench/results/attention-<device>-<date>.md)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes in Pallas interpret mode (tests the script on CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved timing rounds per shape: every row is called in turn each round")
    p.add_argument("--block-q", type=int, default=None, help="override our kernel's block_q")
    p.add_argument("--block-k", type=int, default=None, help="override our kernel's block_k")
    p.add_argument("--head-dims", type=int, nargs="+", default=None,
                   help="only these head dims (default: all of the run's shapes)")
    p.add_argument("--dtypes", nargs="+", default=None, help="only these dtypes, e.g. float16")
    p.add_argument("--match", default=None,
                   help="only kernels whose row name matches this regular expression")
    p.add_argument("--fp8", action="store_true",
                   help="issue 10: fp8 kernels vs our bf16 kernel and cuDNN (B4 H32 D128 S4096/8192)")
    p.add_argument("--decode", action="store_true",
                   help="issue 21: decode steps (B32, caches 4096/32768) vs cuDNN and XLA; GB/s of the cache read")
    p.add_argument("--masks", action="store_true",
                   help="issue 21: key padding, sliding window, bias and soft-cap rows vs cuDNN and XLA")
    p.add_argument("--window", type=int, default=1024, help="--masks: the sliding window's keys")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> pathlib.Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.cpu_smoke:
        raise SystemExit(
            f"bench/attention.py needs a GPU (jax default backend is {jax.default_backend()!r}); "
            "pass --cpu-smoke for a tiny interpret-mode run that only tests the script.")
    smoke = args.cpu_smoke and not on_gpu
    if args.masks and smoke:
        args.window = min(args.window, 32)  # the smoke shape's keys are few
    if args.fp8 + args.decode + args.masks > 1:
        raise SystemExit("--fp8, --decode and --masks are separate runs; pass one")
    smoke_shapes = FP8_SMOKE_SHAPES if args.fp8 else DECODE_SMOKE_SHAPES if args.decode else \
        MASK_SMOKE_SHAPES if args.masks else SMOKE_SHAPES
    shapes = smoke_shapes if args.cpu_smoke else fp8_shapes(args.quick) if args.fp8 else \
        decode_shapes(args.quick) if args.decode else mask_shapes(args.quick) if args.masks else gpu_shapes(args.quick)
    shapes = [sh for sh in shapes if (args.head_dims is None or sh.d in args.head_dims)
              and (args.dtypes is None or sh.dtype in args.dtypes)]
    reps = args.reps or (2 if args.cpu_smoke else 5 if args.quick else 20)
    warmup = 1 if args.cpu_smoke else args.warmup
    kind = jax.devices()[0].device_kind
    today = dt.date.today().isoformat()
    stem = "attention-fp8" if args.fp8 else "attention-decode" if args.decode else \
        "attention-masks" if args.masks else "attention"
    out = args.out or ROOT / "bench" / "results" / f"{stem}-{device_slug(kind)}-{today}.md"

    rows = []
    blocks = (args.block_q, args.block_k)
    for shape in shapes:
        a = make_decode_inputs(shape) if args.decode else make_inputs(shape)
        if args.masks:
            a = add_mask_inputs(shape, a)
        ref = decode_reference_subset(shape, a) if args.decode else reference_subset(shape, a)
        if args.decode:
            todo = [(n, fn, lay, ref, None) for n, (fn, lay) in decode_implementations(shape, smoke).items()]
        elif args.fp8:
            a = add_fp8_inputs(a)
            ref8, vmax = fp8_reference_subset(shape, a)
            bound8 = FP8_ATOL * vmax + FP8_RTOL * float(jnp.abs(ref8).max())
            todo = [(n, fn, lay, ref8 if kind_ == "fp8" else ref, bound8 if kind_ == "fp8" else None)
                    for n, (fn, lay, kind_) in fp8_implementations(shape, smoke, blocks).items()]
        elif not args.masks:
            todo = [(n, fn, lay, ref, None) for n, (fn, lay) in implementations(shape, smoke, blocks).items()]
        if args.masks:
            prepared = prepare_masked_rows(shape, a, ref, args, warmup)
        else:
            if args.match:
                todo = [t for t in todo if re.search(args.match, t[0])]
            prepared = [prepare_row(name, fn, layout, shape, a, want, warmup, bound)
                        for name, fn, layout, want, bound in todo]
        time_rows(prepared, shape, a, reps, args.rounds)
        for row, _ in prepared:
            if args.decode and row["ms"] is not None:  # memory bound: the cache's bytes per second
                row["gbps"] = shape.cache_bytes / (row["ms"] * 1e-3) / 1e9
            rows.append(row)
            print(f"{row['shape']} causal={shape.causal} {row['kernel']}: "
                  f"{row['tflops'] and round(row['tflops'], 1)} TFLOP/s {row['check']}", flush=True)
        del a, prepared
        write_page(out, rows, args, argv, kind, today, reps, warmup, smoke)  # partial pages survive a timeout
    print(f"wrote {out}")
    return out


def prepare_masked_rows(shape: Shape, a: dict, ref: jax.Array, args: argparse.Namespace,
                        warmup: int) -> list[tuple[dict, Callable | None]]:
    """--masks (``a`` from `add_mask_inputs`): the unmodified Mosaic GPU kernel (the baseline), then
    each variant's rows, each checked against its own reference on batches 0 and B-1 (a padded
    one), heads 0-1; TFLOP/s on the pairs the variant keeps, our Mosaic GPU rows also on the tiles
    they compute."""
    smoke, window = args.cpu_smoke and jax.default_backend() != "gpu", args.window
    base = functools.partial(flash_attention, scale=shape.d ** -0.5, causal=shape.causal, interpret=smoke,
                             backend="mosaic_gpu")
    todo = [("ours Mosaic GPU, no modification", lambda a: base(a["q"], a["k"], a["v"]), ref, (0,), None, None)]
    for variant in MASK_VARIANTS:
        if variant == "sliding window" and not shape.causal:
            continue  # a window hides the keys after the query: its rows are the causal shape's
        impls = {name: fn for name, (fn, _) in masked_implementations(shape, variant, window, smoke).items()
                 if not args.match or re.search(args.match, name)}
        if not impls:
            continue
        want = masked_reference(shape, variant, window, a)
        flops = kept_flops(shape, variant, window)
        tiles = computed_tile_flops(shape, variant, window)
        for name, fn in impls.items():
            todo.append((name, fn, want, (0, shape.b - 1), flops, tiles if name.startswith("ours Mosaic") else None))
    prepared = []
    for name, fn, want, batches, flops, tiles in todo:
        if args.match and not re.search(args.match, name):
            continue
        row, jfn = prepare_row(name, fn, "BSHD" if "dot_product_attention" in name else "BHSD", shape, a, want,
                               warmup, batches=batches, missing="it has no soft-cap argument")
        if flops is not None:
            row["flops"] = flops
        if tiles is not None:
            row["tile_flops"] = tiles
        prepared.append((row, jfn))
    return prepared


def write_page(out: pathlib.Path, rows: list[dict], args: argparse.Namespace, argv: list[str],
               kind: str, today: str, reps: int, warmup: int, smoke: bool) -> None:
    title = "# fp8 attention forward benchmark (issue 10)" if args.fp8 else \
        "# Decode attention benchmark (issue 21)" if args.decode else \
        "# Masked, biased and soft-capped attention forward benchmark (issue 21)" if args.masks else \
        "# Attention forward benchmark (issue 5)"
    header = [
        title + (" — CPU smoke run, not a measurement" if smoke else ""),
        "",
        f"- device: {kind} ({jax.default_backend()}, {jax.device_count()} device(s))",
        f"- date: {today}",
        f"- jax {jax.__version__}",
        f"- command: `python bench/attention.py {' '.join(argv)}`".replace("  ", " "),
        f"- timing: median of {reps} calls after {warmup} warm-up, jax.block_until_ready; the rows of"
        f" a shape timed side by side in {max(1, min(args.rounds, reps))} interleaved rounds;"
        " TFLOP/s = 4·B·H·S²·D (÷2 causal) / time",
        f"- max err: vs attention_reference in float32 on batch 0, heads 0-1; ok if ≤ {ERR_TOL}·(1+max|ref|)",
    ]
    if args.fp8:
        header.append("- fp8 rows: q, k, v float8_e4m3fn with per-tensor descales, f32 accumulation, "
                      f"bf16 output; ok if max err ≤ {FP8_ATOL}·max|v| + {FP8_RTOL}·max|ref| "
                      "(reference on the dequantized operands)")
    if args.decode:
        header.append("- decode rows: TFLOP/s = 4·B·H·Sq·Sk·D / time; GB/s = K and V bytes (read once) / time, "
                      "below; the reference checks batch 0, query heads 0-1")
    if args.masks:
        header.append(f"- masked rows: key padding = every key in the first half of the batch, half of them in the "
                      f"second ([B,1,1,S] mask; also as kv_lengths); sliding window {args.window} (causal shapes); "
                      f"bias [1,H,S,S] bf16; soft-cap {SOFTCAP}. TFLOP/s counts the (query, key) pairs each "
                      "variant keeps; each row is checked against its own reference on batches 0 and B-1")
    text = render(rows, header)
    if args.masks:
        text += render_tile_rates(rows)
    if args.decode:
        text += render_decode_bandwidth(rows)
    if args.fp8:
        text += render_fp8_ratios(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
