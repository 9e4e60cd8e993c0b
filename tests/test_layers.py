"""Imports point down the layers: the spec <- files and formats <- backends <- applications.

Each module's layer comes from where it lives (vitspec/__init__.py says which folder is which);
every import of a project module, at any depth of the code, must name a layer at or below the
importer's. Entry points are the applications' wherever they live: a module that only runs under
`if __name__ == "__main__"` (`python -m vitspec.convert`, `python -m backends.torch_vit.train`)
imports the application layer from inside that block, and nowhere else.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC, FORMATS, BACKENDS, APPS = 0, 1, 2, 3
NAMES = {SPEC: "the spec", FORMATS: "files and formats", BACKENDS: "backends", APPS: "applications"}
# `python -m` entry points that live in a lower folder; their import is the command they run.
ENTRY_POINTS = {"vitspec/convert.py", "vitspec/evaluate.py", "vitspec/datasets.py"}
# The one upward name the package's face offers: `vitspec.convert`, an application (its --check runs
# a backend), imported on first use by a module __getattr__ so `import vitspec` stays framework-free.
LAZY_EXPORTS = {
    ("vitspec/__init__.py", "vitspec.app.convert"),
    ("vitspec/__init__.py", "vitspec.app.convert.convert"),
}


def layer_of_module(name: str) -> int | None:
    """Layer of a dotted module name of this project, None for anything else."""
    parts = name.split(".")
    if parts[0] == "vitspec":
        if (
            len(parts) > 1
            and parts[1] == "app"
            or name in ("vitspec.convert", "vitspec.evaluate", "vitspec.datasets", "vitspec.__main__")
        ):
            return APPS
        if len(parts) > 1 and parts[1] == "formats":
            return FORMATS
        return SPEC
    if parts[0] == "backends":
        return BACKENDS
    if parts[0] in ("bench", "tests", "parity_tests"):
        return APPS
    return None


def layer_of_file(path: Path) -> int:
    relative = path.relative_to(ROOT).as_posix()
    if relative == "vitspec/__init__.py":
        return FORMATS  # the package's face: the spec and the formats (`convert` is looked up lazily)
    if relative in ENTRY_POINTS or path.name == "__main__.py":
        return APPS
    return layer_of_module(relative.removesuffix(".py").removesuffix("/__init__").replace("/", "."))


def _is_main_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def imports(tree: ast.AST, under_main: bool = False):
    """(imported module, line, whether under `if __name__ == ...`) for every import in the tree."""
    for node in ast.iter_child_nodes(tree):
        guarded = under_main or _is_main_guard(node)
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, guarded
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno, guarded
            for alias in node.names:  # `from vitspec.app import training` imports vitspec.app.training
                yield f"{node.module}.{alias.name}", node.lineno, guarded
        yield from imports(node, guarded)


def project_files() -> list[Path]:
    return sorted(p for folder in ("vitspec", "backends", "bench") for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", project_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_point_down(path):
    own = layer_of_file(path)
    upward = []
    for module, line, under_main in imports(ast.parse(path.read_text())):
        target = layer_of_module(module)
        if target is None or target <= own or (under_main and target == APPS):
            continue
        if (path.relative_to(ROOT).as_posix(), module) in LAZY_EXPORTS:
            continue
        upward.append(f"line {line}: {module} ({NAMES[target]})")
    assert not upward, f"{path.relative_to(ROOT)} is in {NAMES[own]} but imports upward: {upward}"


def test_the_rule_catches_an_upward_import(tmp_path):
    # A spec module that imports a backend must fail (so the test above can fail).
    tree = ast.parse("def f():\n    from backends.torch_vit import VisionTransformer\n")
    found = [(layer_of_module(m), g) for m, _, g in imports(tree)]
    assert (BACKENDS, False) in found and BACKENDS > SPEC
