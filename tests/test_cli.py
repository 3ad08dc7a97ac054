"""The same behaviour through the command line (click's CliRunner), plus start-up cost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckptavg.cli import cli
from conftest import tree_hash


def run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_list_human_and_json(make_run):
    root, _ = make_run("bin", steps=(5, 10))
    r = run("list", root)
    assert r.exit_code == 0 and "2 checkpoints" in r.output and "torch" in r.output
    data = json.loads(run("list", root, "--json").output)
    assert [c["step"] for c in data["checkpoints"]] == [5, 10]
    assert data["checkpoints"][0]["dtypes"] == ["F32"] and data["checkpoints"][0]["size"] > 0


def test_merge_window_at_default_output_name(make_run):
    root, states = make_run("safetensors", steps=(100, 200, 300, 400))
    r = run("merge", root, "--window", 2, "--at", 300, "--quiet")
    assert r.exit_code == 0, r.output
    out = root.parent / "run-uniform2-step300"
    assert str(out) in r.output
    got = load_file(out / "model.safetensors")
    for k, v in got.items():
        assert torch.equal(v, (states[200][k] + states[300][k]) / 2)


def test_merge_ema_json_output(make_run, tmp_path):
    root, _ = make_run("safetensors", steps=(0, 100, 300))
    r = run("merge", root, "--method", "ema", "--half-life", 100, "-o", tmp_path / "e", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["steps"] == [0, 100, 300]
    raw = [2**-3, 2**-2, 1]
    assert data["weights"] == pytest.approx([x / sum(raw) for x in raw])
    assert json.loads((tmp_path / "e" / "ckptavg.json").read_text())["method"]["half_life"] == 100


def test_merge_dry_run_reads_nothing_and_writes_nothing(make_run, tmp_path):
    root, _ = make_run("safetensors", steps=(1, 2, 3))
    r = run("merge", root, "--steps", "1,3", "--method", "weighted", "--weights", "1,3", "-o", tmp_path / "d", "--dry-run")
    assert r.exit_code == 0
    assert "weight 0.250000" in r.output and "weight 0.750000" in r.output
    assert not (tmp_path / "d").exists()


def test_output_exists_is_refused_then_force_replaces(make_run, tmp_path):
    root, _ = make_run("safetensors", steps=(1, 2))
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = run("merge", root, "-o", out, "-q")
    assert r.exit_code == 1 and "already exists and is not empty; use --force" in r.output
    assert (out / "keep.txt").exists()
    r = run("merge", root, "-o", out, "-q", "--force")
    assert r.exit_code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("args, msg", [
    (["--window", "9"], "window 9 needs 9 checkpoints"),
    (["--window", "2", "--at", "150"], "no checkpoint at step 150"),
    (["--method", "emma"], "did you mean 'ema'"),
    (["--method", "ema"], "exactly one of --decay"),
    (["--dtype", "int8"], "unknown output dtype"),
    (["--max-shard-size", "lots"], "cannot parse size"),
    (["--max-shard-size", "inf"], "cannot parse size 'inf'"),
    (["--max-shard-size", "nan"], "cannot parse size 'nan'"),
    (["--window", "0"], "--window must be a whole number of at least 1, got 0"),
    (["--every", "0"], "--every must be a whole number of at least 1, got 0"),
    (["--spacing", "-5"], "--spacing must be a whole number of at least 1, got -5"),
    (["--from", "300", "--to", "100"], "--from 300 is after --to 100"),
    (["--from", "250", "--to", "280"], "nothing selected by Selection(start=250, stop=280)"),
    (["--step-pattern", "x(\\d+)"], "--step-pattern applies to hf:// trajectories only"),
], ids=["window", "at", "method", "ema-params", "dtype", "shard-size", "shard-size-inf", "shard-size-nan", "window-0", "every-0", "spacing-negative",
        "from-after-to", "empty-range", "step-pattern-local"])
@pytest.mark.parametrize("dry", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_bad_flags_give_one_line_errors_and_no_output(make_run, tmp_path, args, msg, dry):
    root, _ = make_run("safetensors", steps=(100, 200, 300))
    before = tree_hash(root)
    r = run("merge", root, "-o", tmp_path / "out", "-q", *args, *dry)
    assert r.exit_code == 2  # bad flags, as click's own usage errors
    assert msg in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert tree_hash(root) == before


def test_output_inside_input_is_refused(make_run):
    root, _ = make_run("safetensors", steps=(1, 2))
    r = run("merge", root, "-o", root / "avg", "-q")
    assert r.exit_code == 1 and "inside the input" in r.output
    assert not (root / "avg").exists()


def test_help_is_fast_no_heavy_imports():
    code = "import sys; from ckptavg.cli import cli; assert not {'torch','numpy','lm_eval','transformers'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
    r = subprocess.run([sys.executable, "-m", "ckptavg", "--help"], capture_output=True, text=True, check=True)
    assert "merge" in r.stdout and "list" in r.stdout


TRAJECTORY_COMMANDS = ["merge", "series", "eval"]
SHARED = ["--window", "--at", "--from", "--to", "--every", "--spacing", "--steps", "--method", "--weights", "--decay",
          "--half-life", "--step-pattern", "--allow-duplicates"]


@pytest.mark.parametrize("cmd", TRAJECTORY_COMMANDS)
def test_commands_that_read_a_trajectory_share_one_set_of_flags(cmd):
    from ckptavg.cli import cli as group

    opts = {o for p in group.commands[cmd].params for o in p.opts}
    assert [f for f in SHARED if f not in opts] == []


def test_every_command_that_reports_has_json_and_out_means_a_directory():
    from ckptavg.cli import cli as group

    for name, command in group.commands.items():
        opts = {o: p for p in command.params for o in p.opts}
        assert "--json" in opts, name
        if "--out" in opts and not opts["--out"].hidden:
            assert opts["--out"].type.file_okay is False or opts["--out"].type.dir_okay, name
            assert "directory" in (opts["--out"].help or "").lower(), name


def test_old_flag_names_still_work_with_a_warning(make_run, tmp_path):
    root, states = make_run("safetensors", steps=(1, 2, 3, 4))
    r = run("series", root, "--window", "2", "--stride", "2", "-o", tmp_path / "s", "-q", "--json")
    assert r.exit_code == 0, r.output
    assert "--stride is deprecated; use --every" in r.output
    assert [o["step"] for o in json.loads(r.stdout)["outputs"]] == [2, 4]


def test_every_command_has_help_with_its_purpose():
    from ckptavg.cli import cli as group

    for name, command in group.commands.items():
        r = run(name, "--help")
        first = (command.help or "").strip().splitlines()[0]
        assert r.exit_code == 0 and first and first[:40] in " ".join(r.output.split()), name


def test_a_merge_of_one_checkpoint_says_it_is_a_copy(make_run, tmp_path):
    root, states = make_run("safetensors", steps=(1, 2, 3))
    r = run("merge", root, "--method", "ema", "--half-life", "5", "--steps", "2", "-o", tmp_path / "one", "-q")
    assert r.exit_code == 0, r.output
    assert "warning: the selection is one checkpoint (step 2); the output is a copy of it" in r.stderr
    got = load_file(tmp_path / "one" / "model.safetensors")
    assert all(torch.equal(v, states[2][k]) for k, v in got.items())
    r = run("merge", root, "--window", "2", "-o", tmp_path / "two", "-q")
    assert r.exit_code == 0 and "warning" not in r.stderr
