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

The format is JSON (constants as base64 bytes), never pickle. Programs holding an opaque node
(a JAX primitive the rules do not model, kept as live Python objects) are not cached on disk.

Off by default (tests and runs stay hermetic). `set_cache_dir`, ``ea.optimize(cache_dir=...)``
or the ``EQSAT_ATTN_CACHE_DIR`` environment variable turn it on (`resolve_cache_dir`).
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .egraph import rulesets
from .egraph.rule_cache import package_source_digest
from .ir import ConstValue, Node, Params, Program, TensorType
from .pipeline import OptimizeOptions, PipelineResult, default_cost_model

#: Bumped whenever the file layout or the meaning of a field changes.
FORMAT_VERSION = 1
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


def program_to_json(program: Program, digest_only: bool = False) -> dict[str, Any]:
    """``program`` as JSON data (constants' bytes as base64, or their sha256 with ``digest_only``).

    Raises `Unserializable` for a program with an opaque node."""
    nodes = []
    for node in program.nodes:
        if node.op == "opaque" or node.type is None:
            raise Unserializable(f"op {node.op!r} (opaque JAX calls are not stored on disk)")
        params = {k: _encode_value(v, digest_only) for k, v in node.params.items()}
        nodes.append([node.op, list(node.inputs), params, [list(node.type.shape), node.type.dtype]])
    return {"nodes": nodes, "inputs": list(program.inputs), "outputs": list(program.outputs)}


def program_from_json(data: dict[str, Any]) -> Program:
    nodes = tuple(
        Node(op, tuple(inputs), Params({k: _decode_value(v) for k, v in params.items()}),
             TensorType(tuple(shape), dtype))
        for op, inputs, params, (shape, dtype) in data["nodes"]
    )
    return Program(nodes, tuple(data["inputs"]), tuple(data["outputs"]))


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
    None when a rule set was not declared in a rule file (its version is unknown)."""
    chosen = rulesets.resolve(options.rule_names())
    files = {id(rs): path for path, declared in list(rulesets._LOADED.items()) for rs in declared}
    h = hashlib.sha256()
    for rs in chosen:
        path = files.get(id(rs))
        if path is None:
            return None
        h.update(rs.name.encode() + b"\0" + path.read_bytes() + b"\0")
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
        program = program_from_json(payload["program"])
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


def store(directory: Path, key: str, result: PipelineResult) -> None:
    """Write ``result`` under ``key`` atomically (temp file, then os.replace). Raises
    `Unserializable` for a program with an opaque node, OSError when the directory is unusable."""
    payload = {
        "program": program_to_json(result.program),
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
