"""Is the transformers this Python would import inside the range omnikv declares in pyproject.toml?

    python benchmarks/gpu/transformers_range.py pyproject.toml

Prints one line; exit 0 inside, 1 outside (or not installed), 2 when it cannot tell. run.sh uses it
to decide whether to install a carried wheel. The range is read from pyproject.toml, never
written down twice. OMNIKV_GPU_TRANSFORMERS_VERSION pretends a version is installed (tests).
"""

from __future__ import annotations

import os
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def declared_range(pyproject: Path) -> str:
    """The version specifier of transformers in [project].dependencies, e.g. ">=5.20,<5.25"."""
    import tomllib

    deps = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    for dep in deps:
        m = re.match(r"^\s*transformers\s*(\[[^\]]*\])?\s*([^;]*)", dep)
        if m:
            return m.group(2).strip()
    raise LookupError(f"{pyproject} declares no transformers dependency")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: transformers_range.py PYPROJECT_TOML")
        return 2
    try:
        from packaging.specifiers import SpecifierSet

        spec = declared_range(Path(argv[0]))
        installed = os.environ.get("OMNIKV_GPU_TRANSFORMERS_VERSION") or version("transformers")
    except PackageNotFoundError:
        print("transformers is not installed")
        return 1
    except Exception as exc:  # noqa: BLE001 - any failure here means: cannot tell
        print(f"cannot check the transformers version: {type(exc).__name__}: {exc}")
        return 2
    if installed in SpecifierSet(spec):
        print(f"transformers {installed} is inside omnikv's range {spec} (pyproject.toml): using it")
        return 0
    print(f"transformers {installed} is outside omnikv's range {spec} (pyproject.toml)")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
