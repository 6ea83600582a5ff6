"""The package's import rules (docs/design.md, "Layout" and "Imports flow downward"), checked
on the import graph.

Every `.py` under `src/dualrerank` is parsed with `ast` (nothing is imported or run) and
every import it names is collected:

- `import x.y`, `from x import y`, `from . import y`, `from ..x import y`, at module level,
  inside functions and classes, and under `if TYPE_CHECKING:` (a type-only import still
  couples the two modules);
- lazy imports written as data: a string constant that is exactly a package module name,
  or a `module:Class` path (the `_LAZY` tables of the package `__init__`s,
  `models.registry.MODELS`), since `import_module` on that string is an import all the same.

Each import is resolved to a `dualrerank` module name (`from a import b` names `a.b` when
`a.b` is a module, else `a`) and checked against `RULES`, the design's "never" sentences
written as data. A failure names the importing file and line, the imported module and the
rule it breaks. An import that breaks a rule today is listed, with its reason, in
`KNOWN_EXCEPTIONS`; an entry that is no longer needed fails too, so the list only shrinks.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "dualrerank"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / PACKAGE


# --------------------------------------------------------------------------- the rules
@dataclass(frozen=True)
class Rule:
    """Modules under `importer` never import modules under `forbidden`.

    Prefixes are module names and match whole components: "dualrerank.sim" covers
    "dualrerank.sim" and "dualrerank.sim.world", not "dualrerank.simple".
    `allowed_targets` / `allowed_importers` carve out what the design's sentence permits.
    """

    importer: str
    forbidden: str
    why: str
    allowed_targets: tuple[str, ...] = ()
    allowed_importers: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.importer}-/->{self.forbidden}"


_D = PACKAGE + "."

# The "never" sentences of design.md, one row per (importer, forbidden target).
NEVER_RULES: tuple[Rule, ...] = (
    # "A model never imports the world (no model reads the oracle or exact utility),
    #  training loops, or serving"
    Rule(_D + "models", _D + "sim", "a model never imports the world (no model reads the oracle or exact utility)"),
    Rule(_D + "models", _D + "train", "a model never imports training loops"),
    Rule(_D + "models", _D + "serve", "a model never imports serving"),
    # "losses are pure functions and know nothing of models, rewards or the world"
    Rule(_D + "losses", _D + "models", "losses are pure functions and know nothing of models"),
    Rule(_D + "losses", _D + "reward", "losses are pure functions and know nothing of rewards"),
    Rule(_D + "losses", _D + "sim", "losses are pure functions and know nothing of the world"),
    # "reward.py ... never imports sim, holds no weights"; "the reward system sees feedback,
    #  never the world's hidden state". No models rule: the design lets a reward rule use an
    #  evaluator (a model) passed in by argument, and "holds no weights" is about state, not
    #  imports. reward imports no model today either.
    Rule(_D + "reward", _D + "sim", "the reward system sees feedback, never the world's hidden state (never imports sim)"),
    # "the world knows no model"
    Rule(_D + "sim", _D + "models", "the world knows no model"),
    # "serving carries neither training code nor the simulator"
    Rule(_D + "serve", _D + "train", "serving carries no training code"),
    Rule(_D + "serve", _D + "sim", "serving carries no simulator"),
    # "serve/  export.py -> runtime.py (one direction)"
    Rule(_D + "serve.runtime", _D + "serve.export", "serve: export.py -> runtime.py, one direction only"),
    # bundle.py (loads/writes serving checkpoints) imports export.py and runtime.py: runtime
    # importing it would be runtime -> export again, one module removed.
    Rule(_D + "serve.runtime", _D + "serve.bundle", "serve: bundle.py -> export.py -> runtime.py, one direction only"),
    # "the schema depends on nothing in the package". errors.py is allowed: it holds only the
    # package's exception classes (one-line user errors) and imports nothing in the package
    # itself (next rule), so schema gains no dependency through it; and design.md says "The
    # house as built keeps every 'never'" of a schema.py that raises DataError, so the
    # author did not count errors as a dependency.
    Rule(
        _D + "schema",
        PACKAGE,
        "the schema depends on nothing in the package (errors, the import-free leaf, excepted)",
        allowed_targets=(_D + "errors",),
    ),
    Rule(_D + "errors", PACKAGE, "errors is the leaf every module (schema included) may use, so it imports nothing in the package"),
    # "demo.py  the demo pipeline (only commands/demo.py imports it)". Dormant until demo.py exists.
    Rule(
        PACKAGE,
        _D + "demo",
        "only commands/demo.py imports demo.py",
        allowed_importers=(_D + "commands.demo", _D + "demo"),
    ),
    # "-> feedback -> schema": feedback.py sits below every part but the schema; besides the
    # schema it may use only the utilities no part-layer module sits under (errors, files,
    # config, decoding). Dormant until feedback.py exists.
    Rule(
        _D + "feedback",
        PACKAGE,
        "imports flow downward: ... -> feedback -> schema (feedback uses only schema, errors, files, config, decoding)",
        allowed_targets=tuple(_D + m for m in ("schema", "errors", "files", "config", "decoding")),
    ),
)

# "Imports flow downward: `cli` -> `train`/`serve`/`report` -> `models`/`losses`/`reward`/
# `metrics`/`data`/`sim` -> `feedback` -> `schema`": the middle layer never imports the top
# (api, cli and commands are the top's own callers). Pairs a "never" rule already states are
# left to it. Imports inside a layer (data -> sim, sim -> metrics, train -> sim) are allowed.
MIDDLE = ("models", "losses", "reward", "metrics", "data", "sim")
TOP = ("train", "serve", "report", "cli", "commands", "api")
FLOW_RULES: tuple[Rule, ...] = tuple(
    Rule(_D + low, _D + up, f"imports flow downward: {up} -> {low}, never back up")
    for low in MIDDLE
    for up in TOP
    if not any(r.importer == _D + low and r.forbidden == _D + up for r in NEVER_RULES)
)

RULES: tuple[Rule, ...] = NEVER_RULES + FLOW_RULES

# Imports that break a rule today. Key: (importing module, imported module); the value says
# why it is tolerated and what removes it. Keyed by module, not line, so that unrelated
# edits do not break the list; every import between the pair is covered.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {
}


# --------------------------------------------------------------------------- the walker
@dataclass(frozen=True)
class Import:
    importer: str  # module name of the importing file
    path: Path  # the importing file
    line: int
    target: str  # the imported module, resolved to a module name of the package
    kind: str  # "import", "from", "relative", "string"
    in_function: bool  # inside a def (runs at call time), not at import time
    type_only: bool  # under `if TYPE_CHECKING:`


def module_name(path: Path, root: Path) -> str:
    """`root/a/b.py` -> "<pkg>.a.b", `root/a/__init__.py` -> "<pkg>.a" (pkg = root's name)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([root.name, *parts])


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    def __init__(self, importer: str, is_package: bool, path: Path, modules: frozenset[str], package: str):
        self.importer, self.is_package, self.path = importer, is_package, path
        self.modules, self.package = modules, package
        self.found: list[Import] = []
        self._fn_depth = 0
        self._tc_depth = 0

    # context
    def _visit_function(self, node: ast.AST) -> None:
        self._fn_depth += 1
        self.generic_visit(node)
        self._fn_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._tc_depth += 1
            for child in node.body:
                self.visit(child)
            self._tc_depth -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    # resolution
    def _resolve(self, name: str) -> str | None:
        """The package module `name` refers to: itself, or its longest module prefix."""
        if not _under(name, self.package):
            return None
        probe = name
        while probe:
            if probe in self.modules:
                return probe
            probe = probe.rpartition(".")[0]
        return name  # a module that does not exist (a broken import): keep the name

    def _add(self, node: ast.AST, target: str | None, kind: str) -> None:
        if target is None:
            return
        imp = Import(self.importer, self.path, node.lineno, target, kind, self._fn_depth > 0, self._tc_depth > 0)
        if imp not in self.found:  # `from a import b, c` with b, c not modules: one edge
            self.found.append(imp)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, self._resolve(alias.name), "import")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base_parts = self.importer.split(".")
            if not self.is_package:
                base_parts = base_parts[:-1]  # a module's relative imports start at its package
            if node.level - 1 >= len(base_parts):
                pytest.fail(f"{self.path}:{node.lineno}: relative import goes above the package")
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
            kind = "relative"
        else:
            base, kind = node.module or "", "from"
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(node, sub if sub in self.modules else self._resolve(base), kind)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str):
            name = node.value.partition(":")[0]
            # the bare package name is a program name ("dualrerank --help"), not an import
            if name in self.modules and name not in (self.importer, self.package):
                self._add(node, name, "string")


def walk_imports(root: Path) -> list[Import]:
    """Every intra-package import of the package at `root` (a directory with __init__.py)."""
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    modules = frozenset(module_name(p, root) for p in files)
    found: list[Import] = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        collector = _Collector(module_name(path, root), path.name == "__init__.py", path, modules, root.name)
        collector.visit(tree)
        found.extend(collector.found)
    return found


def applies(rule: Rule, imp: Import) -> bool:
    return (
        imp.importer != imp.target
        and _under(imp.importer, rule.importer)
        and _under(imp.target, rule.forbidden)
        and not any(_under(imp.target, t) for t in rule.allowed_targets)
        and not any(_under(imp.importer, m) for m in rule.allowed_importers)
    )


def describe(imp: Import, rule: Rule, root: Path) -> str:
    base = root.parents[1]  # the checkout: <checkout>/src/<package>
    where = imp.path.relative_to(base) if imp.path.is_relative_to(base) else imp.path
    how = {"string": "lazy import by name", "relative": "relative import"}.get(imp.kind, "import")
    if imp.in_function:
        how += " inside a function"
    if imp.type_only:
        how += " under TYPE_CHECKING"
    return (
        f"{where}:{imp.line}: {imp.importer} imports {imp.target} ({how}); "
        f"rule {rule.importer} never imports {rule.forbidden}: {rule.why}"
    )


def violations(
    imports: list[Import], rules: tuple[Rule, ...] = RULES, exceptions: dict[tuple[str, str], str] | None = None
) -> list[tuple[Rule, Import]]:
    exceptions = KNOWN_EXCEPTIONS if exceptions is None else exceptions
    return [
        (rule, imp)
        for rule in rules
        for imp in imports
        if applies(rule, imp) and (imp.importer, imp.target) not in exceptions
    ]


# --------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def imports() -> list[Import]:
    assert (PACKAGE_DIR / "__init__.py").is_file(), f"package not found at {PACKAGE_DIR}"
    return walk_imports(PACKAGE_DIR)


def _exists(prefix: str) -> bool:
    return any(_under(module_name(p, PACKAGE_DIR), prefix) for p in PACKAGE_DIR.rglob("*.py"))


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_never_rule(rule: Rule, imports: list[Import]) -> None:
    for side in (rule.importer, rule.forbidden):
        if not _exists(side):
            pytest.skip(f"dormant: {side} does not exist yet ({rule.why})")
    broken = violations(imports, (rule,))
    if broken:
        pytest.fail(
            "import rule broken (docs/design.md, 'Imports flow downward'; a justified exception goes in "
            "KNOWN_EXCEPTIONS with its reason):\n" + "\n".join(describe(imp, r, PACKAGE_DIR) for r, imp in broken),
            pytrace=False,
        )


def test_known_exceptions_are_still_needed(imports: list[Import]) -> None:
    """An allow-list entry whose import is gone (or now allowed) must be deleted."""
    used = {(imp.importer, imp.target) for rule in RULES for imp in imports if applies(rule, imp)}
    stale = sorted(set(KNOWN_EXCEPTIONS) - used)
    assert not stale, f"KNOWN_EXCEPTIONS entries no longer needed, delete them: {stale}"


def test_walker_sees_the_real_package(imports: list[Import]) -> None:
    """Guards against a vacuous pass: a walker that finds nothing breaks no rule."""
    assert len(imports) > 100, f"only {len(imports)} intra-package imports found under {PACKAGE_DIR}"
    assert any(imp.in_function for imp in imports), "no import inside a function found"
    assert any(imp.kind == "string" for imp in imports), "no lazy import by name found (the _LAZY tables)"
    importers = {imp.importer for imp in imports}
    for module in (_D + "schema", _D + "reward", _D + "losses", _D + "serve.runtime", _D + "sim.world", _D + "models.student"):
        assert module in importers, f"no import found in {module}"
    # a known edge of each kind, at its exact resolution
    edges = {(imp.importer, imp.target, imp.kind, imp.in_function) for imp in imports}
    assert (_D + "schema", _D + "errors", "from", False) in edges
    assert (_D + "serve.export", _D + "serve.runtime", "from", True) in edges
    assert (_D + "models", _D + "models.teacher", "string", False) in edges


def test_rules_name_real_modules() -> None:
    """A rule with a typo in a prefix would never fire; only design-announced modules may be missing."""
    announced_later = {_D + "demo", _D + "commands.demo", _D + "feedback"}
    for rule in RULES:
        for prefix in (rule.importer, rule.forbidden, *rule.allowed_targets, *rule.allowed_importers):
            assert _exists(prefix) or prefix in announced_later, f"rule {rule.id}: no module {prefix}"


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_walker_catches_violations(tmp_path: Path) -> None:
    """The checker on a tiny fake `dualrerank`, one violation of each import form."""
    root = _write(
        tmp_path / "src" / PACKAGE,
        {
            "__init__.py": "",
            "errors.py": "class DataError(Exception):\n    pass\n",
            "schema.py": (
                "from dualrerank.errors import DataError\n"  # allowed
                "from dualrerank import metrics\n"  # line 2: forbidden, `from pkg import module`
            ),
            "metrics.py": "",
            "models/__init__.py": '_LAZY = {"World": "dualrerank.sim.world"}\n',  # line 1: by name
            "models/student.py": (
                "import torch\n"
                "\n"
                "def f():\n"
                "    import dualrerank.train.loop\n"  # line 4: inside a function
                "    return dualrerank.train.loop\n"
            ),
            "sim/__init__.py": "",
            "sim/world.py": "from ..models.student import f\n",  # line 1: relative
            "train/__init__.py": "",
            "train/loop.py": "from dualrerank.sim import world\n",  # allowed: train may use sim
            "serve/__init__.py": "",
            "serve/export.py": "from dualrerank.serve.runtime import g\n",  # allowed direction
            "serve/runtime.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from .export import h\n"  # line 3: relative, type-only
                "def g():\n"
                "    pass\n"
            ),
        },
    )
    found = walk_imports(root)
    got = {(imp.importer, imp.target, imp.line) for _, imp in violations(found, exceptions={})}
    assert got == {
        ("dualrerank.schema", "dualrerank.metrics", 2),
        ("dualrerank.models", "dualrerank.sim.world", 1),
        ("dualrerank.models.student", "dualrerank.train.loop", 4),
        ("dualrerank.sim.world", "dualrerank.models.student", 1),
        ("dualrerank.serve.runtime", "dualrerank.serve.export", 3),
    }, got
    kinds = {(imp.importer, imp.kind, imp.in_function, imp.type_only) for imp in found}
    assert ("dualrerank.models.student", "import", True, False) in kinds
    assert ("dualrerank.serve.runtime", "relative", False, True) in kinds
    assert ("dualrerank.models", "string", False, False) in kinds
    # the message names file, line, imported module and rule
    rule, imp = next((r, i) for r, i in violations(found, exceptions={}) if i.importer == "dualrerank.sim.world")
    message = describe(imp, rule, root)
    assert message.startswith(f"src/{PACKAGE}/sim/world.py:1: dualrerank.sim.world imports dualrerank.models.student")
    assert "the world knows no model" in message
    # an exception silences exactly its pair
    left = violations(found, exceptions={("dualrerank.sim.world", "dualrerank.models.student"): "test"})
    assert {(i.importer, i.target) for _, i in left} == {(a, b) for a, b, _ in got} - {("dualrerank.sim.world", "dualrerank.models.student")}


def test_demo_rule(tmp_path: Path) -> None:
    """demo.py may be imported by commands/demo.py only (the rule is dormant in the real package until demo.py exists)."""
    root = _write(
        tmp_path / PACKAGE,
        {
            "__init__.py": "",
            "demo.py": "",
            "commands/__init__.py": "",
            "commands/demo.py": "from dualrerank import demo\n",
            "commands/train.py": "from dualrerank.demo import run\n",
        },
    )
    got = {(imp.importer, imp.target) for _, imp in violations(walk_imports(root), exceptions={})}
    assert got == {("dualrerank.commands.train", "dualrerank.demo")}
