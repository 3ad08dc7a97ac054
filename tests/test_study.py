"""``ckptavg study``: the claims' arithmetic on made-up scores (exact), the command's flags, and the
smallest real study run twice (identical JSON and PNG, one number against an independent oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckptavg.cli import cli
from ckptavg.demo.study import StudyConfig, _grid, _runs, _spacing_targets, quick, summarise


def _fake_scores(cfg: StudyConfig) -> dict[str, dict]:
    """Scores with known gains: raw = 1 everywhere; LAWA gains 0.01 × lr/1e-3 × (1 + seed) before the
    spike; spacing sp gains sp/1000; the annealed run's cool-down gains fall to 0, the twin's stay."""
    b = cfg.base
    out = {}
    grid = _grid(b)
    for name, c in _runs(cfg).items():
        g = 0.01 * c.lr / 1e-3 * (1 + c.seed)
        raw = {s: 1.0 for s in grid}
        raw[b.spike_end] = 2.0
        const = name.endswith("constant")
        lawa = {s: 1.0 - (g if const or b.phase(s) != "cooldown" else g * (b.steps - s) / b.cooldown) for s in grid}
        lawa[b.spike_end] = 1.25
        if not const:  # the annealed branch ends lower, and LAWA there gains nothing
            raw[b.steps] = lawa[b.steps] = 0.8
        r = {"raw": raw, "lawa": lawa, "ema": {b.spike_end: 1.5}, "lawa_xa": {b.spike_end: 1.1},
             "excluded": {b.spike_end: [b.spike_end]}}
        if const:
            r["spacing"] = {sp: {t: 1.0 - sp / 1000 for t in _spacing_targets(b, cfg)} for sp in cfg.spacings}
            r["wsm"] = {"steps": [b.steps - b.cooldown, b.steps], "wsm": 0.85, "uniform": 0.9}
        out[name] = r
    return out


def test_the_claims_are_computed_from_the_scores_exactly():
    cfg = quick()
    b = cfg.base
    c = summarise(cfg, _fake_scores(cfg))
    lr = {r["lr"]: r for r in c["lr"]["rows"]}
    assert lr[3e-3]["steps"] == [30, 40, 50]  # k × spacing ≤ s < spike start, constant LR
    assert lr[3e-3]["median_gain"]["seeds"] == [pytest.approx(0.03), pytest.approx(0.06)]
    assert lr[1e-2]["median_gain"]["mean"] == pytest.approx(0.15) and lr[1e-2]["wins"]["seeds"] == [3, 3]
    assert c["lr"]["holds"] is True
    sp = {r["spacing"]: r for r in c["spacing"]["rows"]}
    assert {s: r["k"] for s, r in sp.items()} == {10: 3, 20: 2}
    assert sp[20]["mean_gain"]["min"] == pytest.approx(0.02) and c["spacing"]["holds"] is True
    last = c["annealing"]["rows"][-1]
    assert last["step"] == b.steps and last["annealed"]["max"] == pytest.approx(0.0)
    assert last["constant"]["seeds"] == [pytest.approx(0.03), pytest.approx(0.06)] and c["annealing"]["holds"] is True
    spike = c["spike"]["rows"][0]
    assert (spike["raw"]["mean"], spike["lawa"]["mean"], spike["ema"]["mean"], spike["lawa_xa"]["mean"]) == (2.0, 1.25, 1.5, 1.1)
    assert spike["recovered"]["mean"] == pytest.approx(0.75) and spike["excluded"] == [[60], [60]]
    w = c["wsm"]
    assert w["gap_closed"]["seeds"] == [pytest.approx(0.75)] * 2 and w["holds"] is True
    assert w["wsm_minus_annealed"]["mean"] == pytest.approx(0.05)


def test_a_claim_that_fails_says_so():
    cfg = quick()
    scores = _fake_scores(cfg)
    for name, r in scores.items():
        if "constant" in name:
            r["wsm"]["wsm"] = 0.99  # closes 5% of the gap
            r["spacing"][20] = {t: 1.0 for t in r["spacing"][20]}  # wider spacing gains nothing
    c = summarise(cfg, scores)
    assert c["wsm"]["holds"] is False and c["spacing"]["holds"] is False and c["lr"]["holds"] is True
    from ckptavg.demo.study_report import study_markdown

    md = study_markdown({"config": json.loads(json.dumps(_asdict(cfg))), "claims": c, "branch_identical": True})
    assert "## 5. WSM (1-sqrt) merge vs an annealed branch — **does not appear**" in md
    assert "## 1. Gain vs peak learning rate — **holds**" in md


def _asdict(cfg: StudyConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


@pytest.mark.parametrize("args, message", [
    (["--lrs", "1e-3,fast"], "--lrs: expected numbers"),
    (["--lrs", "1e-3,1e-2"], "including the base LR 0.003"),
    (["--seeds", "0"], "Invalid value for '--seeds'"),
], ids=["not-a-number", "no-base-lr", "no-seeds"])
def test_bad_flags_exit_2_with_one_line(tmp_path, args, message):
    r = CliRunner().invoke(cli, ["study", "--out", str(tmp_path / "s"), *args])
    assert r.exit_code == 2 and message in r.output
    assert not (tmp_path / "s").exists()  # refused before anything is trained


@pytest.mark.slow  # 2 × 6 tiny trainings in fresh processes: ~2 min idle, far more on a loaded machine
def test_the_smallest_study_is_reproduced_exactly_and_its_numbers_are_real(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ckptavg.demo.study import run_study
    from ckptavg.eval import held_out_loss

    r = CliRunner().invoke(cli, ["study", "--quick", "--out", str(tmp_path / "a"), "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "## 1. Gain vs peak learning rate" in r.output and "study.png" in r.output
    second = run_study(tmp_path / "b", quick(), progress=False)
    for f in ("study.json", "study.md", "study.png"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert second["branch_identical"] is True

    # One number by hand: LAWA (k = 3, every 10 steps) at step 50 of seed 1, lr 3e-3, in fp64.
    cfg = quick()
    run = tmp_path / "a" / "runs" / "s1-lr0.003" / "pythia-critter"
    states = [load_file(run / f"step{s}" / "model.safetensors") for s in (30, 40, 50)]
    avg = {k: (sum(s[k].double() for s in states) / 3).float() for k in states[0]}
    model = AutoModelForCausalLM.from_pretrained(run / "step50").float().eval()
    if "embed_out.weight" not in model.state_dict():
        avg = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in avg.items()}
    model.load_state_dict(avg)
    torch.set_num_threads(1)
    heldout = tmp_path / "a" / "data" / "s1" / "heldout.jsonl"
    want = held_out_loss(model, AutoTokenizer.from_pretrained(run / "step50"), heldout, seq_len=cfg.base.context,
                         batch_size=64)["loss"]
    got = json.loads((tmp_path / "a" / "study.json").read_text())["scores"]["s1-lr0.003"]["lawa"]["50"]
    assert got == pytest.approx(want, abs=2e-6)
    assert Path(tmp_path / "a" / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
