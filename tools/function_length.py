"""Refuse functions of 60 lines or more: past that a function no longer reads at once.

Usage: python tools/function_length.py DIR [DIR ...]; exits 1 and lists the offenders.
"""

import ast
import sys
from pathlib import Path

LIMIT = 60


def long_functions(root: Path) -> list[tuple[int, str]]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines >= LIMIT:
                    found.append((lines, f"{path}:{node.lineno} {node.name}"))
    return found


def main(roots: list[str]) -> int:
    found = sorted((f for root in roots for f in long_functions(Path(root))), reverse=True)
    for lines, where in found:
        print(f"{where}: {lines} lines (limit {LIMIT - 1})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
