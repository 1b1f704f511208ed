"""The code's structure: no import cycles in the package, function-local imports only where listed (with the reason),
files under 500 lines, no ``sys.path`` edits, and the modules that must start without megatron do.

The import graph is read from the source (``ast``): module-level imports and imports inside functions, without the
``if TYPE_CHECKING:`` ones; ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, and importing
``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__`` (edges to the target's packages, except the importer's own).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = "kvpo_megatron"

LIGHT = ("kvpo_megatron.checkpoint.convert", "kvpo_megatron.checkpoint.formats", "kvpo_megatron.kvpo.memory_model",
         "kvpo_megatron.benchmarks.memory")
"""Modules the CLIs ``tools/convert_checkpoint.py`` and ``tools/memory_model.py`` import before parsing arguments:
they start without megatron, peft or transformers (``--help``, argument and input errors in a few seconds)."""

LOCAL_IMPORTS = {  # (importing module, imported module) -> why the import is inside a function
    ("kvpo_megatron.checkpoint.architecture", "kvpo_megatron.model.config"): "megatron's TransformerConfig, once an "
    "architecture is resolved: the converter CLI starts without megatron (LIGHT)",
    ("kvpo_megatron.checkpoint.convert", "kvpo_megatron.model"): "the model stack (megatron), once the converter "
    "works (LIGHT)",
    ("kvpo_megatron.checkpoint.convert", "kvpo_megatron.model.specs"): "the same",
    ("kvpo_megatron.checkpoint.convert", "kvpo_megatron.lora"): "peft + megatron, once an adapter is exported (LIGHT)",
    ("kvpo_megatron.checkpoint.convert", "kvpo_megatron.checkpoint.training_adapter"): "the same (it loads a "
    "training checkpoint's LoRA through lora)",
    ("kvpo_megatron.kvpo.memory_model", "kvpo_megatron.model.config"): "the presets' sizes; tools/memory_model.py "
    "answers without megatron (LIGHT)",
    ("kvpo_megatron.kvpo.memory_model", "kvpo_megatron.kvpo.replay"): "the replay's activation estimate; the same",
    ("kvpo_megatron.kvpo.branch_schedule", "kvpo_megatron.kvpo.types"): "the typed hand-offs (KV cache, megatron) "
    "only where a branch is received: the schedule's counts stay light for memory_model (LIGHT)",
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted((ROOT / PKG).rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _targets(node, module: str, is_pkg: bool, mods: dict) -> tuple[set[str], set[str]]:
    """(package modules an import statement names, the ones it runs: those and their packages, not the importer's
    own packages)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".")[: None if is_pkg else -1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    named, out = set(), set()
    for name in names:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        if name not in mods or name == module:
            continue
        named.add(name)
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            pkg = ".".join(parts[:i])
            if pkg in mods and pkg != module and not module.startswith(pkg + "."):
                out.add(pkg)
    return named, out


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], list[int]]]:
    """(module -> imported package modules, {(module, target): lines of its function-local imports})."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    local: dict[tuple[str, str], list[int]] = {}
    for m, f in mods.items():
        tree = ast.parse(f.read_text())
        guarded = {id(n) for g in ast.walk(tree) if isinstance(g, ast.If) and "TYPE_CHECKING" in ast.unparse(g.test)
                   for n in ast.walk(g)}

        def visit(node, in_function: bool):
            for ch in ast.iter_child_nodes(node):
                if isinstance(ch, (ast.Import, ast.ImportFrom)) and id(ch) not in guarded:
                    named, runs = _targets(ch, m, f.name == "__init__.py", mods)
                    edges[m] |= runs
                    for t in named if in_function else ():
                        local.setdefault((m, t), []).append(ch.lineno)
                visit(ch, in_function or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)))

        visit(tree, False)
    return edges, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_the_checker_sees_cycles_and_local_imports():
    """The checker itself: a planted cycle is found, and so is a function-local import."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    edges, local = import_graph()
    assert "kvpo_megatron.model.causal_wan" in edges["kvpo_megatron.model.build"]
    assert "kvpo_megatron.model" in edges["kvpo_megatron.checkpoint.convert"]  # local, and seen
    assert ("kvpo_megatron.checkpoint.convert", "kvpo_megatron.model") in local


def test_no_import_cycles():
    edges, _ = import_graph()
    assert cycles(edges) == []


def test_function_local_imports_are_the_listed_ones():
    """Every function-local import of a package module is listed with its reason, and every listed one exists."""
    _, local = import_graph()
    unlisted = {k: v for k, v in local.items() if k not in LOCAL_IMPORTS}
    assert not unlisted, f"function-local package imports without a reason in LOCAL_IMPORTS: {unlisted}"
    stale = sorted(set(LOCAL_IMPORTS) - set(local))
    assert not stale, f"LOCAL_IMPORTS lists imports that no longer exist: {stale}"


def test_light_modules_start_without_megatron():
    """The reason of every LOCAL_IMPORTS entry: these modules import without megatron, peft and transformers."""
    code = ("import sys\n" + "".join(f"import {m}\n" for m in LIGHT) +
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'megatron', 'peft', 'transformers', 'diffusers'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def _python_files():
    for top in (PKG, "tests", "tools", "examples"):
        yield from sorted((ROOT / top).rglob("*.py"))


def test_files_are_under_500_lines():
    long = {str(f.relative_to(ROOT)): n for f in _python_files() if (n := len(f.read_text().splitlines())) >= 500}
    assert not long, long


def test_no_sys_path_edits():
    """Tools, examples and tests import the installed package (and tests' helpers as ``tests.*``); nothing edits
    ``sys.path`` to reach another folder's files."""
    edits = [str(f.relative_to(ROOT)) for f in _python_files() if f != Path(__file__)
             and "sys.path." in f.read_text()]
    assert not edits, edits


def test_tests_mirror_the_package():
    """A test lives in ``tests/<package folder>/`` beside the code it checks (tests of top-level modules such as
    ``lora.py`` or ``cli.py`` in ``tests/``); every test folder is a package folder."""
    folders = {f.parent.relative_to(ROOT / "tests") for f in (ROOT / "tests").rglob("test_*.py")}
    strays = sorted(str(d) for d in folders if d != Path(".") and not (ROOT / PKG / d).is_dir())
    assert not strays, f"test folders with no package folder of the same name: {strays}"
    assert len(folders) > 5  # the layout is used, not only the top folder


def test_readme_layout_names_the_tree():
    """The README's Layout block names every package folder, top-level module and tool (globs such as
    ``bench_*.py`` count), and every ``name/`` or ``name.py`` it names exists."""
    import fnmatch
    import re

    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout\n\n```\n", 1)[1].split("```", 1)[0]
    words = set(re.findall(r"[\w*]+(?:\.py|\.sh|\.md|/)", block))
    globs = {w for w in words if "*" in w}
    named = lambda name: name in words or any(fnmatch.fnmatch(name, g) for g in globs)  # noqa: E731
    tree = [f"{p.name}/" if p.is_dir() else p.name for p in (ROOT / PKG).iterdir()
            if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")]
    tree += [p.name for p in (ROOT / "tools").iterdir() if p.is_file()]
    missing = sorted(n for n in tree if not named(n))
    assert not missing, f"README Layout does not name: {missing}"
    places = [ROOT, ROOT / PKG, ROOT / "tools", ROOT / "examples", ROOT / "docs", ROOT / "tests"]
    entries = {w for w in words - globs if not w.endswith("/")} | set(re.findall(r"^ {0,2}(\w+/)", block, re.M))
    stale = sorted(w for w in entries if not any((d / w.rstrip("/")).exists() for d in places))
    assert not stale, f"README Layout names what does not exist: {stale}"
