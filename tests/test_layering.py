"""The flow goes one way (DESIGN.md): a module imports only mammodg modules of its own layer or below.

Every ``import`` / ``from ... import`` of mammodg in the package is checked, including those inside
functions (the package imports TensorFlow lazily, so most imports are there)."""
import ast
from pathlib import Path

import mammodg

# Layer of each top-level module or subpackage of mammodg, lowest first.
LAYERS = [
    {"config"},  # typed configuration, read by everything
    {"io", "phantom"},  # DICOM, manifests, public datasets; the phantom simulator writes DICOM + manifests
    {"preprocess"},
    {"models", "losses", "metrics", "optimizers", "report"},
    {"records"},
    {"sampling", "augment"},
    {"train", "export", "distributed"},  # export: the SavedModel contract (stages call it); distributed: the trainer's cluster path
    {"stages"},
    {"evaluate", "demo", "cli", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
ROOT = Path(mammodg.__file__).parent


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == "mammodg" else [node.module]
        else:
            continue
        for name in names:
            if name == "mammodg" or not name.startswith("mammodg."):
                continue
            yield node.lineno, name


def test_every_module_has_a_layer():
    units = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")}
    assert units - {"__init__"} <= set(RANK), f"add to LAYERS: {sorted(units - set(RANK) - {'__init__'})}"


def test_imports_point_downward():
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        unit = path.relative_to(ROOT).parts[0].removesuffix(".py")
        if unit == "__init__":
            continue
        for line, name in _imports(path):
            target = _unit(name)
            if target in RANK and RANK[target] > RANK[unit]:
                violations.append(f"{path.relative_to(ROOT.parent)}:{line} ({unit}, layer {RANK[unit]}) imports "
                                  f"{name} (layer {RANK[target]})")
    assert not violations, "imports pointing up the flow:\n" + "\n".join(violations)
