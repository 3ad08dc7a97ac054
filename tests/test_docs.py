"""The README is policed: its set-up commands run, every command it shows exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptavg.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_shows_the_two_setup_commands_and_ci_runs_the_test_one():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    cmds = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert cmds == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_readme_main_job_runs(tmp_path, demo_run):
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / demo_run.name).symlink_to(demo_run)  # the session's trained run: `make demo` reuses it
    r = subprocess.run(["make", "demo", f"DEMO_OUT={tmp_path / 'ex'}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "held-out loss" in r.stdout and "LAWA k=5 beats raw at" in r.stdout and "zero-shot" in r.stdout
    assert (tmp_path / "ex" / "lawa.png").is_file()
    assert (tmp_path / "ex" / "pythia-critter-uniform5-step600" / "ckptavg.json").is_file()


def test_every_cli_command_in_readme_exists():
    shown = set(re.findall(r"^ckptavg (\w+)", README, re.M))
    assert shown, "README shows no ckptavg command"
    for cmd in shown:
        assert CliRunner().invoke(cli, [cmd, "--help"]).exit_code == 0, cmd


def test_every_flag_the_readme_shows_exists_on_its_command():
    """A renamed flag (``--stride`` → ``--every``) must be renamed in the README too."""
    lines = re.findall(r"^(?:\.venv/bin/)?ckptavg (\w+)(.*)$", README, re.M)
    assert lines
    for cmd, rest in lines:
        opts = {o for p in cli.commands[cmd].params for o in p.opts}
        flags = re.findall(r"(?<=\s)(--?[a-z][\w-]*)", re.sub(r"'[^']*'", "", rest.split("#")[0]))
        assert [f for f in flags if f not in opts and f not in ("-h", "--help")] == [], (cmd, rest)
