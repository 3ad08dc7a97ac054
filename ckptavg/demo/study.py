"""``ckptavg study``: when does averaging help? The LAWA and WSM papers' claims, measured with seeds.

Every run is the demo's (:mod:`ckptavg.demo.train`: tiny Pythia on Critter, deterministic, cached
by its recipe); a seed changes the world, the data order and the initialisation. For each seed the
study trains one run per peak learning rate (the demo's schedule: warm-up, constant LR with an
injected spike, cosine cool-down) and one *constant* branch at the demo's LR that never cools down:
both are bit-identical up to the cool-down (checked), so the pair is an annealed branch and its
constant-LR twin from the same point. It then scores, on each seed's held-out text:

1. **LR**: LAWA (latest ``window``, uniform) minus raw, at every checkpoint of the constant phase
   before the spike, for each peak LR;
2. **spacing**: on the constant branch, windows spanning ``span`` steps sampled every 20, 40, …
   steps (k = span / spacing + 1), at targets whose window holds no spike;
3. **annealing**: LAWA's gain at the cool-down checkpoints of the annealed run and of its constant
   twin;
4. **spike**: raw, LAWA, EMA and LAWA without the checkpoints ``ckptavg inspect`` flags, at the spike;
5. **WSM**: the WSM merge (``wsm_schedule``) and the uniform average of the constant branch's
   checkpoints over the cool-down's span, against the annealed branch's last checkpoint.

Results: ``OUT/study.json`` (every loss and every summary), ``OUT/study.md`` (tables) and
``OUT/study.png``. The same settings give the same JSON, byte for byte, on the same machine.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .train import DEMO, RUN_NAME, TrainConfig, build_run, write_data

RESULTS = "study.json"


@dataclass(frozen=True)
class StudyConfig:
    """The study's settings. The default takes about 10 minutes on 2 idle CPU cores (12 runs)."""

    seeds: tuple[int, ...] = (0, 1, 2)  # three seeds: enough to see a spread, not to estimate one well
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # pythia-70m's, the demo's (3x), and 10x
    base: TrainConfig = DEMO  # every run's recipe but the seed and the LR; base.lr gets the constant twin
    window: int = 5  # LAWA's k, as the demo
    span: int = 160  # spacing: every window spans this many steps (8 save intervals of the demo)
    spacings: tuple[int, ...] = (20, 40, 80, 160)  # k = 9, 5, 3, 2
    ema_half_life: float = 30.0  # the demo's EMA
    wsm_schedule: str = "1-sqrt"  # the decay shape the WSM paper found best
    workers: int = 0  # runs trained and scored at once (0: the CPUs this process may use)

    def __post_init__(self) -> None:
        from ..errors import UsageError

        if len(self.seeds) < 1 or not self.lrs or self.base.lr not in self.lrs:
            raise UsageError(f"study: need seeds and LRs including the base LR {self.base.lr:g}")
        if any(self.span % d or d % self.base.save_every for d in self.spacings):
            raise UsageError(f"study: every spacing must divide span {self.span} and be a multiple of "
                             f"the save interval {self.base.save_every}")


def quick(steps: int = 80) -> StudyConfig:
    """The smallest study the code supports (tests): 2 seeds, 2 LRs, ``steps`` steps, one file a run.

    Returns:
        A :class:`StudyConfig` on an 80-step schedule with the spike at 60 and a 10-step cool-down.
    """
    base = replace(DEMO, n_train=2000, n_heldout=40, steps=steps, warmup=5, spike_end=60, spike_steps=2,
                   cooldown=10, save_every=10)
    return StudyConfig(seeds=(0, 1), lrs=(3e-3, 1e-2), base=base, window=3, span=20, spacings=(10, 20), workers=2)


# Runs ------------------------------------------------------------------------------------------
def _runs(cfg: StudyConfig) -> dict[str, TrainConfig]:
    out = {}
    for seed in cfg.seeds:
        for lr in cfg.lrs:
            out[f"s{seed}-lr{lr:g}"] = replace(cfg.base, seed=seed, lr=lr)
        out[f"s{seed}-constant"] = replace(cfg.base, seed=seed, cooldown=0)
    return out


def _grid(c: TrainConfig) -> list[int]:
    """The regularly spaced checkpoints (every ``save_every`` steps)."""
    return [s for s in c.save_steps() if s % c.save_every == 0 and s > 0]


class _Scorer:
    """Held-out loss of raw checkpoints and averages of one run: one model, weights swapped in."""

    def __init__(self, run: Path, heldout: Path, c: TrainConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from ..sources import discover

        self.traj = discover(run)
        hf_logging.disable_progress_bar()  # transformers 5 draws a bar per load; the study says one line per run
        self.model = AutoModelForCausalLM.from_pretrained(run / f"step{c.steps}").float().eval()
        self.tok = AutoTokenizer.from_pretrained(run / f"step{c.steps}")
        self.run, self.heldout, self.c = run, heldout, c
        self.excluded: list[int] = []

    def _loss(self, state: Mapping[str, Any]) -> float:
        from ..eval import held_out_loss

        # transformers >= 5 names GPT-NeoX's output layer lm_head in memory; checkpoints say embed_out
        if "embed_out.weight" in state and "embed_out.weight" not in self.model.state_dict():
            state = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in state.items()}
        self.model.load_state_dict(state, strict=True)
        return round(float(held_out_loss(self.model, self.tok, self.heldout, seq_len=self.c.context,
                                         batch_size=64)["loss"]), 6)

    def raw(self, step: int) -> float:
        from safetensors.torch import load_file

        return self._loss(load_file(self.run / f"step{step}" / "model.safetensors"))

    def average(self, steps: Sequence[int], method: str = "uniform", **kw: Any) -> float:
        from ..averaging import average
        from ..selection import Selection

        sd = average(self.traj, selection=Selection(steps=tuple(steps)), method=method, progress=False, threads=1, **kw)
        self.excluded = sorted(int(e["step"]) for e in sd.manifest.get("excluded") or ())  # --exclude-anomalies
        return self._loss(sd)


def _score(name: str, run: Path, heldout: Path, c: TrainConfig, cfg: StudyConfig) -> dict[str, Any]:
    """Every loss the claims need from one run: ``{variant: {step: loss}}``."""
    sc, k, d = _Scorer(run, heldout, c), cfg.window, c.save_every
    grid = _grid(c)
    lawa = [s for s in grid if s >= k * d]
    out: dict[str, Any] = {"raw": {s: sc.raw(s) for s in grid if s >= 2 * d},
                           "lawa": {s: sc.average(range(s - (k - 1) * d, s + 1, d)) for s in lawa}}
    if name.endswith("constant"):
        out["spacing"] = {sp: {t: sc.average(range(t - cfg.span, t + 1, sp)) for t in _spacing_targets(c, cfg)}
                          for sp in cfg.spacings}
        cool = [s for s in grid if s >= cfg.base.steps - cfg.base.cooldown]  # the annealed twin's cool-down
        out["wsm"] = {"steps": cool, "wsm": sc.average(cool, "wsm", schedule=cfg.wsm_schedule),
                      "uniform": sc.average(cool)}
    else:
        end = c.spike_end
        spike = [s for s in lawa if end - d <= s <= end + 2 * d]
        out["ema"] = {s: sc.average([x for x in sc.traj.steps if x <= s], "ema", half_life=cfg.ema_half_life)
                      for s in spike}
        out["lawa_xa"], out["excluded"] = {}, {}
        for s in spike:  # LAWA without the checkpoints `ckptavg inspect` flags, and which those were
            out["lawa_xa"][s] = sc.average(range(s - (k - 1) * d, s + 1, d), exclude_anomalies=True)
            out["excluded"][s] = sc.excluded
    return out


def _spacing_targets(c: TrainConfig, cfg: StudyConfig) -> list[int]:
    """Targets whose window [t - span, t] starts after the fast early fall (2 save intervals) and
    holds no spiked checkpoint nor the one just after it."""
    lo, hi = c.spike_end - c.spike_steps, c.spike_end + c.save_every
    return [t for t in _grid(c) if t - cfg.span >= 2 * c.save_every and (t < lo or t - cfg.span > hi)]


# The claims ------------------------------------------------------------------------------------
def _spread(xs: Sequence[float]) -> dict[str, Any]:
    """Mean, min, max over seeds (and each seed's value, in seed order)."""
    if not xs:
        return {"mean": None, "min": None, "max": None, "n": 0, "seeds": []}
    return {"mean": round(statistics.fmean(xs), 6), "min": round(min(xs), 6), "max": round(max(xs), 6),
            "n": len(xs), "seeds": [round(x, 6) for x in xs]}


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarise(cfg: StudyConfig, scores: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The five claims, each with its numbers per seed and their spread, from the runs' scores.

    Args:
        cfg: the study's settings.
        scores: run name → what :func:`run_study` scored on it.

    Returns:
        ``{"lr", "spacing", "annealing", "spike", "wsm"}``, each with ``rows`` and ``holds``.
    """
    b, seeds = cfg.base, cfg.seeds
    pre = [s for s in _grid(b) if cfg.window * b.save_every <= s < b.spike_end - b.spike_steps and b.phase(s) == "high-lr"]

    def gain(run: Mapping[str, Any], s: int, curve: str = "lawa") -> float:
        return run["raw"][s] - run[curve][s]

    lr_rows: list[dict[str, Any]] = []
    for lr in cfg.lrs:
        runs = [scores[f"s{seed}-lr{lr:g}"] for seed in seeds]
        lr_rows.append({"lr": lr, "steps": pre, "median_gain": _spread([_median([gain(r, s) for s in pre]) for r in runs]),
                        "wins": _spread([sum(gain(r, s) > 0 for s in pre) for r in runs]),
                        "final_raw": _spread([r["raw"][b.steps] for r in runs])})
    means = [r["median_gain"]["mean"] for r in lr_rows]
    lr_claim = {"rows": lr_rows, "holds": all(x is not None for x in means) and means == sorted(means),
                "criterion": "the mean over seeds of the median gain rises with the peak LR"}

    consts = [scores[f"s{seed}-constant"] for seed in seeds]
    targets = _spacing_targets(b, cfg)
    sp_rows: list[dict[str, Any]] = [{"spacing": sp, "k": cfg.span // sp + 1, "targets": targets,
                "mean_gain": _spread([statistics.fmean([r["raw"][t] - r["spacing"][sp][t] for t in targets])
                                      for r in consts] if targets else [])} for sp in cfg.spacings]
    sp_means = [r["mean_gain"]["mean"] for r in sp_rows]
    sp_claim = {"rows": sp_rows, "span": cfg.span,
                "holds": all(x is not None for x in sp_means) and sp_means == sorted(sp_means),
                "criterion": f"at a fixed span of {cfg.span} steps, the mean gain rises with the spacing"}

    anneal = [scores[f"s{seed}-lr{b.lr:g}"] for seed in seeds]
    cool = [s for s in _grid(b) if b.phase(s) == "cooldown"]
    an_rows: list[dict[str, Any]] = [{"step": s, "lr": b.lr_at(s - 1), "annealed": _spread([gain(r, s) for r in anneal]),
                "constant": _spread([gain(r, s) for r in consts])} for s in cool]
    last: dict[str, Any] = an_rows[-1] if an_rows else {"annealed": {"seeds": []}, "constant": {"seeds": []}}
    an_claim = {"rows": an_rows, "criterion": "at the last step, LAWA's gain on the annealed run is below its "
                "gain on the constant twin in every seed",
                "holds": bool(an_rows) and all(a < c for a, c in zip(last["annealed"]["seeds"], last["constant"]["seeds"]))}

    end = b.spike_end
    before = max(s for s in _grid(b) if s <= end - b.spike_steps)
    sk_rows = []
    for lr in cfg.lrs:
        runs = [scores[f"s{seed}-lr{lr:g}"] for seed in seeds]
        row: dict[str, Any] = {"lr": lr, "before": before, "step": end,
                               "raw_before": _spread([r["raw"][before] for r in runs])}
        for curve in ("raw", "lawa", "ema", "lawa_xa"):
            row[curve] = _spread([r[curve][end] for r in runs if end in r[curve]])
        row["excluded"] = [r.get("excluded", {}).get(end, []) for r in runs]  # what --exclude-anomalies left out
        row["recovered"] = _spread([(r["raw"][end] - r["lawa"][end]) / (r["raw"][end] - r["raw"][before])
                                    for r in runs if r["raw"][end] > r["raw"][before]])
        sk_rows.append(row)
    base_row = sk_rows[cfg.lrs.index(b.lr)]
    sk_claim = {"rows": sk_rows, "criterion": f"at lr {b.lr:g}, LAWA at the spike is below raw in every seed",
                "holds": all(lw < rw for lw, rw in zip(base_row["lawa"]["seeds"], base_row["raw"]["seeds"]))}

    ws_rows = {"constant_raw": _spread([r["raw"][b.steps] for r in consts]),
               "uniform": _spread([r["wsm"]["uniform"] for r in consts]),
               "wsm": _spread([r["wsm"]["wsm"] for r in consts]),
               "annealed": _spread([r["raw"][b.steps] for r in anneal]),
               "steps": consts[0]["wsm"]["steps"] if consts else []}
    gaps = [w - a for w, a in zip(ws_rows["wsm"]["seeds"], ws_rows["annealed"]["seeds"])]
    closed = [(c - w) / (c - a) for c, w, a in zip(ws_rows["constant_raw"]["seeds"], ws_rows["wsm"]["seeds"],
                                                   ws_rows["annealed"]["seeds"]) if c > a]
    ws_claim = {"rows": ws_rows, "wsm_minus_annealed": _spread(gaps), "gap_closed": _spread(closed),
                "criterion": "the WSM merge closes at least half of the constant run's gap to the annealed "
                             "branch in every seed", "holds": len(closed) == len(seeds) and min(closed) >= 0.5}
    return {"lr": lr_claim, "spacing": sp_claim, "annealing": an_claim, "spike": sk_claim, "wsm": ws_claim}


# Driver ----------------------------------------------------------------------------------------
def _branch_point_identical(runs: Mapping[str, Path], cfg: StudyConfig) -> bool:
    """The constant twin and the annealed run share every checkpoint up to the cool-down, bit for bit."""
    shared = [s for s in cfg.base.save_steps() if s <= cfg.base.steps - cfg.base.cooldown]
    return all((runs[f"s{seed}-constant"] / f"step{s}" / "model.safetensors").read_bytes()
               == (runs[f"s{seed}-lr{cfg.base.lr:g}"] / f"step{s}" / "model.safetensors").read_bytes()
               for seed in cfg.seeds for s in shared[-2:])


def run_study(out: str | os.PathLike[str] = "study", cfg: StudyConfig = StudyConfig(), *,
              plot: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train (or reuse) the study's runs under ``out/runs/``, score them, summarise the claims.

    Args:
        out: the study's folder: ``runs/NAME/pythia-critter``, ``data/sN/`` (each seed's held-out
            text), ``scores/NAME.json`` (cached per run), ``study.json``, ``study.md``, ``study.png``.
        cfg: the settings.
        plot: write ``study.png`` (needs matplotlib).
        progress: one line per run on stderr.

    Returns:
        What ``study.json`` holds: ``config``, ``claims`` (:func:`summarise`), ``scores``,
        ``branch_identical`` and ``seconds``.

    Raises:
        CkptavgError: a run failed to train or to score.

    Example:
        >>> r = run_study("study", quick())                          # doctest: +SKIP
        >>> r["claims"]["lr"]["holds"]                               # doctest: +SKIP
    """
    from ..pipeline import available_cpus

    root = Path(out)
    runs = _runs(cfg)
    t0 = time.perf_counter()
    say: Callable[[str], None] = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)

    def one(item: tuple[str, TrainConfig]) -> tuple[str, Path, dict[str, Any]]:
        import torch

        name, c = item
        run, stamp = build_run(root / "runs" / name / RUN_NAME, c, progress=False)
        heldout = write_data(root / "data" / f"s{c.seed}", c).heldout
        cache = root / "scores" / f"{name}.json"
        key = {"run": stamp["key"], "study": {k: v for k, v in asdict(cfg).items() if k not in ("seeds", "lrs", "workers")}}
        try:
            saved = json.loads(cache.read_text())
            if saved["key"] == json.loads(json.dumps(key)):
                say(f"study: {name} cached")
                return name, run, saved["scores"]
        except (OSError, ValueError, KeyError):
            pass
        torch.set_num_threads(c.threads)
        scores = json.loads(json.dumps(_score(name, run, heldout, c, cfg)))  # str keys, as read back
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "scores": scores}, sort_keys=True) + "\n")
        say(f"study: {name} done ({time.perf_counter() - t0:.0f} s)")
        return name, run, scores

    # Import in this thread what the workers use: transformers' lazy modules are not safe to import
    # from several threads at once ("cannot import name AutoModelForCausalLM")
    import safetensors.torch  # noqa: F401
    import transformers.utils.logging  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from ..averaging import average  # noqa: F401
    from ..eval import held_out_loss  # noqa: F401

    workers = cfg.workers or available_cpus()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = list(pool.map(one, runs.items()))
    folders = {name: run for name, run, _ in done}
    scores = {name: {curve: _int_keys(v) for curve, v in s.items()} for name, _, s in done}
    result = {"config": asdict(cfg), "claims": summarise(cfg, scores), "scores": scores,
              "branch_identical": _branch_point_identical(folders, cfg)}
    (root / RESULTS).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    from .study_report import study_markdown, study_plot

    (root / "study.md").write_text(study_markdown(result))
    if plot:
        study_plot(result, root / "study.png")
    result["seconds"] = round(time.perf_counter() - t0, 1)  # not in study.json: it would differ run to run
    return result


def _int_keys(v: Any) -> Any:
    """JSON turned the steps into strings; give them back as ints (spacing keys stay strings)."""
    if isinstance(v, dict) and v and all(isinstance(k, str) and k.isdigit() for k in v):
        return {int(k): _int_keys(x) for k, x in v.items()}
    if isinstance(v, dict):
        return {k: _int_keys(x) for k, x in v.items()}
    return v


__all__ = ["RESULTS", "StudyConfig", "quick", "run_study", "summarise"]
