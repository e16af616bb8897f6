"""ALiBi computed from per-head slopes in the kernels, instead of a bias read from memory.

An `Alibi` stands for the additive bias

    bias[b, h, i, j] = dtype(f32(slopes[b, h]) · f32(row_coef·i + col_coef·j + offset))

(i: query index, j: key index; ``slopes`` broadcast over B and H where they have length 1; the
product rounded once in float32, then to ``dtype``). That is exactly what a program computes when
it multiplies float32 slopes by integer positions converted to float32 (BLOOM's ``slope·j``, MPT's
``slope·(j - (Sk - 1))``, the paper's ``slope·(j - i)``): every position is an integer of
magnitude below 2^24, so its float32 conversion is exact, and one float32 multiply rounds the
same way in a kernel as in XLA. `lower` only hands a bias to the kernels in this form when its
analysis (`eqsat_attn.alibi_bias`) proves the program computes these values; `positions_exact`
refuses shapes whose positions reach 2^24.

The slopes are static (a program's constants): the form is hashable and part of a kernel's plan.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

#: float32 represents every integer of magnitude up to this exactly
EXACT_INTEGERS = 2 ** 24
#: dtypes the product may be rounded to (the bias dtypes the kernels read)
ALIBI_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Alibi:
    """``slope[b, h] · (row_coef·i + col_coef·j + offset)`` (module docstring). ``slopes``: rows
    over B (1 or B of them), each over H (1 or H values), float32 values as Python floats."""

    slopes: tuple[tuple[float, ...], ...]
    row_coef: int = 0
    col_coef: int = 1
    offset: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        if not self.slopes or not self.slopes[0] or len({len(r) for r in self.slopes}) != 1:
            raise ValueError(f"slopes must be a non-empty [B or 1][H or 1] table, got {self.slopes!r}")
        exact = tuple(tuple(float(np.float32(s)) for s in row) for row in self.slopes)
        object.__setattr__(self, "slopes", exact)
        for name in ("row_coef", "col_coef", "offset"):
            if not isinstance(getattr(self, name), (int, np.integer)):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.dtype not in ALIBI_DTYPES:
            raise ValueError(f"dtype must be one of {ALIBI_DTYPES}, got {self.dtype!r}")

    @classmethod
    def from_array(cls, slopes, **form) -> "Alibi":
        """From slopes shaped [H], [B, H] (or broadcastable, e.g. [1, H])."""
        table = np.asarray(slopes, np.float32)
        if table.ndim == 1:
            table = table[None, :]
        if table.ndim != 2:
            raise ValueError(f"slopes must be [H] or [B, H], got shape {table.shape}")
        return cls(tuple(tuple(float(s) for s in row) for row in table), **form)

    @property
    def shape(self) -> tuple[int, int]:
        """(1 or B, 1 or H)."""
        return len(self.slopes), len(self.slopes[0])

    @property
    def one_row(self) -> bool:
        """The bias is the same for every query (no ``i`` term): one row, e.g. ``slope·j``."""
        return self.row_coef == 0

    def describe(self) -> str:
        """The form as text, e.g. "slope·(j - i)" or "slope·(j - 127) bf16"."""
        terms = []
        for coef, name in ((self.col_coef, "j"), (self.row_coef, "i")):
            if coef:
                sign = "-" if coef < 0 else "+"
                term = name if abs(coef) == 1 else f"{abs(coef)}{name}"
                terms.append(f"{sign} {term}" if terms or coef < 0 else term)
        if self.offset or not terms:
            terms.append(f"{'-' if self.offset < 0 else '+'} {abs(self.offset)}" if terms else str(self.offset))
        text = " ".join(terms)
        form = f"slope·({text})" if len(terms) > 1 or text.startswith("-") else f"slope·{text}"
        return form if self.dtype == "float32" else f"{form} {jnp.dtype(self.dtype).name}"

    def slopes_array(self) -> jax.Array:
        """float32 [1 or B, 1 or H]: the kernels' operand."""
        return jnp.asarray(np.asarray(self.slopes, np.float32))

    def largest_position(self, sq: int, sk: int) -> int:
        """The largest |row_coef·i + col_coef·j + offset| over i < Sq, j < Sk."""
        ends = [self.row_coef * i + self.col_coef * j + self.offset for i in (0, sq - 1) for j in (0, sk - 1)]
        return max(abs(e) for e in ends)

    def check(self, b: int, h: int, sq: int, sk: int) -> None:
        """ValueError unless the slopes broadcast to [B, H] and every position is exact in float32."""
        bs, hs = self.shape
        if bs not in (1, b) or hs not in (1, h):
            raise ValueError(f"ALiBi slopes [{bs}, {hs}] do not broadcast to [B, H] = [{b}, {h}]")
        if self.largest_position(sq, sk) >= EXACT_INTEGERS:
            raise ValueError(f"ALiBi positions reach 2^24 at Sq={sq}, Sk={sk}: not exact in float32")

    def tile(self, slope, rows, cols):
        """The bias at int32 query indices ``rows`` and key indices ``cols`` (same shape; in a
        kernel, a tile in wgmma's layout) for one scalar float32 ``slope``, in ``dtype``."""
        pos = cols if self.col_coef == 1 else cols * self.col_coef
        if self.row_coef:
            pos = pos + rows * self.row_coef
        if self.offset:
            pos = pos + self.offset
        value = slope * pos.astype(jnp.float32)
        return value if self.dtype == "float32" else value.astype(jnp.dtype(self.dtype))

    def bias(self, sq: int, sk: int) -> jax.Array:
        """The bias materialised, [1 or B, 1 or H, Sq (1 when `one_row`), Sk] in ``dtype``: the
        same operations as `tile`, so the same values (for kernels that read a bias)."""
        rows = jnp.arange(1 if self.one_row else sq, dtype=jnp.int32)[:, None]
        cols = jnp.arange(sk, dtype=jnp.int32)[None, :]
        slopes = self.slopes_array()[:, :, None, None]
        return self.tile(slopes, rows[None, None], cols[None, None])

    def bias_f64(self, sq: int, sk: int) -> np.ndarray:
        """The bias in float64 NumPy from its definition (tests' reference), [Bs, Hs, Sq, Sk]."""
        i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
        pos = (self.row_coef * i + self.col_coef * j + self.offset).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to ±inf as in float32 (0·inf NaN)
            value = np.asarray(self.slopes, np.float32)[:, :, None, None] * pos  # float32 product
        return np.asarray(value.astype(jnp.dtype(self.dtype)), np.float64)
