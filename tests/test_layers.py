"""The layering rule of docs/architecture.md, checked on the source: every `chibichat` import (module level
or inside a function) points to the same layer or a lower one, and no two modules import each other through
a cycle. The layer table below is the one the document shows; a test also checks the two agree."""

from __future__ import annotations

import ast
import itertools
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "chibichat"

# Lowest first. A module belongs to the first entry whose prefix matches its dotted name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("common", ("common", "")),
    ("tokenizer", ("tokenizer", "render")),
    ("data", ("data",)),
    ("model", ("model",)),
    ("training", ("train",)),
    ("tools", ("sandbox", "tools")),
    ("metrics", ("eval.metrics",)),
    ("tasks", ("tasks",)),
    ("inference", ("engine",)),
    ("evaluation", ("eval",)),
    ("export", ("export",)),
    ("serve", ("serve",)),
    ("bench", ("bench",)),
    ("stages", ("stages",)),
    ("cli", ("cli", "__main__")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix and module.startswith(prefix + ".")):
                return rank
    raise AssertionError(f"module chibichat.{module} is in no layer of docs/architecture.md: add it there and here")


def imports_of(path: Path) -> set[str]:
    """chibichat modules that `path` imports, as names relative to the package ('' = the package itself)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "chibichat":
            names.append(node.module)
            # `from chibichat.pkg import mod` imports a module when mod is a file of pkg.
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == "chibichat"]
        for name in names:
            rel = name.split(".", 1)[1] if "." in name else ""
            target = PKG.joinpath(*rel.split(".")) if rel else PKG
            if target.with_suffix(".py").exists() or (target / "__init__.py").exists():
                found.add(rel)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in sorted(PKG.rglob("*.py"))}


def test_imports_point_to_the_same_or_a_lower_layer():
    upward = []
    for mod, targets in graph().items():
        for t in sorted(targets):
            if layer_of(t) > layer_of(mod):
                upward.append(f"chibichat.{mod} ({LAYERS[layer_of(mod)][0]}) imports chibichat.{t} "
                              f"({LAYERS[layer_of(t)][0]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state and m != "":
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_layer_table_matches_docs():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    documented = [line.split()[0] for line in block.strip().splitlines() if line.strip()]
    # The document lists the highest layer first.
    assert documented == [name for name, _ in reversed(LAYERS)]



def architecture_paths(text: str) -> set[str]:
    """Repository paths docs/architecture.md names: `chibichat/...`, `dev/...`, `scripts/...`, `tests/...` (a path
    like `tasks/x.py` is under chibichat/), `{a,b}` expanded; in a heading, a bare `x.py` is in the folder of the
    path before it. Placeholders (`<name>`, `*`, NNN) are not paths."""
    def expand(p):
        parts = re.split(r"\{([^}]*)\}", p)
        options = [[s] if i % 2 == 0 else s.split(",") for i, s in enumerate(parts)]
        return ["".join(c) for c in itertools.product(*options)]

    out = set()
    for m in re.finditer(r"(?<![\w/.<-])((?:[\w{},]+/)+[\w{},-]+\.(?:py|md|sh|jsonl))\b", text):
        for p in expand(m.group(1)):
            out.add(p if p.split("/")[0] in ("chibichat", "dev", "scripts", "tests", "docs") else "chibichat/" + p)
    for heading in re.findall(r"^## .*$", text, re.M):
        folder = None
        for tok in re.findall(r"`([^`]+)`", heading):
            if "/" in tok:
                full = expand(tok if tok.startswith(("chibichat/", "dev/")) else "chibichat/" + tok)[0]
                folder = full.rsplit("/", 1)[0]
            elif tok.endswith(".py") and folder:
                out.add(f"{folder}/{tok}")
    return out


def test_every_file_the_architecture_names_exists():
    paths = architecture_paths((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    assert {"chibichat/data/download.py", "chibichat/model/slc2.py", "chibichat/eval/jglue.py",
            "chibichat/tasks/word_problems.py", "dev/build_corpora.py"} <= paths
    assert sorted(p for p in paths if not (ROOT / p).exists()) == []
    # a bare name in a heading resolves to the folder before it
    assert architecture_paths("## Corpora (`chibichat/data/corpora.py`, `build.py`)") == {
        "chibichat/data/corpora.py", "chibichat/data/build.py"}

def test_the_checks_are_not_vacuous(monkeypatch):
    """An upward import and a cycle planted in a copy of the graph are reported."""
    real = graph()
    planted = {m: set(t) for m, t in real.items()}
    planted["model.gpt"].add("stages.sft")
    planted["stages.sft"].add("model.gpt")
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: planted)
    with pytest.raises(AssertionError, match="chibichat.model.gpt \\(model\\) imports chibichat.stages.sft"):
        test_imports_point_to_the_same_or_a_lower_layer()
    with pytest.raises(AssertionError, match="model.gpt -> stages.sft"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("nowhere_module_xyz")


def test_every_source_file_compiles_without_warnings():
    """An invalid escape in a string ("\\d" in a docstring) is a SyntaxWarning today and an error in a later
    Python; every file of the package and of the tests compiles with warnings as errors."""
    import warnings

    files = sorted(PKG.rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py"))
    assert len(files) > 100
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(path.read_text(encoding="utf-8"), str(path), "exec")
