"""The house rules of the layout, checked on the source: imports run one way.

``jit_kernels`` <- ``jit_sampler`` <- ``jit_eval`` (the bench) <- ``benchmarks``. Inside
``jit_sampler`` the loop and its building blocks never import the pipelines, and nothing
imports the bench except the CLI's lazy default-model path (inside a function).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ("config", "schedule", "anchors", "sampler", "report", "distributed")


def _imports(path: pathlib.Path):
    """``(module, top_level)`` of every import in ``path`` (statements and ``importlib.import_module`` of a
    literal name), relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    top_level = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.append((mod, id(node) in top_level))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):  # importlib.import_module("a.b"): inside a call, never top level
            out.append((node.args[0].value, False))
    return out


def _files(package: str):
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package, forbidden", [
    ("jit_kernels", ("jit_sampler", "jit_eval", "benchmarks")),
    ("jit_sampler", ("jit_eval", "benchmarks")),
    ("jit_eval", ("benchmarks",)),
])
def test_imports_run_one_way(package, forbidden):
    bad = []
    for f in _files(package):
        for mod, top in _imports(f):
            if mod and mod.split(".")[0] in forbidden:
                lazy_cli = f.name == "cli.py" and package == "jit_sampler" and mod.startswith("jit_eval") and not top
                if not lazy_cli:
                    bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert not bad, bad


def test_sampler_core_never_imports_a_pipeline():
    bad = [f"{name}.py imports {mod}" for name in CORE
           for mod, _ in _imports(ROOT / "jit_sampler" / f"{name}.py")
           if mod and (mod.startswith("jit_sampler.pipelines") or mod.startswith("diffusers"))]
    assert not bad, bad


def test_the_cli_reaches_the_bench_only_lazily():
    mods = [(mod, top) for mod, top in _imports(ROOT / "jit_sampler" / "cli.py") if mod and mod.startswith("jit_eval")]
    assert mods and not any(top for _, top in mods)

