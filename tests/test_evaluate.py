"""ckptavg eval: the in-memory path against the from-disk path, our scores against lm-eval run by
hand, the held-out loss against transformers' own loss, and the CLI on top.

One tiny GPT-NeoX run (5 checkpoints, noise around one random model) with a tiny BPE tokenizer
trained here on the packaged task's words; nothing is downloaded.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckptavg
from ckptavg import Selection
from ckptavg.cli import cli
from ckptavg.eval import EXTRA_HINT, TASKS_DIR, packaged_tasks, score
from ckptavg.eval.tasks import offline_env
from conftest import HELD_OUT, TASK_DATA

pytest.importorskip("lm_eval", reason="the eval extra is not installed")

ROOT = Path(__file__).resolve().parents[1]


def run(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _listing(p: Path) -> list[str]:
    return sorted(str(x.relative_to(p)) for x in p.rglob("*"))


# In memory vs from disk ----------------------------------------------------------------------
SPECS = {
    "window": (dict(selection=Selection(window=3, at=400)), lambda t: t.window(3, at=400), {}),
    "ema": (dict(selection=Selection(window=4), method="ema", half_life=100), lambda t: t.last(4),
            {"method": "ema", "half_life": 100}),
}


@pytest.mark.parametrize("name", list(SPECS), ids=list(SPECS))
def test_in_memory_average_scores_exactly_like_the_merged_directory(eval_run, held_out, tmp_path, name):
    spec, pick, merge_kw = SPECS[name]
    before = _listing(eval_run.parent)
    mem = score(eval_run, "ckptavg_basics", limit=40, text=held_out["txt"], seq_len=16, batch_size=8, progress=False,
                **spec)
    assert _listing(eval_run.parent) == before  # averaged in memory: nothing written anywhere near the run

    merged = ckptavg.average(pick(ckptavg.discover(eval_run)), tmp_path / "merged", progress=False, **merge_kw)
    disk = score(merged, "ckptavg_basics", limit=40, text=held_out["txt"], seq_len=16, batch_size=8)

    assert mem["ckptavg"]["loaded_from"] == "memory" and disk["ckptavg"]["loaded_from"] == "disk"
    assert mem["results"] == disk["results"]
    assert mem["held_out"]["loss"] == disk["held_out"]["loss"]
    assert mem["n-samples"]["ckptavg_basics"] == {"original": 99, "effective": 40}
    # Same provenance either way: the in-memory record has ckptavg.json's inputs and weights.
    strip = lambda rec: [(i["step"], i["weight"]) for i in rec["inputs"]]  # noqa: E731
    assert strip(mem["ckptavg"]["weights"]) == strip(disk["ckptavg"]["weights"])
    assert mem["ckptavg"]["weights"]["method"] == disk["ckptavg"]["weights"]["method"]


def test_one_step_of_a_run_scores_like_that_checkpoint_directory(eval_run, held_out):
    kw = dict(limit=40, text=held_out["jsonl"], seq_len=16, batch_size=8)
    mem = score(eval_run, "ckptavg_basics", step=300, progress=False, **kw)
    disk = score(eval_run / "step300", "ckptavg_basics", **kw)
    assert (mem["ckptavg"]["loaded_from"], disk["ckptavg"]["loaded_from"]) == ("memory", "disk")
    assert [i["step"] for i in mem["ckptavg"]["weights"]["inputs"]] == [300]
    assert mem["results"] == disk["results"] and mem["held_out"] == disk["held_out"]


def test_averages_differ_from_single_checkpoints(eval_run, held_out):
    """Guards the equality tests above against a path that ignores its weights."""
    losses = {s: score(eval_run, step=s, text=held_out["txt"], seq_len=16)["held_out"]["loss"] for s in (100, 500)}
    avg = score(eval_run, selection=Selection(steps=(100, 500)), text=held_out["txt"], seq_len=16)["held_out"]["loss"]
    assert len({losses[100], losses[500], avg}) == 3


def _loopback_hub(monkeypatch, tmp_path, name: str, branches: dict[str, Path]):  # type: ignore[no-untyped-def]
    """A loopback Hub (tests/hubserver.py) serving ``branches`` (branch → checkpoint folder) as
    ``org/name``, with huggingface_hub pointed at it and a private cache under ``tmp_path``."""
    from hubserver import HubServer, Repo, set_client

    repo = Repo(f"org/{name}")
    for branch, folder in branches.items():
        repo.commit(branch, {f.name: f.read_bytes() for f in folder.iterdir()})
    server = HubServer([repo])
    home = tmp_path / "hf_home"
    set_client(monkeypatch, ENDPOINT=server.url,
               HUGGINGFACE_CO_URL_TEMPLATE=server.url + "/{repo_id}/resolve/{revision}/{filename}",
               HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), HF_HUB_OFFLINE=False,
               HF_TOKEN_PATH=str(home / "token"), HF_STORED_TOKENS_PATH=str(home / "stored_tokens"),
               HF_HUB_DISABLE_TELEMETRY=True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return server


def test_hub_trajectory_is_averaged_in_memory_like_local_files(eval_run, held_out, tmp_path, monkeypatch):
    """hf:// selections download through ckptavg.hub, then take the same in-memory path; the
    same weights give the same held-out loss as on disk."""
    server = _loopback_hub(monkeypatch, tmp_path, "tiny-eval",
                           {f"step{s}": eval_run / f"step{s}" for s in (300, 400, 500)})
    with server:
        mem = score("hf://org/tiny-eval", selection=Selection(window=2), text=held_out["txt"], seq_len=16,
                    progress=False)
    disk = score(ckptavg.average(ckptavg.discover(eval_run).window(2), tmp_path / "m", progress=False),
                 text=held_out["txt"], seq_len=16)
    assert mem["ckptavg"]["loaded_from"] == "memory"
    assert [i["step"] for i in mem["ckptavg"]["weights"]["inputs"]] == [400, 500]
    assert len(server.downloads("model.safetensors")) == 2  # the window's two revisions, fetched over HTTP
    assert mem["held_out"] == disk["held_out"]


def test_hub_duplicates_are_refused_unless_allowed(eval_run, held_out, tmp_path, monkeypatch):
    """allow_duplicates reaches the download: two branches with step400's bytes are refused
    before any weights are fetched, and allowed they average to exactly step400."""
    server = _loopback_hub(monkeypatch, tmp_path, "tiny-dupes",
                           {"step300": eval_run / "step300", "step400": eval_run / "step400",
                            "step500": eval_run / "step400"})
    with server:
        with pytest.raises(ckptavg.DuplicateError, match="--allow-duplicates"):
            score("hf://org/tiny-dupes", selection=Selection(window=2), text=held_out["txt"], seq_len=16,
                  progress=False)
        assert len(server.downloads("model.safetensors")) == 0  # refused from metadata alone
        with pytest.warns(Warning, match="averaging anyway"):
            mem = score("hf://org/tiny-dupes", selection=Selection(window=2), text=held_out["txt"], seq_len=16,
                        allow_duplicates=True, progress=False)
    disk = score(eval_run / "step400", text=held_out["txt"], seq_len=16)
    assert [i["step"] for i in mem["ckptavg"]["weights"]["inputs"]] == [400, 500]
    assert mem["held_out"] == disk["held_out"]  # the mean of two copies of step400 is step400, bit for bit


# Against lm-eval and transformers, run by hand -----------------------------------------------
def test_scores_match_lm_eval_run_directly_on_the_saved_checkpoint(eval_run, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_local.yaml").write_text(
        "task: tiny_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {TASK_DATA}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    merged = ckptavg.average(ckptavg.discover(eval_run).window(2), tmp_path / "merged", progress=False)

    ours = score(eval_run, "tiny_local", selection=Selection(window=2), include_path=tasks, limit=60, batch_size=4,
                 progress=False)
    lm = HFLM(pretrained=str(merged), device="cpu", batch_size=4)
    theirs = lm_eval.simple_evaluate(model=lm, tasks=["tiny_local"], limit=60, log_samples=False,
                                     task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    assert theirs is not None
    assert ours["results"]["tiny_local"] == theirs["results"]["tiny_local"]
    assert ours["n-samples"] == theirs["n-samples"] == {"tiny_local": {"original": 99, "effective": 60}}


def _windows(ids: list[int], n: int) -> list[list[int]]:
    return [w for w in (ids[i : i + n] for i in range(0, len(ids), n)) if len(w) >= 2]


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_held_out_loss_equals_transformers_loss(eval_run, held_out, tokenizer, kind):
    from transformers import AutoModelForCausalLM

    got = score(eval_run / "step200", text=held_out[kind], seq_len=16, batch_size=3)["held_out"]

    model = AutoModelForCausalLM.from_pretrained(eval_run / "step200").eval()
    if kind == "txt":
        ids = tokenizer(held_out["txt"].read_text(), add_special_tokens=False).input_ids
    else:
        ids = []
        for i, t in enumerate(HELD_OUT):
            ids += ([tokenizer.eos_token_id] if i else []) + tokenizer(t, add_special_tokens=False).input_ids
    total = count = 0.0
    with torch.no_grad():
        for w in _windows(ids, 16):
            x = torch.tensor([w])
            total += model(input_ids=x, labels=x).loss.item() * (len(w) - 1)
            count += len(w) - 1
    assert got["tokens"] == len(ids) and got["predicted_tokens"] == count
    assert got["windows"] == len(_windows(ids, 16)) and got["documents"] == (1 if kind == "txt" else len(HELD_OUT))
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_one_window_is_exactly_the_model_loss(eval_run, held_out, tokenizer):
    from transformers import AutoModelForCausalLM

    ids = tokenizer(held_out["txt"].read_text(), add_special_tokens=False).input_ids
    got = score(eval_run / "step500", text=held_out["txt"], seq_len=len(ids))["held_out"]
    model = AutoModelForCausalLM.from_pretrained(eval_run / "step500").eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        assert got["windows"] == 1 and got["loss"] == pytest.approx(model(input_ids=x, labels=x).loss.item(), rel=1e-6)


@pytest.mark.parametrize("spec", [None, Selection()], ids=["disk", "memory"])
def test_weights_that_do_not_fit_the_config_are_refused(eval_run, held_out, tmp_path, spec):
    import shutil

    d = tmp_path / "step500"
    shutil.copytree(eval_run / "step500", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 3}))  # the weights have 2 layers
    with pytest.raises(ckptavg.CheckpointError, match=r"tensor 'gpt_neox\.layers\.2\..*' is missing"):
        score(d, selection=spec, text=held_out["txt"], progress=False)


# Command line --------------------------------------------------------------------------------
def test_cli_json_output_and_results_file(eval_run, held_out, tmp_path):
    out = tmp_path / "res" / "eval.json"
    r = run("eval", eval_run, "--window", 2, "--tasks", "ckptavg_basics", "--limit", 20, "--batch-size", 4,
            "--text", held_out["jsonl"], "--seq-len", 16, "--results", out, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data == json.loads(out.read_text())
    assert data["n-samples"]["ckptavg_basics"] == {"original": 99, "effective": 20}
    assert set(data["results"]["ckptavg_basics"]) >= {"acc,none", "acc_stderr,none", "acc_norm,none"}
    assert data["configs"]["ckptavg_basics"]["dataset_path"] == "json"  # lm-eval's own keys are kept
    prov = data["ckptavg"]
    assert prov["loaded_from"] == "memory" and prov["tasks"] == ["ckptavg_basics"] and prov["limit"] == 20
    assert [(i["step"], i["weight"]) for i in prov["weights"]["inputs"]] == [(400, 0.5), (500, 0.5)]
    assert prov["weights"]["method"] == {"name": "uniform"} and prov["model"]["class"] == "GPTNeoXForCausalLM"
    assert data["held_out"]["seq_len"] == 16 and data["held_out"]["loss"] > 0


def test_cli_table(eval_run):
    r = run("eval", eval_run, "--step", 400, "--tasks", "ckptavg_basics", "--limit", 10)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("weights: step 400 of ") and lines[0].endswith("in memory")
    assert lines[1].split() == ["task", "metric", "value"]
    assert lines[2].split()[:2] == ["ckptavg_basics", "acc"] and lines[3].split()[:2] == ["ckptavg_basics", "acc_norm"]


def test_missing_lm_eval_names_the_extra_and_text_still_works(eval_run, held_out, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    r = run("eval", eval_run, "--window", 2, "--tasks", "ckptavg_basics")
    assert r.exit_code == 1
    assert r.output.strip() == (
        "Error: scoring tasks needs lm-evaluation-harness (missing module 'lm_eval'): pip install 'ckptavg[eval]'"
    )
    with pytest.raises(ckptavg.MissingDependencyError, match=EXTRA_HINT.replace("[", r"\[")) as err:
        score(eval_run, "ckptavg_basics", step=100)
    assert isinstance(err.value, ImportError)  # `except ImportError` around optional features still catches it
    r = run("eval", eval_run / "step100", "--text", held_out["txt"], "--json")
    assert r.exit_code == 0, r.output
    assert "results" not in json.loads(r.stdout) and json.loads(r.stdout)["held_out"]["loss"] > 0


@pytest.mark.parametrize("args, msg", [
    (["--tasks", "ckptavg_basics"], "a run of 5 checkpoints (steps 100..500); choose one with --step S"),
    (["--window", 2, "--tasks", "ckptavg_basic"], "unknown task 'ckptavg_basic'; did you mean 'ckptavg_basics'"),
    (["--window", 2], "nothing to score"),
    (["--step", 100, "--window", 2, "--text", ROOT / "README.md"], "not both"),
    (["--step", 150, "--text", ROOT / "README.md"], "no checkpoint at step 150"),
    (["--window", 2, "--tasks", "ckptavg_basics", "--include-path", ROOT / "nope"], "must be a folder of task YAMLs"),
    (["--step", 100, "--text", ROOT / "README.md", "--dtype", "float8"], "unknown model dtype 'float8'"),
    (["--step", 100, "--text", ROOT / "README.md", "--seq-len", 1], "--seq-len must be at least 2, got 1"),
], ids=["run-without-spec", "unknown-task", "nothing-to-score", "step-and-window", "bad-step", "bad-include-path",
        "bad-dtype", "bad-seq-len"])
def test_bad_input_gives_one_line_errors(eval_run, args, msg):
    """Every one is a bad flag: exit 2, as click gives for its own flag errors."""
    r = run("eval", eval_run, *args)
    assert r.exit_code == 2
    assert msg in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("kw, error", [
    (dict(tasks="ckptavg_basics"), ckptavg.SelectionError),
    (dict(tasks="ckptavg_basic", step=100), ckptavg.UsageError),
    (dict(), ckptavg.UsageError),
    (dict(text=ROOT / "README.md", step=100, selection=Selection(window=2)), ckptavg.UsageError),
    (dict(text=ROOT / "README.md", step=100, dtype="float8"), ckptavg.UsageError),
    (dict(text=ROOT / "README.md", step=100, seq_len=0), ckptavg.UsageError),
], ids=["run-without-spec", "unknown-task", "nothing-to-score", "step-and-selection", "bad-dtype", "bad-seq-len"])
def test_bad_arguments_raise_the_specific_error_class(eval_run, kw, error):
    with pytest.raises(error):
        score(eval_run, **kw)


@pytest.mark.parametrize("how", [["--step", 500], ["--window", 2]], ids=["from-disk", "in-memory"])
def test_custom_code_models_are_refused_without_running_their_code(eval_run, held_out, tmp_path, how):
    """A config whose model_type only the checkpoint's own modeling_*.py knows: transformers would
    import that file (or stop at a y/N prompt). ckptavg refuses in one line and runs none of it."""
    import shutil

    sentinel = tmp_path / "code-ran"
    run_dir = tmp_path / "custom"
    for step in (400, 500):
        d = shutil.copytree(eval_run / f"step{step}", run_dir / f"step{step}")
        cfg = json.loads((d / "config.json").read_text())
        cfg |= {"model_type": "critter", "auto_map": {"AutoConfig": "configuration_critter.CritterConfig",
                                                      "AutoModelForCausalLM": "modeling_critter.CritterForCausalLM"}}
        (d / "config.json").write_text(json.dumps(cfg))
        for mod in ("configuration_critter", "modeling_critter"):
            (d / f"{mod}.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    target = run_dir / "step500" if how[0] == "--step" else run_dir
    args = ["eval", target, "--text", held_out["txt"]] + (how[2:] if how[0] == "--step" else how)
    r = subprocess.run([sys.executable, "-m", "ckptavg", *map(str, args)], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    assert r.returncode == 1 and not sentinel.exists()
    assert "model_type 'critter' needs its own code (modeling_critter.CritterForCausalLM)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "[y/N]" not in r.stdout and r.stdout == ""


def test_eval_has_help_and_cli_start_stays_light():
    assert len(run("eval", "--help").output) > 500
    code = ("import sys, ckptavg.cli, ckptavg, ckptavg.eval; ckptavg.score.__doc__; "
            "assert not {'torch', 'lm_eval', 'transformers'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# Offline and packaging -----------------------------------------------------------------------
def test_offline_sets_the_hf_variables_for_the_call_only(monkeypatch):
    import huggingface_hub.constants as hub_constants

    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    for k in names:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with offline_env(True):
        assert [os.environ.get(k) for k in names] == ["1"] * 3
        assert hub_constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and hub_constants.HF_HUB_OFFLINE is False


def test_scoring_outside_a_git_checkout_prints_no_git_error(eval_run, tmp_path, monkeypatch, capfd):
    """lm-eval records ``git describe --always`` in its results, and git wrote "fatal: not a git
    repository" straight to the terminal (file descriptor 2) outside a checkout."""
    import lm_eval.evaluator

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no checkout above tmp_path either
    r = score(eval_run, "ckptavg_basics", step=500, limit=2, progress=False)
    assert r["git_hash"] is None
    assert "fatal" not in capfd.readouterr().err
    # in a checkout the value is still git's own
    git = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, env=os.environ | git)
    want = subprocess.check_output(["git", "describe", "--always"], cwd=tmp_path, text=True).strip()
    assert lm_eval.evaluator.get_git_commit_hash() == want


def test_offline_run_of_the_packaged_task(eval_run):
    r = score(eval_run, "ckptavg_basics", step=500, limit=5, offline=True)
    assert r["ckptavg"]["offline"] is True and r["n-samples"]["ckptavg_basics"]["effective"] == 5


def test_packaged_task_is_well_formed_and_shipped():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    assert packaged_tasks() == ["ckptavg_basics"]
    docs = [json.loads(line) for line in TASK_DATA.read_text().splitlines()]
    assert len(docs) == 99 and len({d["question"] for d in docs}) == 99
    for d in docs:
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4 and 0 <= d["label"] < 4
    assert sorted({d["label"] for d in docs}) == [0, 1, 2, 3]
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ckptavg"]
    for f in (TASKS_DIR / "ckptavg_basics").iterdir():
        assert any(fnmatch(str(f.relative_to(ROOT / "ckptavg")), g) for g in globs), f


def test_old_module_name_warns_and_still_works(monkeypatch):
    import ckptavg.eval

    monkeypatch.delitem(sys.modules, "ckptavg.evaluate", raising=False)  # warn even if imported earlier
    with pytest.warns(DeprecationWarning, match=r"ckptavg\.evaluate is deprecated: use ckptavg\.eval"):
        old = importlib.import_module("ckptavg.evaluate")
    assert old.score is ckptavg.eval.score and old.held_out_loss is ckptavg.eval.held_out_loss
    assert set(old.__all__) == set(ckptavg.eval.__all__)
