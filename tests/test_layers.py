"""The core (model configs, towers, heads, model, losses, precision, distributed) imports only the core."""

from __future__ import annotations

import ast
from pathlib import Path

import clipcraft

PACKAGE = Path(clipcraft.__file__).parent
CORE = (
    "config",
    "distributed",
    "errors",
    "files",
    "heads",
    "images",
    "losses",
    "model",
    "precision",
    "presets",
    "templates",
    "towers",
    "version",
)
# ClipModel.encode_images / encode_texts are thin doors into the one encoder (imported inside the methods):
# the encoder, one layer up, owns batching, workers and the cache.
# create_model / load dispatch foreign sources (transformers, open_clip) to the interop layer, and save writes
# its model card: also doors opened inside the functions, so the core still imports without them.
KNOWN_EXCEPTIONS = {
    ("model", "clipcraft.encoding"),
    ("model", "clipcraft.interop"),
    ("model", "clipcraft.interop.card"),
}


def _clipcraft_imports(path: Path) -> set[str]:
    """Every clipcraft module ``path`` imports, at the top or inside a function; ``from clipcraft import
    X`` counts as importing the package face ``clipcraft``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "clipcraft")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "clipcraft":
            found.add(node.module)
    return found


def test_core_modules_import_only_core_modules():
    core = {f"clipcraft.{name}" for name in CORE}
    wrong = []
    for name in CORE:
        path = PACKAGE / f"{name}.py"
        if not path.exists():
            continue
        for module in sorted(_clipcraft_imports(path) - core):
            if (name, module) not in KNOWN_EXCEPTIONS:
                wrong.append(f"clipcraft/{name}.py imports {module}")
    assert not wrong, "\n".join(wrong)


def test_the_version_module_matches_pyproject():
    from clipcraft.version import __version__

    pyproject = (PACKAGE.parents[1] / "pyproject.toml").read_text()
    assert f'\nversion = "{__version__}"\n' in pyproject
    assert clipcraft.__version__ == __version__
