"""Built rule sets on disk: a shipped rule file's egglog rules, built once, reused by later processes.

Executing the shipped rule files builds ~650 egglog rules through egglog-python's expression API
(type inference, literal conversion): ~1.5 s on the first optimization of every process. This
module stores what a rule file built (its rule sets' names, docs, phases and families, each rule
as egglog's declarations) and hands it back to a later process in ~0.15 s.

An entry is found by a sha256 key over everything the rules can depend on: the rule file's path
and bytes, the source of every .py file of eqsat_attn and of the shipped rule folder, the
versions of Python, egglog, jax, jaxlib and numpy, and this format. The entry also records the
version of every other distribution the rule file refers to (checked when read) and the modules
it imported (imported again on a hit, for their side effects, e.g. ``qkv_math`` registering its
index-math questions).
An entry is used only if its magic, key, payload checksum and versions match and its payload
unpickles under an allow-list (egglog's declaration classes only: no other code can run);
anything else is ignored and rebuilt, never an error. Files are written to a temporary file in
the same directory and moved into place with ``os.replace``: concurrent processes never read a
partial file.

On by default, in ``$EQSAT_ATTN_RULE_CACHE_DIR``, else ``$EQSAT_ATTN_CACHE_DIR/rules`` (the
program cache's directory, `eqsat_attn.disk_cache`), else ``$XDG_CACHE_HOME/eqsat_attn/rules``
(``~/.cache/eqsat_attn/rules``). ``EQSAT_ATTN_RULE_CACHE_DIR=off`` (or ``0``, or empty) or
`set_rule_cache_dir(None)` turns it off. Only the shipped rule files are cached: a user's rule
file may read anything when it runs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import io
import json
import os
import pickle
import sys
import tempfile
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from egglog.declarations import CallDecl, ClassDecl, Ident
from egglog.egraph import RewriteOrRule

#: bumped whenever the entry layout or the payload's meaning changes
FORMAT_VERSION = 1
MAGIC = b"eqsat-attn rules\n"
ENV_VAR = "EQSAT_ATTN_RULE_CACHE_DIR"
PROGRAM_CACHE_ENV_VAR = "EQSAT_ATTN_CACHE_DIR"  # eqsat_attn.disk_cache.ENV_VAR (a layer above this one)
OFF_VALUES = ("", "0", "off", "false", "none")
#: entries kept per rule file (other source versions, e.g. other checkouts sharing the cache)
KEEP_PER_FILE = 8

#: a rule family as stored: (name, doc, rules)
Family = tuple[str, str, list[RewriteOrRule]]
#: a rule set as stored: (name, doc, phase, families)
Built = tuple[str, str, str, list[Family]]

_UNSET: Any = object()
_configured: Any = _UNSET  # set_rule_cache_dir's value: a Path, None (off) or _UNSET (the env vars decide)


def set_rule_cache_dir(path: str | os.PathLike[str] | None) -> None:
    """Keep built rule sets in ``path`` (created when first written); None turns the cache off.
    Overrides the environment variables for this process."""
    global _configured
    if path is not None and (not isinstance(path, (str, os.PathLike)) or not os.fspath(path)):
        raise TypeError(f"the rule cache directory must be a path (str or os.PathLike), or None to turn it off, "
                        f"got {path!r}")
    _configured = None if path is None else Path(os.fspath(path)).expanduser()


def rule_cache_dir() -> Path | None:
    """The directory in use (see the module docstring); None when the cache is off."""
    if _configured is not _UNSET:
        return _configured
    own = os.environ.get(ENV_VAR)
    if own is not None:
        return None if own.strip().lower() in OFF_VALUES else Path(own).expanduser()
    programs = os.environ.get(PROGRAM_CACHE_ENV_VAR)
    if programs:
        return Path(programs).expanduser() / "rules"
    try:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:  # no home directory: no default location, the cache is off
        return None
    return Path(base).expanduser() / "eqsat_attn" / "rules"


# ---------------------------------------------------------------------------- the key
def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@functools.cache
def package_source_digest() -> str:
    """sha256 of every .py file of the eqsat_attn package: any change to the optimizer invalidates."""
    return _tree_digest(Path(__file__).resolve().parents[1])


def entry_key(rule_file: Path, shipped_dir: Path) -> str | None:
    """The key of ``rule_file``'s built rule sets (see the module docstring); None when the cache
    is off or a source cannot be read (the rules are then built, not cached)."""
    if rule_cache_dir() is None:
        return None
    try:
        material = [FORMAT_VERSION, str(rule_file), hashlib.sha256(rule_file.read_bytes()).hexdigest(),
                    package_source_digest(), _tree_digest(shipped_dir), sys.version, library_versions()]
    except OSError:
        return None
    return hashlib.sha256(json.dumps(material).encode()).hexdigest()


#: the distributions eqsat_attn's own modules compute with when a rule file runs (egglog builds the
#: rules; language.py derives constants with numpy; jax is imported by the package)
LIBRARIES = ("egglog", "jax", "jaxlib", "numpy")


@functools.cache
def library_versions() -> dict[str, str]:
    versions = {}
    for dist in LIBRARIES:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "absent"
    return versions


def dependencies(module: types.ModuleType, imported: Iterable[str]) -> dict[str, str] | None:
    """The distributions a rule module refers to (its globals' modules, and ``imported``) with
    their versions, besides the standard library and eqsat_attn (whose source is in the key);
    None when one has no known version (the file's rules are then not cached)."""
    try:
        return _dependencies(module, imported)
    except Exception:  # noqa: BLE001 - unreadable package metadata: not cached, never an error
        return None


def _dependencies(module: types.ModuleType, imported: Iterable[str]) -> dict[str, str] | None:
    tops = {name.split(".")[0] for name in imported}
    for value in vars(module).values():
        if isinstance(value, types.ModuleType):
            tops.add(value.__name__.split(".")[0])
        elif isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
            tops.add(str(getattr(value, "__module__", "") or "").split(".")[0])
        else:
            tops.add(type(value).__module__.split(".")[0])
    tops -= {"", "builtins", "__future__", "eqsat_attn", module.__name__.split(".")[0], *sys.stdlib_module_names}
    versions = {}
    for top in sorted(tops):
        dists = [top] if _has_distribution(top) else importlib.metadata.packages_distributions().get(top, [])
        if not dists:
            return None
        versions.update((dist, importlib.metadata.version(dist)) for dist in dists)
    return versions


def _has_distribution(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# ---------------------------------------------------------------------------- pickling
def _live_class_decl(ident: Ident) -> ClassDecl:
    """The declaration of an egglog class in this process (builtins, eqsat_attn's language)."""
    owner = getattr(importlib.import_module(str(ident.module)), ident.name)
    return owner.__egg_decls__._classes[ident]


class _Pickler(pickle.Pickler):
    """egglog's classes by reference to the live declaration (they hold Python methods and
    properties); interned calls rebuilt through their constructor (egglog compares them by
    identity)."""

    def __init__(self, file: io.BytesIO, class_idents: dict[int, Ident]) -> None:
        super().__init__(file, protocol=5)
        self.class_idents = class_idents  # id(ClassDecl) -> its Ident
        self.checked: dict[int, tuple[str, str, str | None]] = {}

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is not ClassDecl:
            return None
        pid = self.checked.get(id(obj))
        if pid is None:
            ident = self.class_idents.get(id(obj))
            if ident is None or _live_class_decl(ident) is not obj:
                raise pickle.PicklingError("an egglog class declared outside an importable module")
            pid = self.checked[id(obj)] = ("class", ident.name, ident.module)
        return pid

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is CallDecl:
            return (CallDecl, (obj.callable, obj.args, obj.bound_tp_params))
        return NotImplemented


_DECLARATION_MODULE = "egglog.declarations"
_ALLOWED = {("egglog.egraph", "RewriteOrRule")}


class _Unpickler(pickle.Unpickler):
    """Only egglog's declaration dataclasses and rules: an entry cannot run other code."""

    def find_class(self, module: str, name: str) -> Any:
        if module == _DECLARATION_MODULE or (module, name) in _ALLOWED:
            cls = getattr(importlib.import_module(module), name, None)
            if isinstance(cls, type) and hasattr(cls, "__dataclass_fields__"):
                return cls
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a rule cache entry")

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.classes: dict[tuple[str, str, str | None], ClassDecl] = {}

    def persistent_load(self, pid: Any) -> Any:
        found = self.classes.get(pid)
        if found is None:
            kind, name, module = pid
            if kind != "class":
                raise pickle.UnpicklingError(f"unknown reference {pid!r}")
            found = self.classes[pid] = _live_class_decl(Ident(name, module))
        return found


def dumps(built: list[Built]) -> bytes:
    """``built`` as bytes; PicklingError when a rule refers to something that cannot be stored."""
    idents = {}
    for _, _, _, families in built:
        for _, _, rules in families:
            for r in rules:
                if type(r) is not RewriteOrRule or r.ruleset is not None:
                    raise pickle.PicklingError(f"not a free-standing egglog rule: {r!r}")
                for ident, decl in r.__egg_decls__._classes.items():
                    idents[id(decl)] = ident
    buffer = io.BytesIO()
    _Pickler(buffer, idents).dump(built)
    return buffer.getvalue()


def loads(data: bytes) -> list[Built]:
    return _Unpickler(io.BytesIO(data)).load()


# ---------------------------------------------------------------------------- entries
def entry_path(directory: Path, rule_file: Path, key: str) -> Path:
    return directory / f"{rule_file.stem}-{key[:40]}.rules"


def load(rule_file: Path, key: str) -> tuple[list[Built], list[str]] | None:
    """(the built rule sets, the modules to import) stored for ``key``; None when off, absent,
    corrupt, of another format, or when a recorded dependency's version changed."""
    directory = rule_cache_dir()
    if directory is None:
        return None
    try:
        data = entry_path(directory, rule_file, key).read_bytes()
        if not data.startswith(MAGIC):
            return None
        header_end = data.index(b"\n", len(MAGIC))
        header = json.loads(data[len(MAGIC):header_end])
        payload = data[header_end + 1:]
        if header.get("format") != FORMAT_VERSION or header.get("key") != key:
            return None
        if hashlib.sha256(payload).hexdigest() != header["checksum"]:
            return None
        for dist, version in header["dependencies"].items():
            if importlib.metadata.version(dist) != version:
                return None
        imports = [str(name) for name in header["imports"]]
        for name in imports:  # their import-time registrations, as executing the file would
            importlib.import_module(name)
        return loads(payload), imports
    except Exception:  # noqa: BLE001 - a missing or unusable entry: build the rules again
        return None


def store(rule_file: Path, key: str, built: list[Built], dependencies: dict[str, str], imports: list[str]) -> bool:
    """Write an entry atomically (temporary file, then ``os.replace``); False when off or not
    possible (a rule that cannot be stored, an unwritable directory): never an error."""
    directory = rule_cache_dir()
    if directory is None:
        return False
    tmp = None
    try:
        payload = dumps(built)
        header = {"format": FORMAT_VERSION, "key": key, "checksum": hashlib.sha256(payload).hexdigest(),
                  "dependencies": dependencies, "imports": imports}
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{rule_file.stem}-", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, entry_path(directory, rule_file, key))
        tmp = None
        _prune(directory, rule_file)
        return True
    except Exception:  # noqa: BLE001 - the cache only saves time
        return False
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _prune(directory: Path, rule_file: Path) -> None:
    """Keep the `KEEP_PER_FILE` newest entries of ``rule_file`` (other source versions' go)."""
    entries = []
    for path in directory.glob(f"{rule_file.stem}-*.rules"):
        try:
            entries.append((path.stat().st_mtime, path))
        except OSError:
            pass
    for _, path in sorted(entries, reverse=True)[KEEP_PER_FILE:]:
        try:
            path.unlink()
        except OSError:
            pass
