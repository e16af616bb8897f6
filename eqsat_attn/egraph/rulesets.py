"""Named rule sets: how rule files declare rules and how the optimizer loads them.

A rule file (``rules/transpose.py`` and friends, or any file a user passes by path) creates
`RuleSet` objects and registers *rule families* on them: a function with a one-line
docstring that yields egglog rules. Helpers here build named rules, so a run report counts
matches per family, and split a rule that needs index math into its ask and answer halves.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import os
import sys
import threading
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from egglog import Fact, Ruleset, RewriteOrRule, eq, rule, ruleset, union, unstable_combine_rulesets, var

from egglog.egraph import UnstableCombinedRuleset

from . import rule_cache
from .language import IntVec, Term, answer, ask

# Phases run in this order in every round (EGGLOG_NOTES: raising before analyses before
# the layout rules keeps the big attention pattern from being re-matched every iteration).
PHASES = ("raise", "rewrite")


@dataclass
class RuleFamily:
    name: str
    doc: str
    rules: list[RewriteOrRule]


@dataclass
class RuleSet:
    """A named egglog ruleset built from documented rule families.

    Each rule is an egglog ruleset of its own, and the set's `ruleset` their combination (run
    together, as one ruleset): a run can then combine just the rules that can match a program
    (`egraph.relevance`, `subset`) without registering any rule again."""

    name: str
    doc: str
    phase: str = "rewrite"
    families: list[RuleFamily] = field(default_factory=list)
    _ruleset: UnstableCombinedRuleset | None = None
    _singles: list[Ruleset] | None = None

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"rule set {self.name!r}: phase must be one of {PHASES}")
        REGISTRY.setdefault(self.name, self)

    def family(self, fn: Callable[..., Iterable[RewriteOrRule]]) -> Callable[..., Iterable[RewriteOrRule]]:
        """Register ``fn`` (a generator of rules; its docstring documents the family)."""
        doc = inspect.getdoc(fn)
        if not doc:
            raise ValueError(f"rule family {fn.__name__} in {self.name!r} needs a docstring")
        name = f"{self.name}.{fn.__name__}"
        rules: list[RewriteOrRule] = []
        for k, r in enumerate(fn()):
            rules.append(_with_name(r, f"{name}#{k}"))
        self.families.append(RuleFamily(name, doc.splitlines()[0], rules))
        self._ruleset = self._singles = None
        return fn

    @property
    def rules(self) -> list[RewriteOrRule]:
        """Every rule, family by family."""
        return [r for f in self.families for r in f.rules]

    @property
    def singles(self) -> list[Ruleset]:
        """One egglog ruleset per rule, in `rules`' order."""
        if self._singles is None:
            self._singles = [ruleset(r, name=f"{self.name}~{k}") for k, r in enumerate(self.rules)]
        return self._singles

    @property
    def ruleset(self) -> UnstableCombinedRuleset:
        """All the set's rules, run together."""
        if self._ruleset is None:
            self._ruleset = unstable_combine_rulesets(*self.singles, name=self.name)
        return self._ruleset

    def subset(self, keep: Sequence[bool]) -> UnstableCombinedRuleset | None:
        """The rules where ``keep`` (one flag per rule of `rules`) is true, run together; the
        whole set's `ruleset` when all are, None when none is."""
        if all(keep):
            return self.ruleset
        kept = [single for single, k in zip(self.singles, keep, strict=True) if k]
        if not kept:
            return None
        digest = hashlib.sha1(bytes(int(k) for k in keep)).hexdigest()[:16]
        return unstable_combine_rulesets(*kept, name=f"{self.name}~{digest}")

    def __iter__(self) -> Iterator[RuleFamily]:
        return iter(self.families)


REGISTRY: dict[str, RuleSet] = {}


def _with_name(r: RewriteOrRule, name: str) -> RewriteOrRule:
    """Egglog rules keep their name in reports; ours carry ``set.family#k``."""
    if isinstance(r, _NamedRule):
        return r.build(name)
    raise TypeError(f"{name}: build rules with eqsat_attn.egraph.rulesets.rw/rl/asking, not {type(r).__name__}")


@dataclass
class _NamedRule:
    build: Callable[[str], RewriteOrRule]


def rw(lhs: Term, rhs: Term, *conditions: Fact) -> _NamedRule:
    """``lhs == rhs`` when the conditions hold (a rewrite that keeps both sides)."""

    def build(name: str) -> RewriteOrRule:
        e = var("_e", Term)
        return rule(eq(e).to(lhs), *conditions, name=name).then(union(e).with_(rhs))

    return _NamedRule(build)


def rl(*facts: Fact) -> Callable[..., _NamedRule]:
    """A general rule: ``rl(facts...)(actions...)``."""

    def then(*actions) -> _NamedRule:
        return _NamedRule(lambda name: rule(*facts, name=name).then(*actions))

    return then


def asking(
    lhs: Term,
    conditions: Sequence[Fact],
    kind: str,
    args: tuple[IntVec, IntVec, IntVec, IntVec],
    n_answers: int,
    rhs: Callable[..., Term],
) -> list[_NamedRule]:
    """A rewrite whose right side needs Python index math (see `language`).

    The first rule asks ``kind(*args)`` whenever ``lhs`` matches; the second fires once the
    driver has answered and unions ``lhs`` with ``rhs(*answers)``.
    """
    answers = [var(f"_ans{k}", IntVec) for k in range(n_answers)]
    known = [eq(answer(kind, *args, k)).to(a) for k, a in enumerate(answers)]

    def ask_rule(name: str) -> RewriteOrRule:
        e = var("_e", Term)
        return rule(eq(e).to(lhs), *conditions, name=name + "?").then(ask(kind, *args))

    def use_rule(name: str) -> RewriteOrRule:
        e = var("_e", Term)
        return rule(eq(e).to(lhs), *conditions, *known, name=name).then(union(e).with_(rhs(*answers)))

    return [_NamedRule(ask_rule), _NamedRule(use_rule)]


def rule_file_path(name: str) -> Path:
    """The shipped rule file of a rule-set module name (``transpose`` -> .../rules/transpose.py)."""
    return _shipped_rules_dir() / f"{name}.py"


@functools.cache
def _shipped_rules_dir() -> Path:
    """Where the shipped rule files are, found without importing them (rule files are loaded by
    path, and they import this module): the installed ``eqsat_attn.rules`` package's folder, or
    ``rules/`` of a source tree that is not installed."""
    spec = importlib.util.find_spec("eqsat_attn.rules")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "rules"


class RuleFileError(ValueError):
    """A rule file that cannot be used: it raised while loading, or declares no `RuleSet`."""


class UnknownRuleSet(ValueError, KeyError):
    """A rule-set name that is neither registered nor a path (a KeyError too, for old callers)."""

    __str__ = ValueError.__str__  # KeyError's would quote the message


# Loaded rule files by resolved path. A module is entered here only once it has fully run, and
# loading holds the lock, so threads making their first optimized call at once never see a
# half-executed rule file (which declares no RuleSet yet).
_LOADED: dict[Path, list[RuleSet]] = {}
_LOAD_LOCK = threading.RLock()


def load_rule_file(path: str | Path) -> list[RuleSet]:
    """Execute a rule file and return the rule sets it declares (loaded once per path; thread-safe)."""
    path = Path(path).resolve()
    found = _LOADED.get(path)
    if found is not None:
        return found
    with _LOAD_LOCK:
        found = _LOADED.get(path)
        if found is None:
            found = _execute_rule_file(path)
            _LOADED[path] = found
    return found


def _execute_rule_file(path: Path) -> list[RuleSet]:
    """The rule sets a rule file declares: a shipped file's read from `rule_cache` when stored
    there (else executed, then stored), a user's file executed."""
    if not path.is_file():
        raise FileNotFoundError(f"rule file {path} does not exist; pass a rule-set name or a path to a .py file")
    if path.parent != _shipped_rules_dir().resolve():  # a user's file may read anything when it runs: not cached
        return _run_rule_file(path)[0]
    key = rule_cache.entry_key(path, _shipped_rules_dir())  # None: the cache is off
    cached = None if key is None else rule_cache.load(path, key)
    if cached is not None:
        return [_from_built(built) for built in cached[0]]
    found, module, imported = _run_rule_file(path)
    dependencies = None if key is None else rule_cache.dependencies(module, imported)
    if dependencies is not None:
        rule_cache.store(path, key, [_to_built(rs) for rs in found], dependencies,
                         _import_names(module, imported))
    return found


def _to_built(rs: RuleSet) -> rule_cache.Built:
    return (rs.name, rs.doc, rs.phase, [(f.name, f.doc, list(f.rules)) for f in rs.families])


def _from_built(built: rule_cache.Built) -> RuleSet:
    """A stored rule set, registered as the rule file's declaration registers it."""
    name, doc, phase, families = built
    return RuleSet(name, doc, phase, [RuleFamily(f_name, f_doc, rules) for f_name, f_doc, rules in families])


def _import_names(module: types.ModuleType, imported: list[str]) -> list[str]:
    """The eqsat_attn modules a rule module imported or refers to, imported again on a cache hit
    so that their import-time registrations (``qkv_math``'s index-math questions) happen as they
    would (other libraries' are in the cache key by version)."""
    names = [*imported, *(v.__name__ for v in vars(module).values() if isinstance(v, types.ModuleType))]
    return [n for n in dict.fromkeys(names) if n == "eqsat_attn" or n.startswith("eqsat_attn.")]


def _run_rule_file(path: Path) -> tuple[list[RuleSet], types.ModuleType, list[str]]:
    """Execute a rule file: the rule sets it declares, its module and the modules it imported."""
    module_name = f"eqsat_attn_rules_{hashlib.sha256(str(path).encode()).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RuleFileError(f"rule file {path} cannot be imported as Python; pass a path to a .py file")
    module = importlib.util.module_from_spec(spec)
    before = set(sys.modules)
    sys.modules[module_name] = module  # while it runs (dataclasses look their module up there); under the lock
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise RuleFileError(f"rule file {path} raised while loading: {type(exc).__name__}: {exc}") from exc
    except BaseException:
        del sys.modules[module_name]
        raise
    found = [v for v in vars(module).values() if isinstance(v, RuleSet)]
    if not found:
        del sys.modules[module_name]
        raise RuleFileError(
            f"rule file {path} declares no eqsat_attn RuleSet; create one at module level, e.g. "
            "`mine = RuleSet(\"mine\", \"what it does\")` (eqsat_attn.egraph.rulesets)")
    return found, module, [name for name in list(sys.modules) if name not in before and name != module_name]


SHIPPED_FILES = ("canonical", "transpose", "attention", "fp8", "qkv", "fusion")
DEFAULT_RULESETS = (
    "canonical", "transpose", "attention_raise", "attention_layout", "fp8_attention", "projections", "packed_qkv",
)


def rule_names(names: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """``names`` as a list of strings: one name or path, or a sequence of them; TypeError otherwise."""
    if isinstance(names, (str, os.PathLike)):
        return [os.fspath(names)]
    if not isinstance(names, Sequence) or not all(isinstance(n, (str, os.PathLike)) for n in names):
        raise TypeError(
            f"rules must be a rule-set name, a path to a rule file, or a list of them (e.g. [\"transpose\"]), "
            f"got {names!r}")
    return [os.fspath(n) for n in names]


def resolve(names: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[RuleSet]:
    """Rule sets for names (shipped rule sets, or paths to rule files); None = the defaults.

    A single name or path counts as a list of one (``"transpose"`` is ``["transpose"]``).
    Only the shipped files that declare the named sets are loaded (`SHIPPED_SETS`; building a
    file's rules costs up to 0.9 s on the first call, unless `rule_cache` has them); a name not
    found there loads them all. A set listed without what it reads (`READS_FROM`) gets those
    just before it.
    """
    wanted = list(DEFAULT_RULESETS) if names is None else rule_names(names)
    _load_shipped(name for name in wanted if not _is_path(name))
    return _with_sources(_named_sets(names))


def _with_sources(sets: list[RuleSet]) -> list[RuleSet]:
    """``sets`` with each one's `READS_FROM` sets placed before it where not there already."""
    out: list[RuleSet] = []
    for rs in sets:
        for source in (REGISTRY[name] for name in READS_FROM.get(rs.name, ())):
            if all(source is not other for other in (*sets, *out)):
                out.append(source)
        out.append(rs)
    return out


def _named_sets(names: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[RuleSet]:
    """The rule sets ``names`` names (loaded), in their order."""
    out: list[RuleSet] = []
    if names is None:
        names = [n for n in DEFAULT_RULESETS if n in REGISTRY]
    for name in rule_names(names):
        if _is_path(name):
            out.extend(load_rule_file(name))
        elif name in REGISTRY:
            out.append(REGISTRY[name])
        else:
            known = ", ".join(sorted(REGISTRY))
            raise UnknownRuleSet(f"unknown rule set {name!r}; known rule sets: {known} (or pass a path to a rule file)")
    return out


#: shipped rule sets whose rules read facts another set of the same rule file writes (its relations):
#: that one runs just before it in each round, so the facts are read in the round they are found
READS_FROM = {"attention_grad": ("attention_grad_vjp",)}

#: the shipped rule file (in `SHIPPED_FILES`) that declares each shipped rule set
SHIPPED_SETS = {
    "canonical": "canonical", "transpose": "transpose", "attention_raise": "attention", "attention_grad": "attention",
    "attention_grad_vjp": "attention",
    "attention_value_grad": "attention", "attention_fast_math": "attention",
    "attention_layout": "attention", "fp8_attention": "fp8", "fp8_policy": "fp8", "projections": "qkv",
    "packed_qkv": "qkv", "fusion": "fusion",
}


def _is_path(name: str) -> bool:
    return name.endswith(".py") or "/" in name or os.sep in name


def _load_shipped(names: Iterable[str]) -> None:
    """Load the shipped files declaring ``names``; every shipped file when one of them is not
    registered afterwards (a set `SHIPPED_SETS` does not know, or a misspelt name: its error then
    lists every set)."""
    names = list(names)
    files = {SHIPPED_SETS[n] for n in names if n in SHIPPED_SETS}
    for file in sorted(files, key=SHIPPED_FILES.index):
        if rule_file_path(file).is_file():
            load_rule_file(rule_file_path(file))
    if all(n in REGISTRY for n in names):
        return
    for file in SHIPPED_FILES:
        if rule_file_path(file).is_file():
            load_rule_file(rule_file_path(file))
