"""The study's tables (markdown) and figure (one PNG, six panels), from ``study.json``'s content."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _s(x: Mapping[str, Any], digits: int = 3, signed: bool = True) -> str:
    """``mean [min, max]`` of a spread over seeds."""
    if not x.get("n"):
        return "—"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(x['mean'])} [{f.format(x['min'])}, {f.format(x['max'])}]"


def _verdict(claim: Mapping[str, Any]) -> str:
    return f"**{'holds' if claim['holds'] else 'does not appear'}** ({claim['criterion']})"


def study_markdown(result: Mapping[str, Any]) -> str:
    """``study.md``: one table per claim, each value ``mean [min, max]`` over the seeds.

    Args:
        result: what :func:`ckptavg.demo.study.run_study` returns (or ``study.json``).

    Returns:
        Markdown text.
    """
    cfg, c = result["config"], result["claims"]
    b, k, n = cfg["base"], cfg["window"], len(cfg["seeds"])
    lines = [f"# ckptavg study: {n} seeds ({', '.join(map(str, cfg['seeds']))}), LAWA k={k}",
             "",
             f"Held-out loss in nats/token; gain = raw − averaged (> 0: averaging wins); every cell is the mean "
             f"over seeds [min, max]. Runs: {b['steps']} steps, warm-up {b['warmup']}, spike ×{b['spike_factor']:g} "
             f"ending at {b['spike_end']}, cool-down over the last {b['cooldown']}, checkpoints every {b['save_every']}. "
             f"Constant twins bit-identical to the annealed runs up to the cool-down: {result['branch_identical']}.",
             "", f"## 1. Gain vs peak learning rate — {_verdict(c['lr'])}", "",
             f"Targets: steps {_steps(c['lr']['rows'][0]['steps'])} (constant LR, before the spike).", "",
             "| peak LR | median gain | LAWA wins (of targets) | raw loss at the last step |",
             "| --- | ---: | ---: | ---: |"]
    for r in c["lr"]["rows"]:
        lines.append(f"| {r['lr']:g} | {_s(r['median_gain'])} | {_s(r['wins'], 0, False)} of {len(r['steps'])} | "
                     f"{_s(r['final_raw'], 3, False)} |")
    sp = c["spacing"]
    lines += ["", f"## 2. Gain vs checkpoint spacing, window span {sp['span']} steps — {_verdict(sp)}", "",
              f"Constant-LR runs, targets {_steps(sp['rows'][0]['targets'])} (no spike in the window).", "",
              "| spacing (steps) | k | mean gain |", "| ---: | ---: | ---: |"]
    lines += [f"| {r['spacing']} | {r['k']} | {_s(r['mean_gain'])} |" for r in sp["rows"]]
    lines += ["", f"## 3. Gain as the learning rate anneals (peak {b['lr']:g}) — {_verdict(c['annealing'])}", "",
              "| step | LR of the annealed run | gain, annealed run | gain, constant twin |",
              "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['step']} | {r['lr']:.2e} | {_s(r['annealed'])} | {_s(r['constant'])} |" for r in c["annealing"]["rows"]]
    lines += ["", f"## 4. The spike (LR ×{b['spike_factor']:g} for {b['spike_steps']} steps) — {_verdict(c['spike'])}", "",
              "| peak LR | raw before | raw at the spike | LAWA | EMA | LAWA, anomalies excluded (left out) | share of the "
              "spike LAWA removes |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in c["spike"]["rows"]:
        left = sorted({s for ex in r["excluded"] for s in ex})
        lines.append(f"| {r['lr']:g} | {_s(r['raw_before'], 3, False)} | {_s(r['raw'], 3, False)} | "
                     f"{_s(r['lawa'], 3, False)} | {_s(r['ema'], 3, False)} | {_s(r['lawa_xa'], 3, False)} "
                     f"({', '.join(map(str, left)) or 'none'}) | {_s(r['recovered'], 2, False)} |")
    w = c["wsm"]
    lines += ["", f"## 5. WSM ({cfg['wsm_schedule']}) merge vs an annealed branch — {_verdict(w)}", "",
              f"Constant-LR checkpoints {_steps(w['rows']['steps'])} merged, against the annealed run's last "
              "checkpoint (the same run, cooled down over those steps).", "",
              "| model | loss at the last step |", "| --- | ---: |",
              f"| constant LR, raw | {_s(w['rows']['constant_raw'], 3, False)} |",
              f"| constant LR, uniform average | {_s(w['rows']['uniform'], 3, False)} |",
              f"| constant LR, WSM merge | {_s(w['rows']['wsm'], 3, False)} |",
              f"| annealed branch, raw | {_s(w['rows']['annealed'], 3, False)} |", "",
              f"WSM − annealed: {_s(w['wsm_minus_annealed'])}; share of the constant run's gap to the annealed "
              f"branch that the merge closes: {_s(w['gap_closed'], 2, False)}.", ""]
    return "\n".join(lines)


def _steps(steps: list[int]) -> str:
    if not steps:
        return "(none)"
    return ", ".join(map(str, steps)) if len(steps) <= 4 else f"{steps[0]}, {steps[1]}, …, {steps[-1]} ({len(steps)})"


def study_plot(result: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """``study.png``: one panel per claim, error bars min–max over seeds, plus the spike's curves.

    Args:
        result: what :func:`ckptavg.demo.study.run_study` returns.
        path: the PNG.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, c = result["config"], result["claims"]
    fig, ax = plt.subplots(2, 3, figsize=(13, 7.5), dpi=90)

    def bars(a: Any, xs: list[float], spreads: list[Mapping[str, Any]], **kw: Any) -> None:
        ys = [s["mean"] if s.get("n") else float("nan") for s in spreads]
        lo = [y - s["min"] if s.get("n") else 0 for y, s in zip(ys, spreads)]
        hi = [s["max"] - y if s.get("n") else 0 for y, s in zip(ys, spreads)]
        a.errorbar(xs, ys, yerr=[lo, hi], capsize=3, marker="o", **kw)

    a = ax[0][0]
    rows = c["lr"]["rows"]
    bars(a, [r["lr"] for r in rows], [r["median_gain"] for r in rows], color="C3")
    a.set_xscale("log")
    a.set(title="1. LAWA gain vs peak LR", xlabel="peak LR", ylabel="median raw − LAWA (nats)")
    a = ax[0][1]
    rows = c["spacing"]["rows"]
    bars(a, [r["spacing"] for r in rows], [r["mean_gain"] for r in rows], color="C0")
    for r in rows:
        a.annotate(f"k={r['k']}", (r["spacing"], r["mean_gain"]["mean"] or 0), textcoords="offset points", xytext=(4, 4),
                   fontsize=8)
    a.set(title=f"2. gain vs spacing, span {c['spacing']['span']} steps", xlabel="spacing (steps)",
          ylabel="mean raw − average (nats)")
    a = ax[0][2]
    rows = c["annealing"]["rows"]
    bars(a, [r["step"] for r in rows], [r["annealed"] for r in rows], color="C2", label="annealed run")
    shift = cfg["base"]["save_every"] / 5  # side by side
    bars(a, [r["step"] + shift for r in rows], [r["constant"] for r in rows], color="0.4", label="constant-LR twin")
    a.set(title="3. LAWA gain during the cool-down", xlabel="step", ylabel="raw − LAWA (nats)")
    a.legend(fontsize=8)
    for a in ax[0]:
        a.axhline(0, color="k", linewidth=0.6)
    a = ax[1][0]
    base = cfg["base"]
    names = [n for n in result["scores"] if n.endswith(f"-lr{base['lr']:g}")]
    for curve, style in (("raw", {"color": "0.4", "marker": "."}), ("lawa", {"color": "C3"}), ("ema", {"color": "C0"}),
                         ("lawa_xa", {"color": "C1", "linestyle": "--"})):
        for i, n in enumerate(names):
            pts = sorted((s, v) for s, v in result["scores"][n][curve].items()
                         if abs(s - base["spike_end"]) <= 4 * base["save_every"])
            if pts:
                a.plot(*zip(*pts), alpha=0.8, label=curve if i == 0 else None, **style)
    a.axvline(base["spike_end"], color="C3", alpha=0.2, linewidth=6)
    a.set(title=f"4. around the spike (LR {base['lr']:g}, every seed)", xlabel="step", ylabel="held-out loss")
    a.legend(fontsize=8)
    a = ax[1][1]
    w = c["wsm"]["rows"]
    labels = ["constant\nraw", "constant\nuniform", f"constant\nWSM {cfg['wsm_schedule']}", "annealed\nbranch"]
    bars(a, list(range(4)), [w["constant_raw"], w["uniform"], w["wsm"], w["annealed"]], color="C4", linestyle="none")
    a.set_xticks(range(4), labels, fontsize=8)
    a.set(title="5. a merge vs a decay (last step)", ylabel="held-out loss")
    a = ax[1][2]
    a.axis("off")
    text = "\n".join(f"{i}. {name}: {'holds' if c[key]['holds'] else 'does not appear'}"
                     for i, (key, name) in enumerate((("lr", "gain rises with LR"), ("spacing", "gain rises with spacing"),
                                                      ("annealing", "gain shrinks as LR anneals"),
                                                      ("spike", "LAWA mitigates the spike"),
                                                      ("wsm", "WSM emulates the decay")), 1))
    a.text(0, 0.95, f"{len(cfg['seeds'])} seeds; bars: min–max\n\n{text}", va="top", fontsize=10)
    fig.suptitle("When does checkpoint averaging help? Tiny Pythia on Critter (ckptavg study)")
    fig.tight_layout()
    path = Path(path)
    # no timestamp in the PNG: the same results give the same bytes
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


__all__ = ["study_markdown", "study_plot"]
