"""README's package table is the package: every module listed once, no module missing, none that does not
exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_layout_table_lists_exactly_the_packages_modules() -> None:
    readme = (REPO / "README.md").read_text()
    listed = re.findall(r"^\| `(w2v_dist/[\w/]+\.py)` \|", readme, flags=re.MULTILINE)
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "w2v_dist").rglob("*.py")
                     if p.name != "__init__.py")
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert sorted(listed) == modules, {"missing": sorted(set(modules) - set(listed)),
                                       "not a module": sorted(set(listed) - set(modules))}


def test_only_the_engine_the_process_start_and_the_checkpoint_files_import_deepspeed() -> None:
    importers = sorted(str(p.relative_to(REPO)) for p in (REPO / "w2v_dist").rglob("*.py")
                       if re.search(r"^\s*(import deepspeed|from deepspeed)", p.read_text(),
                                    flags=re.MULTILINE))
    assert importers == ["w2v_dist/checkpoint/files.py", "w2v_dist/engine.py", "w2v_dist/process.py"]


def test_no_private_name_is_imported_across_modules() -> None:
    private = [f"{p.relative_to(REPO)}: {line.strip()}" for p in [*(REPO / "w2v_dist").rglob("*.py"),
                                                                   *(REPO / "tests").rglob("*.py")]
               for line in p.read_text().splitlines()
               if re.match(r"\s*from w2v_dist[\w.]* import .*\b_[a-z]\w*", line)]
    assert private == []


def package_imports() -> dict[str, set[str]]:
    """Each module of w2v_dist and the modules of w2v_dist it imports, at module level or inside a
    function."""
    import ast

    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (REPO / "w2v_dist").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module in modules:
                graph[name] |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                                else node.module for alias in node.names}
        graph[name].discard(name)
    return graph


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = package_imports()
    state: dict[str, str] = {}  # "open" while its imports are walked, then "done"
    cycles: list[list[str]] = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycles.append([*path[path.index(imported):], imported])
            elif imported not in state:
                walk(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert graph["w2v_dist.trainer"] >= {"w2v_dist.dist", "w2v_dist.export"}, "the graph is read"
    assert cycles == [], [" -> ".join(cycle) for cycle in cycles]


def test_the_tests_are_a_package_whose_helpers_live_in_tests_support() -> None:
    """Every folder of tests/ is a package; helpers live in ``tests.support`` (the workers that tests run as
    subprocesses beside their tests); no file edits ``sys.path`` and no test module imports another."""
    tests = REPO / "tests"
    files = [p for p in tests.rglob("*.py") if "__pycache__" not in p.parts]
    assert sorted({str(p.parent.relative_to(REPO)) for p in files
                   if not (p.parent / "__init__.py").is_file()}) \
        == []
    loose = [str(p.relative_to(REPO)) for p in files if p.parent.name != "support"
             and not p.name.startswith("test_") and not p.name.endswith("_worker.py")
             and p.name not in ("__init__.py", "conftest.py")]
    assert loose == [], "helpers belong in tests/support"
    edits = [str(p.relative_to(REPO)) for p in files
             if re.search(r"\bsys\.path\.(insert|append)", p.read_text())]
    assert edits == []
    imports = [f"{p.relative_to(REPO)}: {line.strip()}" for p in files for line in p.read_text().splitlines()
               if re.match(r"\s*(from|import) (tests\.)?[\w.]*\btest_\w+", line)]
    assert imports == []


CONCERNS = ("signals", "checkpoint commit", "elastic resume", "data plan", "mixing", "scoring", "export",
            "multi-node start", "fault injection", "config checks")


def test_the_readme_names_a_module_for_each_concern_a_newcomer_asks_about() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| concern | module |"):readme.index("| module | concern |")]
    rows = dict(re.findall(r"^\| ([\w -]+?)(?: \(.*?\))? \| (.+) \|$", table, flags=re.MULTILINE))
    assert sorted(rows) == sorted(("concern", *CONCERNS))
    for concern in CONCERNS:
        named = re.findall(r"`(w2v_dist/[\w/]+\.py)`", rows[concern])
        assert named and all((REPO / path).is_file() for path in named), (concern, rows[concern])
