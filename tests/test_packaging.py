"""A built wheel ships the rule files and loads them by name without the source tree."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "eqsat_attn", "rules")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build a wheel from a copy of the source tree (no build artifacts left in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.exists():
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(4, "--no-build-isolation")  # offline-friendly when the build backend is here
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"wheel build failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("eqsat_attn-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_rule_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "eqsat_attn/rules/__init__.py",
        "eqsat_attn/rules/transpose.py",
        "eqsat_attn/rules/canonical.py",
        "eqsat_attn/egraph/rulesets.py",
        "eqsat_attn/egraph/index_math.py",
        "eqsat_attn/cost/model.py",
    ):
        assert required in names, f"{required} missing from {wheel.name}"


def test_installed_wheel_loads_rules_by_name(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    code = (
        "import eqsat_attn, eqsat_attn.egraph.rulesets as r\n"
        "from eqsat_attn.egraph import resolve\n"
        "print(eqsat_attn.__file__)\n"
        "print(r.rule_file_path('transpose'))\n"
        "print([s.name for s in resolve(['transpose'])])\n"
        "print(sorted(s.name for s in resolve(None)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    module_file, rule_file, named, defaults = proc.stdout.strip().splitlines()[-4:]
    assert module_file.startswith(str(site)), f"imported {module_file}, not the wheel's copy"
    assert rule_file.startswith(str(site))
    assert named == "['transpose']"
    assert "'canonical'" in defaults and "'transpose'" in defaults
