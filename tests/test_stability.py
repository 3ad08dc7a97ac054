"""``ckptavg inspect`` (ckptavg.stability) and spike-aware averaging (``--exclude-anomalies``).

Figures are checked against an fp64 oracle computed with torch from the state dicts the run was
written from; anomalies against runs with a planted jump, NaN or growth at a known step."""

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
from ckptavg import errors as ckptavg_errors
from ckptavg.cli import cli
from ckptavg.series import series
from ckptavg.stability import (
    GROUP_NAMES,
    CheckpointStats,
    Norms,
    Report,
    detect,
    inspect,
    layer_group,
    robust_z,
)
from conftest import integer_state, tiny_config, write_checkpoint

STEPS = tuple(range(100, 1300, 100))  # 12 checkpoints: the default window (8) judges the last three
JUMP_AT = 1100  # index 10
SMALL = "gpt_neox.layers.0.attention.dense.bias"  # 32 elements: a jump here is not the model's
BIG = "gpt_neox.embed_in.weight"  # 4096 elements: a jump here is the model's


def _oracle(states: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str | None, tuple[float, ...]]]:
    """fp64 (weight norm, update norm, relative update per step) per tensor (None: whole model) and
    per group ("group:NAME"), by step."""
    steps = sorted(states)
    out: dict[int, dict[str | None, tuple[float, ...]]] = {}
    for i, s in enumerate(steps):
        cur = {k: v.double() for k, v in states[s].items() if v.is_floating_point()}
        prev = {k: v.double() for k, v in states[steps[i - 1]].items()} if i else None
        sums: dict[str | None, list[float]] = {}
        for k, v in cur.items():
            sq = float((v * v).sum())
            dsq = float(((v - prev[k]) ** 2).sum()) if prev else math.nan
            psq = float((prev[k] ** 2).sum()) if prev else math.nan
            for key in (k, None, f"group:{layer_group(k)}"):
                t = sums.setdefault(key, [0.0, 0.0, 0.0])
                t[0] += sq
                t[1] += dsq
                t[2] += psq
        gap = s - steps[i - 1] if i else 1
        out[s] = {k: (math.sqrt(a), math.sqrt(b), math.sqrt(b) / math.sqrt(c) / gap) for k, (a, b, c) in sums.items()}
    return out


def _figures(c: CheckpointStats, key: str | None) -> Norms:
    if key is None:
        return c.model
    return c.groups[key[6:]] if key.startswith("group:") else c.tensors[key]


@pytest.mark.parametrize("fmt,dtype", [("safetensors", torch.float32), ("bin", torch.float32),
                                       ("safetensors-sharded", torch.bfloat16), ("pt-file", torch.float16)],
                         ids=["safetensors", "bin", "sharded-bf16", "nanogpt-fp16"])
def test_figures_equal_an_fp64_oracle(make_run, fmt, dtype):
    steps = (0, 100, 300, 700, 1500)  # uneven gaps: the relative update is per step
    root, states = make_run(fmt, steps=steps, dtype=dtype, values="random",
                            extra={"gpt_neox.mask": lambda i: torch.ones(4, 4, dtype=torch.bool)})  # not a float
    report = inspect(root, progress=False)
    oracle = _oracle(states)
    assert report.steps == list(steps)
    assert "gpt_neox.mask" not in report.checkpoints[0].tensors
    first = report.checkpoints[0]
    assert first.model.update_norm is None and first.model.relative_update is None
    assert first.model.weight_norm == pytest.approx(oracle[0][None][0], rel=1e-12)
    for c in report.checkpoints[1:]:
        keys = [None, *c.tensors, *(f"group:{g}" for g in c.groups)]
        assert len(keys) == len(oracle[c.step])
        for key in keys:
            got = _figures(c, key)
            assert (got.weight_norm, got.update_norm, got.relative_update) == pytest.approx(oracle[c.step][key], rel=1e-12), key
    assert set(first.groups) == {"qkv", "attn_out", "mlp_in", "mlp_out", "embed", "norm"}


def test_figures_do_not_depend_on_threads_or_chunking(make_run, monkeypatch):
    import ckptavg.stability as stability

    root, states = make_run("safetensors", steps=(1, 2, 3, 5), values="random")
    monkeypatch.setattr(stability, "CHUNK", 1000)  # tensors of 4096 elements span several chunks
    runs = [inspect(root, threads=t, progress=False).to_dict() for t in (1, 2, 5)]
    assert runs[0] == runs[1] == runs[2]
    oracle = _oracle(states)
    assert runs[0]["checkpoints"][3]["update_norm"] == pytest.approx(oracle[5][None][1], rel=1e-12)


@pytest.mark.parametrize("name,group", [
    ("gpt_neox.layers.0.attention.query_key_value.weight", "qkv"),
    ("gpt_neox.layers.0.attention.dense.bias", "attn_out"),
    ("gpt_neox.layers.1.mlp.dense_h_to_4h.weight", "mlp_in"),
    ("gpt_neox.layers.1.mlp.dense_4h_to_h.weight", "mlp_out"),
    ("gpt_neox.embed_in.weight", "embed"), ("embed_out.weight", "embed"),
    ("gpt_neox.layers.0.input_layernorm.weight", "norm"), ("gpt_neox.final_layer_norm.bias", "norm"),
    ("model.layers.3.self_attn.q_proj.weight", "qkv"), ("model.layers.3.self_attn.v_proj.bias", "qkv"),
    ("model.layers.3.self_attn.o_proj.weight", "attn_out"), ("model.layers.3.mlp.gate_proj.weight", "mlp_in"),
    ("model.layers.3.mlp.up_proj.weight", "mlp_in"), ("model.layers.3.mlp.down_proj.weight", "mlp_out"),
    ("model.embed_tokens.weight", "embed"), ("lm_head.weight", "embed"), ("model.norm.weight", "norm"),
    ("model.layers.0.post_attention_layernorm.weight", "norm"),
    ("transformer.h.0.attn.c_attn.weight", "qkv"), ("transformer.h.0.attn.c_proj.weight", "attn_out"),
    ("transformer.h.0.mlp.c_fc.bias", "mlp_in"), ("transformer.h.0.mlp.c_proj.weight", "mlp_out"),
    ("transformer.wte.weight", "embed"), ("transformer.wpe.weight", "embed"), ("transformer.h.0.ln_1.weight", "norm"),
    ("transformer.ln_f.bias", "norm"),
    ("model.transformer.blocks.0.att_proj.weight", "qkv"), ("model.transformer.blocks.0.attn_out.weight", "attn_out"),
    ("model.transformer.blocks.0.ff_proj.weight", "mlp_in"), ("model.transformer.blocks.0.ff_out.weight", "mlp_out"),
    ("model.transformer.ff_out.weight", "embed"), ("model.transformer.blocks.0.attn_norm.weight", "norm"),
    ("gpt_neox.layers.0.attention.rotary_emb.inv_freq", "other"), ("classifier.weight", "other"),
], ids=lambda x: x if "." not in x else None)
def test_layer_groups_by_architecture(name, group):
    assert layer_group(name) == group
    assert group in GROUP_NAMES


def _steady_run(root: Path, base: dict[str, torch.Tensor], fmt: str = "safetensors", plant=None) -> dict[int, dict]:
    """12 checkpoints of independent integer noise (steady update sizes); ``plant(i, sd)`` edits one."""
    states = {}
    for i, s in enumerate(STEPS):
        sd = integer_state(base, seed=2000 + i)
        if plant is not None:
            plant(i, sd)
        write_checkpoint(root, s, sd, fmt)
        states[s] = sd
    return states


def _jump(name: str, size: float):
    def plant(i: int, sd: dict[str, torch.Tensor]) -> None:
        if STEPS[i] >= JUMP_AT:  # a lasting shift: one big update, at JUMP_AT
            sd[name] = sd[name] + size
    return plant


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_planted_jump_in_one_tensor_is_reported_at_that_step_and_tensor_only(tmp_path, base_state_dict, fmt):
    _steady_run(tmp_path / "run", base_state_dict, fmt, plant=_jump(SMALL, 20.0))
    report = inspect(tmp_path / "run", progress=False)
    assert [(a.step, a.tensor, a.kind) for a in report.anomalies] == [(JUMP_AT, SMALL, "update_spike")]
    assert report.anomalies[0].score > 20
    assert report.flagged() == {}  # one 32-element tensor does not condemn the checkpoint


def test_a_jump_the_whole_model_feels_is_flagged_for_exclusion(tmp_path, base_state_dict):
    _steady_run(tmp_path / "run", base_state_dict, plant=_jump(BIG, 20.0))
    report = inspect(tmp_path / "run", progress=False)
    assert {(a.step, a.tensor) for a in report.anomalies} == {(JUMP_AT, None), (JUMP_AT, BIG)}
    assert list(report.flagged()) == [JUMP_AT]
    assert "update_spike in the whole model" in report.flagged()[JUMP_AT]


def test_nan_is_reported_as_non_finite_at_its_step_and_tensor_without_crashing(tmp_path, base_state_dict):
    def plant(i: int, sd: dict[str, torch.Tensor]) -> None:
        if i == 4:
            sd[SMALL] = sd[SMALL].clone()
            sd[SMALL][:3] = torch.tensor([math.nan, math.inf, -math.inf])

    states = _steady_run(tmp_path / "run", base_state_dict, plant=plant)
    report = inspect(tmp_path / "run", progress=False)
    assert [(a.step, a.tensor, a.kind, a.score) for a in report.anomalies] == [(STEPS[4], SMALL, "non_finite", 3.0)]
    bad, after = report.checkpoints[4], report.checkpoints[5]
    assert bad.tensors[SMALL] == Norms(None) and after.tensors[SMALL].update_norm is None
    # the model's figures leave the NaN tensor out, at its step and the next
    rest = {s: {k: v for k, v in sd.items() if k != SMALL} for s, sd in states.items()}
    oracle = _oracle(rest)
    for c in (bad, after):
        assert c.model.weight_norm == pytest.approx(oracle[c.step][None][0], rel=1e-12)
    assert after.model.update_norm == pytest.approx(oracle[after.step][None][1], rel=1e-12)
    assert list(report.flagged()) == [STEPS[4]]
    json.dumps(report.to_dict(), allow_nan=False)  # strict JSON: NaN/Inf figures are null


def test_sustained_norm_growth_is_reported_once_where_it_qualifies(tmp_path, base_state_dict):
    def plant(i: int, sd: dict[str, torch.Tensor]) -> None:
        if i >= 4:  # every tensor × 1.2 per checkpoint from the 5th on
            for k in sd:
                sd[k] = sd[k] * 1.2 ** (i - 3)

    _steady_run(tmp_path / "run", base_state_dict, plant=plant)
    report = inspect(tmp_path / "run", window=3, progress=False)
    growth = [(a.step, a.tensor) for a in report.anomalies if a.kind == "norm_growth"]
    # rises 400→500→600→700 are the first three in a row; judged from the 2·window-th checkpoint (700)
    assert (STEPS[6], None) in growth and all(s == STEPS[6] for s, _ in growth)
    assert {t for _, t in growth} == {None, *(f"group:{g}" for g in report.checkpoints[0].groups)}
    score = next(a.score for a in report.anomalies if a.kind == "norm_growth" and a.tensor is None)
    w = [c.model.weight_norm for c in report.checkpoints]
    assert score == pytest.approx(w[6] / w[3], rel=1e-12)


def test_robust_z_and_its_floor_for_a_perfectly_steady_history():
    assert robust_z(1.5, [1.0, 1.1, 0.9, 1.0, 1.2]) == pytest.approx(0.5 / (1.4826 * 0.1))
    assert robust_z(1.04, [1.0] * 8) == pytest.approx(0.8)  # MAD 0: the scale is 5 % of the median
    assert robust_z(2.0, [1.0] * 8) == pytest.approx(20.0)
    assert robust_z(1e-9, [0.0] * 8) == math.inf and robust_z(0.0, [0.0] * 8) == 0.0


def test_too_little_history_is_not_judged():
    flat = [CheckpointStats(0, Norms(1.0), {}, {})] + [CheckpointStats(s, Norms(1.0, 0.1, 0.1), {}, {}) for s in range(1, 9)]
    jump = CheckpointStats(9, Norms(1.0, 9.0, 9.0), {}, {})
    assert detect([*flat[:8], jump], window=8) == []  # 7 earlier updates: one short
    assert [(a.step, a.kind) for a in detect([*flat, jump], window=8)] == [(9, "update_spike")]


def test_json_shape_and_round_trip(tmp_path, base_state_dict):
    _steady_run(tmp_path / "run", base_state_dict, plant=_jump(SMALL, 20.0))
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "run"), "--json", "-q"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert set(data) == {"trajectory", "rule", "checkpoints", "anomalies"}
    assert [c["step"] for c in data["checkpoints"]] == list(STEPS)
    c = data["checkpoints"][10]
    assert set(c) == {"step", "weight_norm", "update_norm", "relative_update", "tensors", "groups"}
    assert set(c["tensors"][SMALL]) == {"group", "weight_norm", "update_norm", "relative_update"}
    assert c["tensors"][SMALL]["group"] == "attn_out" and set(c["groups"]) >= {"qkv", "mlp_in", "embed"}
    assert data["anomalies"] == [{"step": JUMP_AT, "tensor": SMALL, "kind": "update_spike",
                                  "score": data["anomalies"][0]["score"]}]
    back = Report.from_dict(data)
    assert back.to_dict() == data


def test_cli_table_names_the_spike_and_plots(tmp_path, base_state_dict):
    pytest.importorskip("matplotlib")
    _steady_run(tmp_path / "run", base_state_dict, plant=_jump(BIG, 20.0))
    png = tmp_path / "s.png"
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "run"), "--groups", "--plot", str(png), "-q"])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.stdout.splitlines() if line.split()[:1] == [str(JUMP_AT)])
    assert "update_spike ×2" in row and "excluded by --exclude-anomalies" in row
    assert f"step {JUMP_AT:>10}  update_spike" in r.stdout and BIG in r.stdout and "(whole model)" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    assert imread(png).shape[0] > 500


def test_cli_bad_flags_exit_2(tmp_path, make_run):
    root, _ = make_run("safetensors", steps=(1, 2))
    for args in (["--anomaly-window", "1"], ["--threshold", "0"], ["--threads", "0"], ["--window", "0"]):
        r = CliRunner().invoke(cli, ["inspect", str(root), *args])
        assert r.exit_code == 2, (args, r.output)
        assert "Traceback" not in r.output


# --exclude-anomalies ------------------------------------------------------------------------------
def _load(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def test_merge_excluding_anomalies_is_the_plain_average_of_the_rest(tmp_path, base_state_dict):
    states = _steady_run(tmp_path / "run", base_state_dict, plant=_jump(BIG, 20.0))
    # the latest 5 hold the spike at 1100; the other 4 average exactly (integers / 4)
    out = average(tmp_path / "run", tmp_path / "lawa", selection=Selection(window=5), exclude_anomalies=True,
                  progress=False)
    kept = [800, 900, 1000, 1200]
    got = _load(out)
    for k, v in got.items():
        assert torch.equal(v, torch.stack([states[s][k] for s in kept]).mean(0)), k
    man = json.loads((out / "ckptavg.json").read_text())
    assert [i["step"] for i in man["inputs"]] == kept
    assert [x["step"] for x in man["excluded"]] == [JUMP_AT]
    assert "update_spike in the whole model" in man["excluded"][0]["reason"]
    assert man["exclusion"]["window"] == 8


def test_merge_cli_with_a_saved_report_and_without_one_agree(tmp_path, base_state_dict):
    _steady_run(tmp_path / "run", base_state_dict, plant=_jump(BIG, 20.0))
    report = tmp_path / "anomalies.json"
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "run"), "--json", "-q"])
    report.write_text(r.stdout)
    outs = {}
    for name, flags in (("inspect", ["--exclude-anomalies"]), ("file", ["--anomalies", str(report)])):
        r = CliRunner().invoke(cli, ["merge", str(tmp_path / "run"), "--window", "5", "-o", str(tmp_path / name), "-q",
                                     *flags])
        assert r.exit_code == 0, r.output
        assert f"left out step {JUMP_AT}: update_spike in the whole model" in r.stdout
        outs[name] = _load(tmp_path / name)
    assert all(torch.equal(outs["inspect"][k], outs["file"][k]) for k in outs["file"])
    # a dry run reads no tensor data: only a saved report will do
    r = CliRunner().invoke(cli, ["merge", str(tmp_path / "run"), "--window", "5", "--dry-run", "--exclude-anomalies"])
    assert r.exit_code == 2 and "--anomalies FILE" in r.output
    r = CliRunner().invoke(cli, ["merge", str(tmp_path / "run"), "--window", "5", "--dry-run", "--json",
                                 "--anomalies", str(report)])
    assert r.exit_code == 0 and json.loads(r.stdout)["steps"] == [800, 900, 1000, 1200]


def test_a_report_that_did_not_inspect_the_window_is_refused(tmp_path, base_state_dict):
    _steady_run(tmp_path / "run", base_state_dict)
    report = tmp_path / "early.json"
    report.write_text(json.dumps(inspect(tmp_path / "run", Selection(stop=600), progress=False).to_dict()))
    r = CliRunner().invoke(cli, ["merge", str(tmp_path / "run"), "--window", "3", "-o", str(tmp_path / "o"),
                                 "--anomalies", str(report)])
    assert r.exit_code == 2 and "step 1000 was not inspected" in r.output and not (tmp_path / "o").exists()
    (tmp_path / "junk.json").write_text('{"checkpoints": 3}')
    r = CliRunner().invoke(cli, ["merge", str(tmp_path / "run"), "--window", "3", "-o", str(tmp_path / "o"),
                                 "--anomalies", str(tmp_path / "junk.json")])
    assert r.exit_code == 2 and "not a report of ckptavg inspect --json" in r.output


def test_series_excluding_anomalies_drops_the_step_from_every_window(tmp_path, base_state_dict):
    states = _steady_run(tmp_path / "run", base_state_dict, plant=_jump(BIG, 20.0))
    outs = series(discover(tmp_path / "run"), tmp_path / "lawa", Selection(window=5, start=1000), progress=False,
                  exclude_anomalies=True)
    assert [o.step for o in outs] == [1000, 1200]  # no model at the flagged step
    got = _load(tmp_path / "lawa" / "step1200")
    for k, v in got.items():
        assert torch.equal(v, torch.stack([states[s][k] for s in (800, 900, 1000, 1200)]).mean(0)), k
    man = json.loads((tmp_path / "lawa" / "step1200" / "ckptavg.json").read_text())
    assert [x["step"] for x in man["excluded"]] == [JUMP_AT] and man["method"]["exclude_anomalies"] is True
    assert json.loads((tmp_path / "lawa" / "step1000" / "ckptavg.json").read_text())["excluded"] == []
    again = series(discover(tmp_path / "run"), tmp_path / "lawa", Selection(window=5, start=1000), progress=False,
                   exclude_anomalies=True)
    assert not any(o.written for o in again)  # a re-run with the same exclusion keeps its outputs


def test_series_ema_excluding_anomalies_equals_the_merge_of_the_rest(tmp_path, base_state_dict):
    states = _steady_run(tmp_path / "run", base_state_dict, plant=_jump(BIG, 20.0))
    series(discover(tmp_path / "run"), tmp_path / "ema", Selection(steps=(1200,)), method="ema", half_life=150.0,
           progress=False, exclude_anomalies=True)
    kept = [s for s in STEPS if s != JUMP_AT]
    w = torch.tensor([0.5 ** ((1200 - s) / 150.0) for s in kept], dtype=torch.float64)
    w /= w.sum()
    got = _load(tmp_path / "ema" / "step1200")
    for k, v in got.items():
        want = sum(wi * states[s][k].double() for wi, s in zip(w, kept))
        torch.testing.assert_close(v.double(), want, rtol=1e-6, atol=1e-6)


# Memory and the demo ------------------------------------------------------------------------------
_MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if r.returncode == 0 else -1)")


def _peak_rss_mb(args: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, check=True)
    kb = int(out.stdout.strip().splitlines()[-1])
    assert kb > 0, out.stderr
    return kb / 1024


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_number_of_checkpoints(tmp_path):
    from safetensors.torch import save_file

    big = 4 * 2**20  # a 16 MiB fp32 tensor: holding every checkpoint of 10 would add 128 MiB
    for i in range(10):
        d = tmp_path / "run" / f"step{i + 1}"
        d.mkdir(parents=True)
        save_file({"big": torch.full((big,), float(i)), "small": torch.arange(10.0) + i}, d / "model.safetensors")
    rss = {k: _peak_rss_mb([sys.executable, "-m", "ckptavg", "inspect", str(tmp_path / "run"), "--to", str(k), "-q",
                            "--json"]) for k in (2, 10)}
    assert rss[10] - rss[2] < 24, rss


@pytest.mark.slow
def test_inspect_flags_the_demo_runs_injected_spike(demo_run):
    from ckptavg.demo import DEMO

    report = inspect(demo_run, progress=False)
    whole = [a.step for a in report.anomalies if a.tensor is None and a.kind == "update_spike"]
    assert whole == [DEMO.spike_end]  # the whole model spikes there and nowhere else
    assert DEMO.spike_end in report.flagged()
    spiked = {a.tensor for a in report.anomalies if a.step == DEMO.spike_end and a.kind == "update_spike"}
    assert len(spiked) > 10  # most tensors feel a learning rate × 10


def test_a_sweep_variant_with_exclude_anomalies_averages_the_window_without_the_spike(tmp_path, base_state_dict,
                                                                                      monkeypatch):
    import ckptavg.eval
    from ckptavg.sweep import load_results, run_sweep

    _steady_run(tmp_path / "run", base_state_dict, plant=_jump(BIG, 20.0))

    def score(target, *args, selection, **kwargs):  # type: ignore[no-untyped-def]  # what scoring was given
        picked = selection.apply(target).steps
        return {"held_out": {"loss": float(len(picked)), "perplexity": 1.0, "predicted_tokens": 1},
                "ckptavg": {"weights": {"inputs": [{"step": s} for s in picked]}}}

    monkeypatch.setattr(ckptavg.eval, "score", score)
    (tmp_path / "t.txt").write_text("text")
    recipe = {"trajectory": str(tmp_path / "run"), "output": str(tmp_path / "out"), "steps": [1000, 1200],
              "eval": {"text": str(tmp_path / "t.txt")},
              "variants": {"raw": True, "uniform": [5], "exclude_anomalies": True}}
    report = run_sweep(recipe, progress=False)
    assert report.failed == ()
    rows = {(r["step"], r["variant"]): r for r in load_results(tmp_path / "out") if r["metric"] == "loss"}
    assert sorted(rows) == [(1000, "raw"), (1000, "uniform5-xa"), (1200, "raw"), (1200, "uniform5-xa")]
    assert [i["step"] for i in rows[(1200, "uniform5-xa")]["provenance"]["inputs"]] == [800, 900, 1000, 1200]
    assert [i["step"] for i in rows[(1000, "uniform5-xa")]["provenance"]["inputs"]] == [600, 700, 800, 900, 1000]


def test_inspect_hf_runs_downloading_as_merge_does(tmp_path, base_state_dict, monkeypatch):
    from hubserver import HubServer, Repo, set_client
    from safetensors.torch import save as st_save

    from ckptavg import hub as hubmod

    states = {s: integer_state(base_state_dict, seed=50 + i) for i, s in enumerate((1000, 2000, 3000))}
    repo = Repo("org/tiny")
    for s, sd in states.items():
        weights = {"model.safetensors": st_save(sd)} if s != 2000 else {"pytorch_model.bin": _torch_bytes(sd)}
        repo.commit(f"step{s}", weights | {"config.json": tiny_config().to_json_string().encode()})
    server = HubServer([repo])
    home = tmp_path / "hf_home"
    set_client(monkeypatch, ENDPOINT=server.url,
               HUGGINGFACE_CO_URL_TEMPLATE=server.url + "/{repo_id}/resolve/{revision}/{filename}",
               HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), HF_HUB_OFFLINE=False,
               HF_TOKEN_PATH=str(home / "token"), HF_STORED_TOKENS_PATH=str(home / "stored_tokens"),
               HF_HUB_DISABLE_TELEMETRY=True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hubmod.transport, "RETRY_WAIT", 0.01)
    with server:
        report = inspect("hf://org/tiny", progress=False)
    oracle = _oracle(states)
    assert report.trajectory == "hf://org/tiny" and report.steps == [1000, 2000, 3000]
    for c in report.checkpoints[1:]:
        got = c.model
        assert (got.weight_norm, got.update_norm, got.relative_update) == pytest.approx(oracle[c.step][None], rel=1e-12)


def _torch_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def test_mixed_architectures_and_missing_reports_are_one_line_errors(tmp_path, make_run, base_state_dict):
    root, states = make_run("safetensors", steps=(1, 2, 3))
    ckpts = list(discover(root))
    other = tmp_path / "other"
    write_checkpoint(other, 4, {k: v for k, v in states[3].items() if k != SMALL}, "safetensors")
    with pytest.raises(ckptavg_errors.IncompatibleError, match=f"step 3 .*extra tensor '{SMALL}'"):
        inspect([*ckpts, *discover(other)], progress=False)
    r = CliRunner().invoke(cli, ["merge", str(root), "--window", "2", "-o", str(tmp_path / "o"),
                                 "--anomalies", str(tmp_path / "nope.json")])
    assert r.exit_code == 1 and "nope.json" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()
