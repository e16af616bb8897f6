"""Roofline cost model: the device table, per-op pricing, device detection and calibration files."""

from __future__ import annotations

import math

import pytest

from eqsat_attn import ir
from eqsat_attn.cost import (
    CPU, H100, H200, DeviceSpec, OpView, RooflineModel, current_device_model, device_spec, for_device,
    program_cost,
)
from eqsat_attn.cost import devices
from eqsat_attn.cost.devices import device_name_of_kind

T = ir.TensorType


def view(op, inputs, output, **params):
    return OpView(op, params, tuple(inputs), output)


def attn(q, k, v, out=None, *, q_layout="BHSD", k_layout="BHSD", v_layout="BHSD", o_layout="BHSD",
         causal=False, mask=None, mask_kind="none", **score_mods):
    inputs = (q, k, v) if mask is None else (q, k, v, mask)
    out = out if out is not None else T(tuple(q.shape[q_layout.index(c)] for c in o_layout), q.dtype)
    return view("attention", inputs, out, q_layout=q_layout, k_layout=k_layout, v_layout=v_layout,
                o_layout=o_layout, scale=0.125, causal=causal, mask_kind=mask_kind, **score_mods)


def bhsd(b, h, s, d, dtype="bfloat16"):
    return T((b, h, s, d), dtype)


def bhds(b, h, s, d, dtype="bfloat16"):
    return T((b, h, d, s), dtype)


H100_MODEL = RooflineModel(H100)


# ------------------------------------------------------------------------------------- table
def test_table_has_spec_numbers():
    assert H100.peak("bfloat16") == pytest.approx(989.4e12)
    assert H100.peak("float16") == pytest.approx(989.4e12)
    assert H100.peak("float8_e4m3fn") == pytest.approx(1978.9e12)
    assert H100.peak("float8_e5m2") == H100.peak("float8_e4m3fn")
    assert H100.bandwidth == pytest.approx(3.35e12)
    assert H200.bandwidth == pytest.approx(4.8e12)
    assert H200.peak("bfloat16") == H100.peak("bfloat16")
    # measured (H200, bench/results/attention-nvidia-h200-2026-11-26.md): our Mosaic GPU kernel ran
    # bf16 at a median 564.5 of 989.4 TFLOP/s, f16 at 521.4
    assert H100.attention_eff("bfloat16", "standard", False) == pytest.approx(564.5 / 989.4)
    assert H100.attention_eff("float16", "standard", False) == pytest.approx(521.4 / 989.4)
    assert 0 < H100.transpose_bandwidth_fraction < 1
    for name in ("h100", "h200", "cpu"):
        assert for_device(name).name == f"roofline-{name}"
    with pytest.raises(ValueError):
        for_device("tpu-v9")


def test_specs_are_hashable_and_comparable():
    assert hash(H100) == hash(devices.H100)
    assert RooflineModel(H100) == for_device("h100") or devices.calibration_path("h100").is_file()
    assert H100 != H200


# ------------------------------------------------------------------------------------- simple ops
def test_dot_general_flops_and_roofline():
    a, b = T((2, 64, 32), "float32"), T((2, 32, 16), "float32")
    out = T((2, 64, 16), "float32")
    node = view("dot_general", (a, b), out, lhs_contract=(2,), rhs_contract=(1,), lhs_batch=(0,), rhs_batch=(0,),
                preferred_element_type=None)
    bd = H100_MODEL.breakdown(node)
    assert bd.flops == 2 * 2 * 64 * 16 * 32
    assert bd.bytes == a.nbytes + b.nbytes + out.nbytes
    utilisation = H100_MODEL.tile_utilisation(2, 64, 16, 32)  # 2 tiles of 128x128, mostly padding
    assert utilisation == pytest.approx((64 * 16) / (128 * 128) * 2 / H100.multiprocessors)
    compute = bd.flops / (H100.peak("float32") * H100.matmul_efficiency) / utilisation
    expected = max(compute, bd.bytes / H100.bandwidth)
    assert H100_MODEL.node_cost(node) == pytest.approx(expected + H100.launch_overhead)


def test_large_bf16_matmul_is_compute_bound():
    a, b = T((8192, 8192), "bfloat16"), T((8192, 8192), "bfloat16")
    node = view("dot_general", (a, b), T((8192, 8192), "bfloat16"), lhs_contract=(1,), rhs_contract=(0,),
                lhs_batch=(), rhs_batch=(), preferred_element_type=None)
    bd = H100_MODEL.breakdown(node)
    assert bd.compute_s > bd.memory_s
    utilisation = H100_MODEL.tile_utilisation(1, 8192, 8192, 8192)  # 4096 tiles in 32 waves of 132 SMs
    assert utilisation == pytest.approx(4096 / (32 * 132))
    assert bd.seconds == pytest.approx(2 * 8192**3 / (989.4e12 * H100.matmul_efficiency) / utilisation
                                       + H100.launch_overhead)


def test_transpose_reads_and_writes_its_output():
    x = T((256, 512), "float32")
    out = T((512, 256), "float32")
    node = view("transpose", (x,), out, perm=(1, 0))
    bd = H100_MODEL.breakdown(node)
    assert bd.bytes == 2 * out.nbytes
    assert bd.seconds == pytest.approx(
        2 * out.nbytes / (H100.bandwidth * H100.transpose_bandwidth_fraction) + H100.launch_overhead
    )
    # a transpose that keeps the minor axis runs as a copy, at full bandwidth
    y = T((4, 8, 64), "float32")
    keep = view("transpose", (y,), T((8, 4, 64), "float32"), perm=(1, 0, 2))
    assert H100_MODEL.node_cost(keep) == pytest.approx(2 * y.nbytes / H100.bandwidth + H100.launch_overhead)
    assert H100_MODEL.node_cost(view("transpose", (y,), y, perm=(0, 1, 2))) == 0.0


@pytest.mark.parametrize("op", ["reshape", "input", "literal", "constant", "opaque_output", "stop_gradient"])
def test_free_ops(op):
    x = T((128, 128), "float32")
    for model in (H100_MODEL, for_device("cpu")):
        assert model.node_cost(view(op, (x,), T((64, 256), "float32"))) == 0.0


@pytest.mark.parametrize("op", ["exp", "add", "convert_element_type", "broadcast_in_dim", "select_n"])
def test_fused_elementwise_costs_output_bytes_only(op):
    x = T((1024, 1024), "bfloat16")
    out = T((1024, 1024), "float32") if op == "convert_element_type" else x
    cost = H100_MODEL.node_cost(view(op, (x, x), out))
    assert cost == pytest.approx(out.nbytes / H100.bandwidth)


def test_reduction_reads_its_input():
    x = T((1024, 4096), "float32")
    out = T((1024,), "float32")
    cost = H100_MODEL.node_cost(view("reduce_sum", (x,), out, axes=(1,)))
    assert cost == pytest.approx((x.nbytes + out.nbytes) / H100.bandwidth + H100.launch_overhead)


# ------------------------------------------------------------------------------------- attention
def test_attention_flops_and_standard_variant():
    q = bhsd(4, 32, 4096, 128)
    node = attn(q, q, q)
    bd = H100_MODEL.breakdown(node)
    assert bd.variant == "standard"
    assert bd.flops == 4 * 4 * 32 * 4096 * 4096 * 128
    assert bd.bytes == 4 * q.nbytes
    # compute bound at the measured efficiency: the model reproduces the 564.5 TFLOP/s our kernel ran at
    assert bd.flops / (bd.seconds - H100.launch_overhead) == pytest.approx(564.5e12)
    causal = H100_MODEL.breakdown(attn(q, q, q, causal=True))
    assert causal.flops == bd.flops / 2


def test_transposed_v_cheaper_by_the_measured_edge_on_hopper_bf16():
    """Measured on an H200: in 16 bits transposed V ran at 1.006x standard V (geometric mean of
    same-run pairs), an edge inside the noise that only breaks ties."""
    q = bhsd(4, 32, 4096, 128)
    std = H100_MODEL.breakdown(attn(q, q, q))
    tv = H100_MODEL.breakdown(attn(q, q, bhds(4, 32, 4096, 128), v_layout="BHDS"))
    assert (tv.variant, std.variant) == ("transposed", "standard")
    edge = H100.attention_eff("bfloat16", "transposed", False) / H100.attention_eff("bfloat16", "standard", False)
    assert edge == pytest.approx(devices._TV_EDGE_16BIT) and 1.0 < edge < 1.01
    assert std.compute_s / tv.compute_s == pytest.approx(edge)


def test_fp8_transposed_v_measured_on_hopper():
    """bench/results/*-nvidia-h200-2026-11-26.md: our Mosaic GPU fp8 kernel (transposed V) at 682.1
    TFLOP/s vs the Triton fp8 kernel with standard V at 204.8 (S4096 D128, non-causal)."""
    q = bhsd(4, 32, 4096, 128, "float8_e4m3fn")
    std = H100_MODEL.breakdown(attn(q, q, q))
    tv = H100_MODEL.breakdown(attn(q, q, bhds(4, 32, 4096, 128, "float8_e4m3fn"), v_layout="BHDS"))
    assert std.compute_s / tv.compute_s == pytest.approx(682.1 / 204.8)
    # and the materialised transpose of V is cheaper than what fp8 transposed V saves
    assert H100_MODEL._transpose_seconds(q.nbytes) + H100.launch_overhead < std.seconds - tv.seconds


def test_materialised_v_transpose_is_never_worth_it_in_bf16():
    """The central choice: with V an input, bf16 transposed V does not pay for transposing V."""
    q = bhsd(4, 32, 4096, 128)
    std = H100_MODEL.node_cost(attn(q, q, q))
    tv = H100_MODEL.node_cost(attn(q, q, bhds(4, 32, 4096, 128), v_layout="BHDS"))
    transpose = H100_MODEL.node_cost(view("transpose", (q,), bhds(4, 32, 4096, 128), perm=(0, 1, 3, 2)))
    assert tv < std < tv + transpose


@pytest.mark.parametrize("operand", ["q", "k", "o"])
def test_non_minor_d_layout_costs_an_extra_transpose(operand):
    q = bhsd(2, 8, 1024, 64)
    base = H100_MODEL.breakdown(attn(q, q, q))
    layouts = {f"{operand}_layout": "BHDS"}
    odd = bhds(2, 8, 1024, 64)
    qq, kk = (odd if operand == "q" else q), (odd if operand == "k" else q)
    node = attn(qq, kk, q, **layouts)
    bd = H100_MODEL.breakdown(node)
    assert bd.flops == base.flops and bd.bytes == base.bytes
    assert bd.extra_s == pytest.approx(H100_MODEL._transpose_seconds(q.nbytes) + H100.launch_overhead)
    assert bd.seconds == pytest.approx(base.seconds + bd.extra_s)


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_v_with_neither_d_nor_s_minor_is_relaid(dtype):
    """Relaid into the faster of the two kernel layouts: transposed V (by far in fp8)."""
    q = bhsd(2, 8, 1024, 64, dtype)
    v = T((2, 1024, 64, 8), dtype)  # "BSDH": heads minor
    bd = H100_MODEL.breakdown(attn(q, q, v, v_layout="BSDH"))
    assert bd.variant == "transposed"
    assert bd.extra_s == pytest.approx(H100_MODEL._transpose_seconds(v.nbytes) + H100.launch_overhead)


def test_gqa_reads_kv_once():
    q = bhsd(2, 32, 2048, 128)
    kv = bhsd(2, 8, 2048, 128)
    bd = H100_MODEL.breakdown(attn(q, kv, kv))
    assert bd.bytes == 2 * q.nbytes + 2 * kv.nbytes  # q, o at 32 heads; k, v at 8 (no repeat)
    assert bd.flops == 4 * 2 * 32 * 2048 * 2048 * 128


def test_bool_mask_runs_the_kernel_and_reads_the_mask():
    q = bhsd(2, 8, 1024, 64)
    mask = T((2, 8, 1024, 1024), "bool")
    bd = H100_MODEL.breakdown(attn(q, q, q, mask=mask, mask_kind="bool"))
    assert bd.variant == "standard"  # the Triton kernel takes a boolean mask (guarded)
    assert bd.bytes == 4 * q.nbytes + mask.nbytes
    nan_fill = H100_MODEL.breakdown(attn(q, q, q, mask=mask, mask_kind="bool", mask_fill=float("nan")))
    assert nan_fill.variant == "reference"  # no kernel fill: the reference runs it
    ref = RooflineModel(H100, attention_kernel="reference")
    assert ref.breakdown(attn(q, q, q)).variant == "reference"
    assert ref.name == "roofline-h100-reference"


def test_with_attention_efficiency_flips_the_v_layout_decision():
    q = bhsd(4, 32, 4096, 128)
    vt = bhds(4, 32, 4096, 128)
    transpose = view("transpose", (q,), vt, perm=(0, 1, 3, 2))
    std_node, tv_node = attn(q, q, q), attn(q, q, vt, v_layout="BHDS")

    def prefers_transposing_v(model):
        return model.node_cost(transpose) + model.node_cost(tv_node) < model.node_cost(std_node)

    assert not prefers_transposing_v(H100_MODEL)
    fast = H100_MODEL.with_attention_efficiency("bfloat16", "transposed", False, 0.8)
    assert prefers_transposing_v(fast)
    assert fast.device.attention_eff("bfloat16", "transposed", False) == 0.8
    assert H100.attention_eff("bfloat16", "transposed", False) != 0.8  # the table is untouched
    slow = H100_MODEL.with_attention_efficiency("bfloat16", "transposed", False, 0.3)
    assert slow.node_cost(tv_node) > slow.node_cost(std_node)


def test_program_cost_under_roofline():
    b = ir.ProgramBuilder()
    x = b.input(T((64, 128), "float32"))
    t = b.add("transpose", (x,), T((128, 64), "float32"), perm=(1, 0))
    e = b.add("exp", (t,), T((128, 64), "float32"))
    r = b.add("reshape", (e,), T((8192,), "float32"))
    prog = b.build([r])
    m = for_device("cpu")
    expected = 2 * 32768 / (CPU.bandwidth * CPU.transpose_bandwidth_fraction) + CPU.launch_overhead + 32768 / CPU.bandwidth
    assert program_cost(prog, m) == pytest.approx(expected)


# ------------------------------------------------------------------------------------- devices
def test_device_detection_on_this_machine_is_cpu():
    import jax

    assert jax.devices()[0].platform == "cpu"  # the CI machine
    assert current_device_model().name == "roofline-cpu"
    from eqsat_attn.pipeline import default_cost_model

    assert default_cost_model().name == "roofline-cpu"
    assert default_cost_model("reference").attention_kernel == "reference"


@pytest.mark.parametrize("kind,name", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100"), ("NVIDIA H200", "h200"),
    ("cpu", "cpu"), ("TPU v5 lite", "cpu"), ("NVIDIA A100-SXM4-80GB", "cpu"),
])
def test_device_kind_mapping(kind, name):
    assert device_name_of_kind(kind) == name


# ------------------------------------------------------------------------------------- calibration
def test_json_round_trip(tmp_path):
    path = tmp_path / "h100.json"
    H100.to_json(path)
    back = DeviceSpec.from_json(path)
    assert back == H100
    assert hash(back) == hash(H100)
    edited = H100.with_attention_efficiency("bfloat16", "transposed", True, 0.5).replace(launch_overhead=5e-6)
    edited.to_json(path)
    assert DeviceSpec.from_json(path) == edited


def test_partial_calibration_file_overrides_the_table(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(devices, "CALIBRATION_DIR", tmp_path)
    (tmp_path / "h100.json").write_text(json.dumps({
        "launch_overhead": 4.5e-6,
        "attention_efficiency": {"bfloat16/transposed/full": 0.55},
        "fitted": "test",
    }))
    spec = device_spec("h100")
    assert spec.launch_overhead == 4.5e-6
    assert spec.attention_eff("bfloat16", "transposed", False) == 0.55
    assert spec.attention_eff("bfloat16", "standard", False) == H100.attention_eff("bfloat16", "standard", False)
    assert spec.bandwidth == H100.bandwidth
    assert for_device("h100").device == spec
    assert device_spec("h100", calibrated=False) == H100
    assert device_spec("h200") == H200  # no file for it
    (tmp_path / "cpu.json").write_text(json.dumps({"no_such_field": 1}))
    with pytest.raises(ValueError, match="no_such_field"):
        device_spec("cpu")


def test_every_variant_is_priced_for_common_dtypes():
    for spec in (H100, H200, CPU):
        for dtype in ("bfloat16", "float16", "float32", "float8_e4m3fn"):
            for variant in ("standard", "transposed", "reference"):
                for causal in (False, True):
                    eff = spec.attention_eff(dtype, variant, causal)
                    assert 0 < eff <= 1 and math.isfinite(eff)


@pytest.mark.parametrize("device", ["cpu", "h100"])
def test_dot_orientation_only_breaks_ties(device):
    """The same GEMM written weight-first (both operands transposed, [N, B, S] out) costs the
    row-major form plus two tie-breaks: nothing a real saving could lose to."""
    from eqsat_attn.cost.roofline import ORIENTATION_TIE_BREAK

    model = for_device(device)
    x, w = T((2, 64, 128), "float32"), T((128, 512), "float32")
    row_major = model.breakdown(view("dot_general", (x, w), T((2, 64, 512), "float32"), lhs_contract=(2,),
                                     rhs_contract=(0,), lhs_batch=(), rhs_batch=()))
    weight_first = model.breakdown(view("dot_general", (w, x), T((512, 2, 64), "float32"), lhs_contract=(0,),
                                        rhs_contract=(2,), lhs_batch=(), rhs_batch=()))
    assert row_major.extra_s == 0.0 and weight_first.flops == row_major.flops
    assert weight_first.seconds - row_major.seconds == pytest.approx(2 * ORIENTATION_TIE_BREAK)
    assert 2 * ORIENTATION_TIE_BREAK < 1e-3 * row_major.seconds


def test_built_in_block_keeps_its_matmuls_row_major():
    """Equal-cost orientations resolve to row-major GEMMs: the built-in block's MLP stays
    [B, S, hidden] (weight-first measured 0.88x of the original on CPU,
    bench/results/rule-ablation-cpu-2026-11-26-before.md), and so do the Q and output
    projections. K's and V's are not equal-cost cases on the CPU: XLA:CPU copies the reference
    attention's K and V into its GEMMs' forms, merged with the transpose that laid them out
    (roofline `_gemm_form_seconds`), and prices a K or V read with S minor as laid out by such a
    transpose, which a weight-first projection writes without one (the model's assumption,
    bench/results/cost-model-cpu-2026-12-07.md); if one is chosen, it is read so."""
    import eqsat_attn as ea
    from eqsat_attn import examples

    fn, args = examples.block_example()
    after = ea.optimize(fn, cost_model=for_device("cpu")).explain(*args).after
    dots = [after.nodes[i] for i in after.live_nodes() if after.nodes[i].op == "dot_general"]
    assert len(dots) == 6  # Q, K, V and output projections, two MLP matmuls

    def row_major(node) -> bool:
        a = after.type_of(node.inputs[0])
        return (tuple(node["lhs_contract"]) == tuple(range(a.rank - len(node["lhs_contract"]), a.rank))
                and tuple(node["rhs_contract"]) == (0,))

    mlp = [n for n in dots if 512 in after.type_of(n.inputs[1]).shape]
    assert len(mlp) == 2 and all(row_major(n) for n in mlp), mlp
    weight_first = [n for n in dots if not row_major(n)]
    (attention,) = [after.nodes[i] for i in after.live_nodes() if after.nodes[i].op == "attention"]
    s_minor = [name for name in "kv" if attention[f"{name}_layout"].endswith("S")]
    assert len(weight_first) <= len(s_minor), (weight_first, attention)
