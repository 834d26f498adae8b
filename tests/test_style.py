"""Code-shape rules the project keeps: no function in the library packages over 60 lines."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "models", "data", "dynconv")
MAX_LINES = 60


def _functions():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1


def test_no_function_in_the_packages_is_longer_than_60_lines():
    found = dict(_functions())
    assert len(found) > 100  # the walk sees the packages
    long = {name: n for name, n in found.items() if n > MAX_LINES}
    assert not long, f"split these into smaller functions: {long}"
