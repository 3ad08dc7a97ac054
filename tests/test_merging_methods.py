"""WSM, WMA, power-EMA, EMA in tokens and greedy soups through every surface: the weights a merge
records and streams, series targets against independent weighted averages, tokens read from the
run, the CLI's refusals, and a greedy soup against a brute-force search on a tiny run."""

from __future__ import annotations

import json
from itertools import combinations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import ckptavg
from ckptavg import Selection, engine, methods
from ckptavg.cli import cli
from ckptavg.errors import MethodError
from ckptavg.series import iter_series, series
from ckptavg.tokens import PYTHIA_TOKENS_PER_STEP, tokens_seen
from ckptavg.trajectory import Checkpoint, HubSource

STEPS = (0, 10, 20, 40, 80, 100, 160)


def run(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def weighted_oracle(states, steps, weights):
    return {n: sum(w * states[s][n].double() for w, s in zip(weights, steps)).float() for n in states[steps[-1]]}


METHODS = {
    "wsm-1-sqrt": ("wsm", {"schedule": "1-sqrt"}, ["--schedule", "1-sqrt"]),
    "wsm-cosine": ("wsm", {"schedule": "cosine"}, ["--schedule", "cosine"]),
    "wma": ("wma", {}, []),
    "power-ema": ("power-ema", {"sigma_rel": 0.2}, ["--sigma-rel", "0.2"]),
}


@pytest.mark.parametrize("name", list(METHODS), ids=list(METHODS))
def test_merge_streams_and_records_the_methods_weights(make_run, tmp_path, name):
    method, params, flags = METHODS[name]
    root, states = make_run(steps=STEPS, values="random")
    r = run("merge", root, "--window", 4, "--method", method, *flags, "-o", tmp_path / "m", "-q")
    assert r.exit_code == 0, r.output
    steps = list(STEPS[-4:])
    w = methods.weights(method, steps, **params)
    man = json.loads((tmp_path / "m" / "ckptavg.json").read_text())
    assert [(i["step"], i["weight"]) for i in man["inputs"]] == list(zip(steps, w))
    assert man["method"]["name"] == method and all(man["method"][k] == v for k, v in params.items())
    got = load_file(tmp_path / "m" / "model.safetensors")
    for n, t in weighted_oracle(states, steps, w).items():
        torch.testing.assert_close(got[n], t, rtol=1e-6, atol=1e-6)
    sd = ckptavg.average(root, selection=Selection(window=4), method=method, progress=False, **params)
    assert [i["weight"] for i in sd.manifest["inputs"]] == w


def test_dry_run_shows_weights_and_the_power_profile_error(make_run):
    root, _ = make_run(steps=STEPS)
    r = run("merge", root, "--window", 3, "--method", "power-ema", "--sigma-rel", "0.05", "--dry-run")
    assert r.exit_code == 0, r.output
    w = methods.weights("power-ema", [80, 100, 160], sigma_rel=0.05)
    err = methods.details("power-ema", [80, 100, 160], sigma_rel=0.05)["profile_error"]
    assert f"step        160  weight {w[-1]:.6f}" in r.output
    assert f"relative L2 error of the realised profile {err:.3f}" in r.output
    assert "warning: the checkpoints are too sparse for --sigma-rel 0.05" in r.stderr
    j = json.loads(run("merge", root, "--steps", "0,10,20", "--method", "wsm", "--schedule", "linear", "--dry-run",
                       "--json").output)
    assert j["weights"] == pytest.approx([1 / 3] * 3, rel=1e-12) and j["dry_run"]


def test_manifest_records_the_profile_error(make_run, tmp_path):
    root, _ = make_run(steps=STEPS)
    assert run("merge", root, "--method", "power-ema", "--sigma-rel", "0.25", "-o", tmp_path / "p", "-q").exit_code == 0
    man = json.loads((tmp_path / "p" / "ckptavg.json").read_text())
    assert man["method"]["profile_error"] == methods.details("power-ema", list(STEPS), sigma_rel=0.25)["profile_error"]
    assert man["method"]["gamma"] > 0


@pytest.mark.parametrize("args, msg", [
    (["--window", 3, "--method", "wsm", "--schedule", "foo"], "unknown --schedule 'foo'"),
    (["--window", 3, "--method", "wsm", "--schedule", "cosin"], "did you mean 'cosine'"),
    (["--window", 3, "--method", "wsm"], "needs --schedule"),
    (["--window", 3, "--method", "power-ema", "--sigma-rel", 0], "--sigma-rel must be in"),
    (["--window", 3, "--method", "power-ema"], "needs --sigma-rel"),
    (["--window", 3, "--method", "wma", "--schedule", "linear"], "does not take 'schedule'"),
    (["--window", 3, "--method", "wsn"], "did you mean 'wsm'"),
    (["--window", 3, "--method", "ema", "--half-life-tokens", "4e9"], "does not record tokens per step"),
    (["--window", 3, "--method", "ema", "--half-life-tokens", "4e9", "--tokens-per-step", 0], "must be a positive"),
])
def test_bad_method_flags_exit_2_in_one_line(make_run, args, msg):
    root, _ = make_run(steps=STEPS)
    r = run("merge", root, *args, "--dry-run")
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output


def test_ema_in_tokens_through_the_cli(make_run):
    root, _ = make_run(steps=STEPS)
    r = run("merge", root, "--method", "ema", "--half-life-tokens", "4e4", "--tokens-per-step", 1000, "--dry-run",
            "--json")
    j = json.loads(r.output)
    assert j["weights"] == pytest.approx(methods.weights("ema", list(STEPS), half_life=40), rel=1e-12)
    assert j["tokens"] == [s * 1000.0 for s in STEPS] and j["tokens_from"] == "--tokens-per-step"


# Tokens from the run -----------------------------------------------------------------------------
def test_tokens_from_trainer_state(tmp_path):
    ckpts = []
    for step in (10, 20, 30):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        log = [{"step": s, "loss": 1.0, "num_input_tokens_seen": s * 512 + (7 if s == 20 else 0)} for s in (10, 20)]
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": log}))
        ckpts.append(Checkpoint(step, str(d), "safetensors"))
    tokens, source = tokens_seen(ckpts)
    # Logged steps exactly; step 30 (not logged) at the newest entry's rate, 10247 / 20 per step.
    assert tokens == [5120.0, 10247.0, 30 * 10247 / 20] and source == "trainer_state.json"


def test_tokens_from_olmo_branch_names_and_pythia():
    olmo = [Checkpoint(s, f"hf://allenai/OLMo-1B@step{s}-tokens{b}B", "safetensors",
                       source=HubSource("allenai/OLMo-1B", f"step{s}-tokens{b}B", "c" * 40, ()))
            for s, b in ((1000, 4), (20000, 84))]
    tokens, source = tokens_seen(olmo)
    assert tokens == pytest.approx([1000 * 84e9 / 20000, 84e9]) and source == "OLMo branch names"
    pythia = [Checkpoint(s, f"hf://EleutherAI/pythia-160m@step{s}", "safetensors",
                         source=HubSource("EleutherAI/pythia-160m", f"step{s}", "c" * 40, ())) for s in (1000, 2000)]
    assert tokens_seen(pythia)[0] == [1000.0 * PYTHIA_TOKENS_PER_STEP, 2000.0 * PYTHIA_TOKENS_PER_STEP]
    assert tokens_seen(pythia, tokens_per_step=10)[0] == [10000.0, 20000.0]  # the user's figure wins
    with pytest.raises(MethodError, match="pass --tokens-per-step"):
        tokens_seen([Checkpoint(5, "/runs/x/step5", "safetensors")])


# Series ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(METHODS), ids=list(METHODS))
def test_series_targets_equal_independent_weighted_windows(make_run, tmp_path, monkeypatch, name):
    monkeypatch.setattr(engine, "CHUNK_ELEMS", 1000)  # several chunks per tensor
    method, params, _ = METHODS[name]
    root, states = make_run(steps=STEPS, values="random")
    traj = ckptavg.discover(root)
    res = series(traj, tmp_path / "s", Selection(window=3), method=method, progress=False, **params)
    assert [r.step for r in res] == list(STEPS[2:])
    mem = dict((t.step, sd) for t, sd in iter_series(traj, Selection(window=3), method=method, **params))
    for i, r in enumerate(res, start=2):
        steps = list(STEPS[i - 2: i + 1])
        w = methods.weights(method, steps, **params)
        man = json.loads((r.path / "ckptavg.json").read_text())
        assert [x["weight"] for x in man["inputs"]] == pytest.approx(w, rel=1e-15)
        got = load_file(r.path / "model.safetensors")
        for n, t in weighted_oracle(states, steps, w).items():
            torch.testing.assert_close(got[n], t, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(mem[r.step][n], t, rtol=1e-6, atol=1e-6)
    again = series(traj, tmp_path / "s", Selection(window=3), method=method, progress=False, **params)
    assert not any(r.written for r in again)  # the recorded parameters match: resumed, not redone


def test_series_ema_in_tokens_matches_merge(make_run, tmp_path):
    root, states = make_run(steps=STEPS, values="random")
    traj = ckptavg.discover(root)
    res = series(traj, tmp_path / "e", Selection(steps=(160,)), method="ema", half_life_tokens=80.0,
                 tokens_per_step=2.0, progress=False)
    w = methods.weights("ema", list(STEPS), half_life=40)
    got = load_file(res[0].path / "model.safetensors")
    for n, t in weighted_oracle(states, list(STEPS), w).items():
        torch.testing.assert_close(got[n], t, rtol=1e-6, atol=1e-6)


def test_series_needs_a_window_for_wsm(make_run, tmp_path):
    root, _ = make_run(steps=STEPS)
    r = run("series", root, "--method", "wsm", "--schedule", "linear", "-o", tmp_path / "s")
    assert r.exit_code == 2 and "needs --window" in r.output


# Greedy soup -------------------------------------------------------------------------------------
@pytest.fixture
def soup_run(eval_run, tmp_path):
    """eval_run's five checkpoints, with step 300 pushed far off (noise 1.5): a soup should leave it out."""
    import shutil

    from safetensors.torch import save_file

    root = tmp_path / "run"
    shutil.copytree(eval_run, root)
    f = root / "step300" / "model.safetensors"
    g = torch.Generator().manual_seed(7)
    save_file({k: (v + 1.5 * torch.randn(v.shape, generator=g)).contiguous() for k, v in load_file(f).items()}, f,
              metadata={"format": "pt"})
    return root


def test_greedy_soup_chooses_what_a_brute_force_search_would(soup_run, held_out, tmp_path):
    from transformers import AutoConfig, AutoTokenizer, GPTNeoXForCausalLM

    from ckptavg.eval import held_out_loss
    from ckptavg.soup import greedy_soup

    steps = [100, 200, 300, 400, 500]
    raw = {s: load_file(soup_run / f"step{s}" / "model.safetensors") for s in steps}
    config = AutoConfig.from_pretrained(soup_run / "step500")
    tok = AutoTokenizer.from_pretrained(soup_run / "step500")

    def loss_of(subset):  # an independent uniform average, built and scored here
        avg = {n: torch.stack([raw[s][n].double() for s in subset]).mean(0).float() for n in raw[500]}
        model = GPTNeoXForCausalLM.from_pretrained(None, config=config, state_dict=avg).eval()
        return held_out_loss(model, tok, held_out["jsonl"], seq_len=32)["loss"]

    table = {(*sub, 500): loss_of((*sub, 500)) for r in range(5) for sub in combinations(steps[:-1], r)}
    chosen, best = [500], table[(500,)]
    for s in reversed(steps[:-1]):  # the greedy rule, over the brute-force table
        trial = table[tuple(sorted((*chosen, s)))]
        if trial < best:
            chosen, best = [*chosen, s], trial
    soup = greedy_soup(soup_run, held_out["jsonl"], Selection(window=5), seq_len=32, out=tmp_path / "soup",
                       progress=False)
    assert soup.steps == tuple(sorted(chosen)) and 300 not in soup.steps and len(soup.steps) >= 2
    assert soup.loss == pytest.approx(best, abs=1e-5)
    assert [c.step for c in soup.curve] == [500, 400, 300, 200, 100]
    man = json.loads((tmp_path / "soup" / "ckptavg.json").read_text())
    assert [i["step"] for i in man["inputs"]] == list(soup.steps)
    assert [i["weight"] for i in man["inputs"]] == pytest.approx([1 / len(soup.steps)] * len(soup.steps))
    assert man["method"]["name"] == "greedy-soup" and man["method"]["chosen"] == list(soup.steps)
    assert [c["loss"] for c in man["method"]["curve"]] == pytest.approx(
        [table[tuple(sorted({500, *[c.step for c in soup.curve[: i + 1] if c.kept], c.step}))]
         for i, c in enumerate(soup.curve)], abs=1e-5)


def test_soup_cli(soup_run, held_out, tmp_path):
    r = run("soup", soup_run, "--window", 3, "--text", held_out["jsonl"], "--seq-len", 32, "-o", tmp_path / "s", "-q")
    assert r.exit_code == 0, r.output
    assert "greedy soup of" in r.output and "step        500" in r.output
    assert (tmp_path / "s" / "model.safetensors").is_file()
    r = run("soup", soup_run, "--window", 3, "--text", tmp_path / "missing.jsonl")
    assert r.exit_code == 2


# Sweep variants ----------------------------------------------------------------------------------
def test_sweep_scores_wsm_and_wma_variants_like_eval_does(eval_run, held_out, tmp_path):
    from ckptavg.eval import score
    from ckptavg.sweep import load_results, run_sweep

    data = {"trajectory": str(eval_run), "output": str(tmp_path / "sw"), "steps": [500],
            "variants": {"raw": False, "wsm": [3], "wsm_schedule": "cosine", "wma": [3]},
            "eval": {"text": str(held_out["txt"]), "seq_len": 16}}
    report = run_sweep(data, progress=False)
    assert not report.failed
    rows = {(r["variant"], r["metric"]): r for r in load_results(tmp_path / "sw") if r["task"] == "held_out"}
    for variant, kw in (("wsm-cosine3", {"method": "wsm", "schedule": "cosine"}), ("wma3", {"method": "wma"})):
        direct = score(eval_run, text=held_out["txt"], seq_len=16, selection=Selection(window=3), progress=False, **kw)
        assert rows[(variant, "loss")]["value"] == direct["held_out"]["loss"]
        got = rows[(variant, "loss")]["provenance"]
        assert got["method"] == kw["method"]


def test_recipe_refuses_an_unknown_wsm_schedule():
    from ckptavg.errors import UsageError
    from ckptavg.sweep import load_recipe

    with pytest.raises(UsageError, match="did you mean '1-sqrt'"):
        load_recipe({"trajectory": "r", "output": "o", "eval": {"text": "t"},
                     "variants": {"wsm": [4], "wsm_schedule": "1sqrt"}})
