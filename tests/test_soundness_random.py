"""Soundness sweep: random well-shaped programs keep their values through the optimizer.

Each example is a random `ir.Program` over transposes, reshapes (split/merge), broadcasts,
unary and binary elementwise ops, scalar constants, integer powers, casts, reductions,
dot_general (with batch dimensions), slices and concatenations, and attention over Q, K, V cast
to bf16 or f16 (a cast prologue to fold), ranks 1-5 and dimensions 1-4. It is optimized with the
default rule sets; then an e-graph saturated with the default rule sets and `fusion` is
extracted under several cost models that pick different members (fused regions among them);
every program extracted must equal the original in value on random inputs with extreme values
mixed in (both zeros, denormals, infinities, NaN; near the float32 maximum where the program
does not sum). Scalar literals include the same extremes. Programs without sums (no
reduce_sum, dot_general or attention, whose summation order the rules may change) must give
the original's results bit for bit (zero signs and NaN positions included); the others equal
NaN positions and infinities and close finite values.

A second, smaller sweep builds projection programs (sibling matmuls of one input, a fused
projection sliced into parts, the parts transposed, split into heads, multiplied or
concatenated) so the `projections` and `packed_qkv` rules (horizontal fusion and its reverse)
fire; it also extracts exactly (ILP) under models that prefer merged and split matmuls.

Two sweeps go through the decorator (`ea.optimize` against ``jax.jit`` of the original):
random functions of an f32 or bf16 array with extreme values and a weakly typed Python float
(extremes among them), with debug callbacks, must give the same bits, weak types and callback
log; int64 and uint64 functions with literals past 2**53 under x64, the same bits.

The number of examples is ``--soundness-examples`` (default 300, the CI budget; ``./dev soundness N``).
"""

from __future__ import annotations

import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

import eqsat_attn as ea
from cost_models import ArbitraryCost, PenaliseTransposes, PreferFused, PreferTransposes
from eqsat_attn import ir
from eqsat_attn.egraph import extract_program
from eqsat_attn.egraph.rulesets import DEFAULT_RULESETS
from eqsat_attn.lower import lower
from eqsat_attn.pipeline import Limits, OptimizeOptions, default_cost_model, optimize_program, saturated
from work_limits import SAFETY_NET_S

F32 = "float32"
MAX_RANK = 5
SWEEP_LIMITS = Limits(iterations=8, nodes=20_000, seconds=SAFETY_NET_S)


# ----------------------------------------------------------------------------- cost models




EXTRA_MODELS = [PreferTransposes(), PenaliseTransposes(), ArbitraryCost(7), PreferFused()]
# the sweep's e-graph also runs the fusion rule set, so extraction under PreferFused (and the
# arbitrary model) picks fused regions: every region formed must compute what its ops compute
SWEEP_RULES = [*DEFAULT_RULESETS, "fusion"]


# ----------------------------------------------------------------------------- program strategy


LITERALS = [0.5, -1.5, 2.0, 0.0, -0.0, 1e-40, -1e-40, 3.0e38, -3.0e38, np.inf, -np.inf, np.nan]
"""Scalar literals the sweep draws: ordinary ones, both zeros, denormals, near-max, inf, NaN."""


class _Gen:
    def __init__(self, draw, sums: bool = True) -> None:
        self.draw = draw
        self.sums = sums  # whether ops that sum (matmuls, reduce_sum, attention) may be drawn
        self.b = ir.ProgramBuilder()
        self.pool: list[int] = []

    def type(self, x: int) -> ir.TensorType:
        return self.b.type_of(x)

    def shape(self, x: int) -> tuple[int, ...]:
        return self.type(x).shape

    def input(self, shape) -> int:
        return self.b.input(ir.TensorType(tuple(shape), F32))

    def add(self, op: str, ins, shape=None, **params) -> int:
        if shape is None:
            t = ir.infer_type(op, params, [self.type(i) for i in ins])
        else:
            t = ir.TensorType(tuple(shape), F32)
        return self.b.add(op, tuple(ins), t, **params)

    def perm(self, rank: int) -> tuple[int, ...]:
        return tuple(self.draw(st.permutations(list(range(rank)))))

    # ---- one op each; return None when not applicable to x

    def transpose(self, x):
        r = len(self.shape(x))
        if r < 2:
            return None
        return self.add("transpose", [x], perm=self.perm(r))

    def reshape(self, x):
        x = self.maybe_transposed(x)
        s = list(self.shape(x))
        kind = self.draw(st.sampled_from(["merge", "split", "unit"]))
        if kind == "merge" and len(s) >= 2:
            i = self.draw(st.integers(0, len(s) - 2))
            s[i:i + 2] = [s[i] * s[i + 1]]
        elif kind == "split" and len(s) < MAX_RANK and any(d in (4, 6, 8, 9, 12, 16) for d in s):
            i = self.draw(st.sampled_from([k for k, d in enumerate(s) if d in (4, 6, 8, 9, 12, 16)]))
            f = 2 if s[i] % 2 == 0 else 3
            s[i:i + 1] = [f, s[i] // f] if self.draw(st.booleans()) else [s[i] // f, f]
        elif len(s) < MAX_RANK:
            s.insert(self.draw(st.integers(0, len(s))), 1)
        else:
            return None
        if any(d > 16 for d in s):
            return None
        return self.add("reshape", [x], shape=s)

    def broadcast(self, x):
        s = list(self.shape(x))
        if len(s) < MAX_RANK and self.draw(st.booleans()):
            k = self.draw(st.integers(0, len(s)))
            out = s[:k] + [self.draw(st.integers(1, 3))] + s[k:]
            dims = tuple(i for i in range(len(out)) if i != k)
        elif 1 in s:
            out = [d if d != 1 else self.draw(st.integers(1, 3)) for d in s]
            dims = tuple(range(len(s)))
        else:
            return None
        return self.add("broadcast_in_dim", [x], shape=out, broadcast_dimensions=dims)

    def unary(self, x):
        x = self.maybe_transposed(x)
        return self.add(self.draw(st.sampled_from(["exp", "tanh", "neg"])), [x])

    def binary(self, x):
        s = self.shape(x)
        same = [v for v in self.pool if self.shape(v) == s]
        perms = [v for v in self.pool if sorted(self.shape(v)) == sorted(s) and len(self.shape(v)) >= 2]
        how = self.draw(st.sampled_from(["pool", "transposed", "input"]))
        if how == "pool":
            other = self.draw(st.sampled_from(same))
        elif how == "transposed" and perms:
            v = self.draw(st.sampled_from(perms))
            vs = self.shape(v)
            # a permutation of v's axes giving x's shape
            choices = [p for p in _perms_matching(vs, s)]
            p = self.draw(st.sampled_from(choices))
            other = self.add("transpose", [v], perm=p)
        else:
            other = self.input(s)
        op = self.draw(st.sampled_from(["add", "mul", "sub", "max"]))
        a, b = (x, other) if self.draw(st.booleans()) else (other, x)
        return self.add(op, [a, b])

    def scalar(self, x):
        """x times or plus a broadcast literal (a constant inside a fused region), extreme values
        among them (near-overflow ones only in programs without sums)."""
        values = LITERALS if self.sums else [v for v in LITERALS if abs(v) < 1e30 or not np.isfinite(v)]
        lit = self.b.add("literal", (), ir.TensorType((), F32), value=float(self.draw(st.sampled_from(values))))
        c = self.add("broadcast_in_dim", [lit], shape=self.shape(x), broadcast_dimensions=())
        op = self.draw(st.sampled_from(["mul", "add"]))
        return self.add(op, [x, c] if self.draw(st.booleans()) else [c, x])

    def power(self, x):
        return self.add("integer_pow", [self.maybe_transposed(x)], y=self.draw(st.sampled_from([2, 3])))

    def cast(self, x):
        """A round trip through float16 (a cast pair inside a fused region)."""
        half = self.b.add("convert_element_type", (x,), ir.TensorType(self.shape(x), "float16"), new_dtype="float16")
        return self.add("convert_element_type", [half], new_dtype=F32)

    def attention(self, x):
        """Attention over Q, K, V cast from f32 to bf16 or f16 (some of them computed in that dtype
        instead), read back as f32: the cast prologue folds into the attention's compute dtype.
        Q is x when x is [B, H, S, D], else a new input."""
        draw = self.draw
        q = x if len(self.shape(x)) == 4 else self.input([draw(st.integers(1, 2)), draw(st.integers(1, 2)),
                                                          draw(st.integers(1, 4)), draw(st.integers(1, 4))])
        b, h, _, d = self.shape(q)
        sk, dv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        half = draw(st.sampled_from(["bfloat16", "float16"]))
        cast = draw(st.sets(st.sampled_from("qkv"), min_size=1))
        operands = []
        for name, t in zip("qkv", (q, self.input([b, h, sk, d]), self.input([b, h, sk, dv]))):
            t = self.b.add("convert_element_type", (t,), ir.TensorType(self.shape(t), half), new_dtype=half)
            operands.append(t if name in cast else self.b.add("tanh", (t,), self.type(t)))
        params = dict(q_layout="BHSD", k_layout="BHSD", v_layout="BHSD", o_layout="BHSD",
                      scale=draw(st.sampled_from([0.5, 1.0])), causal=draw(st.booleans()), mask_kind="none")
        out = self.b.add("attention", operands, ir.infer_type("attention", params, [self.type(t) for t in operands]),
                         **params)
        return self.add("convert_element_type", [out], new_dtype=F32)

    def slice(self, x):
        """A sub-range of one or two axes (unit strides)."""
        x = self.maybe_transposed(x)
        s = self.shape(x)
        axes = [i for i, d in enumerate(s) if d >= 2]
        if not axes:
            return None
        start, limit = [0] * len(s), list(s)
        for i in self.draw(st.sets(st.sampled_from(axes), min_size=1, max_size=min(2, len(axes)))):
            start[i] = self.draw(st.integers(0, s[i] - 1))
            limit[i] = self.draw(st.integers(start[i] + 1, s[i]))
        return self.add("slice", [x], start_indices=tuple(start), limit_indices=tuple(limit))

    def concat(self, x):
        """x joined along one axis with a pool value, a slice of x or a new input that fits."""
        x = self.maybe_transposed(x)
        s = self.shape(x)
        if not s:
            return None
        axis = self.draw(st.integers(0, len(s) - 1))
        fits = [v for v in self.pool if len(self.shape(v)) == len(s)
                and all(a == b for i, (a, b) in enumerate(zip(self.shape(v), s)) if i != axis)]
        how = self.draw(st.sampled_from(["pool", "self", "input"]))
        if how == "pool" and fits:
            other = self.draw(st.sampled_from(fits))
        elif how == "self" and s[axis] >= 2:
            lo = self.draw(st.integers(0, s[axis] - 1))
            start, limit = [0] * len(s), list(s)
            start[axis] = lo
            other = self.add("slice", [x], start_indices=tuple(start), limit_indices=tuple(limit))
        else:
            other = self.input([d if i != axis else self.draw(st.integers(1, 3)) for i, d in enumerate(s)])
        parts = [x, other] if self.draw(st.booleans()) else [other, x]
        if s[axis] + self.shape(other)[axis] > 16:
            return None
        return self.add("concatenate", parts, dimension=axis)

    def maybe_transposed(self, x):
        """x, or (half the time) a transpose of it, so the rules that move transposes apply."""
        if len(self.shape(x)) >= 2 and self.draw(st.booleans()):
            return self.transpose(x)
        return x

    def reduce(self, x):
        x = self.maybe_transposed(x)
        r = len(self.shape(x))
        if r == 0:
            return None
        axes = tuple(sorted(self.draw(st.sets(st.integers(0, r - 1), min_size=1, max_size=r))))
        kinds = ["reduce_sum", "reduce_max"] if self.sums else ["reduce_max", "reduce_min"]
        return self.add(self.draw(st.sampled_from(kinds)), [x], axes=axes)

    def dot(self, x):
        s = self.shape(x)
        r = len(s)
        roles = [self.draw(st.sampled_from(["batch", "contract", "free"])) for _ in range(r)]
        lb = tuple(i for i in range(r) if roles[i] == "batch")
        lc = tuple(i for i in range(r) if roles[i] == "contract")
        n_free_a = r - len(lb) - len(lc)
        max_free_b = min(2, MAX_RANK - len(lb) - n_free_a, MAX_RANK - len(lb) - len(lc))
        if max_free_b < 0:
            return None
        nf = self.draw(st.integers(0, max_free_b))
        logical = [s[i] for i in lb] + [s[i] for i in lc] + [self.draw(st.integers(1, 4)) for _ in range(nf)]
        pos = self.perm(len(logical))  # position of each logical axis in the rhs
        rhs_shape = [0] * len(logical)
        for k, size in enumerate(logical):
            rhs_shape[pos[k]] = size
        rb = tuple(pos[:len(lb)])
        rc = tuple(pos[len(lb):len(lb) + len(lc)])
        y = self.input(rhs_shape)
        if self.draw(st.booleans()) and len(rhs_shape) >= 2:  # a transposed operand to fold
            q = self.perm(len(rhs_shape))
            y_src = self.input(tuple(rhs_shape[i] for i in _inverse(q)))
            y = self.add("transpose", [y_src], perm=q)
        a, b, lc_, rc_, lb_, rb_ = x, y, lc, rc, lb, rb
        if self.draw(st.booleans()):  # operand order
            a, b, lc_, rc_, lb_, rb_ = y, x, rc, lc, rb, lb
        out = self.add(
            "dot_general", [a, b], lhs_contract=lc_, rhs_contract=rc_, lhs_batch=lb_, rhs_batch=rb_,
            preferred_element_type=None,
        )
        if len(self.shape(out)) > MAX_RANK:
            return None
        return out


def _inverse(p):
    inv = [0] * len(p)
    for i, pi in enumerate(p):
        inv[pi] = i
    return tuple(inv)


def _perms_matching(src_shape, dst_shape):
    """Permutations p with src_shape[p[i]] == dst_shape[i] (a few)."""
    out = []
    used = [False] * len(src_shape)
    p = []

    def go(i):
        if len(out) >= 6:
            return
        if i == len(dst_shape):
            out.append(tuple(p))
            return
        for j, d in enumerate(src_shape):
            if not used[j] and d == dst_shape[i]:
                used[j] = True
                p.append(j)
                go(i + 1)
                p.pop()
                used[j] = False

    go(0)
    return out


OPS = [
    "transpose", "reshape", "broadcast", "unary", "binary", "binary", "reduce", "reduce", "dot", "scalar", "power", "cast",
    "attention", "slice", "concat",
]


SUMMING_OPS = frozenset({"dot", "attention"})


@st.composite
def programs(draw, max_steps=6):
    g = _Gen(draw, sums=draw(st.booleans()))
    rank = draw(st.integers(1, 4))
    x = g.input([draw(st.integers(1, 4)) for _ in range(rank)])
    g.pool.append(x)
    steps = draw(st.integers(1, max_steps))
    made = []
    for _ in range(steps):
        v = draw(st.sampled_from(g.pool[-3:]))
        kind = draw(st.sampled_from(OPS if g.sums else [k for k in OPS if k not in SUMMING_OPS]))
        if kind == "reduce" and len(g.shape(v)) <= 1 and draw(st.booleans()):
            kind = "transpose"
        out = getattr(g, kind)(v)
        if out is None:
            out = g.unary(v)
        if draw(st.integers(0, 3)) == 0 and len(g.shape(out)) >= 2:  # transposes around everything
            out = g.transpose(out)
        g.pool.append(out)
        made.append(out)
    outputs = [made[-1]]
    if len(made) >= 3 and draw(st.booleans()):
        outputs.append(made[draw(st.integers(0, len(made) - 2))])
    return g.b.build(outputs)


@st.composite
def projection_programs(draw):
    """Sibling projections x @ w_i of one input (weights [E, k] or [k, E]), or one fused
    projection x @ W sliced along its output axis into parts; each part then passes through an
    elementwise op, a transpose, a split into two heads or nothing, and the parts are returned,
    concatenated, or (equal shapes) multiplied (a gated MLP's gate * up)."""
    g = _Gen(draw)
    lead = [draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 3)))]
    e = draw(st.integers(2, 4))
    x = g.input([*lead, e])
    r = len(lead) + 1
    n = draw(st.sampled_from([2, 3, 3]))
    dot = dict(lhs_batch=(), rhs_batch=(), preferred_element_type=None)
    fused = draw(st.booleans())
    if not fused:  # siblings
        rc = draw(st.integers(0, 1))
        parts = []
        for _ in range(n):
            k = draw(st.sampled_from([2, 4, 6]))
            w = g.input([e, k] if rc == 0 else [k, e])
            ins, lc_, rc_ = ([x, w], (r - 1,), (rc,)) if draw(st.booleans()) else ([w, x], (rc,), (r - 1,))
            parts.append(g.add("dot_general", ins, lhs_contract=lc_, rhs_contract=rc_, **dot))
            if ins[0] == w:  # weight first: the output axis leads; move it last like the others
                parts[-1] = g.add("transpose", [parts[-1]], perm=(*range(1, r), 0))
    else:  # one fused projection, sliced
        k = draw(st.sampled_from([4, 6]))  # split into two heads of 2 or 3 below
        y = g.add("dot_general", [x, g.input([e, n * k])], lhs_contract=(r - 1,), rhs_contract=(0,), **dot)
        parts = [g.add("slice", [y], start_indices=(*[0] * (r - 1), i * k), limit_indices=(*lead, (i + 1) * k))
                 for i in range(n)]
    # heads: Q/K/V of a fused QKV split into heads (packed_qkv), the common case of fused projections
    how = draw(st.sampled_from(["heads", "unary", "transpose", "none"] if fused else ["unary", "transpose", "heads", "none"]))
    perm = g.perm(r)
    out_axis = r - 1
    if how == "unary":
        parts = [g.add(draw(st.sampled_from(["exp", "tanh", "neg"])), [p]) for p in parts]
    elif how == "transpose":
        parts = [g.add("transpose", [p], perm=perm) for p in parts]
        out_axis = perm.index(r - 1)
    elif how == "heads" and all(g.shape(p)[-1] % 2 == 0 for p in parts) and r < MAX_RANK:
        parts = [g.add("reshape", [p], shape=(*lead, 2, g.shape(p)[-1] // 2)) for p in parts]
        out_axis = r
    combine = draw(st.sampled_from(["outputs", "concat", "mul"]))
    if combine == "concat":
        return g.b.build([g.add("concatenate", parts, dimension=out_axis)])
    if combine == "mul" and len({g.shape(p) for p in parts}) == 1:
        return g.b.build([g.add("mul", parts[:2])])
    return g.b.build(parts)


# ----------------------------------------------------------------------------- checks


SUMMING_IR_OPS = frozenset({"reduce_sum", "dot_general", "attention", "attention_fp8", "packed_attention"})
"""Ops whose results depend on summation order, which the rules may change (a transposed
reduction, a commuted matmul): programs with them are compared up to rounding."""

EXTREME_INPUTS = np.array([0.0, -0.0, 1e-40, -1e-40, np.inf, -np.inf, np.nan], np.float32)
NEAR_MAX_INPUTS = np.array([3.0e38, -3.0e38, 1.7e38], np.float32)


def sums(program: ir.Program) -> bool:
    return any(program.nodes[i].op in SUMMING_IR_OPS for i in program.live_nodes())


def random_inputs(program: ir.Program, seed: int = 0, extremes: bool = True) -> list[np.ndarray]:
    """Standard normal values with (``extremes``) a fifth of the elements replaced by extreme ones:
    both zeros, denormals, infinities, NaN, and near-max values in programs without sums."""
    rng = np.random.default_rng(seed)
    pool = EXTREME_INPUTS if sums(program) else np.concatenate([EXTREME_INPUTS, NEAR_MAX_INPUTS])
    out = []
    for t in program.input_types:
        x = rng.standard_normal(t.shape).astype(t.dtype)
        if extremes:
            x = np.where(rng.random(t.shape) < 0.2, rng.choice(pool, t.shape), x).astype(t.dtype)
        out.append(x)
    return out


def assert_same_values(want: np.ndarray, got: np.ndarray, exact: bool, err_msg: str, rtol=1e-4, atol=1e-5) -> None:
    """``exact``: equal bits, except that any NaN matches any NaN. Otherwise: NaN where the
    original has NaN, the same infinities, finite values close (relative to the largest)."""
    assert got.dtype == want.dtype and got.shape == want.shape, err_msg
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"NaN positions: {err_msg}")
    if exact:
        uint = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[want.dtype.itemsize]
        np.testing.assert_array_equal(np.where(nan, 0, got).view(uint), np.where(nan, 0, want).view(uint),
                                      err_msg=f"bits (zero signs included): {err_msg}")
        return
    inf = np.isinf(want)
    np.testing.assert_array_equal(np.where(inf, got, 0), np.where(inf, want, 0), err_msg=f"infinities: {err_msg}")
    finite = np.isfinite(want)
    scale = max(1.0, float(np.max(np.abs(want[finite]), initial=0.0)))
    np.testing.assert_allclose(np.where(finite, got, 0), np.where(finite, want, 0), rtol=rtol, atol=atol * scale,
                               err_msg=err_msg)


def check_same_values(original: ir.Program, candidate: ir.Program, what: str, rtol=1e-4, atol=1e-5) -> None:
    assert candidate.output_types == original.output_types, what
    exact = not sums(original)
    for seed, extremes in ((0, False), (1, True)):
        args = random_inputs(original, seed, extremes)
        with warnings.catch_warnings():  # a cast of a near-max value to float16 overflows, as it should
            warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning)
            want = [np.asarray(v) for v in lower(original)(*args)]
            got = [np.asarray(v) for v in lower(candidate)(*args)]
        for k, (w, g) in enumerate(zip(want, got)):
            assert_same_values(
                w, g, exact, rtol=rtol, atol=atol,
                err_msg=f"{what}: output {k} differs (inputs {args})\noriginal:\n{original}\nextracted:\n{candidate}",
            )


def check_program(program: ir.Program, fired: set[str] | None = None) -> None:
    note(str(program))
    options = OptimizeOptions(limits=SWEEP_LIMITS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the original is a failure here
        result = optimize_program(program, options)
    check_same_values(program, result.program, "optimize_program (default rules, default cost model)")
    with saturated(program, OptimizeOptions(rules=SWEEP_RULES, limits=SWEEP_LIMITS)) as (egraph, enc, run):
        if fired is not None:
            fired.update(name for name, n in run.rules_fired.items() if n)
        chosen = [extract_program(egraph, enc, model)[0] for model in EXTRA_MODELS]
    for model, program_chosen in zip(EXTRA_MODELS, chosen):
        check_same_values(program, program_chosen, f"extraction under {model.name}")


def _extreme_literals() -> ir.Program:
    """x times -0.0 and 0.0, plus NaN and -inf, a denormal and a near-max scale, transposed
    (egglog's f64 alone would merge the zeros and lose the sign)."""
    b = ir.ProgramBuilder()
    t = ir.TensorType((2, 3), F32)
    x = b.input(t)
    outs = []
    for value, op in ((-0.0, "mul"), (0.0, "mul"), (float("nan"), "add"), (-np.inf, "max"), (1e-40, "add"),
                      (3.0e38, "mul")):
        lit = b.add("literal", (), ir.TensorType((), F32), value=value)
        c = b.add("broadcast_in_dim", (lit,), t, broadcast_dimensions=())
        y = b.add(op, (b.add("transpose", (b.add("transpose", (x,), ir.TensorType((3, 2), F32), perm=(1, 0)),),
                             t, perm=(1, 0)), c), t)
        outs.append(b.add("neg", (y,), t))
    return b.build(outs)


@pytest.fixture
def soundness_examples(request) -> int:
    return int(request.config.getoption("--soundness-examples"))


@pytest.mark.slow
def test_random_programs_keep_their_values(soundness_examples):
    @settings(
        max_examples=soundness_examples, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(programs())
    @example(_extreme_literals())
    def sweep(program):
        check_program(program, fired)

    fired: set[str] = set()
    sweep()
    if soundness_examples >= 300:  # the sweep exercises every family its ops can trigger
        expected = {
            f"transpose.{n}" for n in
            ("compose", "identity", "unary", "binary", "broadcast", "reduce", "reshape", "dot_output", "dot_operand",
             "concatenate")
        } | {"canonical.dot_canonical", "canonical.dot_commute", "canonical.reshape"} | {
            f"fusion.{n}" for n in (
                "region_inputs", "leaves", "unary", "binary", "shared_inputs", "epilogue", "attention_cast_prologue",
            )
        }
        assert expected <= fired, f"never fired: {sorted(expected - fired)}"


def _fused_qkv_into_heads() -> ir.Program:
    """x[2,3,4] @ w[4,12], its thirds split into two heads of two, each negated."""
    b = ir.ProgramBuilder()
    x, w = b.input(ir.TensorType((2, 3, 4), F32)), b.input(ir.TensorType((4, 12), F32))
    y = b.add("dot_general", (x, w), ir.TensorType((2, 3, 12), F32), lhs_contract=(2,), rhs_contract=(0,),
              lhs_batch=(), rhs_batch=(), preferred_element_type=None)
    outs = []
    for i in range(3):
        part = b.add("slice", (y,), ir.TensorType((2, 3, 4), F32), start_indices=(0, 0, 4 * i),
                     limit_indices=(2, 3, 4 * i + 4))
        heads = b.add("reshape", (part,), ir.TensorType((2, 3, 2, 2), F32))
        outs.append(b.add("neg", (heads,), ir.TensorType((2, 3, 2, 2), F32)))
    return b.build(outs)


class _MergeMatmuls:
    """Each matmul costs a fixed large price (whatever its size), slices and concatenations
    almost nothing: exact extraction takes one merged matmul wherever the e-graph has one."""

    name = "merge-matmuls"

    def node_cost(self, node) -> float:
        if node.op == "dot_general":
            return 1e6
        return (0.01 if node.op in ("slice", "concatenate") else 1.0) * max(node.output.nbytes, 1)


class _SplitMatmuls:
    """Slices and concatenations dear, matmuls by their output size: extraction splits."""

    name = "split-matmuls"

    def node_cost(self, node) -> float:
        return (100.0 if node.op in ("slice", "concatenate") else 1.0) * max(node.output.nbytes, 1)


PROJECTION_FAMILIES = {"projections.horizontal", "projections.split_projection", "projections.adjacent_slices",
                       "projections.slice_transpose", "packed_qkv.packed_split"}


def test_random_projection_programs_keep_their_values(soundness_examples):
    """Horizontal fusion and its reverse on random projection programs saturated with the
    default rule sets: extraction under the default cost model and exact extractions that merge
    and split keep values (8 programs and a fixed GPT-2-style one at the default 300: ~5 s)."""
    from eqsat_attn.egraph.ilp import extract_program_ilp

    @settings(
        max_examples=max(8, soundness_examples // 40), deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(projection_programs())
    @example(_fused_qkv_into_heads())  # GPT-2's QKV split, so packed_qkv fires whatever is drawn
    def sweep(program):
        note(str(program))
        with saturated(program, OptimizeOptions(limits=SWEEP_LIMITS)) as (egraph, enc, run):  # the default rule sets
            fired.update(name for name, n in run.rules_fired.items() if n)
            default = extract_program(egraph, enc, default_cost_model())[0]
            exact = {model.name: extract_program_ilp(egraph, enc, model)[0]  # past MAX_MIP_NODES: HiGHS's best
                     for model in (_MergeMatmuls(), _SplitMatmuls())}
        check_same_values(program, default, "extraction under the default cost model")
        for name, chosen in exact.items():
            check_same_values(program, chosen, f"exact extraction under {name}")
            merged[name] += chosen.count("dot_general") < program.count("dot_general")

    fired: set[str] = set()
    merged = {"merge-matmuls": 0, "split-matmuls": 0}
    sweep()
    assert PROJECTION_FAMILIES <= fired, f"never fired: {sorted(PROJECTION_FAMILIES - fired)}"
    assert merged["merge-matmuls"] > 0, "no program had its sibling matmuls merged"


# ----------------------------------------------------------------------------- blow-up


def test_long_transpose_chain_stays_within_limits():
    """Thousands of alternating transposes and elementwise ops: stops at a limit, stays correct."""
    b = ir.ProgramBuilder()
    t = ir.TensorType((2, 3, 4), F32)
    x = b.input(t)
    y = b.input(t)
    v = x
    perms = [(1, 2, 0), (2, 0, 1), (0, 2, 1), (1, 0, 2)]
    ops = ["tanh", "neg", "add", "mul"]
    n_layers = 800
    for i in range(n_layers):
        p = perms[i % len(perms)]
        v = b.add("transpose", (v,), ir.infer_type("transpose", {"perm": p}, [b.type_of(v)]), perm=p)
        op = ops[i % len(ops)]
        if op in ("add", "mul"):
            other = b.add("transpose", (y,), ir.infer_type("transpose", {"perm": p}, [t]), perm=p) if b.type_of(v) != t else y
            if b.type_of(other) != b.type_of(v):
                other = b.add(
                    "transpose", (y,), ir.TensorType(b.type_of(v).shape, F32),
                    perm=next(q for q in _perms_matching(t.shape, b.type_of(v).shape)),
                )
            v = b.add(op, (v, other), b.type_of(v))
            v = b.add("tanh", (v,), b.type_of(v))  # keep values bounded
        else:
            v = b.add(op, (v,), b.type_of(v))
    program = b.build([v])
    assert len(program) >= 2000
    limits = Limits(iterations=30, nodes=15_000, seconds=SAFETY_NET_S)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = optimize_program(program, OptimizeOptions(limits=limits))
    elapsed = time.perf_counter() - start
    assert elapsed < 90, f"optimizing a {len(program)}-node chain took {elapsed:.0f} s"
    assert isinstance(result.saturated, bool)
    if not result.saturated:
        assert result.warnings and "saturation stopped" in result.warnings[0]
    assert result.egraph_nodes > 0
    check_same_values(program, result.program, "long chain")


# ----------------------------------------------------------------------------- through the decorator


SCALARS = [0.5, -1.5, 0.0, -0.0, 1e-40, 3.0e38, float("inf"), float("-inf"), float("nan")]


@st.composite
def scalar_functions(draw):
    """A random function of an array ``x`` (f32 or bf16, extreme values) and a Python float ``s``
    (weakly typed): a few steps of transposes, elementwise ops with ``s`` or a literal (both
    zeros, NaN, infinities among them), selects, and debug callbacks logging a value; it
    returns the last value and, sometimes, a result of ``s`` alone (weakly typed)."""
    steps = draw(st.lists(st.sampled_from(["mul_s", "add_lit", "transpose", "tanh", "where", "callback", "neg"]),
                          min_size=1, max_size=5))
    literals = [draw(st.sampled_from(SCALARS)) for _ in steps]
    weak_out = draw(st.booleans())

    def fn(x, s, log):
        v = x
        for k, (step, lit) in enumerate(zip(steps, literals)):
            if step == "mul_s":
                v = v * s
            elif step == "add_lit":
                v = v + lit
            elif step == "transpose":
                v = v.T
            elif step == "tanh":
                v = jnp.tanh(v)
            elif step == "where":
                v = jnp.where(v > 0, v, lit)
            elif step == "neg":
                v = -v
            else:
                jax.debug.callback(lambda a, k=k: log.append((k, np.asarray(a).tobytes())), v)
        return (v, s * 2 + literals[0]) if weak_out else v

    return steps, literals, fn


def _where_zero(x, s, log):
    """The fixed example: -0.0 where x <= 0, logged, plus NaN, times -0.0; and a weak 2s - 0.0."""
    v = jnp.where(x > 0, x, -0.0)
    jax.debug.callback(lambda a: log.append((1, np.asarray(a).tobytes())), v)
    return (v + float("nan")) * s, s * 2 + -0.0


def test_random_functions_keep_bits_weak_types_and_effects(soundness_examples):
    """Random functions of an array and a Python scalar through `ea.optimize`: the same bits
    (any NaN matching any NaN) and weak types as ``jax.jit`` of the original, and the same
    debug callbacks with the same values, in program order."""
    @settings(
        max_examples=max(6, soundness_examples // 10), deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(scalar_functions(), st.sampled_from(["float32", "bfloat16"]), st.sampled_from(SCALARS))
    @example((["where", "callback", "add_lit", "mul_s"], [-0.0, 0.5, float("nan"), 0.0], _where_zero), "float32", -0.0)
    def sweep(drawn, dtype, s):
        steps, literals, fn = drawn
        note(f"steps {steps}, literals {literals}, dtype {dtype}, s {s}")
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 3)).astype(np.float32)
        x = np.where(rng.random((2, 3)) < 0.4, rng.choice(EXTREME_INPUTS, (2, 3)), x)
        x = jnp.asarray(x, dtype)
        want_log, got_log = [], []
        want = jax.jit(lambda x, s: fn(x, s, want_log))(x, s)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            got = ea.optimize(lambda x, s: fn(x, s, got_log))(x, s)
        jax.effects_barrier()
        assert got_log == want_log
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            assert jax.typeof(g) == jax.typeof(w)  # dtype, shape and weak type
            assert_same_values(np.asarray(w), np.asarray(g), exact=True, err_msg=f"{steps} {literals} s={s}")

    sweep()


def test_random_int64_programs_keep_their_bits_under_x64():
    """int64 and uint64 functions with literals past 2**53 through `ea.optimize` under x64:
    the same bits as ``jax.jit`` of the original."""
    big = [2**53 + 1, -(2**62) - 3, 2**63 - 1, -(2**63), 12345]
    step = st.tuples(st.sampled_from(["add", "mul", "max", "xor"]), st.sampled_from(big))

    @settings(max_examples=6, deadline=None, derandomize=True, database=None)
    @given(st.lists(step, min_size=1, max_size=4), st.booleans())
    def sweep(steps, unsigned):
        def fn(x):
            v = x.astype(jnp.uint64) if unsigned else x
            for op, c in steps:
                c = np.uint64(c % 2**64) if unsigned else c
                v = {"add": lambda: v + c, "mul": lambda: v * c, "max": lambda: jnp.maximum(v, c),
                     "xor": lambda: v ^ c}[op]()
            return v

        x = jnp.array([0, 1, -7, 2**40 + 3, -(2**62)], jnp.int64)
        want = jax.jit(fn)(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            got = ea.optimize(fn)(x)
        assert jax.typeof(got) == jax.typeof(want)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(steps))

    enable = getattr(jax, "enable_x64", None)
    if enable is not None:
        with enable(True):
            sweep()
    else:
        before = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)
        try:
            sweep()
        finally:
            jax.config.update("jax_enable_x64", before)
