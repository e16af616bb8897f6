"""Index math for the projection-layout rules (`rules/qkv.py`), registered with `index_math`.

- ``packed_split``: a slice of one third of an axis, reshaped so that the third splits into
  (heads, head_dim), is the same slice of the array reshaped to [..., 3, heads, head_dim, ...].
- ``packed_attention``: attention whose Q, K, V are entries 0, 1, 2 along one axis of one
  rank-5 array, each reshaped to rank 4 with the same layout, reads the packed array directly.
"""

from __future__ import annotations

from .index_math import QUESTIONS, Answer, Ints, reshape_groups

PACK = 3  # Q, K, V


def sliced_axes(shape: Ints, start: Ints, limit: Ints) -> list[int]:
    """Axes on which ``slice(x, start, limit)`` of an x of ``shape`` is not the full range."""
    return [i for i, (n, lo, hi) in enumerate(zip(shape, start, limit)) if (lo, hi) != (0, n)]


def packed_split(shape: Ints, start: Ints, limit: Ints, s_out: Ints) -> Answer:
    """reshape(slice(y, start, limit), s_out) == reshape(slice(reshape(y, packed), st5, li5), s_out).

    Applies when the slice takes entry i of three equal parts of one axis a and the reshape splits
    that part into two or more axes (H, D): returns (packed, st5, li5), where ``packed`` is
    y's shape with axis a replaced by [3, *those axes].
    """
    axes = sliced_axes(shape, start, limit)
    if len(axes) != 1 or len(shape) != len(start):
        return None
    a = axes[0]
    part = limit[a] - start[a]
    if part <= 0 or shape[a] != PACK * part or start[a] % part:
        return None
    sliced = tuple(limit[i] - start[i] for i in range(len(shape)))
    groups = reshape_groups(sliced, s_out)
    if groups is None:
        return None
    for src, dst in groups:
        if a in src:
            if src != [a] or len(dst) < 2:
                return None
            inner = tuple(s_out[j] for j in dst)
            break
    else:
        return None
    packed = shape[:a] + (PACK,) + inner + shape[a + 1:]
    index = start[a] // part
    st5 = start[:a] + (index,) + (0,) * len(inner) + start[a + 1:]
    li5 = limit[:a] + (index + 1,) + inner + limit[a + 1:]
    return packed, st5, li5


def packed_attention(shape: Ints, bounds: Ints, axes: Ints, s4: Ints) -> Answer:
    """Positions of (B, H, S, D, packed) in a rank-5 array whose entries 0, 1, 2 along one axis,
    each dropped to rank 4 (``s4``) and read with axis positions ``axes``, are Q, K and V."""
    r = len(shape)
    if r != 5 or len(bounds) != 6 * r or len(axes) != 4 or len(s4) != 4:
        return None
    slices = [(bounds[2 * k * r:(2 * k + 1) * r], bounds[(2 * k + 1) * r:(2 * k + 2) * r]) for k in range(3)]
    packed_axis = None
    for index, (st, li) in enumerate(slices):
        moved = sliced_axes(shape, st, li)
        if len(moved) != 1 or shape[moved[0]] != PACK or st[moved[0]] != index or li[moved[0]] != index + 1:
            return None
        if packed_axis not in (None, moved[0]):
            return None
        packed_axis = moved[0]
    assert packed_axis is not None
    if tuple(n for i, n in enumerate(shape) if i != packed_axis) != tuple(s4):
        return None
    positions = tuple(p + (p >= packed_axis) for p in axes) + (packed_axis,)
    return (positions,)


QUESTIONS.setdefault("packed_split", packed_split)
QUESTIONS.setdefault("packed_attention", packed_attention)
