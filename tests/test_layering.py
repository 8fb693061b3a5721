"""The dependency rules of STYLE.md, checked by parsing imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPS = ("finance", "medical", "education")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", python_files("core"), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_apps(path: Path) -> None:
    assert not [m for m in imported_modules(path) if m == "apps" or m.startswith("apps.")]


@pytest.mark.parametrize("app", APPS)
def test_an_app_never_imports_another_app(app: str) -> None:
    others = [a for a in APPS if a != app]
    for path in python_files(f"apps/{app}"):
        bad = [m for m in imported_modules(path) if any(m.startswith(f"apps.{o}") for o in others)]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_only_core_defines_nn_modules() -> None:
    offenders = []
    for path in python_files("apps"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(base) for base in node.bases}
                if bases & {"nn.Module", "torch.nn.Module", "Module"}:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert not offenders
