"""The package's layers, held against the code: what sits at the top of `omnikv/`, and which layer
may import which (a layer imports only from itself and the layers below it). docs/internals.md
draws the same picture."""

import ast
from pathlib import Path

import omnikv

ROOT = Path(omnikv.__file__).parent

# Bottom to top. A module of one layer may import from its own layer and any layer listed earlier.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("errors", "budget", "config")),
    ("hf", ("hf",)),  # transformers seams
    ("offload", ("offload",)),  # the Context Bank and the transfers
    ("algorithm", ("algorithm",)),  # OmniKV: roles, selection, filter / sparse layers, the cache
    ("methods", ("methods", "models")),  # the KV methods; model loading (imports only base)
    ("decoding", ("decoding",)),  # Session, generate, stops, fork
    ("applications", ("bench", "eval", "server")),
    ("analysis", ("analysis",)),  # uses eval's inputs
    ("cli", ("cli",)),
    ("entry", ("__init__", "__main__")),
]
RANK = {top: i for i, (_, tops) in enumerate(LAYERS) for top in tops}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _may_import(own: str, other: str) -> bool:
    """A folder may import itself, any lower layer, and (base modules only) its own layer's others:
    the folders that share a layer (bench / eval / server) stay independent of each other."""
    if other == own:
        return True
    if other not in RANK:
        return False
    return RANK[other] < RANK[own] or (RANK[other] == RANK[own] and LAYERS[RANK[own]][0] == "base")


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "omnikv":
            if node.module == "omnikv":
                found += [f"omnikv.{a.name}" for a in node.names]
            else:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "omnikv"]
    return found


def test_the_top_level_holds_entry_modules_and_layer_folders():
    files = sorted(p.name for p in ROOT.iterdir() if p.suffix == ".py")
    folders = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert files == ["__init__.py", "__main__.py", "budget.py", "config.py", "errors.py"]
    assert set(folders) == {t for _, tops in LAYERS for t in tops if t not in ("errors", "budget", "config", "__init__", "__main__")}


def test_every_module_imports_only_its_own_layer_and_the_layers_below():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        own = _top(module)
        assert own in RANK, f"{module}: its folder is in no layer of LAYERS; add it there and to docs/internals.md"
        for imported in _imports(path):
            if not _may_import(own, _top(imported)):
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "imports that run up or across layers:\n" + "\n".join(wrong)
