"""Which rules can ever match a program: the rest are not run (exact, by construction).

A rule matches only where every table its query reads has rows: a rule over ``exp`` and
``reduce max`` never fires in a program without a softmax, nor after any number of rewrites
unless some rule that can fire creates those terms. `relevant_rules` computes that closure over
*symbols*: a symbol is a table's egglog name with, for the language's op-string constructors
(``Term.unary("exp", x)``, ``Term.reduce("max", ...)``, ``Term.fused2(body, ...)``), the
literal op when the rule or program spells one (``None``: any op). Starting from the symbols
the encoded program writes and those the analysis rules write, a rule is kept once every symbol
its query reads is available, and then what its actions write becomes available; repeat to a
fixed point. A rule left out could not have matched in any iteration, so the e-graph a run
builds, and every count it reports, are those of the full rule sets; only the time to try the
never-matching rules is saved (most of a run for programs without attention, and for a model's
embedding and head).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

from egglog import bindings
from egglog.declarations import CallDecl, Ident, JustTypeRef, LitDecl, RuleDecl, TypedExprDecl, UnboundVarDecl

#: a table's egglog name and its literal op (None: any op, or a table without one)
Symbol = tuple[str, str | None]



def program_symbols(commands: Iterable[Any]) -> set[Symbol]:
    """The symbols egglog commands (an encoding's lets and sets) write."""
    out: set[Symbol] = set()
    for command in commands:
        action = command.action if isinstance(command, bindings.ActionCommand) else command
        if isinstance(action, bindings.Let):
            _expr_symbols(action.rhs, out)
        elif isinstance(action, bindings.Set):
            out.add((action.lhs, _literal(action.args[0]) if action.args else None))
            for arg in action.args:
                _expr_symbols(arg, out)
            _expr_symbols(action.rhs, out)
        elif isinstance(action, bindings.Expr_):
            _expr_symbols(action.expr, out)
    return out


def _expr_symbols(expr: Any, out: set[Symbol]) -> None:
    if isinstance(expr, bindings.Call):
        out.add((expr.name, _literal(expr.args[0]) if expr.args else None))
        for arg in expr.args:
            _expr_symbols(arg, out)


def _literal(expr: Any) -> str | None:
    if isinstance(expr, bindings.Lit) and isinstance(expr.value, bindings.String):
        return expr.value.value
    return None


@dataclasses.dataclass(frozen=True)
class OpVar:
    """A rule's op that is a variable: read, any op; written, the ops the variable matched."""

    name: str


#: a call's op in a rule: a literal string, a variable, or None (neither, or no op)
Op = str | OpVar | None


@dataclasses.dataclass(frozen=True)
class RuleSymbols:
    """What one rule's query reads and its actions write, as (callable reference, op) pairs;
    ``reads`` None where the rule is not a plain `RuleDecl` (it is then always kept)."""

    reads: frozenset[tuple[Any, Op]] | None
    writes: frozenset[tuple[Any, Op]]


def rule_symbols(decl: Any) -> RuleSymbols:
    """The (reference, op) pairs of ``decl``'s query and of its actions."""
    if not isinstance(decl, RuleDecl):
        return RuleSymbols(None, frozenset(_decl_calls(decl)))
    return RuleSymbols(frozenset(_decl_calls(decl.body)), frozenset(_decl_calls(decl.head)))


#: declaration types that never hold a call (type references and names): not walked
_CALL_FREE = frozenset({str, int, float, bool, type(None), Ident, JustTypeRef})
#: each walked dataclass type's field names (``dataclasses.fields`` per item was most of the walk),
#: without the fields of a typed expression's type (``TypedExprDecl.tp``: a `JustTypeRef`)
_FIELDS: dict[type, tuple[str, ...]] = {TypedExprDecl: ("expr",)}


def _fields(kind: type) -> tuple[str, ...]:
    names = _FIELDS.get(kind)
    if names is None:
        names = _FIELDS[kind] = tuple(f.name for f in dataclasses.fields(kind))
    return names


def _decl_calls(node: Any) -> Iterator[tuple[Any, Op]]:
    """Every call in a declaration tree, with its first argument as an `Op`."""
    stack = [node]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in _CALL_FREE:
            continue
        if kind is CallDecl:
            yield item.callable, _op(item.args[0].expr) if item.args else None
            stack.extend(arg.expr for arg in item.args)
        elif kind is tuple or kind is list:
            stack.extend(item)
        elif isinstance(item, CallDecl):
            yield item.callable, _op(item.args[0].expr) if item.args else None
            stack.extend(arg.expr for arg in item.args)
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(getattr(item, name) for name in _fields(kind))


def _op(expr: Any) -> Op:
    if isinstance(expr, LitDecl) and isinstance(expr.value, str):
        return expr.value
    if isinstance(expr, UnboundVarDecl):
        return OpVar(expr.name)
    return None


class SymbolNames:
    """Callable references to egglog table names, read from declarations (no rule need be
    registered: an e-graph with the rule sets' declarations added names every table)."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self._names: dict[Any, str | None] = {}

    def table(self, ref: Any) -> str | None:
        """The egglog table of ``ref``, None for a primitive (vec-of, +, !=: always available)."""
        if ref not in self._names:
            try:
                backed = self.state._callable_is_table_backed(ref)
            except Exception:  # noqa: BLE001 - not a declared callable: a primitive
                backed = False
            self._names[ref] = self.state.callable_ref_to_egg(ref)[0] if backed else None
        return self._names[ref]

    def symbols(self, pairs: Iterable[tuple[Any, Op]]) -> frozenset[tuple[str, Op]]:
        """``pairs`` with each reference as its table; primitives dropped."""
        return frozenset((name, op) for ref, op in pairs if (name := self.table(ref)) is not None)


#: one rule as (reads, writes) over table names; reads None: always kept
Rule = tuple[frozenset[tuple[str, Op]] | None, frozenset[tuple[str, Op]]]


class _Written:
    """The symbols that may have rows: for each table, its ops (None among them: any op)."""

    def __init__(self, symbols: Iterable[Symbol]) -> None:
        self.ops: dict[str, set[str | None]] = {}
        self.add(symbols)

    def add(self, symbols: Iterable[Symbol]) -> bool:
        grew = False
        for name, op in symbols:
            ops = self.ops.setdefault(name, set())
            if op not in ops:
                ops.add(op)
                grew = True
        return grew

    def readable(self, name: str, op: Op) -> bool:
        ops = self.ops.get(name)
        if not ops:
            return False
        return not isinstance(op, str) or op in ops or None in ops

    def written_by(self, rule: Rule) -> set[Symbol]:
        """What ``rule``'s actions write now: a variable op writes the ops its reads matched."""
        reads, writes = rule
        out: set[Symbol] = set()
        for name, op in writes:
            if isinstance(op, OpVar):
                bound = [self.ops.get(n, set()) for n, o in reads or () if o == op]
                out.update((name, o) for ops in bound for o in ops) if bound else out.add((name, None))
            else:
                out.add((name, op))
        return out


def relevant_rules(rules: list[Rule], available: Iterable[Symbol], answered: dict[str, str] | None = None) -> list[bool]:
    """For each rule, whether it can match once ``available`` is written: the closure described
    in the module docstring. ``answered``: tables Python writes with another's ops once that one
    has rows (the driver answers each question of ``ask`` in ``answer``: {ask's name: answer's})."""
    written = _Written(available)
    kept = [reads is None for reads, _ in rules]
    grew = True
    while grew:
        grew = written.add([(answered[name], op) for name in list(written.ops) if name in (answered or {})
                            for op in written.ops[name]])
        for k, rule in enumerate(rules):
            reads = rule[0]
            if not kept[k] and all(written.readable(name, op) for name, op in reads):
                kept[k] = True
            if kept[k]:
                grew = written.add(written.written_by(rule)) or grew
    return kept
