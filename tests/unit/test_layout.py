"""README's package table is the package: every module listed once, no module missing, none that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_layout_table_lists_exactly_the_packages_modules() -> None:
    readme = (REPO / "README.md").read_text()
    listed = re.findall(r"^\| `(w2v_dist/[\w/]+\.py)` \|", readme, flags=re.MULTILINE)
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "w2v_dist").rglob("*.py") if p.name != "__init__.py")
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert sorted(listed) == modules, {"missing": sorted(set(modules) - set(listed)),
                                       "not a module": sorted(set(listed) - set(modules))}


def test_only_the_engine_the_process_start_and_the_checkpoint_files_import_deepspeed() -> None:
    importers = sorted(str(p.relative_to(REPO)) for p in (REPO / "w2v_dist").rglob("*.py")
                       if re.search(r"^\s*(import deepspeed|from deepspeed)", p.read_text(), flags=re.MULTILINE))
    assert importers == ["w2v_dist/checkpoint/files.py", "w2v_dist/engine.py", "w2v_dist/process.py"]


def test_no_private_name_is_imported_across_modules() -> None:
    private = [f"{p.relative_to(REPO)}: {line.strip()}" for p in [*(REPO / "w2v_dist").rglob("*.py"),
                                                                   *(REPO / "tests").rglob("*.py")]
               for line in p.read_text().splitlines()
               if re.match(r"\s*from w2v_dist[\w.]* import .*\b_[a-z]\w*", line)]
    assert private == []
