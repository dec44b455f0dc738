"""What may import what: ``models`` never imports ``serving`` (nor ``retrieval``, ``bench``).

Read from the source with ``ast``, so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOT_BELOW_MODELS = ("serving", "retrieval", "bench")


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports are in-package)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_models_imports_nothing_of_serving() -> None:
    sources = sorted((ROOT / "models").rglob("*.py"))
    assert len(sources) > 10  # the walk found the package
    wrong = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in sources
        for name in imported(path)
        if name.split(".")[0] in NOT_BELOW_MODELS
    }
    assert not wrong, sorted(wrong)
