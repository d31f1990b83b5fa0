"""Under ``CI=true`` a skipped test fails (tests/conftest.py): pytest runs a small file with the suite's own
conftest, once as CI and once as a developer's machine. ``--skip-heavy`` deselects the cluster tests, and
only off CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIPPING = '''
import pytest

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def nodes():
    pytest.skip("needs root (network and UTS namespaces)")


def test_runs():
    pass


def test_skips_in_its_body():
    pytest.skip("cannot mount a tmpfs here (needs root)")


@pytest.mark.skipif(True, reason="ip is not installed")
def test_is_marked_to_skip():
    pass


def test_uses_a_fixture_that_skips(nodes):
    pass


@pytest.mark.xfail(reason="a known failure", run=False)
def test_is_an_expected_failure():
    pass
'''
SKIPPING_MODULE = '''
import pytest

pytest.importorskip("a_package_that_is_not_installed")


def test_needs_it():
    pass
'''


HEAVY = '''
import pytest


@pytest.mark.slurm
def test_starts_slurm():
    pass


@pytest.mark.multinode
def test_starts_nodes():
    pass


def test_runs():
    pass
'''


def run_pytest(tmp_path: Path, ci: str | None, *options: str) -> str:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    (tmp_path / "test_skipping_module.py").write_text(SKIPPING_MODULE)
    (tmp_path / "test_heavy.py").write_text(HEAVY)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(REPO)}
    if ci is not None:
        env["CI"] = ci
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "-rA", "--strict-markers", "-o", "markers=slurm\nmultinode",
                           "--continue-on-collection-errors", *options, str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_every_skip_fails_naming_its_reason(tmp_path: Path, ci: str) -> None:
    out = run_pytest(tmp_path, ci)
    assert "1 failed, 4 passed, 1 xfailed, 3 errors" in out, out
    for reason in ("cannot mount a tmpfs here (needs root)", "ip is not installed",
                   "needs root (network and UTS namespaces)",
                   "could not import 'a_package_that_is_not_installed'"):
        assert f"skipped under CI=true, where every test must run: {reason}" in out, out


@pytest.mark.parametrize("ci", [None, "false"])
def test_elsewhere_a_skip_is_a_skip(tmp_path: Path, ci: str | None) -> None:
    out = run_pytest(tmp_path, ci)
    assert "4 passed, 4 skipped, 1 xfailed" in out, out
    assert "skipped under CI" not in out


def test_skip_heavy_deselects_the_cluster_tests_and_is_refused_under_ci(tmp_path: Path) -> None:
    out = run_pytest(tmp_path, None, "--skip-heavy")
    assert "2 passed, 4 skipped, 2 deselected, 1 xfailed" in out, out
    assert "::test_starts_slurm" not in out and "::test_starts_nodes" not in out and "::test_runs" in out
    assert "--skip-heavy under CI=true: CI runs every test" in run_pytest(tmp_path, "true", "--skip-heavy")
