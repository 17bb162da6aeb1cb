"""The README and docs/ pages as a user pastes them: their command blocks, their links, their generated figures."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from alexnet_tasks.config import PipelineConfig
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def command_blocks(path: Path) -> list[str]:
    """The text of every ```bash block of a page."""
    return re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)


def commands(path: Path) -> list[str]:
    """Every command line of the page's bash blocks, comments and blank lines left out."""
    found = []
    for block in command_blocks(path):
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_every_command_line_is_complete_shell(page):
    """A line pasted alone runs: no quote left open for the next line, no continuation."""
    for line in commands(page):
        assert not line.endswith("\\"), f"{page.name}: {line}"
        shlex.split(line, comments=True)  # raises on an unterminated quote


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_every_make_run_conf_is_one_shell_word_of_json_the_config_accepts(page):
    for line in commands(page):
        if not line.startswith("make run"):
            continue
        words = shlex.split(line, comments=True)
        assert words[:2] == ["make", "run"] and len(words) <= 3, f"{page.name}: {line}"
        if len(words) == 3:
            assert words[2].startswith("CONF="), line
            PipelineConfig.from_dict(json.loads(words[2].removeprefix("CONF=")))


def test_the_first_screen_holds_the_two_commands_a_quick_local_run_and_where_the_results_are():
    readme = (ROOT / "README.md").read_text()
    first_screen = readme[:readme.index("## What `make run` does")]
    for needed in ("make run ", "make test ", "make_archive.py /tmp/cifar/cifar-10-python.tar.gz",
                   '"source_md5": "18c6e7d1617e846e1cbee435086bc6c8"', "ALEXNET_ARTIFACTS", "scripts/airflow.sh standalone",
                   "tensorboard --logdir"):
        assert needed in first_screen, needed
    assert len(readme.encode()) < 15_000


def test_the_local_archive_commands_agree_with_make_runs_message():
    """The README's archive path and MD5 are the ones `make run` suggests when the source cannot be reached."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import local_conf
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    build = f".venv/bin/python ../shared/cifar10/make_archive.py {local_conf.LOCAL_ARCHIVE}"
    assert build in commands(ROOT / "README.md") and build in local_conf.unreachable_source_message({}, "refused")
    quick = next(line for line in commands(ROOT / "README.md") if '"epochs": 1' in line and line.startswith("make run"))
    params = json.loads(shlex.split(quick)[2].removeprefix("CONF="))
    assert (params["source_url"], params["source_md5"]) == (local_conf.LOCAL_ARCHIVE, local_conf.MAKE_ARCHIVE_MD5)


def test_every_make_sweep_conf_is_a_sweep_whose_trials_all_pass_the_plan():
    from alexnet_tasks.sweeps import plan_trials

    found = 0
    for page in PAGES:
        for line in commands(page):
            if not line.startswith("make sweep"):
                continue
            words = shlex.split(line, comments=True)
            assert words[:2] == ["make", "sweep"] and len(words) == 3 and words[2].startswith("CONF="), line
            assert len(plan_trials(json.loads(words[2].removeprefix("CONF=")))) >= 2, line
            found += 1
    assert found >= 2  # the README's and docs/sweeps.md's


def test_links_between_pages_point_at_files_that_exist():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to a missing {target}"


def test_the_quick_run_figures_come_from_the_timing_script():
    """README's sentence and docs/performance.md's table are what scripts/time_quick_run.py prints."""
    printed = subprocess.run([sys.executable, str(ROOT / "scripts" / "time_quick_run.py"), "--table"],
                             capture_output=True, text=True, check=True).stdout
    table, sentence = printed.strip().rsplit("\n\n", 1)
    assert sentence.rstrip(".") in (ROOT / "README.md").read_text()
    assert table in (ROOT / "docs" / "performance.md").read_text()


def test_the_quick_read_only_commands_run_as_written():
    """The README's commands that change nothing and finish in seconds run, from the repository root."""
    quick = {"scripts/params_table.py", "scripts/time_quick_run.py --table"}
    ran = 0
    for page in PAGES:
        for line in commands(page):
            for script in quick:
                if line.startswith(f".venv/bin/python {script}") or line.startswith(f"python {script}"):
                    words = shlex.split(line, comments=True)
                    subprocess.run([sys.executable, *words[1:]], cwd=ROOT, check=True, capture_output=True,
                                   timeout=120)
                    ran += 1
    assert ran >= 1
