"""Optimized programs on disk, shared by processes (as jax's persistent compilation cache).

An entry is one JSON file named by a sha256 key over everything the chosen program depends on:

- the captured program: nodes, parameters, types and each constant's bytes (`program_digest`);
- the source text of every rule file the rule sets come from, and of the eqsat_attn package;
- the cost model: its class, name and attributes (a roofline model's whole `DeviceSpec`);
- the options: rules, precision, extractor, limits, backend, reuse_blocks.

Change any of them and the key changes: a stale entry is never found. An entry found is used
only if its format version, its key and the sha256 checksum of its payload match, and the
program it holds has the captured program's input and output types; anything else (a corrupt
or truncated file, another format) is ignored and recomputed, then overwritten. Files are
written to a temporary file in the same directory and moved into place with ``os.replace``,
so concurrent processes never read a partial file.

The format is JSON (constants as base64 bytes), never pickle. An opaque node (a JAX primitive
the rules do not model, kept as a live Python object: an embedding's gather, a cumsum) is keyed
by its primitive, parameters and result types and stored as its position among the captured
program's opaque calls, which the loading process supplies from its own trace; one whose
parameters cannot be named exactly (a function, a jaxpr) keeps its program off the disk.

Off by default (tests and runs stay hermetic). `set_cache_dir`, ``ea.optimize(cache_dir=...)``
or the ``EQSAT_ATTN_CACHE_DIR`` environment variable turn it on (`resolve_cache_dir`).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .egraph import rulesets
from .egraph.rule_cache import library_versions, package_source_digest
from .lower import resolve_attention_kernel
from .ir import ConstValue, Node, OpaqueCall, Params, Program, TensorType
from .pipeline import OptimizeOptions, PipelineResult, default_cost_model

#: Bumped whenever the file layout or the meaning of a field changes.
FORMAT_VERSION = 2  # 2: opaque calls by position, effects
ENV_VAR = "EQSAT_ATTN_CACHE_DIR"

_UNSET: Any = object()
_configured: Any = _UNSET  # set_cache_dir's value: a Path, None (off) or _UNSET (the env var decides)


class Unserializable(TypeError):
    """A program this format cannot hold (an opaque node, a parameter of an unknown type)."""


def set_cache_dir(path: str | os.PathLike[str] | None) -> None:
    """Use ``path`` as this process's disk cache of optimized programs; None turns it off.

    It overrides ``EQSAT_ATTN_CACHE_DIR`` and applies to later optimizations of every decorated
    function without a ``cache_dir`` of its own. The directory is created when first written.
    """
    global _configured
    _configured = None if path is None else checked_cache_dir(path)


def checked_cache_dir(path: Any) -> Path:
    """``path`` as a Path; TypeError unless a string or os.PathLike naming a directory."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"cache_dir must be a directory path (str or os.PathLike), or None to turn the disk "
                        f"cache off, got {path!r}")
    return Path(os.fspath(path)).expanduser()


def resolve_cache_dir(explicit: Path | bool | None = None) -> Path | None:
    """The directory in use: ``explicit`` (a function's ``cache_dir``; False: off), else
    `set_cache_dir`'s, else ``$EQSAT_ATTN_CACHE_DIR``; None when off (the default)."""
    if explicit is False:
        return None
    if isinstance(explicit, Path):
        return explicit
    if _configured is not _UNSET:
        return _configured
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else None


# ---------------------------------------------------------------------------- serialization
def _encode_value(value: Any, digest_only: bool) -> Any:
    """A parameter value as JSON; floats by their bits, tuples and constants tagged."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return {"f": value.hex()}
    if isinstance(value, complex):
        return {"c": [value.real.hex(), value.imag.hex()]}
    if isinstance(value, tuple):
        return {"t": [_encode_value(v, digest_only) for v in value]}
    if type(value) is ConstValue:
        arr = np.ascontiguousarray(value.array)
        data = arr.tobytes()
        body = hashlib.sha256(data).hexdigest() if digest_only else base64.b64encode(data).decode("ascii")
        return {"const": {"dtype": str(arr.dtype), "shape": list(arr.shape), "data": body}}
    raise Unserializable(f"parameter of type {type(value).__name__}")


def _decode_value(data: Any) -> Any:
    if data is None or isinstance(data, (bool, str, int)):
        return data
    if isinstance(data, dict) and len(data) == 1:
        (tag, body), = data.items()
        if tag == "f":
            return float.fromhex(body)
        if tag == "c":
            return complex(float.fromhex(body[0]), float.fromhex(body[1]))
        if tag == "t":
            return tuple(_decode_value(v) for v in body)
        if tag == "const":
            import jax.numpy as jnp

            dtype = jnp.dtype(body["dtype"])
            arr = np.frombuffer(base64.b64decode(body["data"]), dtype=dtype).reshape(tuple(body["shape"]))
            return ConstValue(arr.copy())
    raise ValueError(f"not an encoded parameter: {data!r}")


def opaque_calls(program: Program) -> list[OpaqueCall]:
    """The opaque calls of ``program`` in node order: an entry names each by its position here."""
    return [node.params["call"] for node in program.nodes if node.op == "opaque"]


def _plain(value: Any) -> Any:
    """A parameter of an opaque call as JSON that names it exactly (its primitive's parameters:
    numbers, strings, tuples, enums, dtypes, named tuples and frozen dataclasses of those).
    Anything else (a function, a jaxpr, a sharding) raises `Unserializable`: a digest that could
    miss a difference is never made."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return {"f": value.hex()}
    if isinstance(value, enum.Enum):
        return {"enum": f"{type(value).__module__}.{type(value).__qualname__}.{value.name}"}
    if isinstance(value, np.dtype):
        return {"dtype": str(value)}
    if isinstance(value, np.generic):
        return {"np": [str(value.dtype), value.tobytes().hex()]}
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if isinstance(value, tuple):
        if hasattr(type(value), "_fields"):
            return {"named": kind, "fields": {f: _plain(getattr(value, f)) for f in value._fields}}
        items = [_plain(v) for v in value]
        return {"t": items} if type(value) is tuple else {"tuple": kind, "items": items}
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and type(value).__dataclass_params__.frozen:
        return {"dataclass": kind, "fields": {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    raise Unserializable(f"an opaque call's parameter of type {kind}")


def opaque_digest(call: OpaqueCall) -> dict[str, Any]:
    """What an opaque call computes, as JSON: its primitive, parameters and result types."""
    kind = f"{type(call.primitive).__module__}.{type(call.primitive).__qualname__}"
    return {"primitive": [call.name, kind], "params": {k: _plain(v) for k, v in sorted(call.params.items())},
            "out": [[list(t.shape), t.dtype] for t in call.out_types]}


def program_to_json(program: Program, digest_only: bool = False,
                    calls: list[OpaqueCall] | None = None) -> dict[str, Any]:
    """``program`` as JSON data (constants' bytes as base64, or their sha256 with ``digest_only``).

    An opaque node (a JAX primitive the rules do not model) is written as its `opaque_digest`
    with ``digest_only``, else as its position among ``calls`` (the captured program's
    `opaque_calls`, which the optimized program carries unchanged). Raises `Unserializable`
    for an opaque call outside ``calls`` or whose parameters `_plain` cannot name."""
    nodes = []
    for node in program.nodes:
        if node.op == "opaque":
            call = node.params["call"]
            if digest_only:
                params = {"call": opaque_digest(call)}
            else:
                opaque_digest(call)  # stored only where its digest (the key) names it exactly
                index = next((k for k, c in enumerate(calls or ()) if c is call), None)
                if index is None:
                    raise Unserializable("an opaque call the captured program does not make")
                params = {"call": {"opaque": index}}
            nodes.append([node.op, list(node.inputs), params, None])
            continue
        params = {k: _encode_value(v, digest_only) for k, v in node.params.items()}
        nodes.append([node.op, list(node.inputs), params, [list(node.type.shape), node.type.dtype]])
    return {"nodes": nodes, "inputs": list(program.inputs), "outputs": list(program.outputs),
            "effects": list(program.effects)}


def program_from_json(data: dict[str, Any], calls: list[OpaqueCall] | None = None) -> Program:
    """The program `program_to_json` wrote; its opaque nodes make ``calls``' calls (by position)."""
    nodes = []
    for op, inputs, params, typ in data["nodes"]:
        if op == "opaque":
            nodes.append(Node(op, tuple(inputs), Params({"call": (calls or [])[params["call"]["opaque"]]})))
            continue
        shape, dtype = typ
        nodes.append(Node(op, tuple(inputs), Params({k: _decode_value(v) for k, v in params.items()}),
                          TensorType(tuple(shape), dtype)))
    return Program(tuple(nodes), tuple(data["inputs"]), tuple(data["outputs"]), tuple(data.get("effects", ())))


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def program_digest(program: Program) -> str:
    """A stable sha256 of ``program`` (nodes, parameters, types, constants' bytes)."""
    return _sha256(_canonical(program_to_json(program, digest_only=True)))


# ---------------------------------------------------------------------------- the key
def rules_digest(options: OptimizeOptions) -> str | None:
    """sha256 over the names and source text of the rule files the options' rule sets come from;
    None when a rule set was not declared in a rule file (its version is unknown).

    A shipped set's file is found by its name (`rulesets.SHIPPED_SETS`) and a path read as it
    is, without building their rules: a process that finds its program on disk never does."""
    names = options.rule_names() or list(rulesets.DEFAULT_RULESETS)
    loaded = {rs.name: path for path, declared in list(rulesets._LOADED.items()) for rs in declared}
    h = hashlib.sha256()
    for name in names:
        if rulesets._is_path(name):
            path = Path(name)
        elif name in rulesets.SHIPPED_SETS and name not in loaded:
            path = rulesets.rule_file_path(rulesets.SHIPPED_SETS[name])
        else:
            path = loaded.get(name)
            if path is None:
                return None
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def cost_model_key(model: Any) -> str:
    """The cost model's class, name, attributes and (outside this package) class source."""
    cls = type(model)
    attrs = repr(sorted(vars(model).items())) if hasattr(model, "__dict__") else repr(model)
    source = ""
    if not cls.__module__.startswith("eqsat_attn."):  # the package's own code is in package_source_digest
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            source = ""
    return _canonical([f"{cls.__module__}.{cls.__qualname__}", str(getattr(model, "name", "")), attrs,
                       _sha256(source)])


def entry_key(program: Program, options: OptimizeOptions) -> str | None:
    """The cache key of optimizing ``program`` with ``options``; None when it cannot be cached
    (an opaque node, or a rule set of unknown origin)."""
    try:
        digest = program_digest(program)
        rules = rules_digest(options)
        model = options.cost_model or default_cost_model(options.backend)
        model_key = cost_model_key(model)
    except Exception:  # noqa: BLE001 - an opaque node, an unreadable rule file: not cached, never an error
        return None
    if rules is None:
        return None
    material = {
        "format": FORMAT_VERSION,
        "program": digest,
        "rules": [options.rule_names(), rules],
        "code": package_source_digest(),
        "cost_model": model_key,
        "options": [options.precision, options.extractor, repr(options.limits), options.backend,
                    bool(options.reuse_blocks)],
        # where the stored program was lowered and checked (a loaded one is not lowered twice)
        "platform": [jax.default_backend(), resolve_attention_kernel(options.backend), library_versions()],
    }
    return _sha256(_canonical(material))


# ---------------------------------------------------------------------------- entries
def entry_path(directory: Path, key: str) -> Path:
    return directory / f"{key}.json"


def load(directory: Path, key: str, captured: Program) -> PipelineResult | None:
    """The stored result for ``key``, or None if absent, corrupt, of another format or version,
    or of a program whose input or output types differ from ``captured``'s."""
    try:
        entry = json.loads(entry_path(directory, key).read_text())
        if entry.get("format") != FORMAT_VERSION or entry.get("key") != key:
            return None
        payload_text = entry["payload"]
        if _sha256(payload_text) != entry["checksum"]:
            return None
        payload = json.loads(payload_text)
        program = program_from_json(payload["program"], opaque_calls(captured))
        if program.input_types != captured.input_types or program.output_types != captured.output_types:
            return None
        return PipelineResult(
            program=program,
            rules_fired={str(k): int(v) for k, v in payload["rules_fired"].items()},
            egraph_nodes=int(payload["egraph_nodes"]),
            saturated=bool(payload["saturated"]),
            cost_before=float.fromhex(payload["cost_before"]),
            cost_after=float.fromhex(payload["cost_after"]),
            warnings=tuple(str(w) for w in payload["warnings"]),
            repeated_blocks=int(payload["repeated_blocks"]),
            attention_notes=tuple(str(n) for n in payload["attention_notes"]),
        )
    except Exception:  # noqa: BLE001 - missing or unreadable entry: optimize again
        return None


def store(directory: Path, key: str, result: PipelineResult, captured: Program) -> None:
    """Write ``result`` (of optimizing ``captured``) under ``key`` atomically (temp file, then
    os.replace). Raises `Unserializable` for a program `program_to_json` cannot write, OSError
    when the directory is unusable."""
    payload = {
        "program": program_to_json(result.program, calls=opaque_calls(captured)),
        "rules_fired": dict(result.rules_fired),
        "egraph_nodes": int(result.egraph_nodes),
        "saturated": bool(result.saturated),
        "cost_before": float(result.cost_before).hex(),
        "cost_after": float(result.cost_after).hex(),
        "warnings": list(result.warnings),
        "repeated_blocks": int(result.repeated_blocks),
        "attention_notes": list(result.attention_notes),
    }
    payload_text = _canonical(payload)
    entry = {"format": FORMAT_VERSION, "key": key, "checksum": _sha256(payload_text), "payload": payload_text}
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_canonical(entry))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, entry_path(directory, key))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
