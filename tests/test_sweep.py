"""ckptavg sweep / plot: the table against direct scoring and closed-form averages, resume after a
SIGKILL, failed jobs, Ray against the local executor, recipe validation, shipped recipes, the PNG.

The run is conftest's eval_run (5 tiny GPT-NeoX checkpoints with a tokenizer, steps 100..500), scored on
the packaged ckptavg_basics task (limit 8) and a held-out text; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import ckptavg
from ckptavg import CkptavgError, Selection, SelectionError, UsageError
from ckptavg.cli import cli
from ckptavg.sweep import (
    TABLE,
    EvalSpec,
    RayOptions,
    Recipe,
    Variants,
    load_recipe,
    load_results,
    plan,
    ray_options,
    run_sweep,
)
from ckptavg.sweep.table import ResultsTable

ROOT = Path(__file__).resolve().parents[1]
PYTHIA_TASKS = ("lambada_openai", "piqa", "winogrande", "arc_easy", "arc_challenge", "sciq")
TARGETS = (300, 400, 500)
VARIANTS = ("raw", "uniform2", "uniform3", "ema-h100")
METRICS = (("ckptavg_basics", "acc"), ("ckptavg_basics", "acc_norm"), ("held_out", "loss"), ("held_out", "perplexity"))
EVAL = {"tasks": ["ckptavg_basics"], "limit": 8, "seq_len": 16, "batch_size": 4}


def recipe(run: Path, text: Path, out: Path, **over: object) -> dict:
    """The tests' recipe as parsed YAML: steps 300..500, raw + LAWA 2, 3 + EMA (half-life 100 steps)."""
    base = {"trajectory": str(run), "output": str(out), "steps": {"start": 300},
            "variants": {"raw": True, "uniform": [2, 3], "ema_half_life": [100]},
            "eval": EVAL | {"text": str(text)}}
    return base | over


def write_recipe(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def values(rows: list[dict]) -> dict[tuple, float]:
    return {(r["step"], r["variant"], r["task"], r["metric"]): r["value"] for r in rows if r["status"] == "ok"}


def run_cli(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def local_sweep(eval_run, held_out, tmp_path_factory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("sweep") / "local"
    report = run_sweep(recipe(eval_run, held_out["txt"], out), progress=False)
    return report, load_results(out)


# The table -----------------------------------------------------------------------------------
def test_table_has_a_row_per_step_variant_metric_and_summaries(local_sweep):
    report, rows = local_sweep
    assert (report.jobs, report.ran, report.skipped, report.failed) == (12, 12, 0, ())
    assert len(rows) == len(TARGETS) * len(VARIANTS) * len(METRICS)
    assert {(r["step"], r["variant"], r["task"], r["metric"]) for r in rows} == {
        (s, v, t, m) for s in TARGETS for v in VARIANTS for t, m in METRICS}
    assert all(r["status"] == "ok" and r["trajectory"] == rows[0]["trajectory"] for r in rows)
    r = next(r for r in rows if r["variant"] == "uniform3" and r["step"] == 500 and r["metric"] == "acc")
    assert r["samples"] == 8 and r["higher_is_better"] is True and 0 < r["stderr"] < 1
    assert [(i["step"], i["weight"]) for i in r["provenance"]["inputs"]] == [(300, 1 / 3), (400, 1 / 3), (500, 1 / 3)]
    assert r["provenance"]["eval"]["limit"] == 8 and r["provenance"]["executor"] == "local"

    import csv

    with report.csv.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert {(int(c["step"]), c["variant"], c["task"], c["metric"]): float(c["value"]) for c in table} == values(rows)
    md = report.markdown.read_text()
    assert "## ckptavg_basics · acc (higher is better)" in md and "## held_out · loss (lower is better)" in md
    assert "| step | raw | uniform2 | uniform3 | ema-h100 |" in md
    assert "- uniform3 beats raw at " in md


SPECS = {
    "raw": dict(step=400),
    "uniform3": dict(selection=Selection(window=3, at=400)),
    "ema-h100": dict(selection=Selection(at=400), method="ema", half_life=100),
}


@pytest.mark.parametrize("variant", list(SPECS), ids=list(SPECS))
def test_values_equal_scoring_the_same_weights_directly(local_sweep, eval_run, held_out, variant):
    _, rows = local_sweep
    direct = ckptavg.score(eval_run, text=held_out["txt"], progress=False, **EVAL, **SPECS[variant])
    mine = {(r["task"], r["metric"]): r["value"] for r in rows if (r["step"], r["variant"]) == (400, variant)}
    assert mine[("held_out", "loss")] == direct["held_out"]["loss"]
    assert mine[("ckptavg_basics", "acc")] == direct["results"]["ckptavg_basics"]["acc,none"]
    assert mine[("ckptavg_basics", "acc_norm")] == direct["results"]["ckptavg_basics"]["acc_norm,none"]


@pytest.mark.parametrize("step, variant, weights", [
    (500, "uniform2", {400: 0.5, 500: 0.5}),
    (300, "ema-h100", {100: 0.25 / 1.75, 200: 0.5 / 1.75, 300: 1 / 1.75}),  # 0.5^((300 - s)/100), normalised
], ids=["lawa", "ema"])
def test_held_out_loss_equals_a_torch_average_scored_by_hand(local_sweep, eval_run, held_out, tokenizer,
                                                             step, variant, weights):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ckptavg.eval import held_out_loss

    model = AutoModelForCausalLM.from_pretrained(eval_run / f"step{step}").eval()
    sds = {s: load_file(eval_run / f"step{s}" / "model.safetensors") for s in weights}
    avg = {k: sum(w * sds[s][k].double() for s, w in weights.items()).float() for k in sds[step]}
    model.load_state_dict(avg)
    want = held_out_loss(model, tokenizer, held_out["txt"], seq_len=16)["loss"]
    _, rows = local_sweep
    got = next(r["value"] for r in rows if (r["step"], r["variant"], r["metric"]) == (step, variant, "loss"))
    assert got == pytest.approx(want, rel=1e-5)


def test_rerun_skips_every_finished_job_and_appends_nothing(local_sweep, eval_run, held_out):
    report, rows = local_sweep
    before = report.table.read_bytes()
    again = run_sweep(recipe(eval_run, held_out["txt"], report.table.parent), progress=False)
    assert (again.ran, again.skipped) == (0, 12)
    assert report.table.read_bytes() == before


# Crashes and resume --------------------------------------------------------------------------
def _complete_jobs(table: Path) -> int:
    """Attempts with all their rows in the table (what follows the last newline is torn)."""
    rows = [json.loads(x) for x in table.read_bytes().split(b"\n")[:-1]]
    attempts = {r["attempt"]: r["job_rows"] for r in rows}
    return sum(n == sum(r["attempt"] == a for r in rows) for a, n in attempts.items())


@pytest.mark.slow  # a subprocess that imports torch and lm-eval, then SIGKILL
def test_sigkill_mid_sweep_then_rerun_completes_without_recomputing(eval_run, held_out, tmp_path):
    out = tmp_path / "killed"
    data = recipe(eval_run, held_out["txt"], out, steps={"start": 200}, variants={"raw": True, "uniform": [2]},
                  eval={"text": str(held_out["txt"]), "seq_len": 16})  # held-out loss only: 8 short jobs
    path = write_recipe(tmp_path / "r.yaml", data)
    proc = subprocess.Popen([sys.executable, "-m", "ckptavg", "sweep", str(path), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    table = out / TABLE
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if table.is_file() and b"\n" in table.read_bytes():
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    first = table.read_bytes()
    done = _complete_jobs(table)
    assert 1 <= done < 8

    report = run_sweep(path, progress=False)
    assert (report.skipped, report.ran, report.failed) == (done, 8 - done, ())
    assert table.read_bytes()[: first.rfind(b"\n") + 1] == first[: first.rfind(b"\n") + 1]  # rows are only appended
    rows = load_results(out)
    assert len(rows) == 4 * 2 * 2 and all(r["status"] == "ok" for r in rows)
    attempts = {(r["step"], r["variant"]): r["attempt"] for r in rows}
    assert len(set(attempts.values())) == 8  # one complete attempt per job: nothing was scored twice
    assert _complete_jobs(table) == 8


def test_a_torn_last_line_is_cut_and_its_job_rerun(local_sweep, eval_run, held_out, tmp_path):
    report, rows = local_sweep
    out = tmp_path / "torn"
    out.mkdir()
    whole = report.table.read_bytes()
    (out / TABLE).write_bytes(whole[:-40])  # the crash hit the last job's last row mid-write
    with pytest.warns(UserWarning, match="dropped a torn last line"):
        again = run_sweep(recipe(eval_run, held_out["txt"], out), progress=False)
    assert (again.ran, again.skipped) == (1, 11)
    lines = (out / TABLE).read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(x) for x in lines[:-1])
    assert values(load_results(out)) == values(rows)


def test_a_table_being_written_by_another_sweep_is_refused(local_sweep, eval_run, held_out):
    report, _ = local_sweep
    other = ResultsTable(report.table)
    try:
        with pytest.raises(CkptavgError, match="another sweep is writing this table"):
            run_sweep(recipe(eval_run, held_out["txt"], report.table.parent), progress=False)
    finally:
        other.close()


def test_a_table_scored_under_another_eval_spec_is_refused(local_sweep, eval_run, held_out):
    report, _ = local_sweep
    data = recipe(eval_run, held_out["txt"], report.table.parent)
    data["eval"] = data["eval"] | {"limit": 6}
    with pytest.raises(CkptavgError, match=r"scored with another eval spec \(limit: 8 → 6\)"):
        run_sweep(data, progress=False)


# Failed jobs ---------------------------------------------------------------------------------
def test_failing_jobs_are_recorded_and_retried_and_the_sweep_goes_on(eval_run, held_out, tmp_path, monkeypatch,
                                                                     capsys):
    import ckptavg.eval

    real = ckptavg.eval.score

    def flaky(target, *args, **kwargs):  # type: ignore[no-untyped-def]
        if target.steps[-1] == 300 and kwargs["selection"].window == 1:
            print("chatter before the failure", file=sys.stderr)  # what lm-eval and transformers do at every job
            raise RuntimeError("injected failure\nsecond line")
        return real(target, *args, **kwargs)

    monkeypatch.setattr(ckptavg.eval, "score", flaky)
    path = write_recipe(tmp_path / "r.yaml", recipe(eval_run, held_out["txt"], tmp_path / "out", steps=[200, 300],
                                                     variants={"raw": True, "uniform": [3]}))
    report = run_sweep(path, progress=False)
    assert report.ran == 4 and sorted(report.failed) == [
        (200, "uniform3", "SelectionError: tiny: window 3 needs 3 checkpoints, the selection has 2"),
        (300, "raw", "RuntimeError: injected failure"),
    ]
    rows = load_results(tmp_path / "out")
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and all(r["metric"] is None and r["value"] is None for r in failed)
    raw_failure = next(r for r in failed if r["variant"] == "raw")["provenance"]
    assert "injected failure" in raw_failure["traceback"]
    assert raw_failure["log"] == "chatter before the failure\n"  # a job's stderr is kept with its failure…
    assert "chatter" not in capsys.readouterr().err  # …and kept off the terminal
    assert len([r for r in rows if r["status"] == "ok"]) == 2 * len(METRICS)  # the other two jobs finished
    assert "## Failed jobs" in report.markdown.read_text()

    monkeypatch.setattr(ckptavg.eval, "score", real)
    r = run_cli("sweep", path, "-q")
    assert r.exit_code == 1  # a job still failed
    assert "4 jobs: 2 run now (1 ok, 1 failed), 2 already in the table" in r.output
    assert "failed: step 200 uniform3: SelectionError: tiny: window 3 needs 3 checkpoints" in r.output
    rows = load_results(tmp_path / "out")
    assert {(r["step"], r["variant"]) for r in rows if r["status"] == "failed"} == {(200, "uniform3")}
    assert len([r for r in rows if r["status"] == "ok"]) == 3 * len(METRICS)

    r = run_cli("sweep", path, "--json")
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert report == {"table": str(tmp_path / "out" / TABLE), "csv": str(tmp_path / "out" / "results.csv"),
                      "markdown": str(tmp_path / "out" / "results.md"), "jobs": 4, "skipped": 3, "ran": 1,
                      "failed": [{"step": 200, "variant": "uniform3", "error": report["failed"][0]["error"]}]}
    assert "window 3 needs 3 checkpoints" in report["failed"][0]["error"]


# Ray -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():  # type: ignore[no-untyped-def]
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no usage report to the internet from the tests' Ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = saved


@pytest.mark.slow  # starts Ray
def test_ray_executor_gives_the_same_table_and_records_failures(ray_session, local_sweep, eval_run, held_out, tmp_path):
    _, rows = local_sweep
    data = recipe(eval_run, held_out["txt"], tmp_path / "ray", steps=[400, 500])
    data["variants"] = data["variants"] | {"uniform": [3, 5]}  # uniform5 needs 5 checkpoints: fails at 400
    report = run_sweep(data, executor="ray", progress=False)
    assert ray_session.is_initialized()  # the tests' session was reused, not shut down
    assert report.ran == 8 and [(s, v) for s, v, _ in report.failed] == [(400, "uniform5")]
    assert "window 5 needs 5 checkpoints" in report.failed[0][2]
    got = load_results(tmp_path / "ray")
    assert all(r["provenance"]["executor"] == "ray" for r in got)
    mine = values(got)
    same = {k: v for k, v in values(rows).items() if k[0] in (400, 500) and k[1] != "uniform2"}
    assert {k: v for k, v in mine.items() if k[1] != "uniform5"} == pytest.approx(same, rel=1e-6)
    assert {k[:2] for k in mine if k[1] == "uniform5"} == {(500, "uniform5")}


@pytest.mark.parametrize("device, ray, want", [
    ("cpu", {}, {"num_cpus": 1, "num_gpus": 0}),
    ("cuda", {}, {"num_cpus": 1, "num_gpus": 1}),
    ("cuda", {"num_cpus": 4, "num_gpus": 0.5, "memory_gb": 2}, {"num_cpus": 4, "num_gpus": 0.5, "memory": 2 * 2**30}),
], ids=["cpu", "cuda", "explicit"])
def test_ray_resources_follow_the_eval_device(device, ray, want):
    r = load_recipe({"trajectory": "runs/x", "output": "o", "eval": {"tasks": ["piqa"], "device": device}, "ray": ray})
    assert ray_options(r) == want


# Recipes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, msg", [
    ("trajectory: r\noutput: o\neval: {tasks: [piqa]}\nvariant: {raw: true}\n",
     "unknown key 'variant'; did you mean 'variants'?"),
    ("trajectory: r\noutput: o\neval: {tasks: [piqa], limt: 10}\n", "unknown key 'eval.limt'; did you mean 'limit'?"),
    ("trajectory: r\noutput: o\neval: {tasks: [piqa]}\nsteps: {start: 1000, strid: 2}\n",
     "unknown key 'steps.strid'"),
    ("trajectory: r\noutput: o\neval: {tasks: [piqa]}\nsteps: {spacng: 20}\n",
     "unknown key 'steps.spacng'; did you mean 'spacing'? (known in steps: start, stop, spacing, every, at, steps)"),
    ("trajectory: r\noutput: o\neval: {tasks: [piqa]}\nsteps: {window: 5}\n", "unknown key 'steps.window'"),
    ("trajectory: r\noutput: o\neval: {tasks: [piqa]}\nsteps: {spacing: 0}\n",
     "steps.spacing must be a whole number of at least 1, got 0"),
    ("trajectory: r\noutput: o\neval: {tasks: [piqa]}\nsteps: {start: 600, stop: 100}\n",
     "steps.start 600 is after steps.stop 100"),
    ("trajectory: r\noutput: o\neval: {tasks: [piqa]}\nsteps: []\n", "steps: the list of target steps is empty"),
    ("trajectory: r\noutput: o\neval: {tasks: [piqa]}\nsteps: [300, x]\n", "steps[1] must be an integer, got 'x'"),
    ("trajectory: r\noutput: o\neval: {tasks: [piqa]}\nsteps: 300\n",
     "steps must be a mapping (start, stop, spacing, every, at, steps) or a list of steps, got 300"),
    ("trajectory: r\noutput: o\neval: {tasks: [piqa]}\nvariants: {uniform: [five]}\n",
     "variants.uniform[0] must be an integer, got 'five'"),
    ("trajectory: r\noutput: o\neval: {tasks: [piqa], batch_size: big}\n", "eval.batch_size must be an integer or 'auto'"),
    ("output: o\neval: {tasks: [piqa]}\n", "missing key 'trajectory'"),
    ("trajectory: r\noutput: o\neval: {}\n", "nothing to score"),
    ("trajectory: r\noutput: o\neval: {tasks: [piqa]}\nvariants: {raw: false}\n", "no variants to score"),
    ("trajectory: r\noutput: o\neval: {tasks: [piqa]\n", "not valid YAML"),
    ("- just\n- a list\n", "the recipe must be a mapping"),
], ids=["top-level", "nested", "steps", "steps-typo", "steps-window", "steps-spacing", "steps-order", "steps-empty",
        "steps-item", "steps-type", "type", "batch-size", "missing", "nothing-to-score", "no-variants", "yaml",
        "not-a-mapping"])
def test_bad_recipes_are_refused_in_one_line_naming_the_file(tmp_path, text, msg):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path}") and msg in str(e.value)
    if "steps." in msg and "unknown" not in msg:
        assert isinstance(e.value, SelectionError)  # range errors of the target steps are Selection's
    r = run_cli("sweep", path)
    assert r.exit_code == 2 and msg in r.output  # a bad recipe is bad input: the usage exit code
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_recipe_defaults_live_in_the_dataclasses():
    r = load_recipe({"trajectory": "runs/x", "output": "o", "eval": {"text": "v.txt"}})
    assert r == Recipe("runs/x", "o", EvalSpec(text="v.txt"))
    assert (r.steps, r.variants, r.ray, r.evict) == (Selection(), Variants(), RayOptions(), False)
    assert [v.name for v in r.variants.expand()] == ["raw"]
    with pytest.raises(Exception, match="frozen|cannot assign"):
        r.output = "elsewhere"  # type: ignore[misc]


def _pythia_like():  # type: ignore[no-untyped-def]
    from ckptavg.trajectory import Checkpoint, Trajectory

    steps = [0] + [2**i for i in range(10)] + list(range(1000, 10_001, 1000))  # Pythia's log-spaced start
    return Trajectory("p", tuple(Checkpoint(s, f"hf://org/p@step{s}", "torch") for s in steps), "hf://org/p")


def test_plan_targets_and_windows_on_a_log_spaced_start():
    r = load_recipe({"trajectory": "hf://org/p", "output": "o", "eval": {"tasks": ["piqa"]},
                     "steps": {"start": 1000, "stop": 9000, "spacing": 2000}, "variants": {"raw": True, "uniform": [5]}})
    jobs = plan(r, _pythia_like())
    assert [(j.step, j.variant.name) for j in jobs][:4] == [(1000, "raw"), (1000, "uniform5"), (3000, "raw"), (3000, "uniform5")]
    assert sorted({j.step for j in jobs}) == [1000, 3000, 5000, 7000, 9000]
    assert jobs[1].inputs.steps == [64, 128, 256, 512, 1000] and jobs[0].inputs.steps == [1000]
    with pytest.raises(SelectionError, match="no checkpoint at step 1500"):
        plan(load_recipe({"trajectory": "hf://org/p", "output": "o", "eval": {"tasks": ["piqa"]}, "steps": [1500]}),
             _pythia_like())
    with pytest.raises(SelectionError, match="no target step selected"):
        plan(load_recipe({"trajectory": "hf://org/p", "output": "o", "eval": {"tasks": ["piqa"]},
                          "steps": {"start": 20_000}}), _pythia_like())


@pytest.mark.parametrize("steps, want", [
    ({"start": 1000, "spacing": 2000}, [1000, 3000, 5000, 7000, 9000]),
    ({"spacing": 3000}, [0, 3000, 6000, 9000]),  # from 0 without a start, as Selection's spacing
    ({"stop": 4, "every": 2}, [1, 4]),  # every 2nd of 0, 1, 2, 4, counted back from the newest
    ({"at": 3000, "start": 512}, [512, 1000, 2000, 3000]),
    ({"steps": [4000, 2000], "start": 3000}, [4000]),
    ([4000, 2000, 4000], [2000, 4000]),
    (None, None),  # every checkpoint
], ids=["start-spacing", "spacing-from-0", "every", "at", "steps-filtered", "list", "default"])
def test_recipe_steps_are_a_selection_and_pick_its_targets(steps, want):
    data = {"trajectory": "hf://org/p", "output": "o", "eval": {"tasks": ["piqa"]}, "variants": {"uniform": [2]}}
    r = load_recipe(data | ({"steps": steps} if steps is not None else {}))
    traj = _pythia_like()
    sel = Selection(steps=tuple(steps)) if isinstance(steps, list) else Selection(**(steps or {}))
    assert r.steps == sel
    targets = sorted({j.step for j in plan(r, traj)})
    assert targets == sel.targets(traj).steps == (want or traj.steps)


def test_a_window_is_not_a_target_filter():
    with pytest.raises(UsageError, match="steps.window is not a target filter"):
        Recipe("runs/x", "o", EvalSpec(text="v.txt"), steps=Selection(window=5))


def test_evict_drops_only_revisions_no_unfinished_job_needs(monkeypatch):
    from ckptavg import hub
    from ckptavg.sweep.plan import evict_consumed
    from ckptavg.trajectory import Checkpoint, Trajectory

    src = hub.HubSource("org/p", "b", "c", ())
    traj = Trajectory("p", tuple(Checkpoint(s, f"hf://org/p@step{s}", "torch", source=src) for s in range(1, 7)), "hf://org/p")
    r = load_recipe({"trajectory": "hf://org/p", "output": "o", "eval": {"tasks": ["piqa"]}, "steps": {"start": 3},
                     "variants": {"raw": False, "uniform": [3]}})
    jobs = plan(r, traj)  # windows 1-3, 2-4, 3-5, 4-6
    gone: list[list[int]] = []
    monkeypatch.setattr(hub, "evict", lambda cs: gone.append([c.step for c in cs]) or 0)
    evicted: set[int] = set()
    for i, job in enumerate(jobs):
        evict_consumed(job, jobs[i + 1:], evicted)
    assert gone == [[1], [2], [3], [4, 5, 6]]


RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_load_and_comment_every_knob(path):
    load_recipe(path)
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        key, sep, rest = line.strip().partition(":")
        if line.strip().startswith(("#", "-")) or not sep or not rest.split("#")[0].strip():
            continue  # comments, list items, section headers
        commented = "#" in rest or lines[i - 1].strip().startswith("#")
        assert commented, f"{path.name}:{i + 1}: knob {key!r} has no comment saying why"


@pytest.mark.parametrize("size", ["160m", "1b", "6.9b"])
def test_pythia_recipes_are_lawa_sweeps_on_a_gpu(size):
    r = load_recipe(ROOT / "recipes" / f"pythia-{size}-deduped-lawa.yaml")
    assert r.trajectory == f"hf://EleutherAI/pythia-{size}-deduped"
    assert r.variants.raw and r.variants.uniform == (5,) and r.steps.spacing == 1000
    assert r.eval.tasks == PYTHIA_TASKS and r.eval.device == "cuda" and ray_options(r)["num_gpus"] == 1
    assert r.eval.limit is None and r.eval.offline is False


@pytest.mark.slow  # needs the trained demo run
def test_demo_recipe_fits_what_make_demo_writes(demo_run, tmp_path, monkeypatch):
    """recipes/demo.yaml, run from a folder laid out as `make demo` leaves ./example (the session's
    trained demo run, its held-out text and task), on its last target."""
    from dataclasses import replace

    from ckptavg.demo import write_data

    (tmp_path / "example").mkdir()
    (tmp_path / "example" / "pythia-critter").symlink_to(demo_run)
    write_data(tmp_path / "example" / "data")
    monkeypatch.chdir(tmp_path)
    r = load_recipe(ROOT / "recipes" / "demo.yaml")
    assert sorted({j.step for j in plan(r, ckptavg.discover(r.trajectory))}) == list(range(100, 601, 20))
    report = run_sweep(replace(r, steps=Selection(steps=(600,))), progress=False)
    assert report.table == tmp_path / "example" / "sweep" / TABLE and (report.ran, report.failed) == (5, ())
    rows = load_results(report.table)
    assert {(r["task"], r["metric"]) for r in rows} >= {("critter_facts", "acc"), ("held_out", "loss")}
    assert {(r["step"], r["variant"]) for r in rows} == {(600, v) for v in ("raw", "uniform5", "ema-h30",
                                                                            "wsm-1-sqrt5", "wma5")}


def test_missing_ray_and_matplotlib_name_their_extra(local_sweep, eval_run, held_out, tmp_path, monkeypatch):
    from ckptavg import MissingDependencyError
    from ckptavg.sweep.plot import plot_results

    report, _ = local_sweep
    # import ray / matplotlib.* → ImportError, also for submodules an earlier test already imported
    for name in [m for m in sys.modules if m.split(".")[0] in ("ray", "matplotlib")] + ["ray", "matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'ckptavg\[ray\]'"):
        run_sweep(recipe(eval_run, held_out["txt"], tmp_path / "ray"), executor="ray", progress=False)
    with pytest.raises(MissingDependencyError, match=r"pip install 'ckptavg\[plot\]'"):
        plot_results(report.table, tmp_path / "x.png")


def test_bad_executor_arguments_are_usage_errors(eval_run, held_out, tmp_path):
    data = recipe(eval_run, held_out["txt"], tmp_path / "o")
    with pytest.raises(UsageError, match="unknown executor 'slurm'"):
        run_sweep(data, executor="slurm", progress=False)
    with pytest.raises(UsageError, match="--address applies to --executor ray only"):
        run_sweep(data, address="auto", progress=False)


# Plot ----------------------------------------------------------------------------------------
def test_plot_writes_a_png_with_a_panel_per_metric(local_sweep, tmp_path):
    import matplotlib.image as mpimg
    from PIL import Image

    from ckptavg.sweep.plot import plot_results

    report, _ = local_sweep
    png = plot_results(report.table.parent, tmp_path / "all.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 1000 and im.size[1] > 500
    pixels = mpimg.imread(png)
    assert pixels.ndim == 3 and float(pixels[..., :3].std()) > 0.02  # lines and text, not a blank canvas

    r = run_cli("plot", report.table, "--task", "held_out", "--metric", "loss", "--png", tmp_path / "loss.png")
    assert r.exit_code == 0 and r.output.strip() == f"wrote {tmp_path / 'loss.png'}"
    with Image.open(tmp_path / "loss.png") as im:
        assert im.size[0] < Image.open(png).size[0]  # one panel

    r = run_cli("plot", report.table, "--task", "piqa")
    assert r.exit_code == 1 and "no finished rows to plot for tasks ['piqa']" in r.output


def test_plot_adds_gain_panels_and_marks_for_the_demo_figure(local_sweep, tmp_path):
    from PIL import Image

    from ckptavg.sweep.plot import Mark, plot_results

    report, _ = local_sweep
    kw = dict(tasks=["held_out"], metrics=["loss"], dpi=100)
    plain = plot_results(report.table, tmp_path / "plain.png", **kw)
    gain = plot_results(report.table, tmp_path / "gain.png", **kw, variants=["raw", "uniform3", "ema-h100"],
                        start=400, labels={"raw": "raw checkpoint", "uniform3": "LAWA k=3"}, gain=True, gain_clip=1e-4,
                        marks=[Mark(450, 500, "a span", "C2"), Mark(400, label="a step")], title="a title")
    with Image.open(plain) as a, Image.open(gain) as b:
        assert b.size[0] == a.size[0] and b.size[1] > a.size[1] * 1.4  # a gain panel under the loss panel
    no_raw = plot_results(report.table, tmp_path / "no-raw.png", **kw, variants=["uniform3"], gain=True)
    with Image.open(no_raw) as c:
        assert c.size == Image.open(plain).size  # nothing to compare with: no gain panel
    with pytest.raises(CkptavgError, match=r"no finished rows to plot for variants \['uniform9'\]"):
        plot_results(report.table, tmp_path / "x.png", variants=["uniform9"])


def test_sweep_and_plot_have_help_and_keep_the_cli_light():
    for cmd in ("sweep", "plot"):
        assert len(run_cli(cmd, "--help").output) > 300
    code = ("import sys, ckptavg.cli; "
            "assert not {'torch', 'ray', 'matplotlib', 'yaml', 'lm_eval'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
