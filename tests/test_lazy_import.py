"""`import omnikv.selection` must not import transformers (the vLLM plugin shares the selection code
in a venv whose transformers is older than omnikv's range), while `omnikv.X` still works."""

from __future__ import annotations

import subprocess
import sys

import pytest

import omnikv


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True, text=True, check=True,
    ).stdout
    return set(out.split())


def test_selection_and_config_do_not_import_transformers():
    mods = _modules_after("import omnikv.selection, omnikv.config, omnikv.roles, omnikv.errors")
    assert "omnikv.selection" in mods and "omnikv.config" in mods
    assert "transformers" not in mods


def test_top_level_names_resolve_lazily():
    mods = _modules_after("import omnikv")
    assert "transformers" not in mods and "omnikv.cache" not in mods
    from omnikv.cache import OmniKVCache
    from omnikv.config import OmniKVConfig

    assert omnikv.OmniKVCache is OmniKVCache
    assert omnikv.OmniKVConfig is OmniKVConfig
    assert set(omnikv.__all__) <= set(dir(omnikv))


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        omnikv.NoSuchThing  # noqa: B018
