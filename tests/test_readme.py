"""The README's commands exist: every script, flag, make target and file it tells a user to run."""

import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SCRIPTS = ("train.py", "predict.py", "phantom.py", "dataset.py", "bench.py", "tools/peer_recipe.py",
           "tools/nnunet_budget.py")


def code_lines() -> list[str]:
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


@cache
def help_text(script: str, subcommand: str = "check") -> str:
    args = [sys.executable, str(REPO / script), *([subcommand] if script == "dataset.py" else []), "--help"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, f"{script} --help failed: {result.stderr[-2000:]}"
    return result.stdout


def script_invocations() -> list[tuple[str, str]]:
    found = []
    for line in code_lines():
        for script in SCRIPTS:
            if re.search(rf"(^|\s){re.escape(script)}(\s|$)", line):
                found.append((script, line))
    return found


def test_readme_shows_the_two_commands_first():
    first_block = code_lines()[:2]
    assert first_block == ["make demo", "make test"]


@pytest.mark.parametrize("script, line", script_invocations())
def test_every_flag_in_the_readme_exists(script, line):
    after = line.split(script, 1)[1]
    text = help_text(script, after.split()[0]) if script == "dataset.py" else help_text(script)
    for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", after):
        assert flag in text, f"README line `{line}` uses {flag}, which `{script} --help` does not list"


def test_options_table_flags_exist():
    table = README.split("## Options", 1)[1].split("\n## ", 1)[0]
    combined = help_text("train.py") + help_text("predict.py")
    for flag in set(re.findall(r"`(--[a-z][a-z-/]*)", table)):
        for part in flag.split("/"):
            assert part in combined, f"the options table names {part}, which neither train.py nor predict.py has"


def test_make_targets_and_files_exist():
    makefile = (REPO / "Makefile").read_text()
    for line in code_lines():
        if line.startswith("make "):
            target = line.split()[1]
            assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"no make target {target}"
        if line.startswith("sbatch "):
            assert (REPO / line.split()[1]).is_file()
    for image in re.findall(r"\]\((images_for_README/[^)]+)\)", README):
        assert (REPO / image).is_file(), f"README shows {image}, which is not in the repo"
    for path in re.findall(r"^\| `([\w/]+\.py|slurm/)` \|", README, flags=re.M):
        assert (REPO / path).exists(), f"the layout table lists {path}, which does not exist"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
