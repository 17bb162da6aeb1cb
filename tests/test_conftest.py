"""The suite's own scheduling (tests/conftest.py): what ``make test`` relies on to run on 2 cores."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

from conftest import TESTS

# The session's conftest takes the suite's grouping and its check (and the clean-up of the Airflow home it makes).
CONFTEST = '''
import importlib.util

spec = importlib.util.spec_from_file_location("suite_conftest", {conftest!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
pytest_collection_modifyitems = suite.pytest_collection_modifyitems
grouped = suite.grouped
pytest_sessionfinish = suite.pytest_sessionfinish
'''

MODULE = '''
import os

import pytest


def _record(what):
    with open(os.environ["RECORD"], "a") as record:
        record.write(f"{what} {os.environ['PYTEST_XDIST_WORKER']}\\n")


@pytest.fixture(scope="module")
def made_once():
    _record("fixture NAME")


@pytest.mark.parametrize("case", ["one", "two@example.com", "three"])
def test_first(made_once, case):
    pass


@pytest.mark.cluster
def test_on_the_cluster():
    _record("cluster NAME")


def test_last(made_once):
    pass
'''


def test_make_test_runs_each_module_on_one_worker_and_the_cluster_tests_on_one(tmp_path):
    """Under ``-n 2 --dist loadgroup`` with the suite's conftest: a module's fixtures are made once and
    the ``cluster`` tests of every module share one worker (so two clusters never run at once)."""
    (tmp_path / "conftest.py").write_text(CONFTEST.format(conftest=str(TESTS / "conftest.py")))
    for name in ("alpha", "beta", "gamma", "delta"):
        (tmp_path / f"test_{name}.py").write_text(MODULE.replace("NAME", name))
    record = tmp_path / "record.txt"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
         "-p", "no:randomly", "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "RECORD": str(record)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line.split() for line in record.read_text().splitlines()]
    fixtures = Counter(name for what, name, worker in lines if what == "fixture")
    assert fixtures == {"alpha": 1, "beta": 1, "gamma": 1, "delta": 1}, lines
    cluster_workers = {worker for what, name, worker in lines if what == "cluster"}
    assert len([line for line in lines if line[0] == "cluster"]) == 4 and len(cluster_workers) == 1, lines
