"""Function lengths of the C++/CUDA sources and the Python (Triton) kernels, for the limits of issue 11.

``python tests/function_lengths.py [--over N] [PATH ...]`` prints ``lines  path:line  name`` for every
function (default paths: ``csrc/`` and ``kernels/``), longest first; ``tests/test_function_lengths.py``
asserts the limit. A function's length runs from the first line of its signature to its closing brace (C++,
CUDA) or its last line (Python, decorators excluded). The C++ reading is a brace matcher, not a parser:
it skips comments, string and character literals, and counts as a function every brace block at namespace,
class or ``extern "C"`` level whose header has a parenthesis (lambdas and control blocks nest inside).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPP_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


def _strip_cpp(text: str) -> str:
    """``text`` with comments, literals and preprocessor lines blanked (newlines kept, so line numbers hold)."""
    pattern = re.compile(
        r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|^[ \t]*#(?:[^\n]*\\\n)*[^\n]*', re.S | re.M
    )
    return pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def cpp_functions(path: Path) -> list[tuple[str, int, int]]:
    """``(name, first line, lines)`` of the functions defined in a C++/CUDA file."""
    text = _strip_cpp(path.read_text())
    out = []
    stack: list[tuple[str, int, str]] = []  # (kind, first line, name) per open brace
    header_start = 0  # offset where the current header (text since the last ; { }) begins
    for pos, ch in enumerate(text):
        if ch in ";}":
            if ch == "}" and stack:
                kind, first, name = stack.pop()
                if kind == "function":
                    out.append((name, first, text.count("\n", 0, pos) + 1 - first + 1))
            header_start = pos + 1
        elif ch == "{":
            header = text[header_start:pos]
            kind, name = _classify(header, stack)
            start = header_start + len(header) - len(header.lstrip())
            stack.append((kind, text.count("\n", 0, start) + 1, name))
            header_start = pos + 1
    return out


def _classify(header: str, stack: list[tuple[str, int, str]]) -> tuple[str, str]:
    flat = re.sub(r"__launch_bounds__\s*\([^)]*\)", "", " ".join(header.split()))
    if any(kind in ("function", "block") for kind, _, _ in stack):
        return "block", ""
    if re.match(r"^(namespace\b|extern\s)", flat) or flat == "":
        return "scope", ""
    if "(" not in flat or re.search(r"(^|\s)(struct|class|union|enum)\s+\w+[^(]*$", flat):
        return "scope" if re.search(r"\b(struct|class|union)\b", flat) else "block", ""
    if re.search(r"=\s*$", flat) or re.match(r"^(if|for|while|switch|do)\b", flat):
        return "block", ""
    before = flat.split("(")[0].split()
    name = before[-1] if before else "?"
    return "function", name


def python_functions(path: Path) -> list[tuple[str, int, int]]:
    """``(name, first line, lines)`` of the functions (and methods) of a Python file."""
    tree = ast.parse(path.read_text())
    return [
        (node.name, node.lineno, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def functions(paths: list[Path]) -> list[tuple[int, str, str]]:
    """``(lines, "path:line", name)`` for every function under ``paths``, longest first."""
    rows = []
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if path.suffix in CPP_SUFFIXES:
                found = cpp_functions(path)
            elif path.suffix == ".py":
                found = python_functions(path)
            else:
                continue
            rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            rows += [(n, f"{rel}:{first}", name) for name, first, n in found]
    return sorted(rows, key=lambda r: -r[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[ROOT / "csrc", ROOT / "kernels"])
    parser.add_argument("--over", type=int, default=0, help="list only functions longer than this many lines")
    args = parser.parse_args(argv)
    for n, where, name in functions(args.paths):
        if n > args.over:
            print(f"{n:5d}  {where}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
