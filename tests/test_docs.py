"""Every ```python block of README.md and docs/*.md runs, so that the docs cannot drift.

The convention: a ```python block runs here, the blocks of one file in order in one namespace
(a later block may use what an earlier one defined), in a temporary working directory. A block
that cannot run in CI (it needs CUDA, a user's checkpoint path or a live server) is fenced
```python skip and its first line is a comment saying why; this test holds every skip to that.
A file whose runnable blocks load an embedded model (`load_model("gemma3")` / `"smollm2"`) is
marked slow. Shell examples are ```bash and are not run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from omnikv.hf.compat import CACHE_KWARG

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\S*)[ \t]*(.*)$")
_EMBEDDED = re.compile(r"""(load_model\(|EMBEDDED_MODELS\[)\s*["'](gemma3|smollm2)["']""")


def python_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(first line number, info string after the language, code) of every ```python block."""
    blocks, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i].strip())
        if m and m.group(1):
            lang, info, start = m.group(1), m.group(2).strip(), i + 1
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                i += 1
            if lang in ("python", "py", "python3"):
                indent = len(lines[start - 1]) - len(lines[start - 1].lstrip())
                code = "\n".join(line[indent:] for line in lines[start:i])
                blocks.append((start, (info if lang == "python" else f"{lang} {info}").strip(), code))
        i += 1
    return blocks


def _params():
    out = []
    for path in DOCS:
        runnable = [code for _, info, code in python_blocks(path) if info != "skip"]
        if not runnable:
            continue
        marks = [pytest.mark.slow] if any(_EMBEDDED.search(c) for c in runnable) else []
        out.append(pytest.param(path, marks=marks, id=str(path.relative_to(ROOT))))
    return out


def test_fences_follow_the_convention():
    """Only ```python and ```python skip; every skip block starts with a comment saying why."""
    bad = []
    for path in DOCS:
        for line, info, code in python_blocks(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if info not in ("", "skip"):
                bad.append(f"{where}: fence ```{info} (use ```python or ```python skip)")
            elif info == "skip":
                first = code.lstrip("\n").splitlines()[0].strip() if code.strip() else ""
                if not (first.startswith("#") and len(first.lstrip("# ")) >= 10):
                    bad.append(f"{where}: a ```python skip block must open with a comment saying why it cannot run")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", _params())
def test_python_blocks_run(path, tmp_path, monkeypatch, capsys):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs:{path.name}"}
    for line, info, code in python_blocks(path):
        if info == "skip":
            continue
        if CACHE_KWARG != "cache":  # what the docs' comments tell readers on transformers < 5.24
            code = re.sub(r"\bcache=", f"{CACHE_KWARG}=", code)
        try:
            # Padded so that a traceback names the line of the Markdown file.
            exec(compile("\n" * line + code, str(path), "exec"), namespace)
        except Exception as exc:  # name the block, then let pytest show the traceback
            raise AssertionError(f"the ```python block at {path.relative_to(ROOT)}:{line} fails: "
                                 f"{type(exc).__name__}: {exc}") from exc
