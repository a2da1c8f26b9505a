"""docs/architecture.md names real code: every ``file.py:function`` in it exists."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
REFERENCE = re.compile(r"([\w/]+\.py):([A-Za-z_][\w.]*)")


def defined_names(path: Path) -> set[str]:
    """Top-level functions and classes of ``path``, and ``Class.method`` for their methods."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{item.name}" for item in node.body
                      if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def source(relative: str) -> Path:
    top = relative.split("/")[0]
    return ROOT / relative if top in ("hydra_plugins", "tests", "benchmarks") else ROOT / "fedcore_adapter" / relative


def test_the_map_names_the_run_building_path():
    text = DOC.read_text()
    for hop in ("cli.py:main", "building.py:resolve_setup", "building.py:build_run", "engine.py:run"):
        assert hop in text


def test_every_file_and_function_named_in_the_architecture_map_exists():
    references = REFERENCE.findall(DOC.read_text())
    assert len(references) > 30
    missing = [f"{file}:{name}" for file, name in references
               if not source(file).is_file() or name not in defined_names(source(file))]
    assert missing == []
