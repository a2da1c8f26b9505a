"""The package's import map: no module imports, even inside a function, a module that imports it back."""
import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "fedcore_adapter"


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
