"""The package tree shows the layers, and imports only go down (README, Architecture)."""

import ast
from pathlib import Path

import coldfusion

PACKAGE = Path(coldfusion.__file__).parent
# entry point > experiments and the service > evaluation (the protocols every experiment scores
# with), contributors (the one contributor that the loop, Flower and the service drive) >
# repository > training, fusion, encodings > tasks, models > io > infra
LAYERS = {"cli": 7, "collab": 6, "multitask": 6, "selection": 6, "merge": 6, "service": 6, "evaluation": 5,
          "contributors": 5, "repository": 4, "training": 3, "fusion": 3, "encodings": 3, "tasks": 2, "models": 2,
          "io": 1, "infra": 0}


def imported_packages(path: Path) -> set[str]:
    """The coldfusion subpackages a module imports (at any depth of its code)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "coldfusion" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_module_lives_in_a_layer():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert loose == []
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert packages == sorted(LAYERS)


def test_imports_only_go_down():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) < 2:
            continue
        mine = parts[0]
        for other in imported_packages(path) & LAYERS.keys():
            if other != mine and LAYERS[other] >= LAYERS[mine]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports coldfusion.{other}")
    assert wrong == []
