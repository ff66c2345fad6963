"""The version of the code a stage runs, for its checkpoint key (``dtl_jax.stages.keys``).

``code_version(module)`` is a hash of the code of ``module`` and of every module of the package it imports,
directly or not (``import`` statements read with ``ast``, function-level ones included). Code, not text:
each module's syntax tree with its docstrings removed, so comments, formatting and docstrings (a citation,
a reworded explanation) change nothing, while any change to what runs changes the version and so re-runs
the stage in a workdir made before it. Modules that only keep or show results (``BOOKKEEPING``) do
not count.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from pathlib import Path

PACKAGE = "dtl_jax"


@functools.lru_cache(maxsize=1)
def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name), from its source folder."""
    root = Path(importlib.util.find_spec(PACKAGE).origin).parent
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def source(module: str) -> str:
    """The source text of a package module."""
    return package_modules()[module].read_text()


def imports(module: str) -> set[str]:
    """The package modules ``module`` imports (``from a.b import c`` counts ``a.b.c`` if that is a module)."""
    return set(_imports(module, source(module)))


@functools.cache
def _imports(module: str, text: str) -> frozenset[str]:
    known = package_modules()
    path = known[module]
    tree = ast.parse(text, str(path))
    anchor = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                start = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*start, base] if base else start)
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        out |= {target for name in names if (target := _resolve(name, known)) not in (None, module)}
    return frozenset(out)


# Modules that decide where and how results are kept or shown, not what they are: left out of a stage's
# code version (with what only they import), so that bookkeeping changes do not re-run stages. A config
# field's value is in the stage key itself (``dtl_jax.stages.keys.STAGE_FIELDS``).
BOOKKEEPING = frozenset({
    "dtl_jax", "dtl_jax.config", "dtl_jax.errors", "dtl_jax.workdir", "dtl_jax.code_version",
    "dtl_jax.checkpoint", "dtl_jax.train.checkpointed", "dtl_jax.train.compiled", "dtl_jax.train.metrics",
    "dtl_jax.stages.keys", "dtl_jax.data.prepare",
})  # fmt: skip


def closure(module: str) -> list[str]:
    """``module`` and every package module it imports, directly or not, sorted (``BOOKKEEPING`` left out)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen and name not in BOOKKEEPING:
            seen.add(name)
            todo.extend(imports(name))
    return sorted(seen)


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def module_code(module: str) -> str:
    """The code of one module: its syntax tree without docstrings, dumped (no line numbers)."""
    return _code(source(module))


@functools.cache
def _code(text: str) -> str:
    return ast.dump(_without_docstrings(ast.parse(text)))


@functools.cache
def code_version(module: str) -> str:
    """A short hash of the code of ``module`` and of everything of the package it imports."""
    digest = hashlib.sha256()
    for name in closure(module):
        digest.update(name.encode() + b"\0" + module_code(name).encode() + b"\0")
    return digest.hexdigest()[:12]
