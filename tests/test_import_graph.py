"""The project's import rules, read from the source (ast), so a violation fails here rather
than in review: only vllm_engine/ imports vLLM; shards/ imports none of the other packages;
precompute/ and train/ never import each other; vllm_engine/ imports none of precompute/,
train/, tools/; envs/ (the text-game environments precompute, train and tools all use)
imports none of them; crosstok/ (cross-tokenizer alignment) is a leaf above shards/ that
precompute/, train/ and tools/ may import; and no import cycle joins the project's modules.

Every import counts, lazy ones inside functions included (a cycle through a function-level
import still ties the modules together); only `if TYPE_CHECKING:` blocks are left out.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = (
    "shards",
    "datafiles",
    "crosstok",
    "precompute",
    "train",
    "tools",
    "runtime",
    "vllm_engine",
    "bench",
    "envs",
)
# Tests that test vllm_engine itself against the installed vLLM may import it.
VLLM_TESTS = ("tests/test_vllm_engine.py",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources(folders) -> dict[str, Path]:
    return {module_name(p): p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(path: Path, module: str) -> list[tuple[str, int]]:
    """(dotted name, line) of every import in the file; `from a import b` gives a.b (b may be
    a module or a name in a), relative imports resolved against `module`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found.extend((f"{base}.{a.name}" if base else a.name, node.lineno) for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def project_target(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name lands in (the longest module prefix)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def top(name: str) -> str:
    return name.split(".")[0]


def graph() -> dict[str, set[str]]:
    modules = sources(PACKAGES)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for name, _ in imported(path, mod):
            target = project_target(name, modules)
            if target is not None and target != mod:
                edges[mod].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(out)


def violations(folders, allowed: dict[str, set[str]]) -> list[str]:
    """`file:line imports X` for each import whose top package is not allowed for the
    importing file's top package (allowed: package -> forbidden top-level names)."""
    out = []
    for mod, path in sources(folders).items():
        forbidden = allowed.get(top(mod), set())
        for name, line in imported(path, mod):
            if top(name) in forbidden:
                out.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    return out


def test_only_vllm_engine_imports_vllm():
    found = [
        v
        for v in violations((*PACKAGES, "tests"), {p: {"vllm"} for p in (*PACKAGES, "tests")})
        if not v.startswith("vllm_engine/") and v.split(":")[0] not in VLLM_TESTS
    ]
    assert found == []


def test_layering_rules():
    others = {"precompute", "train", "tools", "runtime", "vllm_engine", "bench", "envs", "crosstok"}
    rules = {
        "shards": others | {"datafiles"},
        # Users' data files in HF/TRL formats, read by precompute, train and tools alike.
        "datafiles": others | {"shards"},
        "precompute": {"train", "tools", "bench"},
        "train": {"precompute", "tools", "bench"},
        "vllm_engine": {"precompute", "train", "tools", "bench"},
        "runtime": {"shards", "precompute", "train", "tools", "vllm_engine", "bench", "envs"},
        # Environments, used by precompute (rollouts), train (on-policy) and tools (eval):
        # below all three, so they never meet through it.
        "envs": {"precompute", "train", "tools", "vllm_engine", "bench", "crosstok"},
        # Cross-tokenizer alignment: a leaf above shards/ (tokenizer fingerprints) that
        # precompute/, train/ and tools/ import.
        "crosstok": (others - {"crosstok"}) | {"datafiles"},
    }
    assert violations(PACKAGES, rules) == []


def test_the_checks_see_lazy_relative_and_from_imports(tmp_path, monkeypatch):
    """The checks are not vacuous: a lazy import inside a function, a relative import and a
    `from package import module` are all edges, and a two-module cycle is found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    import vllm.inputs\n")
    (pkg / "b.py").write_text("from pkg import a\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "REPO", tmp_path)
    monkeypatch.setattr(this, "PACKAGES", ("pkg",))
    edges = graph()
    assert edges == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": set()}
    assert cycles(edges) == [["pkg.a", "pkg.b"]]
    assert violations(("pkg",), {"pkg": {"vllm"}}) == ["pkg/a.py:3 imports vllm.inputs"]


def test_no_import_cycles():
    assert cycles(graph()) == []
