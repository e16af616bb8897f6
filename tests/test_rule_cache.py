"""The on-disk cache of built rule sets (eqsat_attn.egraph.rule_cache): a hit gives what executing
the rule file gives, any change to its inputs misses, a bad entry is rebuilt, writes are atomic."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from eqsat_attn.disk_cache import program_digest
from eqsat_attn.egraph import rule_cache, rulesets
from eqsat_attn.egraph.rulesets import RuleSet
from eqsat_attn.capture import capture
from eqsat_attn.examples import attention_vt_example
from eqsat_attn.pipeline import OptimizeOptions, optimize_program

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped sets loaded as the optimizer loads them first; the rule sets these tests build
    register in a copy of the registry, dropped afterwards (other tests see the loaded ones)."""
    rulesets._load_shipped(rulesets.SHIPPED_SETS)
    monkeypatch.setattr(rulesets, "REGISTRY", dict(rulesets.REGISTRY))


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache directory for this test (the process setting restored afterwards)."""
    directory = tmp_path / "rules-cache"
    monkeypatch.setattr(rule_cache, "_configured", directory)
    return directory


@pytest.fixture
def shipped_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped rule folder, used as the shipped folder (its files can be edited)."""
    copy = tmp_path / "rules"
    shutil.copytree(rulesets.rule_file_path("canonical").parent, copy)
    monkeypatch.setattr(rulesets, "_shipped_rules_dir", lambda: copy)
    return copy


def entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.rules"))


def fresh_build(path: Path) -> list[RuleSet]:
    return rulesets._run_rule_file(path)[0]


def must_not_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path):
        raise AssertionError(f"{path} was executed: the cache should have answered")

    monkeypatch.setattr(rulesets, "_run_rule_file", refuse)


def assert_same_rule_sets(got: list[RuleSet], want: list[RuleSet]) -> None:
    assert [(s.name, s.doc, s.phase) for s in got] == [(s.name, s.doc, s.phase) for s in want]
    for a, b in zip(got, want):
        assert [(f.name, f.doc, len(f.rules)) for f in a] == [(f.name, f.doc, len(f.rules)) for f in b]
        for fa, fb in zip(a, b):
            for ra, rb in zip(fa.rules, fb.rules):
                assert ra.decl == rb.decl  # egglog interns calls: equal means the same objects
                assert ra.__egg_decls__._functions == rb.__egg_decls__._functions
                assert ra.__egg_decls__._classes.keys() == rb.__egg_decls__._classes.keys()
                assert all(ra.__egg_decls__._classes[k] is rb.__egg_decls__._classes[k]
                           for k in ra.__egg_decls__._classes)
        assert str(a.ruleset) == str(b.ruleset)


def test_a_hit_gives_what_the_rule_file_builds(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = rulesets.rule_file_path("qkv")  # declares a relation and imports qkv_math for its registrations
    built = rulesets._execute_rule_file(path)
    (entry,) = entries(cache_dir)
    header = json.loads(entry.read_bytes().split(b"\n")[1])
    assert "eqsat_attn.egraph.qkv_math" in header["imports"]
    assert set(header["dependencies"]) == {"egglog"}
    must_not_build(monkeypatch)
    cached = rulesets._execute_rule_file(path)
    assert cached[0] is not built[0]
    assert_same_rule_sets(cached, built)
    assert [r.name for r in cached] == ["projections", "packed_qkv"]


def test_a_hit_registers_the_sets_as_the_file_would(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = rulesets.rule_file_path("canonical")
    rulesets._execute_rule_file(path)
    monkeypatch.setattr(rulesets, "REGISTRY", {})
    must_not_build(monkeypatch)
    (canonical,) = rulesets._execute_rule_file(path)
    assert rulesets.REGISTRY == {"canonical": canonical}


def test_an_edited_input_misses(cache_dir: Path, shipped_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = shipped_copy / "canonical.py"
    key = rule_cache.entry_key(path, shipped_copy)
    rulesets._execute_rule_file(path)
    assert rule_cache.load(path, key) is not None
    path.write_text(path.read_text() + "\n# an edit\n")  # the rule file
    assert rule_cache.entry_key(path, shipped_copy) != key
    (shipped_copy / "helper.py").write_text("X = 1\n")  # another file of the rule folder
    assert rule_cache.entry_key(path, shipped_copy) not in (key, rule_cache.entry_key(path, shipped_copy.parent))
    edited = rule_cache.entry_key(path, shipped_copy)
    monkeypatch.setattr(rule_cache, "package_source_digest", lambda: "another eqsat_attn")  # a package source
    assert rule_cache.entry_key(path, shipped_copy) != edited
    monkeypatch.setattr(rule_cache, "library_versions", lambda: {"egglog": "0.0.0"})  # egglog
    assert len({rule_cache.entry_key(path, shipped_copy), edited, key}) == 3
    built = rulesets._execute_rule_file(path)  # a miss: executed and stored again
    assert_same_rule_sets(built, fresh_build(path))
    assert len(entries(cache_dir)) == 2


def test_a_changed_dependency_version_misses(cache_dir: Path) -> None:
    path = rulesets.rule_file_path("canonical")
    key = rule_cache.entry_key(path, rulesets._shipped_rules_dir())
    rulesets._execute_rule_file(path)
    (entry,) = entries(cache_dir)
    magic, header, payload = entry.read_bytes().split(b"\n", 2)
    stale = json.loads(header)
    stale["dependencies"]["egglog"] = "0.0.0"
    entry.write_bytes(magic + b"\n" + json.dumps(stale).encode() + b"\n" + payload)
    assert rule_cache.load(path, key) is None


def test_other_libraries_are_recorded_by_version(cache_dir: Path, shipped_copy: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule file using numpy records numpy's version; one importing a module of no known
    distribution (a local helper) is not cached: its version cannot be checked."""
    source = rulesets.rule_file_path("canonical").read_text()
    (shipped_copy / "with_numpy.py").write_text(
        source.replace('RuleSet("canonical"', 'RuleSet("with_numpy"') + "\nimport numpy as np\n")
    (tmp_path / "my_rule_helper.py").write_text("SCALE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (shipped_copy / "with_helper.py").write_text(
        source.replace('RuleSet("canonical"', 'RuleSet("with_helper"') + "\nimport my_rule_helper\n")
    try:
        (with_numpy,) = rulesets._execute_rule_file(shipped_copy / "with_numpy.py")
        (with_helper,) = rulesets._execute_rule_file(shipped_copy / "with_helper.py")
    finally:
        sys.modules.pop("my_rule_helper", None)
    assert with_numpy.families and with_helper.families
    (entry,) = entries(cache_dir)
    assert entry.name.startswith("with_numpy-")
    header = json.loads(entry.read_bytes().split(b"\n")[1])
    assert header["dependencies"]["numpy"] == np.__version__


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "garbage", "empty", "other key"])
def test_a_corrupt_entry_is_rebuilt(cache_dir: Path, damage: str) -> None:
    path = rulesets.rule_file_path("canonical")
    key = rule_cache.entry_key(path, rulesets._shipped_rules_dir())
    want = rulesets._execute_rule_file(path)
    (entry,) = entries(cache_dir)
    data = entry.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "flipped byte": data[:-100] + bytes([data[-100] ^ 1]) + data[-99:],
               "garbage": os.urandom(len(data)), "empty": b"",
               "other key": data.replace(key.encode(), b"0" * len(key), 1)}[damage]
    entry.write_bytes(damaged)
    assert rule_cache.load(path, key) is None
    rebuilt = rulesets._execute_rule_file(path)  # no error: built again and stored again
    assert_same_rule_sets(rebuilt, want)
    assert entry.read_bytes() == data
    assert rule_cache.load(path, key) is not None


class _Boom:
    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_an_entry_cannot_run_code(cache_dir: Path, tmp_path: Path) -> None:
    """Only egglog's declaration classes unpickle: an entry naming any other callable is
    rejected, even with a valid checksum and key."""
    path = rulesets.rule_file_path("canonical")
    key = rule_cache.entry_key(path, rulesets._shipped_rules_dir())
    rulesets._execute_rule_file(path)
    (entry,) = entries(cache_dir)
    magic, header, _ = entry.read_bytes().split(b"\n", 2)
    boom = _Boom()
    boom.target = str(tmp_path / "pwned")
    payload = pickle.dumps([boom])
    forged = json.loads(header)
    forged["checksum"] = hashlib.sha256(payload).hexdigest()
    entry.write_bytes(magic + b"\n" + json.dumps(forged).encode() + b"\n" + payload)
    assert rule_cache.load(path, key) is None
    assert not (tmp_path / "pwned").exists()


def test_the_location_is_configurable_and_can_be_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(rule_cache, "_configured", rule_cache._UNSET)
    for var in ("EQSAT_ATTN_RULE_CACHE_DIR", "EQSAT_ATTN_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert rule_cache.rule_cache_dir() == tmp_path / "home" / ".cache" / "eqsat_attn" / "rules"
    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    with monkeypatch.context() as m:
        m.setattr(Path, "home", no_home)
        assert rule_cache.rule_cache_dir() is None  # no default location: off, not an error
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert rule_cache.rule_cache_dir() == tmp_path / "xdg" / "eqsat_attn" / "rules"
    monkeypatch.setenv("EQSAT_ATTN_CACHE_DIR", str(tmp_path / "programs"))
    assert rule_cache.rule_cache_dir() == tmp_path / "programs" / "rules"
    monkeypatch.setenv("EQSAT_ATTN_RULE_CACHE_DIR", str(tmp_path / "mine"))
    assert rule_cache.rule_cache_dir() == tmp_path / "mine"
    for off in ("off", "0", "", "OFF"):
        monkeypatch.setenv("EQSAT_ATTN_RULE_CACHE_DIR", off)
        assert rule_cache.rule_cache_dir() is None
    rule_cache.set_rule_cache_dir(tmp_path / "set")
    assert rule_cache.rule_cache_dir() == tmp_path / "set"
    rule_cache.set_rule_cache_dir(None)
    assert rule_cache.rule_cache_dir() is None
    with pytest.raises(TypeError, match="or None to turn it off"):
        rule_cache.set_rule_cache_dir(3)


def test_off_writes_and_reads_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(rule_cache, "_configured", None)
    path = rulesets.rule_file_path("canonical")
    built = rulesets._execute_rule_file(path)
    assert [s.name for s in built] == ["canonical"]
    assert rule_cache.entry_key(path, rulesets._shipped_rules_dir()) is None
    assert rule_cache.load(path, "0" * 64) is None
    assert not rule_cache.store(path, "k", [], {}, [])


def test_a_user_rule_file_is_not_cached(cache_dir: Path, tmp_path: Path) -> None:
    user = tmp_path / "mine.py"
    user.write_text(rulesets.rule_file_path("canonical").read_text().replace('RuleSet("canonical"', 'RuleSet("mine"'))
    (mine,) = rulesets._execute_rule_file(user)
    assert mine.name == "mine" and mine.families
    assert not cache_dir.exists() or not entries(cache_dir)


def test_an_unwritable_directory_is_not_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(rule_cache, "_configured", blocker / "rules")
    (canonical,) = rulesets._execute_rule_file(rulesets.rule_file_path("canonical"))
    assert canonical.families


_WRITER = """
import sys
from pathlib import Path
from eqsat_attn.egraph import rule_cache, rulesets
rule_cache.set_rule_cache_dir(sys.argv[1])
path = rulesets.rule_file_path("canonical")
key = rule_cache.entry_key(path, rulesets._shipped_rules_dir())
built = [rulesets._to_built(s) for s in rulesets._run_rule_file(path)[0]]
for _ in range(30):
    assert rule_cache.store(path, key, built, {"egglog": rule_cache.library_versions()["egglog"]}, [])
"""


def test_concurrent_writers_leave_a_whole_entry(cache_dir: Path) -> None:
    """Two processes write the same entry over and over while this one reads it: every read
    is absent or whole, and no temporary file is left."""
    path = rulesets.rule_file_path("canonical")
    key = rule_cache.entry_key(path, rulesets._shipped_rules_dir())
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(cache_dir)], cwd=ROOT) for _ in range(2)]
    reads = []
    while any(w.poll() is None for w in writers):
        found = rule_cache.load(path, key)
        reads.append(found)
        assert found is None or found[0][0][0] == "canonical"
        time.sleep(0.02)  # leave the cores to the writers
    assert [w.wait() for w in writers] == [0, 0]
    assert [p.name for p in cache_dir.iterdir()] == [rule_cache.entry_path(cache_dir, path, key).name]
    built, imports = rule_cache.load(path, key)
    assert [name for name, *_ in built] == ["canonical"] and imports == []


def test_store_is_atomic_under_threads(cache_dir: Path) -> None:
    path = rulesets.rule_file_path("canonical")
    key = rule_cache.entry_key(path, rulesets._shipped_rules_dir())
    built = [rulesets._to_built(s) for s in fresh_build(path)]
    errors = []

    def write() -> None:
        for _ in range(20):
            if not rule_cache.store(path, key, built, {"egglog": rule_cache.library_versions()["egglog"]}, []):
                errors.append("store failed")

    def read() -> None:
        for _ in range(40):
            found = rule_cache.load(path, key)
            if found is not None and [name for name, *_ in found[0]] != ["canonical"]:
                errors.append("partial entry read")

    threads = [threading.Thread(target=f) for f in (write, write, read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list(cache_dir.iterdir())) == 1


def test_old_entries_are_pruned(cache_dir: Path) -> None:
    path = rulesets.rule_file_path("canonical")
    built = [rulesets._to_built(s) for s in fresh_build(path)]
    for k in range(rule_cache.KEEP_PER_FILE + 3):
        assert rule_cache.store(path, hashlib.sha256(bytes([k])).hexdigest(), built, {}, [])
    assert len(entries(cache_dir)) == rule_cache.KEEP_PER_FILE


def test_an_optimization_is_the_same_with_rules_from_the_cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default rule sets built by their files, and the same read back from the cache, give
    one optimization: the same program, rules fired, e-graph size and cost."""
    files = sorted({rulesets.SHIPPED_SETS[n] for n in rulesets.DEFAULT_RULESETS}, key=rulesets.SHIPPED_FILES.index)
    paths = [rulesets.rule_file_path(f) for f in files]
    built = {s.name: s for p in paths for s in rulesets._execute_rule_file(p)}  # executed (a miss), stored
    must_not_build(monkeypatch)
    cached = {s.name: s for p in paths for s in rulesets._execute_rule_file(p)}
    assert cached.keys() == built.keys() and all(cached[n] is not built[n] for n in cached)
    fn, args = attention_vt_example(batch=1, heads=2, seq=8, head_dim=4)  # projections feeding attention
    program = capture(fn, *args).program
    options = OptimizeOptions(extractor="tree")  # (saturates; egglog's extractor keeps the test fast)
    results = []
    for sets in (built, cached):
        for name, rs in sets.items():
            monkeypatch.setitem(rulesets.REGISTRY, name, rs)
        results.append(optimize_program(program, options))
    with_files, with_cache = results
    assert {name.split(".")[0] for name in with_files.rules_fired} >= {
        "canonical", "transpose", "attention_raise", "attention_layout", "projections", "packed_qkv"}
    assert with_files.saturated and with_files.program.count("attention") == 1
    assert program_digest(with_cache.program) == program_digest(with_files.program)
    assert with_cache.rules_fired == with_files.rules_fired
    assert with_cache.egraph_nodes == with_files.egraph_nodes
    assert with_cache.cost_after == with_files.cost_after and with_cache.saturated == with_files.saturated
