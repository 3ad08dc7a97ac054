"""The demo's synthetic language, its trained trajectory (the session fixture ``demo_run``, a real
600-step run in Pythia's layout, cached across sessions), and ``ckptavg demo`` itself."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckptavg import Selection, average, discover
from ckptavg.cli import cli
from ckptavg.demo import DEMO, DemoConfig, TrainConfig
from ckptavg.demo.synthlang import COLOURS, FOODS, HOMES, NUMBERS, corpus, train_tokenizer, world, write_task
from ckptavg.series import iter_series, series

SMALL = {"n_train": 2000, "n_heldout": 200}


def test_generator_is_a_pure_function_of_the_seed():
    a, b, c = corpus(0, **SMALL), corpus(0, **SMALL), corpus(1, **SMALL)
    assert a == b
    assert a.train != c.train and a.world != c.world
    assert len(a.train) == 2000 and len(a.heldout) == 200


def test_held_out_split_shares_no_document_with_training():
    c = corpus(DEMO.seed, n_train=DEMO.n_train, n_heldout=DEMO.n_heldout)
    assert not set(c.train) & set(c.heldout)
    assert len(set(c.heldout)) > 0.9 * len(c.heldout)  # mostly distinct documents, not one repeated


def test_world_facts_and_task_answers_agree():
    crs = world(0)
    names = [c.name for c in crs]
    assert len(set(names)) == len(names) and not set(names) & set(COLOURS + HOMES + FOODS + NUMBERS)
    by_name = {c.name: c for c in crs}
    kinds = {"food": 0, "home": 0, "colour": 0, "sum": 0, "agreement": 0}
    for item in corpus(0, **SMALL).task:
        kinds[item["kind"]] += 1
        answer, q = item["choices"][item["label"]], item["question"].split()
        assert len(set(item["choices"])) == len(item["choices"])
        if item["kind"] == "food":
            assert answer == by_name[q[3]].food
        elif item["kind"] == "home":
            assert answer == by_name[q[1]].home
        elif item["kind"] == "colour":
            assert answer == by_name[q[4]].colour
        elif item["kind"] == "sum":
            assert NUMBERS.index(answer) == NUMBERS.index(q[0]) + NUMBERS.index(q[2])
        else:
            assert answer == ("eats" if q[0] == "the" else "eat")
    assert all(kinds.values())


def test_task_files_are_an_lm_eval_multiple_choice_task(tmp_path):
    yaml = pytest.importorskip("yaml")
    items = corpus(0, **SMALL).task
    path = write_task(tmp_path / "task", items, "critter_facts")
    cfg = yaml.safe_load(path.read_text())
    assert cfg["task"] == "critter_facts" and cfg["dataset_path"] == "json" and cfg["output_type"] == "multiple_choice"
    data = cfg["dataset_kwargs"]["data_files"]["test"]
    assert data.startswith("/")  # lm-eval resolves relative data_files against the working directory
    assert [json.loads(line) for line in Path(data).read_text().splitlines()] == list(items)


def test_schedule_and_pythia_save_steps():
    cfg = TrainConfig()
    assert cfg.save_steps()[:8] == (0, 1, 2, 4, 8, 16, 20, 40)
    assert cfg.save_steps()[-1] == cfg.steps and all(s % 20 == 0 for s in cfg.save_steps()[6:])
    assert cfg.lr_at(0) == pytest.approx(cfg.lr / cfg.warmup)
    assert cfg.lr_at(200) == cfg.lr
    assert [cfg.lr_at(s) for s in range(cfg.spike_end - cfg.spike_steps, cfg.spike_end)] == [cfg.lr * cfg.spike_factor] * cfg.spike_steps
    assert cfg.lr_at(cfg.spike_end) == cfg.lr
    assert cfg.lr_at(cfg.steps - 1) == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=1e-2)
    assert TrainConfig(lr=0.01).key() != cfg.key() and TrainConfig().key() == cfg.key()


@pytest.mark.parametrize("what", ["tokenizer", "arithmetic"])
def test_the_cache_key_covers_the_tokenizer_and_the_arithmetic(monkeypatch, what):
    """A run trained with another tokenizer, or other kernels/threads, is not reused."""
    from ckptavg.demo import synthlang, train

    before = DEMO.key()
    if what == "tokenizer":
        monkeypatch.setitem(synthlang.TOKENIZER_SETTINGS, "add_prefix_space", True)
    else:
        monkeypatch.setitem(train.ARITHMETIC, "ATEN_CPU_CAPABILITY", "avx512")
    assert DEMO.key() != before


@pytest.mark.slow  # needs the trained demo run (~40 s when not cached)
def test_tokenizer_is_byte_level_bpe_with_pythia_specials(demo_run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_run / "step600")
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, len(tok)) == ("<|endoftext|>", 0, 1, DEMO.vocab_size)
    text = corpus(DEMO.seed, **SMALL).heldout[0]
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) <= len(text.split()) + 4  # BPE learnt the language's words, not bytes
    fresh = train_tokenizer(corpus(DEMO.seed, n_train=DEMO.n_train, n_heldout=DEMO.n_heldout).train, DEMO.vocab_size)
    assert fresh(text)["input_ids"] == ids  # deterministic


@pytest.mark.slow  # needs the trained demo run (~40 s when not cached)
def test_trajectory_is_discovered_in_pythia_layout(demo_run):
    traj = discover(demo_run)
    assert traj.steps == list(DEMO.save_steps())
    assert traj.steps[:7] == [0, 1, 2, 4, 8, 16, 20]  # log-spaced early steps, as Pythia's step0/1/2/4/…/512
    for c in traj:
        names = {p.name for p in (demo_run / f"step{c.step}").iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
        assert c.format == "safetensors"
    tensors = traj[-1].tensors
    assert "embed_out.weight" in tensors and "gpt_neox.embed_in.weight" in tensors  # Pythia's tensor names
    n = sum(math.prod(t.shape) for t in tensors.values())
    assert 0.5e6 <= n <= 3e6
    config = json.loads((demo_run / "step600" / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and config["use_parallel_residual"] is True


def _loss(run, step, heldout):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ckptavg.eval import held_out_loss

    model = AutoModelForCausalLM.from_pretrained(run / f"step{step}").float().eval()  # (dtype= needs transformers 4.56)
    tok = AutoTokenizer.from_pretrained(run / f"step{step}")
    return held_out_loss(model, tok, heldout, seq_len=DEMO.context, batch_size=64)["loss"]


@pytest.mark.slow  # needs the trained demo run (~40 s when not cached)
def test_held_out_loss_falls_over_training(demo_run, tmp_path):
    from ckptavg.demo import write_data

    heldout = write_data(tmp_path, DEMO).heldout
    losses = [_loss(demo_run, s, heldout) for s in (0, 20, 100, 300, 600)]
    assert losses[0] == pytest.approx(math.log(DEMO.vocab_size), abs=0.1)  # untrained: uniform over the vocabulary
    assert losses == sorted(losses, reverse=True)
    assert losses[-1] < 1.0


def _states(run, steps):  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    return [load_file(run / f"step{s}" / "model.safetensors") for s in steps]


@pytest.mark.slow
@pytest.mark.parametrize("at", [300, 600], ids=["high-lr", "last"])
def test_lawa_on_the_trained_run_equals_an_independent_average(demo_run, tmp_path, at):
    traj = discover(demo_run)
    window = traj.window(5, at=at).steps
    states = _states(demo_run, window)
    oracle = {k: torch.stack([s[k].double() for s in states]).mean(0).float() for k in states[0]}
    [(target, sd)] = list(iter_series(traj, Selection(window=5, steps=[at])))
    assert target.step == at and [traj[i].step for i in target.inputs] == window
    [out] = series(traj, tmp_path / "lawa", Selection(window=5, steps=[at]), progress=False)
    from safetensors.torch import load_file

    on_disk = load_file(out.path / "model.safetensors")
    merged = load_file(average(traj.window(5, at=at), tmp_path / "merged", progress=False) / "model.safetensors")
    for k, v in oracle.items():
        torch.testing.assert_close(sd[k], v, rtol=1e-6, atol=1e-7)  # iter_series keeps one fp32 running sum
        torch.testing.assert_close(on_disk[k], v, rtol=1e-6, atol=1e-7)  # series: five fp32 adds, as merge does
        assert torch.equal(on_disk[k], merged[k]), k  # ... bit for bit


@pytest.mark.slow  # needs the trained demo run (~40 s when not cached)
def test_ema_on_the_trained_run_equals_closed_form_weights(demo_run):
    traj = discover(demo_run)
    h = DemoConfig().ema_half_life
    steps = traj.between(None, 300).steps
    w = torch.tensor([0.5 ** ((300 - s) / h) for s in steps], dtype=torch.float64)
    w /= w.sum()
    states = _states(demo_run, steps)
    [(_, sd)] = list(iter_series(traj, Selection(steps=[300]), method="ema", half_life=h))
    for k in ("embed_out.weight", "gpt_neox.layers.0.attention.query_key_value.weight"):
        oracle = sum(wi * s[k].double() for wi, s in zip(w, states)).float()
        torch.testing.assert_close(sd[k], oracle, rtol=1e-6, atol=1e-8)


@pytest.mark.slow  # needs the trained demo run (~40 s when not cached)
def test_demo_command_prints_its_table_and_saves_the_plot(demo_run, tmp_path):
    out = tmp_path / "ex"
    out.mkdir()
    (out / demo_run.name).symlink_to(demo_run, target_is_directory=True)  # the cached run: no training here
    r = CliRunner().invoke(cli, ["demo", "--out", str(out), "--quiet", "--no-zero-shot"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "held-out loss" in r.output and "cached" in r.output
    assert "high-lr: LAWA k=5 beats raw at" in r.output and "<- spike" in r.output
    png = out / "lawa.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
    merged = out / f"{demo_run.name}-uniform5-step600"
    assert json.loads((merged / "ckptavg.json").read_text())["method"]["name"] == "uniform"

    r = CliRunner().invoke(cli, ["demo", "--out", str(out), "--no-zero-shot", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)  # the tables from the first call: nothing scored again
    assert data["run"] == str(out / demo_run.name) and data["trained"] is False and data["demo"]["window"] == 5
    assert len(data["raw"]) == len(DEMO.save_steps()) and min(map(int, data["lawa"])) == 2 * DEMO.save_every
    assert data["plot"] == str(png) and data["sweep"] == str(out / "demo-sweep") and data["zero_shot"] == []


def _load_into(model, state):  # type: ignore[no-untyped-def]
    """transformers ≥ 5 names GPT-NeoX's output layer ``lm_head`` in memory; checkpoints say ``embed_out``."""
    if "embed_out.weight" in state and "embed_out.weight" not in model.state_dict():
        state = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)


@pytest.mark.slow  # needs the trained demo run, scores 103 models
def test_demo_numbers_are_the_sweep_tables_and_match_independent_oracles(demo_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ckptavg.demo import TASK_NAME, run_demo
    from ckptavg.demo.run import _fresh_tables
    from ckptavg.eval import held_out_loss, score
    from ckptavg.sweep import load_results

    out = tmp_path / "ex"
    out.mkdir()
    (out / demo_run.name).symlink_to(demo_run, target_is_directory=True)
    r = run_demo(out, plot=False, progress=False)

    def traj_steps(at: int) -> list[int]:
        return discover(demo_run).window(5, at=at).steps

    steps = list(DEMO.save_steps())
    assert sorted(r.raw) == steps and sorted(r.lawa) == sorted(r.ema) == [s for s in steps if s >= 40]

    # The numbers are the held-out table's, variant by variant.
    rows = load_results(out / "demo-sweep" / "held-out")
    table = {(x["variant"], x["step"]): x["value"] for x in rows if x["metric"] == "loss"}
    assert {("raw", s): v for s, v in r.raw.items()} | {("uniform5", s): v for s, v in r.lawa.items()} \
        | {("ema-h30", s): v for s, v in r.ema.items()} | {("wsm-1-sqrt5", s): v for s, v in r.wsm.items()} \
        | {("wma5", s): v for s, v in r.wma.items()} | {("uniform5-xa", s): v for s, v in r.lawa_xa.items()} == table
    assert sorted(r.wsm) == sorted(r.wma) == sorted(r.lawa)
    # --exclude-anomalies at the 5 targets whose window holds the spiked step 320: it, and only it, is left out
    assert sorted(r.lawa_xa) == [320, 340, 360, 380, 400]
    assert r.xa_inputs == {s: [x for x in traj_steps(s) if x != 320] for s in r.lawa_xa}
    assert r.gains("high-lr") == {s: r.raw[s] - r.lawa[s] for s in r.lawa if 20 < s <= 480}

    # Independent oracles: the model from its folder, and fp64 averages loaded into it by hand.
    data = out / "data" / "heldout.jsonl"
    model = AutoModelForCausalLM.from_pretrained(demo_run / "step300").float().eval()
    tok = AutoTokenizer.from_pretrained(demo_run / "step300")
    torch.set_num_threads(DEMO.threads)

    def loss() -> float:
        return held_out_loss(model, tok, data, seq_len=DEMO.context, batch_size=64)["loss"]

    assert r.raw[300] == pytest.approx(loss(), abs=1e-6)
    traj = discover(demo_run)
    # WSM 1-sqrt over 5 checkpoints 20 steps apart: the decay f(τ) = 1 − √τ runs over 100 steps from half
    # a gap before the first (τ = 0) to half a gap after the last; w_j is f's mean over update j's 20 steps
    # (j = 1..4 between consecutive checkpoints); c_0 = 1 − w_1, c_j = w_j − w_{j+1}, c_4 = w_4.
    def mean_f(a: float, b: float) -> float:  # the exact mean of 1 − √τ over [a, b]: ∫ = τ − ⅔τ^1.5
        return ((b - 2 / 3 * b**1.5) - (a - 2 / 3 * a**1.5)) / (b - a)

    f = [mean_f((10 + 20 * (j - 1)) / 100, (10 + 20 * j) / 100) for j in (1, 2, 3, 4)]
    wsm = [1 - f[0], f[0] - f[1], f[1] - f[2], f[2] - f[3], f[3]]
    for curve, ins, w in (("lawa", traj.window(5, at=300).steps, None),
                          ("ema", traj.between(None, 300).steps, [0.5 ** ((300 - s) / 30) for s in traj.between(None, 300).steps]),
                          ("wsm", traj.window(5, at=300).steps, wsm),
                          ("wma", traj.window(5, at=300).steps, [1.0, 2.0, 3.0, 4.0, 5.0])):
        w = torch.tensor(w or [1.0] * len(ins), dtype=torch.float64)
        w /= w.sum()
        states = _states(demo_run, ins)
        _load_into(model, {k: sum(wi * st[k].double() for wi, st in zip(w, states)).float() for k in states[0]})
        assert getattr(r, curve)[300] == pytest.approx(loss(), abs=1e-6), curve
    states = _states(demo_run, [240, 260, 280, 300])  # LAWA at 320 without the spiked checkpoint
    _load_into(model, {k: (sum(st[k].double() for st in states) / 4).float() for k in states[0]})
    assert r.lawa_xa[320] == pytest.approx(loss(), abs=1e-6) and r.lawa_xa[320] < r.lawa[320] < r.raw[320]

    # Zero-shot: the zero-shot table's accuracies at 3 steps, raw/LAWA/EMA, as score() gives them directly.
    assert [(z["step"], z["variant"]) for z in r.zero_shot] == [(s, v) for s in (320, 480, 600) for v in ("raw", "lawa", "ema")]
    acc = {(x["step"], x["variant"]): x["value"] for x in load_results(out / "demo-sweep" / "zero-shot") if x["metric"] == "acc"}
    assert [z["acc"] for z in r.zero_shot] == [acc[(z["step"], {"raw": "raw", "lawa": "uniform5", "ema": "ema-h30"}[z["variant"]])]
                                               for z in r.zero_shot]
    direct = score(demo_run, TASK_NAME, selection=Selection(window=5, at=600), include_path=out / "data" / "task",
                   batch_size=32, dtype="float32", offline=True, progress=False)
    assert acc[(600, "uniform5")] == direct["results"][TASK_NAME]["acc,none"]
    json.dumps(r.to_dict())  # JSON-able, as `ckptavg demo --json` prints it

    # A re-run on the same run and settings scores nothing again; another run's tables are dropped.
    before = (out / "demo-sweep" / "held-out" / "results.jsonl").read_bytes()
    again = run_demo(out, zero_shot=False, plot=False, progress=False)
    assert (again.raw, again.lawa, again.ema) == (r.raw, r.lawa, r.ema)
    assert (out / "demo-sweep" / "held-out" / "results.jsonl").read_bytes() == before
    _fresh_tables(out / "demo-sweep", out / demo_run.name, {"key": "another run"}, DemoConfig())
    assert not (out / "demo-sweep" / "held-out").exists()


@pytest.mark.parametrize("module, flags", [("matplotlib", {}), ("lm_eval", {"plot": False})], ids=["plot", "zero-shot"])
def test_a_missing_extra_is_named_before_training(tmp_path, monkeypatch, module, flags):
    import importlib.util

    from ckptavg import MissingDependencyError
    from ckptavg.demo import run_demo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(MissingDependencyError, match=rf"needs {module} .*pip install 'ckptavg\[demo\]'"):
        run_demo(tmp_path, progress=False, **flags)
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


def test_importing_the_demo_modules_stays_light():
    code = ("import sys, ckptavg.demo, ckptavg.demo.synthlang, ckptavg.demo.train, ckptavg.demo.run, ckptavg.cli, "
            "ckptavg.sweep, ckptavg.sweep.plot, ckptavg.demo.study, ckptavg.demo.study_report, ckptavg.cli.study; "
            "print(sorted(m for m in ('torch', 'transformers', 'lm_eval', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# The smallest run the demo supports: 40 steps, every feature of the schedule (warm-up, spike, cool-down).
TINY = {"n_train": 1500, "n_heldout": 40, "steps": 40, "warmup": 5, "spike_end": 30, "cooldown": 10, "save_every": 10}
_TRAIN_AND_SCORE = """
import json, sys
from dataclasses import replace
from ckptavg.demo import DEMO, pin_arithmetic, run_demo
assert pin_arithmetic()  # as `ckptavg demo` does, before torch is imported
import torch
torch.set_num_threads(2)  # the caller's threads: the demo must not depend on them
from ckptavg.sweep import load_results
r = run_demo(sys.argv[1], config=replace(DEMO, **json.loads(sys.argv[2])), zero_shot=False, plot=False, progress=False)
rows = load_results(r.sweep / "held-out")
print(json.dumps(sorted([x["variant"], x["step"], x["metric"], x["value"]] for x in rows)))
"""


@pytest.mark.slow  # two tiny trainings in fresh processes, ~1-2 min on 2 loaded cores
def test_the_demo_is_bit_identical_whatever_the_threads_and_cpu_kernels(tmp_path):
    """Trained and scored twice in fresh processes, one with the CPU's own kernels (AVX-512 here),
    two OpenMP/MKL threads and MKL's automatic code path asked for: the same weights, bit for bit,
    and the same scores table. Without train.ARITHMETIC the second run sums in another order
    (measured: the weights differ from the first update on, the losses in the 9th digit)."""
    import os

    envs = [{"OMP_NUM_THREADS": "1"},
            {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO"}]
    procs = [subprocess.Popen([sys.executable, "-c", _TRAIN_AND_SCORE, str(tmp_path / f"out{i}"), json.dumps(TINY)],
                              env=os.environ | env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, env in enumerate(envs)]
    tables = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-2000:]
        tables.append(json.loads(out.splitlines()[-1]))
    runs = [tmp_path / f"out{i}" / "pythia-critter" for i in range(2)]
    steps = list(TrainConfig(**TINY).save_steps())  # type: ignore[arg-type]
    assert sorted(int(p.name[4:]) for p in runs[0].glob("step*")) == steps
    for s in steps:
        a, b = ((r / f"step{s}" / "model.safetensors").read_bytes() for r in runs)
        assert a == b, f"step{s} differs"
    stamps = [json.loads((r / "ckptavg-demo.json").read_text()) for r in runs]
    assert stamps[0]["log"] == stamps[1]["log"] and stamps[0]["versions"]["cpu_capability"] == "AVX2"
    assert tables[0] == tables[1]
    variants = {v for v, *_ in tables[0]}
    assert {"raw", "uniform5"} <= variants and len(tables[0]) > 2 * len(steps)
