"""``ckptavg demo`` end to end: train (or reuse) the run, score it as sweeps, merge, plot.

The scoring *is* a sweep (:mod:`ckptavg.sweep`), run locally into ``OUT/demo-sweep/``:

- ``held-out/``: held-out Critter loss of the raw checkpoint at every step, and of LAWA (the
  latest k) and an EMA (every checkpoint up to the target) from step 40 on — two recipes with one
  eval spec, so one table;
- ``zero-shot/``: lm-eval accuracy on ``critter_facts`` for the three at a few steps.

The numbers are read back with :func:`ckptavg.sweep.load_results`, and the figure is
:func:`ckptavg.sweep.plot.plot_results` with a gain panel and the spike and cool-down marked. A
re-run on the same run and settings finds every job in the tables and scores nothing again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CkptavgError, MissingDependencyError
from .train import DEMO, RUN_NAME, TASK_NAME, DemoData, TrainConfig, build_run, write_data

if TYPE_CHECKING:
    from ..sweep import Recipe, Variants
    from ..trajectory import Trajectory

SWEEP_DIR = "demo-sweep"  # not "sweep": recipes/demo.yaml writes example/sweep, under another eval spec
HELD_OUT_DIR = "held-out"
ZERO_SHOT_DIR = "zero-shot"
SWEEP_KEY = "demo.json"  # in SWEEP_DIR: which run and settings its tables were scored for
# DemoResult's names for the sweep's raw, uniform{k}, ema-h{h}, wsm-{schedule}{k} and wma{k}
CURVES = ("raw", "lawa", "ema", "wsm", "wma", "lawa_xa")  # lawa_xa: uniform{k}-xa, --exclude-anomalies


@dataclass(frozen=True)
class DemoConfig:
    """What the demo does with the run once trained."""

    window: int = 5  # LAWA's k: checkpoints 80 training steps apart from first to last
    ema_half_life: float = 30.0  # steps: the EMA's mean age (~43 steps) is close to LAWA-5's (40)
    # WSM over LAWA's window, with the decay shape the WSM paper found best, and PMA's WMA over the
    # same window: the same checkpoints weighted three ways
    wsm_schedule: str = "1-sqrt"
    # Also LAWA without the checkpoints `ckptavg inspect` flags (merge --exclude-anomalies), at the
    # targets whose window holds the spike: what spike-aware averaging changes there
    exclude_anomalies: bool = True
    zero_shot_steps: int = 3  # lm-eval costs ~1 s a call: raw/LAWA/EMA are scored at this many steps only
    batch_size: int = 64  # held-out windows per forward pass


@dataclass
class DemoResult:
    """What the demo measured. Losses are held-out mean NLL (nats/token), by step."""

    run: Path
    config: TrainConfig
    demo: DemoConfig
    trained: bool  # False: the run was reused from an earlier call
    seconds: dict[str, float]
    raw: dict[int, float]
    lawa: dict[int, float]
    ema: dict[int, float]
    zero_shot: list[dict[str, Any]] = field(default_factory=list)  # {"step", "variant", "acc"}
    wsm: dict[int, float] = field(default_factory=dict)  # WSM (DemoConfig.wsm_schedule) over LAWA's window
    wma: dict[int, float] = field(default_factory=dict)  # WMA (weights 1..k, newest largest) over it
    lawa_xa: dict[int, float] = field(default_factory=dict)  # LAWA without the flagged checkpoints, near the spike
    xa_inputs: dict[int, list[int]] = field(default_factory=dict)  # the steps lawa_xa averaged, by target
    plot: Path | None = None
    merged: Path | None = None
    sweep: Path | None = None  # the folder of the sweeps' tables (held-out/, zero-shot/)

    def gains(self, phase: str, curve: str = "lawa") -> dict[int, float]:
        """Raw loss minus an average's at each checkpoint of a phase.

        Args:
            phase: ``high-lr`` or ``cooldown`` (:meth:`TrainConfig.phase`).
            curve: ``lawa``, ``ema``, ``wsm`` or ``wma``.

        Returns:
            Step → raw − average (> 0 where averaging wins).
        """
        c = getattr(self, curve)
        return {s: self.raw[s] - c[s] for s in sorted(c) if self.config.phase(s) == phase and s in self.raw}

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-able values (paths as strings), as ``ckptavg demo --json`` prints it.

        Returns:
            The fields by name; ``config`` and ``demo`` as dicts, losses keyed by step.
        """
        def path(p: Path | None) -> str | None:
            return None if p is None else str(p)

        return {"run": str(self.run), "config": asdict(self.config), "demo": asdict(self.demo),
                "trained": self.trained, "seconds": dict(self.seconds), "raw": dict(self.raw),
                "lawa": dict(self.lawa), "ema": dict(self.ema), "wsm": dict(self.wsm), "wma": dict(self.wma),
                "lawa_xa": dict(self.lawa_xa), "xa_inputs": {s: list(v) for s, v in self.xa_inputs.items()},
                "zero_shot": [dict(z) for z in self.zero_shot],
                "plot": path(self.plot), "merged": path(self.merged), "sweep": path(self.sweep)}


# The sweeps ------------------------------------------------------------------------------------
def zero_shot_steps(traj: Trajectory, config: TrainConfig = DEMO, demo: DemoConfig = DemoConfig()) -> list[int]:
    """Where lm-eval scores the demo: just after the spike, the end of the high-LR phase, the last step.

    Args:
        traj: the demo run.
        config: its recipe (where the spike and the phases are).
        demo: ``zero_shot_steps`` says how many of those (the latest).

    Returns:
        The steps, oldest first.
    """
    last_high = max(s for s in traj.steps if config.phase(s) == "high-lr")
    return sorted({config.spike_end, last_high, traj.steps[-1]} & set(traj.steps))[-demo.zero_shot_steps:]


def _averages(demo: DemoConfig) -> Variants:
    from ..sweep import Variants

    return Variants(raw=False, uniform=(demo.window,), ema_half_life=(demo.ema_half_life,), wsm=(demo.window,),
                    wsm_schedule=demo.wsm_schedule, wma=(demo.window,))


def curve_names(demo: DemoConfig = DemoConfig()) -> dict[str, str]:
    """Which sweep variant is which of :class:`DemoResult`'s curves.

    Args:
        demo: the LAWA window and EMA half-life.

    Returns:
        Variant name → curve, e.g. ``{"raw": "raw", "uniform5": "lawa", "ema-h30": "ema",
        "wsm-1-sqrt5": "wsm", "wma5": "wma"}``.
    """
    from ..sweep import Variants

    xa = Variants(raw=False, uniform=(demo.window,), exclude_anomalies=True).expand()[0].name
    return {"raw": "raw"} | dict(zip([v.name for v in _averages(demo).expand()], CURVES[1:5])) | {xa: "lawa_xa"}


def demo_recipes(run: Path, data: DemoData, sweep: Path, zero_shot: Sequence[int], config: TrainConfig = DEMO,
                 demo: DemoConfig = DemoConfig()) -> dict[str, list[Recipe]]:
    """The demo's scoring as sweep recipes.

    Args:
        run: the trained run.
        data: its held-out text and task (:func:`write_data`).
        sweep: the folder for the tables.
        zero_shot: the steps lm-eval scores (:func:`zero_shot_steps`); empty: no zero-shot recipe.
        config: the run's recipe.
        demo: the averaging and scoring settings.

    Returns:
        ``{"held-out": [raw at every step, LAWA and EMA from step 2 × save_every on], "zero-shot": [all three]}``;
        each key's recipes share one eval spec and write ``sweep/<key>/``.
    """
    from ..selection import Selection
    from ..sweep import EvalSpec, Recipe, Variants

    first = 2 * config.save_every  # before this the loss falls by whole nats between checkpoints
    averages = _averages(demo)
    # fp32, as the run is saved; the held-out text is the run's own (write_data, from its seed)
    held = EvalSpec(text=str(data.heldout), seq_len=config.context, batch_size=demo.batch_size, dtype="float32",
                    offline=True)
    out = {HELD_OUT_DIR: [
        Recipe(str(run), str(sweep / HELD_OUT_DIR), held, variants=Variants(raw=True)),
        Recipe(str(run), str(sweep / HELD_OUT_DIR), held, steps=Selection(start=first), variants=averages),
    ]}
    # the targets whose window holds the spiked checkpoint
    spiked = tuple(s for s in config.save_steps() if config.spike_end <= s < config.spike_end + demo.window * config.save_every)
    if demo.exclude_anomalies and spiked:
        out[HELD_OUT_DIR].append(Recipe(str(run), str(sweep / HELD_OUT_DIR), held, steps=Selection(steps=spiked),
                                        variants=Variants(raw=False, uniform=(demo.window,), exclude_anomalies=True)))
    if zero_shot:
        tasks = EvalSpec(tasks=(TASK_NAME,), include_path=(str(data.task_dir),), batch_size=32, dtype="float32",
                         offline=True)
        # raw, LAWA and EMA only: each lm-eval call costs ~1 s, and 144 items cannot tell 5 weightings apart
        three = replace(averages, raw=True, wsm=(), wma=())
        out[ZERO_SHOT_DIR] = [Recipe(str(run), str(sweep / ZERO_SHOT_DIR), tasks, steps=Selection(steps=tuple(zero_shot)),
                                     variants=three)]
    return out


def _fresh_tables(sweep: Path, run: Path, stamp: Mapping[str, Any], demo: DemoConfig) -> None:
    """Drop tables scored for another run, another copy of it, or other settings: a table keys
    jobs by the run folder's path and the step, which a retrained run keeps."""
    mine = {"run": stamp["key"], "path": str(run.resolve()), "demo": asdict(demo)}
    key = hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()
    stamp_file = sweep / SWEEP_KEY
    try:
        same = json.loads(stamp_file.read_text()).get("key") == key
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(sweep, ignore_errors=True)
        sweep.mkdir(parents=True)
        stamp_file.write_text(json.dumps({"key": key}) + "\n")


@contextmanager
def _git_hushed() -> Iterator[None]:
    """lm-eval runs ``git describe`` at every call, and outside a git checkout git prints "fatal:
    not a git repository" straight to file descriptor 2, past Python (the sweep captures what
    Python writes). Point fd 2 at /dev/null meanwhile, and Python's stderr, when it is fd 2, at a
    copy of it so the sweep's bar still shows."""
    sys.stderr.flush()
    try:
        on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # replaced by a test runner, a notebook
        on_fd2 = False
    saved = os.dup(2)
    copy = os.fdopen(os.dup(saved), "w", buffering=1, errors="replace") if on_fd2 else None
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        with contextlib.redirect_stderr(copy) if copy else contextlib.nullcontext():
            yield
    finally:
        if copy:
            copy.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
        if copy:
            copy.close()


def _sweep(recipes: Sequence[Recipe], progress: bool) -> list[dict[str, Any]]:
    """Run the recipes (one table) and return its rows; a failed job fails the demo."""
    from ..sweep import load_results, run_sweep

    for recipe in recipes:
        report = run_sweep(recipe, progress=progress)
        if report.failed:
            step, variant, error = report.failed[0]
            raise CkptavgError(f"{report.table}: scoring step {step} {variant} failed: {error}")
    return load_results(recipes[0].output)


def _curves(rows: Sequence[Mapping[str, Any]], task: str, metric: str, names: Mapping[str, str]) -> dict[str, dict[int, float]]:
    """Curve name → step → value, from a table's rows (``names``: variant → curve)."""
    out: dict[str, dict[int, float]] = {c: {} for c in CURVES}
    for r in rows:
        if r["status"] == "ok" and (r["task"], r["metric"]) == (task, metric) and r["variant"] in names:
            out[names[r["variant"]]][r["step"]] = r["value"]
    return out


def _require_extras(zero_shot: bool, plot: bool) -> None:
    """Say what is missing before training for a minute, not after."""
    import importlib.util

    needed = {"transformers": "training", "tokenizers": "training"}
    if zero_shot:
        needed["lm_eval"] = "the zero-shot scoring (or pass --no-zero-shot)"
    if plot:
        needed["matplotlib"] = "the plot"
    for module, what in needed.items():
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"ckptavg demo needs {module} for {what}: pip install 'ckptavg[demo]'")


@contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(
    out: str | os.PathLike[str] = "example",
    *,
    config: TrainConfig = DEMO,
    demo: DemoConfig = DemoConfig(),
    zero_shot: bool = True,
    plot: bool = True,
    progress: bool = True,
) -> DemoResult:
    """Train (or reuse) the demo run under ``out``, score raw, LAWA and EMA as sweeps, merge, plot.

    Args:
        out: folder for the run (``out/pythia-critter/step{S}/``), the held-out and task files
            (``out/data/``), the sweeps' tables (``out/demo-sweep/``), the LAWA merge at the last
            step and the plot ``out/lawa.png``.
        config: the training recipe (another recipe retrains the run in the same folder).
        demo: averaging and scoring settings.
        zero_shot: also score the lm-eval task (needs the ``eval`` extra).
        plot: save ``out/lawa.png`` (needs matplotlib).
        progress: progress bars on stderr.

    Returns:
        A :class:`DemoResult` (``ckptavg demo`` prints it as a table).

    Raises:
        OutputError: ``out/pythia-critter`` holds something else.
        MissingDependencyError: transformers or tokenizers, lm-eval (``zero_shot``) or matplotlib
            (``plot``) is missing; checked before training.
        CkptavgError: a scoring job failed, or anything the averaging refuses.

    Example:
        >>> r = run_demo("example", zero_shot=False)                 # doctest: +SKIP
        >>> r.gains("high-lr")                                       # doctest: +SKIP
    """
    from ..averaging import average
    from ..sources import discover
    from ..sweep import HELD_OUT

    _require_extras(zero_shot, plot)
    out = Path(out)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    run, stamp = build_run(out / RUN_NAME, config, progress=progress)
    seconds["train"] = time.perf_counter() - t0 if stamp["trained"] else stamp["seconds"]
    data = write_data(out / "data", config)
    traj = discover(run)
    sweep = out / SWEEP_DIR
    _fresh_tables(sweep, run, stamp, demo)
    recipes = demo_recipes(run, data, sweep, zero_shot_steps(traj, config, demo) if zero_shot else (), config, demo)
    names = curve_names(demo)

    t0 = time.perf_counter()
    with _threads(config.threads):
        held_rows = _sweep(recipes[HELD_OUT_DIR], progress)
    curves = _curves(held_rows, HELD_OUT, "loss", names)
    seconds["score"] = time.perf_counter() - t0
    result = DemoResult(run, config, demo, bool(stamp["trained"]), seconds, curves["raw"], curves["lawa"],
                        curves["ema"], sweep=sweep, wsm=curves["wsm"], wma=curves["wma"], lawa_xa=curves["lawa_xa"])
    result.xa_inputs = {r["step"]: [i["step"] for i in r["provenance"].get("inputs", [])] for r in held_rows
                        if names.get(r["variant"]) == "lawa_xa" and r["status"] == "ok" and r["metric"] == "loss"}
    result.merged = average(traj.window(demo.window), out / f"{RUN_NAME}-uniform{demo.window}-step{traj.steps[-1]}",
                            force=True, progress=False)
    if zero_shot:
        t0 = time.perf_counter()
        with _threads(config.threads), _git_hushed():
            rows = _sweep(recipes[ZERO_SHOT_DIR], progress)
        acc = _curves(rows, TASK_NAME, "acc", names)
        result.zero_shot = [{"step": s, "variant": c, "acc": acc[c][s]} for s in sorted(acc["raw"]) for c in CURVES
                            if s in acc[c]]
        seconds["zero-shot"] = time.perf_counter() - t0
    if plot:
        t0 = time.perf_counter()
        result.plot = save_plot(result, out / "lawa.png")
        seconds["plot"] = time.perf_counter() - t0
    return result


def save_plot(result: DemoResult, path: str | os.PathLike[str]) -> Path:
    """The demo's figure: held-out loss vs step for raw, LAWA and EMA over what averaging gains
    (raw − averaged, > 0: the average is better), the spike and the cool-down marked. ~60 KB PNG.

    Args:
        result: a finished demo (its ``sweep`` folder holds the held-out table).
        path: the PNG to write.

    Returns:
        The PNG's path.

    Raises:
        CkptavgError: ``result`` has no sweep tables.
        MissingDependencyError: matplotlib is missing.
    """
    from ..sweep import HELD_OUT
    from ..sweep.plot import Mark, plot_results

    if result.sweep is None:
        raise CkptavgError("this demo result has no sweep tables to plot (run_demo writes them)")
    cfg, d = result.config, result.demo
    legend = {"raw": "raw checkpoint", "lawa": f"LAWA k={d.window}", "ema": f"EMA half-life {d.ema_half_life:g} steps",
              "wsm": f"WSM {d.wsm_schedule} k={d.window}", "wma": f"WMA k={d.window}",
              "lawa_xa": f"LAWA k={d.window}, --exclude-anomalies"}
    look = {"raw": {"color": "0.4", "linewidth": 1.2, "linestyle": "-", "marker": ".", "markersize": 4},
            "lawa": {"color": "C3", "linewidth": 1.8, "marker": None},
            "ema": {"color": "C0", "linewidth": 1.2, "linestyle": "--", "marker": None},
            "wsm": {"color": "C1", "linewidth": 1.0, "linestyle": "-.", "marker": None},
            "wma": {"color": "C4", "linewidth": 1.0, "linestyle": ":", "marker": None},
            "lawa_xa": {"color": "C3", "linewidth": 0, "marker": "x", "markersize": 6}}
    names = curve_names(d)
    first = 2 * cfg.save_every
    # The averages start far above the raw curve (they still hold step 0's weights): keep the
    # y range to the raw curve's, so the spike and the cool-down stay readable.
    shown = [v for s, v in result.raw.items() if s >= first]
    low = min(shown + [v for c in (result.lawa, result.ema, result.wsm, result.wma) for v in c.values()])
    marks = [Mark(cfg.steps - cfg.cooldown, cfg.steps, "cool-down", "C2"),
             Mark(cfg.spike_end, None, f"LR x{cfg.spike_factor:g} for {cfg.spike_steps} steps", "C3")]
    return plot_results(result.sweep / HELD_OUT_DIR, path, tasks=[HELD_OUT], metrics=["loss"], start=first,
                        labels={v: legend[c] for v, c in names.items()}, styles={v: look[c] for v, c in names.items()},
                        ylim=(low - 0.03, max(shown) + 0.1), gain=True, gain_clip=0.15, marks=marks,
                        title=f"Tiny Pythia on a synthetic language, LR {cfg.lr:g}: "
                              f"averaging the latest {d.window} checkpoints",
                        figsize=(7.5, 5.6), dpi=100)


__all__ = ["HELD_OUT_DIR", "SWEEP_DIR", "ZERO_SHOT_DIR", "DemoConfig", "DemoResult", "demo_recipes", "run_demo",
           "save_plot", "zero_shot_steps"]
