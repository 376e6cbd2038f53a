"""The shared steps of the side venvs' setup scripts (scripts/lib/setup_steps.sh), run in bash with
a stand-in for the venv's Python that records the pip commands it is given instead of running them.

`fill_wheelhouse` must leave only wheels for the offline install: on a fresh machine kvpress's
dependency fire (PyPI has only its sdist) reached the install as `fire-0.6.0.tar.gz`, and building it
offline failed for want of `wheel`, so CI=true could not set up its floor venv."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _fill(tmp_path: Path, files: list[str]) -> list[str]:
    """Run fill_wheelhouse over a wheelhouse holding `files`; the pip commands it ran, one a line."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in files:
        (wheels / name).write_bytes(b"")
    calls = tmp_path / "calls"
    fake_py = tmp_path / "python"
    fake_py.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    fake_py.chmod(0o755)
    script = (f'set -euo pipefail; tag=t quiet=0 start=0 py={fake_py} wheels={wheels}; '
              f'source {ROOT}/scripts/lib/setup_steps.sh; fill_wheelhouse "kvpress==0.5.5" torch')
    subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True)
    return calls.read_text().splitlines()


def test_an_sdist_without_its_wheel_is_built_into_one(tmp_path):
    calls = _fill(tmp_path, ["fire-0.6.0.tar.gz", "torch-2.13.0-cp311-cp311-linux_x86_64.whl"])
    assert calls[0].startswith("-m pip download") and calls[0].endswith("kvpress==0.5.5 torch")
    assert len(calls) == 2 and calls[1].startswith("-m pip wheel") and "--no-deps" in calls[1]
    assert calls[1].endswith(str(tmp_path / "wheels" / "fire-0.6.0.tar.gz"))


def test_an_sdist_whose_wheel_is_there_is_not_built_again(tmp_path):
    # A wheel spells the project with underscores and in lower case where its sdist may not.
    calls = _fill(tmp_path, ["PyYAML-6.0.tar.gz", "pyyaml-6.0-cp311-cp311-linux_x86_64.whl",
                             "zope.interface-6.0.zip", "zope_interface-6.0-cp311-cp311-linux_x86_64.whl",
                             "fire-0.6.0.tar.gz", "fire-0.7.0-py3-none-any.whl"])
    built = [c for c in calls if c.startswith("-m pip wheel")]
    assert len(built) == 1 and built[0].endswith("fire-0.6.0.tar.gz"), calls  # 0.7.0's wheel is not 0.6.0's


def test_a_failed_build_stops_the_setup_and_says_which_step(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "fire-0.6.0.tar.gz").write_bytes(b"")
    fake_py = tmp_path / "python"
    fake_py.write_text('#!/usr/bin/env bash\n[[ "$*" == *"pip wheel"* ]] && { echo "no wheel package" >&2; exit 1; }; exit 0\n')
    fake_py.chmod(0o755)
    script = (f'set -euo pipefail; tag="setup(x)" quiet=1 start=0 py={fake_py} wheels={wheels} log={tmp_path}/log; '
              f': > {tmp_path}/log; source {ROOT}/scripts/lib/setup_steps.sh; fill_wheelhouse fire; echo unreachable')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert out.returncode == 1 and "unreachable" not in out.stdout
    assert "setup(x): FAILED:" in out.stderr and "pip wheel" in out.stderr and "no wheel package" in out.stderr
