"""Device table for the roofline cost model: peaks, bandwidth, launch overhead, kernel efficiencies.

Every number carries its source. Three kinds of source appear:

- **spec**: the vendor's data sheet (dense, i.e. without 2:4 sparsity).
  H100 SXM5: NVIDIA H100 Tensor Core GPU data sheet (2023): FP64 34 TFLOP/s, FP64 Tensor Core and
  FP32 67 TFLOP/s, TF32 Tensor Core 494.7 TFLOP/s, BF16/FP16 Tensor Core 989.4 TFLOP/s, FP8 Tensor
  Core 1978.9 TFLOP/s, HBM3 3.35 TB/s. H200 SXM: NVIDIA H200 Tensor Core GPU data sheet (2024):
  the same compute figures, HBM3e 4.8 TB/s.
- **measured**: `/work/shared/gpu/README.md` (H100 of the device tool, 2026-11-24, jax 0.11.2,
  B4 H32, forward TFLOP/s, causal counted with half the FLOPs) and `bench/results/` (our kernels
  on an H100, 2026-11-25, and an H200, 2026-11-26).
- **assumption**: no measurement yet; each names what should replace it (`bench/attention.py`
  on a GPU, then a calibration file, see `DeviceSpec.to_json` and `calibration_path`).

Attention efficiency is the fraction of the dtype's dense peak the attention kernel reaches,
keyed by (dtype, variant, causal). Variants: "standard" (V stored with D minor), "transposed"
(V stored [B,H,D,S], S minor), "reference" (plain JAX/XLA attention: boolean masks, or
``backend="reference"``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import ir

TERA = 1e12

VARIANTS = ("standard", "transposed", "reference")

# dtype name -> the dtype whose table entry applies (others: "default")
_DTYPE_FAMILY = {
    "bfloat16": "bfloat16",
    "float16": "float16",
    "float32": "float32",
    "float64": "float64",
    "float8_e4m3fn": "float8_e4m3fn",
    "float8_e5m2": "float8_e4m3fn",  # same Hopper FP8 tensor-core rate as e4m3 (spec)
    "float8_e4m3fnuz": "float8_e4m3fn",
    "float8_e5m2fnuz": "float8_e4m3fn",
    "int8": "int8",
}


def dtype_family(dtype: str) -> str:
    return _DTYPE_FAMILY.get(str(dtype), "default")


def _eff_key(dtype: str, variant: str, causal: bool) -> str:
    return f"{dtype}/{variant}/{'causal' if causal else 'full'}"


def _frozen(mapping: Mapping[str, float] | tuple) -> tuple[tuple[str, float], ...]:
    items = mapping.items() if isinstance(mapping, Mapping) else mapping
    return tuple(sorted((str(k), float(v)) for k, v in items))


@dataclass(frozen=True)
class DeviceSpec:
    """One device's roofline parameters (hashable; dict-valued fields are stored as sorted pairs).

    ``peak_flops``: dtype -> FLOP/s (a "default" entry covers dtypes not listed).
    ``bandwidth``: main-memory bytes/s. ``launch_overhead``: seconds per kernel that does not
    fuse into a neighbour. ``matmul_efficiency``: fraction of peak a large dot_general reaches.
    ``transpose_bandwidth_fraction``: fraction of ``bandwidth`` a materialised transpose that
    moves the minor axis reaches; ``copy_bandwidth_fraction``: one that keeps it (a strided copy;
    1.0, full bandwidth, on the GPUs).
    ``attention_efficiency``: "dtype/variant/causal|full" -> fraction of ``peak_flops[dtype]``.
    """

    name: str
    peak_flops: Any
    bandwidth: float
    launch_overhead: float
    attention_efficiency: Any
    matmul_efficiency: float = 1.0
    transpose_bandwidth_fraction: float = 1.0
    copy_bandwidth_fraction: float = 1.0  # ... and one that keeps the minor axis (a strided copy)
    # GEMM tile quantisation (0 = not modelled): a dot_general runs as tiles of
    # matmul_tile_m x matmul_tile_n output elements spread over `multiprocessors` in waves
    multiprocessors: int = 0
    matmul_tile_m: int = 0
    matmul_tile_n: int = 0
    # No attention kernel (the CPU): attention runs as the reference's XLA einsums, with no tiles
    # to pad, and at ``split_heads_attention_efficiency`` of peak where Q's or the output's layout
    # does not keep H directly before S (the reference splits H into (kv head, group) in place,
    # and XLA:CPU then loops instead of calling a GEMM).
    einsum_attention: bool = False
    split_heads_attention_efficiency: float = 1.0
    # The decode kernel (kernels/decode_attention.py: few queries, a long KV cache): memory bound,
    # priced at this fraction of ``bandwidth`` (0: no decode kernel on this device, e.g. the CPU).
    decode_bandwidth_fraction: float = 0.0
    # XLA:CPU's dot emitter takes operands as [batch..., free..., contract...] or [batch...,
    # contract..., free...] only: an operand with its batch axes not major, or its contracting axes
    # not one block at either end, is copied into that form first (a dot_general's, and K's and
    # V's in the reference attention's einsums). Priced as a materialised transpose plus a launch.
    relayouts_dot_operands: bool = False
    # Broadcasts are fused into their consumers and never written (XLA:CPU: an explicit softmax
    # with its two row broadcasts measured as the same softmax without them). Off: only a scalar
    # splat is free, any other broadcast is priced as writing its output (the GPU rows as fitted).
    broadcasts_fuse: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak_flops", _frozen(self.peak_flops))
        object.__setattr__(self, "attention_efficiency", _frozen(self.attention_efficiency))

    # ------------------------------------------------------------------ lookups
    def peak(self, dtype: str) -> float:
        table = dict(self.peak_flops)
        return table.get(dtype_family(dtype), table.get(str(dtype), table["default"]))

    def matmul_peak(self, dtype: str, precision: str | None = None) -> float:
        """A matmul's peak rate over operands of ``dtype`` at a dot's ``precision`` ("highest": the
        table's "<dtype>:highest" row where it has one, e.g. float32 without TF32 on a GPU; a
        half-precision preset, "bf16_bf16_f32": that half type's rate)."""
        if precision in ir.HALF_PRESETS:
            return self.peak(ir.HALF_PRESETS[precision])
        if precision:
            row = dict(self.peak_flops).get(f"{dtype_family(dtype)}:{precision}")
            if row is not None:
                return row
        return self.peak(dtype)

    def attention_eff(self, dtype: str, variant: str, causal: bool) -> float:
        table = dict(self.attention_efficiency)
        fam = dtype_family(dtype)
        for d in (fam, "default"):
            for c in (bool(causal), False):
                key = _eff_key(d, variant, c)
                if key in table:
                    return table[key]
        if variant == "transposed":
            return self.attention_eff(dtype, "standard", causal)
        raise KeyError(f"{self.name}: no attention efficiency for {dtype} {variant} causal={causal}")

    # ------------------------------------------------------------------ edits
    def with_attention_efficiency(self, dtype: str, variant: str, causal: bool, value: float) -> DeviceSpec:
        """A copy with one attention efficiency replaced (tests flip the V-layout decision with it)."""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        table = dict(self.attention_efficiency)
        table[_eff_key(dtype_family(dtype) if dtype_family(dtype) != "default" else dtype, variant, causal)] = float(value)
        return dataclasses.replace(self, attention_efficiency=table)

    def replace(self, **changes: Any) -> DeviceSpec:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ calibration files
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["peak_flops"] = dict(self.peak_flops)
        out["attention_efficiency"] = dict(self.attention_efficiency)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: DeviceSpec | None = None) -> DeviceSpec:
        """A spec from a dict; with ``base``, missing fields (and missing table keys) come from it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known - {"comment", "source", "fitted"}
        if unknown:
            raise ValueError(f"unknown DeviceSpec fields {sorted(unknown)}")
        fields = {k: v for k, v in data.items() if k in known}
        if base is None:
            return cls(**fields)
        for table in ("peak_flops", "attention_efficiency"):
            if table in fields:
                fields[table] = {**dict(getattr(base, table)), **dict(fields[table])}
        return dataclasses.replace(base, **fields)

    def to_json(self, path: str | os.PathLike[str]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str], base: DeviceSpec | None = None) -> DeviceSpec:
        return cls.from_dict(json.loads(Path(path).read_text()), base)


# ---------------------------------------------------------------------------------------------
# Attention efficiencies on Hopper: the kernel "auto" runs there, our Pallas Mosaic GPU kernel
# (kernels/mosaic_attention.py), MEASURED on an H200 (2026-11-26, jax 0.11.2, B4 H32 S4096 D128,
# forward, default tiles; bench/results/attention-nvidia-h200-2026-11-26.md, attention-d128-quick-,
# attention-fp8-, attention-fp8-quick- and tune-mosaic(-fp8)-nvidia-h200-2026-11-26.md). The H100
# has the same SMs and clocks and this is compute bound, so the same fractions are assumed there
# (jax's attention_mgpu: 558 f16 TFLOP/s on the H100, 519 on the H200 in our run).
# Each rate is the median over every run of the session, both V layouts pooled: in 16 bits the
# layouts do not differ beyond run-to-run spread (same-run transposed/standard ratios 0.66-1.45;
# the same kernel's rate varied up to 30% between runs, causal rows most), since wgmma reads a
# 16-bit B operand of either major-ness from shared memory. Transposed V gets the geometric mean
# of those ratios, 1.006 over 16 pairs (attention_mgpu's schedule, every shape): an edge far
# inside the noise, so it decides only where V's layout is otherwise free (a projection writes
# either), never against a transpose that would have to be materialised.
_MOSAIC_BF16 = 564.5 / 989.4  # measured: median of 8 runs (485-595) -> 0.571
_MOSAIC_BF16_CAUSAL = 418.7 / 989.4  # measured: median of 8 runs (319-464) -> 0.423
_MOSAIC_F16 = 521.4 / 989.4  # measured: median of 4 runs (474-569) -> 0.527
_MOSAIC_F16_CAUSAL = 430.5 / 989.4  # measured: median of 4 runs (319-486) -> 0.435
_TV_EDGE_16BIT = 1.006  # measured: geometric mean of 16 same-run pairs (above)
# f32 calls run the Pallas Triton kernel (Mosaic GPU takes 16-bit and fp8 operands): its bf16
# rate measured on an H100 (bench/results/attention-h100-2026-11-25.md, 399 and 336 TFLOP/s),
# applied to the TF32 peak (ASSUMPTION: f32 not measured).
_TRITON_BF16 = 399.3 / 989.4  # measured -> 0.404
_TRITON_BF16_CAUSAL = 335.8 / 989.4  # measured -> 0.339
_XLA_BF16 = 110 / 989.4  # measured (H100, /work/shared/gpu/README.md): plain XLA attention -> 0.111
_XLA_BF16_CAUSAL = 40 / 989.4  # measured: plain XLA, bf16 causal -> 0.040
# (cuDNN in the same H200 runs: 497-600 bf16, 356-429 causal; its fp8 attention 725-840, 507-649.)
#
# fp8 (e4m3) needs transposed V on Hopper: its wgmma reads both operands K-major, and P·V reduces
# over keys. Transposed V runs the Mosaic GPU kernel (median 682 TFLOP/s at the table's tiles, 256
# keys, in the tile sweep; 583-624 in the benchmark runs at 128 keys, which the sweep put at 634;
# causal: 497, median of 3, 494-515); standard V runs the Triton fp8 kernel, which transposes V
# tiles through shared memory (Mosaic GPU refuses them): 205 (201-208), causal 175 (173-178).
# A second H200 lease the same day (attention-fp8-nvidia-h200-2026-11-26-run2.md, 256-key fp8 tiles)
# fell inside these ranges but one, and the rates stay as they are: bf16 566.3 (overlapped
# schedule), causal 359.4; fp8 transposed 661.0, causal 506.7; fp8 standard 201.8, causal 159.1
# (below 173-178: standard fp8 only gets slower, its choice does not change).
_FP8_STANDARD = 204.8 / 1978.9  # measured -> 0.103
_FP8_STANDARD_CAUSAL = 175.2 / 1978.9  # measured -> 0.089
_FP8_TRANSPOSED = 682.1 / 1978.9  # measured -> 0.345
_FP8_TRANSPOSED_CAUSAL = 497.2 / 1978.9  # measured -> 0.251


def _hopper_attention() -> dict[str, float]:
    table: dict[str, float] = {}
    for dtype, full, causal in (
        ("bfloat16", _MOSAIC_BF16, _MOSAIC_BF16_CAUSAL),
        ("float16", _MOSAIC_F16, _MOSAIC_F16_CAUSAL),
        ("float32", _TRITON_BF16, _TRITON_BF16_CAUSAL),
    ):
        table[_eff_key(dtype, "standard", False)] = full
        table[_eff_key(dtype, "standard", True)] = causal
        table[_eff_key(dtype, "transposed", False)] = full * _TV_EDGE_16BIT
        table[_eff_key(dtype, "transposed", True)] = causal * _TV_EDGE_16BIT
    table[_eff_key("float8_e4m3fn", "standard", False)] = _FP8_STANDARD
    table[_eff_key("float8_e4m3fn", "standard", True)] = _FP8_STANDARD_CAUSAL
    table[_eff_key("float8_e4m3fn", "transposed", False)] = _FP8_TRANSPOSED
    table[_eff_key("float8_e4m3fn", "transposed", True)] = _FP8_TRANSPOSED_CAUSAL
    # reference (XLA) attention: layout-blind; measured bf16 numbers used for every dtype
    table[_eff_key("default", "reference", False)] = _XLA_BF16
    table[_eff_key("default", "reference", True)] = _XLA_BF16_CAUSAL
    # XLA attention on fp8 operands upcasts them (assumption: no faster than bf16), so its rate
    # is the bf16 one, expressed against the fp8 peak.
    for fp8 in ("float8_e4m3fn", "float8_e5m2"):
        table[_eff_key(fp8, "reference", False)] = _XLA_BF16 * 989.4 / 1978.9
        table[_eff_key(fp8, "reference", True)] = _XLA_BF16_CAUSAL * 989.4 / 1978.9
    table[_eff_key("default", "standard", False)] = _TRITON_BF16  # other dtypes: assumption
    table[_eff_key("default", "standard", True)] = _TRITON_BF16_CAUSAL
    return table


_HOPPER_PEAKS = {
    "bfloat16": 989.4 * TERA,  # spec: BF16 Tensor Core, dense
    "float16": 989.4 * TERA,  # spec: FP16 Tensor Core, dense
    "float8_e4m3fn": 1978.9 * TERA,  # spec: FP8 Tensor Core, dense
    "int8": 1978.9 * TERA,  # spec: INT8 Tensor Core 1979 TOPS, dense
    # JAX's default matmul precision on Hopper runs f32 dots on TF32 tensor cores (spec: 494.7)
    "float32": 494.7 * TERA,
    "float32:highest": 67.0 * TERA,  # spec: FP32 (non-tensor): Precision.HIGHEST runs no TF32
    "float64": 67.0 * TERA,  # spec: FP64 Tensor Core
    "default": 67.0 * TERA,  # spec: FP32 (non-tensor) for anything else
}

# Shared Hopper numbers that are not spec-sheet figures:
_HOPPER_LAUNCH = 3e-6  # ASSUMPTION: ~3 us per non-fused kernel (CUDA launch + inter-kernel gap
#                        commonly quoted as 2-5 us); calibrate from bench timings of small kernels.
_HOPPER_MATMUL_EFF = 0.7  # ASSUMPTION: large cuBLAS bf16 GEMMs reach ~70% of dense peak on H100;
#                           replace by a bench measurement.
# measured: materialising V^T (bf16 B4 H32 S4096 D128, 134 MB read + 134 MB written) took
# 0.26 ms -> 1.03 TB/s = 0.31 of 3.35 TB/s.
_H100_TRANSPOSE_FRACTION = (2 * 4 * 32 * 4096 * 128 * 2 / 0.26e-3) / 3.35e12

_HOPPER_SMS = 132  # spec: H100 SXM5 and H200 SXM have 132 SMs
_HOPPER_DECODE_FRACTION = 1.0  # ASSUMPTION (estimate, not measured): the decode kernel streams the
#   KV cache at the spec bandwidth, as this table prices every memory-bound op (the unfused decode
#   program it competes with in extraction reads the same cache at full bandwidth too; a lower
#   fraction here alone would make the extractor prefer XLA's einsums for no measured reason).
#   Replace by `bench/attention.py --decode` timings (bench/gpu_session.sh decode).
_HOPPER_GEMM_TILE = (128, 128)  # ASSUMPTION: cuBLAS/CUTLASS Hopper bf16 GEMMs use 128x128 (up to
#   128x256) output tiles per SM; a GEMM with few tiles leaves SMs idle in its last wave (split-K
#   only when the tiles cannot fill one wave). Replace by bench/qkv_layouts.py projection timings.

H100 = DeviceSpec(
    name="h100",
    peak_flops=_HOPPER_PEAKS,
    bandwidth=3.35 * TERA,  # spec: H100 SXM5 HBM3 3.35 TB/s
    launch_overhead=_HOPPER_LAUNCH,
    attention_efficiency=_hopper_attention(),  # assumption: as on H200 (same SMs, compute bound)
    matmul_efficiency=_HOPPER_MATMUL_EFF,
    transpose_bandwidth_fraction=_H100_TRANSPOSE_FRACTION,
    multiprocessors=_HOPPER_SMS,
    matmul_tile_m=_HOPPER_GEMM_TILE[0],
    matmul_tile_n=_HOPPER_GEMM_TILE[1],
    decode_bandwidth_fraction=_HOPPER_DECODE_FRACTION,
)

H200 = DeviceSpec(
    name="h200",
    peak_flops=_HOPPER_PEAKS,  # spec: H200 SXM has H100 SXM's compute figures
    bandwidth=4.8 * TERA,  # spec: H200 SXM HBM3e 4.8 TB/s
    launch_overhead=_HOPPER_LAUNCH,
    attention_efficiency=_hopper_attention(),  # measured on an H200 (above)
    matmul_efficiency=_HOPPER_MATMUL_EFF,
    transpose_bandwidth_fraction=_H100_TRANSPOSE_FRACTION,  # assumption: as measured on H100
    multiprocessors=_HOPPER_SMS,
    matmul_tile_m=_HOPPER_GEMM_TILE[0],
    matmul_tile_n=_HOPPER_GEMM_TILE[1],
    decode_bandwidth_fraction=_HOPPER_DECODE_FRACTION,
)

# CPU (the CI/dev machine: Intel Xeon, Sapphire Rapids: AVX-512 and AMX flags, 2 vCPUs at 2.6 GHz,
# 2 MiB L2 per core), as XLA:CPU runs it SINGLE-THREADED: XLA_FLAGS="--xla_cpu_multi_thread_eigen=false
# intra_op_parallelism_threads=1", set by bench/cost_model_experiment.py --cpu before jax is imported,
# and timed by the process's CPU time (the work done, whatever core and however loaded). Peak: one
# core x two 512-bit FMA units = 1 x (2 x 16 lanes x 2 FLOP) x 2.6e9 = 166 GFLOP/s f32 (spec
# arithmetic); XLA:CPU runs bf16/f16 dots by converting to f32 (same peak); f64 has half the lanes.
# Everything else is FITTED, 2026-12-07 on this machine (jax 0.12.1, load average 1.7-4.5 from the
# other engineers' test runs), by `python bench/calibrate_cpu.py cpuA.pkl cpuB.pkl r1.pkl r7.pkl` over
# four runs of `python bench/cost_model_experiment.py --cpu --rounds 61|81 --inner 5 --dump X.pkl`
# (62 programs each: the projected attention block at prefill S256 and S512 and a decode step
# against a 1024-token cache, each as the e-graph's variants and as hand-written equivalents that
# span 24-40x; least squares of log(predicted / measured), workloads weighted alike), and checked
# on 13 runs not used in the fit (bench/results/cost-model-cpu-2026-12-07.md: Spearman 0.901-0.960
# pooled).
# - bandwidth 49 GB/s (the working sets, 0.25-34 MB, sit in the 480 MiB L3); matmul_efficiency 0.64
#   (107 GFLOP/s); attention (the reference's two batched per-head GEMMs) 0.60 of peak; split heads
#   (Q or O without H directly before S: XLA:CPU loops over the split heads) 0.27 of peak.
# - the reference attention and a `softmax` node also pay the softmax's passes over the f32 scores
#   (max, subtract, exp, sum, divide; and the scale) as the same nodes written out are priced
#   (roofline.softmax_passes_seconds): measured, the block as written (explicit softmax) runs with
#   the e-graph's attention variants (within 5% at S512).
# - broadcasts_fuse: XLA fuses a broadcast into each consumer (the softmax's two row broadcasts);
#   priced as writes, they made the explicit softmax 2.6x the `softmax` node it equals.
# - relayouts_dot_operands: XLA:CPU copies a dot operand that is not batch-major (a K/V cache kept
#   [B, S, H, D]) into the GEMM's canonical form (lhs [batch, free, contract], rhs [batch, contract,
#   free]; roofline.gemm_copy_keeps_minor; HLO of the decode programs). Copies that keep the
#   minor axis reach 0.27 of bandwidth (13 GB/s), transposes that move it 0.20: strided, short
#   rows (D = 32). The reference attention's K goes to [B, H, D, S] when q has H before S (its
#   (kv head, group) split; HLO), V to [B, H, S, D], by one copy that XLA folds the transpose
#   that laid the operand out into (roofline.RooflineModel._gemm_form_seconds; measured: it
#   splits decode programs into two clusters 10-15% apart).
# - launch_overhead: 2.4 us per thunk that does not fuse (fit; its lower bound is 1 us).
_CPU_F32 = 1 * (2 * 16 * 2) * 2.6e9
_CPU_ATTENTION = 0.5998  # fitted (above)
CPU = DeviceSpec(
    name="cpu",
    peak_flops={"float32": _CPU_F32, "bfloat16": _CPU_F32, "float16": _CPU_F32, "float64": _CPU_F32 / 2,
                "default": _CPU_F32},
    bandwidth=4.913e10,  # fitted (above)
    launch_overhead=2.353e-6,  # fitted (above)
    attention_efficiency={
        _eff_key("default", variant, causal): _CPU_ATTENTION
        for variant in VARIANTS for causal in (False, True)
    },
    matmul_efficiency=0.6441,  # fitted (above)
    transpose_bandwidth_fraction=0.195,  # fitted (above)
    copy_bandwidth_fraction=0.2668,  # fitted (above)
    einsum_attention=True,  # no attention kernel: XLA runs the reference einsums
    split_heads_attention_efficiency=0.2691,  # fitted (above)
    relayouts_dot_operands=True,  # measured (above)
    broadcasts_fuse=True,  # measured (above)
)

DEVICES: dict[str, DeviceSpec] = {"h100": H100, "h200": H200, "cpu": CPU}

# Calibration files: <dir>/<device>.json, optional, written by a calibration command and read (over
# the table above: only the fields/keys they contain change) whenever a model is built.
CALIBRATION_DIR = Path(os.environ.get("EQSAT_ATTN_CALIBRATION_DIR", Path(__file__).parent / "calibration"))


def calibration_path(name: str) -> Path:
    return CALIBRATION_DIR / f"{name}.json"


def device_spec(name: str, calibrated: bool = True) -> DeviceSpec:
    """The table's spec for "h100" | "h200" | "cpu", with its calibration file applied if present."""
    key = name.lower()
    if key not in DEVICES:
        raise ValueError(f"unknown device {name!r}; known: {sorted(DEVICES)}")
    spec = DEVICES[key]
    path = calibration_path(key)
    if calibrated and path.is_file():
        spec = DeviceSpec.from_json(path, base=spec)
    return spec


def device_name_of_kind(device_kind: str) -> str:
    """Map ``jax.devices()[0].device_kind`` ("NVIDIA H100 80GB HBM3", ...) to a table name."""
    kind = device_kind.upper()
    if "H200" in kind:
        return "h200"
    if "H100" in kind:
        return "h100"
    return "cpu"
