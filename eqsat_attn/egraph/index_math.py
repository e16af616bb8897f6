"""Index arithmetic answered in Python for rules (see `language` for the ask/answer protocol).

Every function takes the question's four integer tuples and returns a tuple of output
tuples, or None when the rewrite does not apply. Conventions: ``transpose(x, p)`` has axis i
equal to axis ``p[i]`` of x; dot_general's output is [batch..., lhs free..., rhs free...].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Ints = tuple[int, ...]
Answer = tuple[Ints, ...] | None


def inverse(p: Sequence[int]) -> Ints:
    inv = [0] * len(p)
    for i, pi in enumerate(p):
        inv[pi] = i
    return tuple(inv)


def _inverse(p: Ints, _b: Ints, _c: Ints, _d: Ints) -> Answer:
    return (inverse(p),)


def _reduce_bubble(p: Ints, axes: Ints, _c: Ints, _d: Ints) -> Answer:
    """reduce(transpose(x, p), axes) == transpose(reduce(x, axes2), q): returns (axes2, q)."""
    axes2 = tuple(sorted(p[a] for a in axes))
    kept_x = [i for i in range(len(p)) if i not in axes2]
    wanted = [p[i] for i in range(len(p)) if i not in axes]
    return axes2, tuple(kept_x.index(w) for w in wanted)


def _reduce_sink(axes: Ints, q: Ints, rank: Ints, _d: Ints) -> Answer:
    """transpose(reduce(x, axes), q) == reduce(transpose(x, p), axes): returns (p,)."""
    kept = [i for i in range(rank[0]) if i not in axes]
    p = list(range(rank[0]))
    for j, qj in enumerate(q):
        p[kept[j]] = kept[qj]
    return (tuple(p),)


def reshape_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Split a reshape src -> dst into minimal groups of axes whose sizes multiply alike."""
    if 0 in src or 0 in dst:
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        gs: list[int] = []
        gd: list[int] = []
        ps = pd = 1
        if i < len(src):
            gs.append(i); ps *= src[i]; i += 1
        if j < len(dst):
            gd.append(j); pd *= dst[j]; j += 1
        while ps != pd:
            if ps < pd:
                if i >= len(src):
                    return None
                gs.append(i); ps *= src[i]; i += 1
            else:
                if j >= len(dst):
                    return None
                gd.append(j); pd *= dst[j]; j += 1
        groups.append((gs, gd))
    return groups


def _runs_in_order(order: Sequence[int], groups: list[list[int]]) -> list[int] | None:
    """Order in which non-empty groups appear in ``order`` if each is a contiguous in-order run."""
    seen: list[int] = []
    pos = 0
    owner = {axis: g for g, members in enumerate(groups) for axis in members}
    while pos < len(order):
        g = owner[order[pos]]
        members = groups[g]
        if tuple(order[pos:pos + len(members)]) != tuple(members):
            return None
        seen.append(g)
        pos += len(members)
    return seen


def _reshape_sink(src: Ints, dst: Ints, p: Ints, _d: Ints) -> Answer:
    """transpose(reshape(x, dst), p) == reshape(transpose(x, p2), dst2), x of shape src."""
    groups = reshape_groups(src, dst)
    if groups is None:
        return None
    order = _runs_in_order(p, [gd for _, gd in groups])
    if order is None:
        return None
    empty_dst = [g for g, (_, gd) in enumerate(groups) if not gd]
    p2 = tuple(a for g in order + empty_dst for a in groups[g][0])
    return p2, tuple(dst[i] for i in p)


def _reshape_bubble(src: Ints, p: Ints, dst: Ints, _d: Ints) -> Answer:
    """reshape(transpose(x, p), dst) == transpose(reshape(x, mid), q), x of shape src."""
    t_shape = tuple(src[i] for i in p)
    groups = reshape_groups(t_shape, dst)
    if groups is None:
        return None
    x_groups = []
    for gs, gd in groups:
        xs = [p[i] for i in gs]
        if xs and xs != list(range(xs[0], xs[0] + len(xs))):
            return None
        x_groups.append((xs[0] if xs else len(src), gd))
    by_x = sorted(range(len(groups)), key=lambda g: x_groups[g][0])
    mid_axes = [a for g in by_x for a in x_groups[g][1]]  # dst axes in the order reshape(x) makes them
    mid = tuple(dst[a] for a in mid_axes)
    q = tuple(mid_axes.index(a) for a in range(len(dst)))
    return mid, q


def _broadcast_sink(shape: Ints, dims: Ints, p: Ints, _d: Ints) -> Answer:
    """transpose(broadcast(x, shape, dims), p) == broadcast(transpose(x, q), shape2, dims2)."""
    pinv = inverse(p)
    new_pos = [pinv[d] for d in dims]
    q = tuple(sorted(range(len(dims)), key=lambda k: new_pos[k]))
    return q, tuple(shape[i] for i in p), tuple(sorted(new_pos))


def _broadcast_bubble(shape: Ints, dims: Ints, q: Ints, _d: Ints) -> Answer:
    """broadcast(transpose(x, q), shape, dims) == transpose(broadcast(x, shape2, dims), p)."""
    p = list(range(len(shape)))
    for k, d in enumerate(dims):
        p[d] = dims[q[k]]
    pinv = inverse(p)
    return tuple(shape[pinv[i]] for i in range(len(shape))), tuple(p)


def _dot_shape(a: Ints, b: Ints, lhs: Ints, rhs: Ints) -> Answer:
    """Output shape of dot_general; ``lhs``/``rhs`` are (n_contract, *contract, *batch)."""
    lc, lb = lhs[1:1 + lhs[0]], lhs[1 + lhs[0]:]
    rc, rbt = rhs[1:1 + rhs[0]], rhs[1 + rhs[0]:]
    return (
        tuple(a[i] for i in lb)
        + tuple(a[i] for i in _free_axes(len(a), lc, lb))
        + tuple(b[i] for i in _free_axes(len(b), rc, rbt)),
    )


def _dot_commute(counts: Ints, _b: Ints, _c: Ints, _d: Ints) -> Answer:
    """dot(a, b) == transpose(dot(b, a), p); counts = (batch, lhs free, rhs free)."""
    nb, naf, nbf = counts
    return (
        tuple(range(nb)) + tuple(range(nb + nbf, nb + nbf + naf)) + tuple(range(nb, nb + nbf)),
    )


def _free_axes(rank: int, contract: Ints, batch: Ints) -> list[int]:
    return [i for i in range(rank) if i not in contract and i not in batch]


def _dot_out_sink(ranks: Ints, lhs: Ints, rhs: Ints, p: Ints) -> Answer:
    """transpose(dot(a, b), p) == dot(transpose(a, qa), transpose(b, qb)) with reordered batch.

    ``lhs``/``rhs`` are (n_contract, *contract, *batch). Applies when p keeps the batch, lhs-free
    and rhs-free groups of the output in place. Returns (qa, qb, lhs_batch2, rhs_batch2).
    """
    ra, rb = ranks
    lc, lb = lhs[1:1 + lhs[0]], lhs[1 + lhs[0]:]
    rc, rbt = rhs[1:1 + rhs[0]], rhs[1 + rhs[0]:]
    nb = len(lb)
    fa, fb = _free_axes(ra, lc, lb), _free_axes(rb, rc, rbt)
    bounds = [(0, nb), (nb, nb + len(fa)), (nb + len(fa), nb + len(fa) + len(fb))]
    for lo, hi in bounds:
        if sorted(p[lo:hi]) != list(range(lo, hi)):
            return None
    pb = [p[i] for i in range(nb)]
    pa = [p[i] - nb for i in range(nb, nb + len(fa))]
    pf = [p[i] - nb - len(fa) for i in range(nb + len(fa), len(p))]
    qa, qb = list(range(ra)), list(range(rb))
    for i, j in enumerate(pa):
        qa[fa[i]] = fa[j]
    for i, j in enumerate(pf):
        qb[fb[i]] = fb[j]
    return tuple(qa), tuple(qb), tuple(lb[i] for i in pb), tuple(rbt[i] for i in pb)


def _dot_operand_fold(q: Ints, contract_batch: Ints, side: Ints, other_free: Ints) -> Answer:
    """dot with a transposed operand == transpose(dot with the operand itself, r): returns (r,).

    ``contract_batch`` = (n_contract, *contract, *batch) of the transposed operand (in its own
    axes), ``side`` = (0,) for lhs or (1,) for rhs, ``other_free`` = (number of free axes of
    the other operand,).
    """
    n = contract_batch[0]
    contract, batch = contract_batch[1:1 + n], contract_batch[1 + n:]
    nb = len(batch)
    t_free = _free_axes(len(q), contract, batch)
    x_free = sorted(q[i] for i in t_free)
    wanted = [x_free.index(q[i]) for i in t_free]
    nf, no = len(t_free), other_free[0]
    if side[0] == 0:
        r = list(range(nb)) + [nb + w for w in wanted] + list(range(nb + nf, nb + nf + no))
    else:
        r = list(range(nb + no)) + [nb + no + w for w in wanted]
    return (tuple(r),)


def _dot_canonical(ranks: Ints, lhs: Ints, rhs: Ints, _d: Ints) -> Answer:
    """dot(a, b) == dot(transpose(a, qa), transpose(b, qb)) in canonical form:
    a as [batch, free, contract], b as [batch, contract, free]. Returns (qa, qb, lc, rc, lb, rb).
    """
    ra, rb = ranks
    lc, lb = lhs[1:1 + lhs[0]], lhs[1 + lhs[0]:]
    rc, rbt = rhs[1:1 + rhs[0]], rhs[1 + rhs[0]:]
    nb, nc = len(lb), len(lc)
    fa, fb = _free_axes(ra, lc, lb), _free_axes(rb, rc, rbt)
    qa = tuple(lb) + tuple(fa) + tuple(lc)
    qb = tuple(rbt) + tuple(rc) + tuple(fb)
    return (
        qa, qb,
        tuple(range(nb + len(fa), ra)), tuple(range(nb, nb + nc)),
        tuple(range(nb)), tuple(range(nb)),
    )


def _attention_out_fold(o_axes: Ints, p: Ints, _c: Ints, _d: Ints) -> Answer:
    """transpose(attention(.., o_axes), p) == attention(.., o_axes2): returns (o_axes2,)."""
    pinv = inverse(p)
    return (tuple(pinv[a] for a in o_axes),)


def _unit_broadcast(src: Ints, shape: Ints, dims: Ints, _d: Ints) -> Answer:
    """broadcast(x, shape, dims) == reshape(x, shape) where the broadcast only inserts unit axes
    (x's axes kept in order and length, every other axis 1): returns (shape,)."""
    if list(dims) != sorted(set(dims)) or len(dims) != len(src):
        return None
    if any(shape[d] != n for d, n in zip(dims, src)) or any(shape[i] != 1 for i in range(len(shape)) if i not in dims):
        return None
    return (shape,)


def _unit_reduce(src: Ints, axes: Ints, _c: Ints, _d: Ints) -> Answer:
    """reduce(x, axes) == reshape(x, shape2) where every reduced axis has length 1: returns (shape2,)."""
    if not axes or any(src[a] != 1 for a in axes):
        return None
    return (tuple(n for i, n in enumerate(src) if i not in axes),)


QUESTIONS: dict[str, Callable[[Ints, Ints, Ints, Ints], Answer]] = {
    "inverse": _inverse,
    "reduce_bubble": _reduce_bubble,
    "reduce_sink": _reduce_sink,
    "reshape_sink": _reshape_sink,
    "reshape_bubble": _reshape_bubble,
    "broadcast_sink": _broadcast_sink,
    "broadcast_bubble": _broadcast_bubble,
    "dot_shape": _dot_shape,
    "dot_commute": _dot_commute,
    "dot_out_sink": _dot_out_sink,
    "dot_operand_fold": _dot_operand_fold,
    "dot_canonical": _dot_canonical,
    "attention_out_fold": _attention_out_fold,
    "unit_broadcast": _unit_broadcast,
    "unit_reduce": _unit_reduce,
}


def solve(kind: str, a: Ints, b: Ints, c: Ints, d: Ints) -> Answer:
    """Answer one question; None when the rewrite that asked does not apply."""
    return QUESTIONS[kind](a, b, c, d)
