"""Nothing in the product is left that nothing calls: every top-level function and class of compress/ and
distill/ is named somewhere besides its own definition (product code, benchmarks, tests, or the entry points in
pyproject.toml), or registered by a decorator."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_top_level_function_and_class_is_used():
    product = [p for d in ("compress", "distill") for p in (ROOT / d).rglob("*.py")]
    corpus = product + list((ROOT / "benchmarks").rglob("*.py")) + list((ROOT / "tests").rglob("*.py"))
    words = Counter(w for p in corpus for w in re.findall(r"[A-Za-z_]\w*", p.read_text()))
    words.update(re.findall(r"[A-Za-z_]\w*", (ROOT / "pyproject.toml").read_text()))
    unused = []
    for path in product:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.decorator_list:
                if words[node.name] < 2:
                    unused.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert unused == [], "defined but never used: " + ", ".join(unused)
