"""``ckptavg demo``: the LAWA effect, reproduced on a CPU in under two minutes.

1. **Train** a tiny Pythia-architecture model (GPT-NeoX, 0.92M parameters) on Critter, the
   synthetic language of :mod:`ckptavg.synthlang`, at a deliberately high constant learning rate
   with one injected loss spike, then a short cool-down. Checkpoints are saved in Pythia's layout
   and naming: ``step0/ step1/ step2/ step4/ … step600/``, each an HF directory (config.json,
   model.safetensors, tokenizer files). A finished run is reused, keyed by its recipe.
2. **Average** it at every checkpoint with the project's own :func:`ckptavg.series.iter_series`:
   LAWA (the latest k checkpoints, uniform) and an EMA, in memory.
3. **Score** raw, LAWA and EMA on held-out Critter (:func:`ckptavg.eval.held_out_loss`) at
   every checkpoint, and on a zero-shot multiple-choice task with lm-eval
   (:func:`ckptavg.eval.score`) at a few; print a table and save a plot.

    >>> result = run_demo("example")                                  # doctest: +SKIP
    >>> result.gains("high-lr")                                       # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import synthlang
from ..errors import CkptavgError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..trajectory import Trajectory

RUN_NAME = "pythia-critter"
STAMP = "ckptavg-demo.json"  # in the run folder: the recipe it was trained with, and the training log
TASK_NAME = "critter_facts"


@dataclass(frozen=True)
class TrainConfig:
    """The demo run's recipe. Every field is part of the cache key: changing one retrains."""

    seed: int = 0
    # Model: Pythia's GPT-NeoX (parallel residual, rotary on 25% of each head, untied output
    # layer), 4 layers like pythia-14m, width 128: 0.92M parameters.
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    vocab_size: int = 512  # byte-level BPE: 256 bytes + 2 specials + 254 merges cover Critter's words
    context: int = 64  # Critter documents are ~21 tokens; a row packs about three
    # Data: ~480k tokens, seen once (as Pythia sees its data about once).
    n_train: int = 22_000
    n_heldout: int = 160  # ~3.4k held-out tokens: one score takes ~0.1 s, and the demo takes ~100
    batch_size: int = 12  # 768 tokens a step: 600 steps train in ~30 s on 2 quiet cores
    # Schedule: warm-up, then a long constant phase at 3x pythia-70m's learning rate (the
    # "high LR" regime where the LAWA papers see averaging help), then a cosine cool-down to 10%
    # (a decaying learning rate averages by itself, so averaging's edge should shrink there).
    steps: int = 600
    warmup: int = 20
    lr: float = 3e-3
    cooldown: int = 120  # the last 120 steps
    min_lr_ratio: float = 0.1
    # Loss spike: a few steps at 10x the learning rate, ending on a checkpoint so the raw curve shows it.
    spike_end: int = 320
    spike_steps: int = 4
    spike_factor: float = 10.0
    # Optimiser: Pythia's AdamW settings.
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # Checkpoints: Pythia saves step0, log-spaced 1, 2, 4 … 512, then every 1000; here the powers
    # of two below the interval, then every 20 steps (a LAWA window of 5 spans 80 steps).
    save_every: int = 20
    threads: int = 2  # torch threads while training and scoring: fixed, so a run is reproducible

    def key(self) -> str:
        """Hash of the recipe and the generator version: a cached run is reused only if it matches."""
        blob = json.dumps({"config": asdict(self), "generator": synthlang.GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def save_steps(self) -> tuple[int, ...]:
        """Pythia-style: 0, the powers of two below ``save_every``, then its multiples, and the last step."""
        early = [0] + [2**i for i in range(32) if 2**i < self.save_every]
        regular = list(range(self.save_every, self.steps + 1, self.save_every))
        return tuple(sorted(set(early + regular + [self.steps])))

    def lr_at(self, step: int) -> float:
        """Learning rate of the update that turns ``step{step}`` into ``step{step+1}``."""
        if self.spike_end - self.spike_steps <= step < self.spike_end:
            return self.lr * self.spike_factor
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        start = self.steps - self.cooldown
        if step < start:
            return self.lr
        t = (step - start) / max(1, self.cooldown)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def phase(self, step: int) -> str:
        """The part of the schedule a checkpoint was saved in: ``warmup``, ``high-lr`` or ``cooldown``."""
        if step <= self.warmup:
            return "warmup"
        return "high-lr" if step <= self.steps - self.cooldown else "cooldown"


DEMO = TrainConfig()


@dataclass(frozen=True)
class DemoConfig:
    """What the demo does with the run once trained."""

    window: int = 5  # LAWA's k: checkpoints 80 training steps apart from first to last
    ema_half_life: float = 30.0  # steps: the EMA's mean age (~43 steps) is close to LAWA-5's (40)
    zero_shot_steps: int = 3  # lm-eval costs ~1 s a call: raw/LAWA/EMA are scored at this many steps only
    batch_size: int = 64  # held-out windows per forward pass


# Data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoData:
    """Files for scoring: held-out documents (JSONL ``{"text"}``) and the zero-shot task folder."""

    heldout: Path
    task_dir: Path
    task: str = TASK_NAME


def write_data(folder: str | os.PathLike[str], config: TrainConfig = DEMO) -> DemoData:
    """Write ``folder/heldout.jsonl`` and the task ``folder/task/critter_facts.{yaml,jsonl}``."""
    d = Path(folder)
    c = synthlang.corpus(config.seed, n_train=config.n_train, n_heldout=config.n_heldout)
    heldout = synthlang.write_jsonl(d / "heldout.jsonl", c.heldout)
    synthlang.write_task(d / "task", c.task, TASK_NAME)
    return DemoData(heldout, (d / "task").resolve())


# Training ------------------------------------------------------------------------------------
@contextmanager
def _hf_bars_off() -> Iterator[None]:
    """transformers draws a bar for every save and load of a one-file model; the demo has its own."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _cached(run: Path, config: TrainConfig) -> dict[str, Any] | None:
    try:
        stamp = json.loads((run / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("key") != config.key():
        return None
    if not all((run / f"step{s}" / "model.safetensors").is_file() for s in config.save_steps()):
        return None
    return stamp  # type: ignore[no-any-return]


def _model_config(config: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import GPTNeoXConfig

    # GPTNeoXConfig's defaults are Pythia's: rotary on 25% of each head, base 10000, LayerNorm eps 1e-5
    return GPTNeoXConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=4 * config.hidden_size,
        max_position_embeddings=config.context, use_parallel_residual=True, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def _packed(tokenizer: PreTrainedTokenizerBase, docs: Sequence[str], context: int) -> torch.Tensor:
    """Documents joined by EOS (as Pythia packs its data), cut into rows of ``context`` tokens: (N, T)."""
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i, x in enumerate(tokenizer(list(docs), add_special_tokens=False)["input_ids"]):
        if i:
            ids.append(eos)
        ids.extend(x)
    n = len(ids) // context
    return torch.tensor(ids[: n * context]).view(n, context)


def build_run(run: str | os.PathLike[str], config: TrainConfig = DEMO, *, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train the demo run into ``run/step{S}/`` (Pythia's layout), or reuse it if it is there.

    A finished run carries ``ckptavg-demo.json`` (its recipe's key and the training log); a run
    with another key, or an unfinished one, is trained again. Training writes to a hidden sibling
    folder renamed into place at the end, so an interrupted run never looks finished.

    Args:
        run: the run folder.
        config: the recipe.
        progress: a progress bar on stderr.

    Returns:
        ``(run, stamp)``; the stamp holds ``key``, ``config``, ``seconds`` (training time),
        ``log`` (per update: ``lr`` and training ``loss``) and ``trained`` (False: reused).

    Raises:
        CkptavgError: ``run`` exists, is not empty and was not made by the demo.

    Example:
        >>> run, stamp = build_run("example/pythia-critter")          # doctest: +SKIP
    """
    run = Path(run)
    stamp = _cached(run, config)
    if stamp is not None:
        return run, stamp | {"trained": False}
    if run.is_dir() and any(run.iterdir()) and not (run / STAMP).is_file():
        raise CkptavgError(f"{run}: exists and was not made by ckptavg demo; choose another --out")
    import torch
    from tqdm import tqdm
    from transformers import GPTNeoXForCausalLM

    t0 = time.perf_counter()
    c = synthlang.corpus(config.seed, n_train=config.n_train, n_heldout=config.n_heldout)
    tokenizer = synthlang.train_tokenizer(c.train, config.vocab_size)
    rows = _packed(tokenizer, c.train, config.context)  # (N, T)
    tmp = run.parent / f".{run.name}.training-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    saves = set(config.save_steps())
    log: dict[str, list[float]] = {"lr": [], "loss": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        model = GPTNeoXForCausalLM(_model_config(config, tokenizer))
        decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on biases and norms
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=config.betas)
        g = torch.Generator().manual_seed(config.seed)
        order = torch.cat([torch.randperm(len(rows), generator=g)
                           for _ in range(1 + config.steps * config.batch_size // len(rows))])
        model.train()
        with _hf_bars_off(), tqdm(total=config.steps, desc="train", unit="step", disable=not progress,
                                  leave=False) as bar:
            for step in range(config.steps + 1):
                if step in saves:
                    model.save_pretrained(tmp / f"step{step}")
                    tokenizer.save_pretrained(tmp / f"step{step}")
                if step == config.steps:
                    break
                lr = config.lr_at(step)
                for group in opt.param_groups:
                    group["lr"] = lr
                x = rows[order[step * config.batch_size : (step + 1) * config.batch_size]]  # (B, T)
                loss = model(input_ids=x, labels=x).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                opt.step()
                log["lr"].append(lr)
                log["loss"].append(round(loss.item(), 5))
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    stamp = {"key": config.key(), "config": asdict(config), "generator": synthlang.GENERATOR_VERSION,
             "seconds": round(time.perf_counter() - t0, 1), "log": log}
    (tmp / STAMP).write_text(json.dumps(stamp) + "\n")
    done = _cached(run, config)  # another process finished the same run meanwhile: keep theirs
    if done is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return run, done | {"trained": False}
    if run.exists():
        shutil.rmtree(run)  # an older recipe's run (checked above to be the demo's)
    tmp.rename(run)
    return run, stamp | {"trained": True}


# Scoring -------------------------------------------------------------------------------------
def _load_into(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's state dict into ``model``: transformers ≥ 5 names GPT-NeoX's output
    layer ``lm_head`` in memory while checkpoints (Pythia's, save_pretrained's) say ``embed_out``."""
    if "embed_out.weight" in state and "embed_out.weight" not in model.state_dict():
        state = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)


def _raw_states(traj: Trajectory) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    from safetensors.torch import load_file

    for c in traj:
        state: dict[str, torch.Tensor] = {}
        for f in c.files:
            state.update(load_file(f))
        yield c.step, state


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
    plot: Path | None = None
    merged: Path | None = None

    def gains(self, phase: str, curve: str = "lawa") -> dict[int, float]:
        """Raw loss minus ``curve``'s (``lawa`` or ``ema``) at each checkpoint of a phase
        (``high-lr`` or ``cooldown``): > 0 where averaging wins."""
        c = getattr(self, curve)
        return {s: self.raw[s] - c[s] for s in sorted(c) if self.config.phase(s) == phase and s in self.raw}


def run_demo(
    out: str | os.PathLike[str] = "example",
    *,
    config: TrainConfig = DEMO,
    demo: DemoConfig = DemoConfig(),
    zero_shot: bool = True,
    plot: bool = True,
    progress: bool = True,
) -> DemoResult:
    """Train (or reuse) the demo run under ``out``, average it at every checkpoint, score, plot.

    Args:
        out: folder for the run (``out/pythia-critter/step{S}/``), the held-out and task files
            (``out/data/``), the LAWA merge at the last step and the plot ``out/lawa.png``.
        config: the training recipe (another recipe retrains the run in the same folder).
        demo: averaging and scoring settings.
        zero_shot: also score the lm-eval task (needs the ``eval`` extra).
        plot: save ``out/lawa.png`` (needs matplotlib).
        progress: progress bars on stderr.

    Returns:
        A :class:`DemoResult` (``ckptavg demo`` prints it as a table).

    Raises:
        CkptavgError: ``out/pythia-critter`` holds something else, a missing optional dependency,
            or anything the averaging refuses.

    Example:
        >>> r = run_demo("example", zero_shot=False)                 # doctest: +SKIP
        >>> r.gains("high-lr")                                       # doctest: +SKIP
    """
    from ..sources import discover
    from ..averaging import average
    from ..eval import held_out_loss
    from ..selection import Selection
    from ..series import iter_series

    out = Path(out)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    run, stamp = build_run(out / RUN_NAME, config, progress=progress)
    seconds["train"] = time.perf_counter() - t0 if stamp["trained"] else stamp["seconds"]
    data = write_data(out / "data", config)

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    traj = discover(run)
    last = run / f"step{traj.steps[-1]}"
    tok = AutoTokenizer.from_pretrained(last)
    with _hf_bars_off():
        model = AutoModelForCausalLM.from_pretrained(last, dtype=torch.float32).eval()
    k, first = demo.window, 2 * config.save_every  # averages are scored from where the plot starts
    n_avg = sum(s >= first for s in traj.steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with tqdm(total=len(traj) + 2 * n_avg, desc="score", unit="model", disable=not progress, leave=False) as bar:

            def losses(states: Iterable[tuple[int, dict[str, torch.Tensor]]]) -> dict[int, float]:
                got = {}
                for step, state in states:
                    _load_into(model, state)
                    got[step] = held_out_loss(model, tok, data.heldout, seq_len=config.context,
                                              batch_size=demo.batch_size)["loss"]
                    bar.update()
                return got

            raw = losses(_raw_states(traj))
            lawa = losses((t.step, sd) for t, sd in iter_series(traj, Selection(window=k, start=first)))
            ema = losses((t.step, sd) for t, sd in iter_series(traj, Selection(start=first), method="ema",
                                                                half_life=demo.ema_half_life))
    finally:
        torch.set_num_threads(threads)
    seconds["score"] = time.perf_counter() - t0
    result = DemoResult(run, config, demo, bool(stamp["trained"]), seconds, raw, lawa, ema)
    result.merged = average(traj.window(k), out / f"{RUN_NAME}-uniform{k}-step{traj.steps[-1]}", force=True,
                            progress=False)
    if zero_shot:
        t0 = time.perf_counter()
        result.zero_shot = _zero_shot(traj, data, config, demo, progress)
        seconds["zero-shot"] = time.perf_counter() - t0
    if plot:
        t0 = time.perf_counter()
        result.plot = save_plot(result, out / "lawa.png")
        seconds["plot"] = time.perf_counter() - t0
    return result


def _zero_shot_steps(traj: Trajectory, config: TrainConfig, demo: DemoConfig) -> list[int]:
    """Just after the spike, the end of the high-LR phase, the last step (the latest ``zero_shot_steps``)."""
    last_high = max(s for s in traj.steps if config.phase(s) == "high-lr")
    return sorted({config.spike_end, last_high, traj.steps[-1]} & set(traj.steps))[-demo.zero_shot_steps:]


@contextmanager
def _lm_eval_hushed() -> Iterator[None]:
    """lm-eval draws its own bars and logs warnings on stderr at every call, and outside a git
    checkout its ``git describe`` prints "fatal: not a git repository": the demo has one bar.
    Errors still arrive as exceptions."""
    import contextlib
    import io
    import logging
    import sys

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sys.stderr.flush()
    saved = os.dup(2)  # fd level: the git subprocess writes to fd 2, not to sys.stderr
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _zero_shot(traj: Trajectory, data: DemoData, config: TrainConfig, demo: DemoConfig,
               progress: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from ..eval import score
    from ..selection import Selection

    steps = _zero_shot_steps(traj, config, demo)
    variants: dict[str, Any] = {
        "raw": lambda s: {"step": s},
        "lawa": lambda s: {"selection": Selection(window=demo.window, at=s)},
        "ema": lambda s: {"selection": Selection(at=s), "method": "ema", "half_life": demo.ema_half_life},
    }
    rows = []
    with tqdm(total=len(steps) * len(variants), desc="zero-shot", unit="model", disable=not progress,
              leave=False) as bar:
        for s in steps:
            for name, spec in variants.items():
                with _lm_eval_hushed():
                    r = score(traj.root, TASK_NAME, include_path=str(data.task_dir), batch_size=32,
                              dtype="float32", offline=True, progress=False, **spec(s))
                rows.append({"step": s, "variant": name, "acc": r["results"][TASK_NAME]["acc,none"]})
                bar.update()
    return rows


# Plot ----------------------------------------------------------------------------------------
def save_plot(result: DemoResult, path: str | os.PathLike[str]) -> Path:
    """Held-out loss vs step for raw, LAWA and EMA (top) and what averaging gains over the raw
    checkpoint (bottom; > 0: the average is better), the spike and the cool-down marked. ~60 KB PNG."""
    try:  # the object-oriented API on the Agg canvas: no pyplot, no global backend switched
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CkptavgError("the demo's plot needs matplotlib: pip install 'ckptavg[demo]'") from None

    cfg, k = result.config, result.demo.window
    first = 2 * cfg.save_every  # before this the loss falls by whole nats between checkpoints
    fig = Figure(figsize=(7.5, 5.6), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    curves = (("raw checkpoint", result.raw, {"color": "0.4", "lw": 1.2, "marker": ".", "ms": 4}),
              (f"LAWA k={k}", result.lawa, {"color": "C3", "lw": 1.8}),
              (f"EMA half-life {result.demo.ema_half_life:g} steps", result.ema, {"color": "C0", "lw": 1.2, "ls": "--"}))
    clip = 0.15  # bottom panel's range in nats; larger gains are drawn at the edge
    for name, curve, style in curves:
        xs = [s for s in sorted(curve) if s >= first]
        top.plot(xs, [curve[s] for s in xs], label=name, **style)
        if curve is result.raw:
            continue
        gains = [result.raw[s] - curve[s] for s in xs]
        bottom.plot(xs, [max(-clip, min(clip, g)) for g in gains], **style)
        for x, g in zip(xs, gains):
            if g > clip and curve is result.lawa:  # the spike, off the scale
                bottom.annotate(f"{g:+.2f}", (x, clip), fontsize=7, color=style["color"], xytext=(4, -8),
                                textcoords="offset points")
    shown = [v for s, v in result.raw.items() if s >= first]
    others = [v for c in (result.lawa, result.ema) for v in c.values()]
    top.set_ylim(min(shown + others) - 0.03, max(shown) + 0.1)
    for ax in (top, bottom):
        ax.axvspan(cfg.steps - cfg.cooldown, cfg.steps, color="C2", alpha=0.08, lw=0)
        ax.axvline(cfg.spike_end, color="C1", lw=0.8, ls=":")
        ax.grid(alpha=0.25)
    bottom.axhline(0, color="0.2", lw=0.8)
    bottom.set_ylim(-clip * 1.05, clip * 1.05)
    top.text(cfg.steps - cfg.cooldown + 4, 0.98, "cool-down", transform=top.get_xaxis_transform(), va="top",
             fontsize=8, color="C2")
    top.text(cfg.spike_end + 4, 0.98, f"LR x{cfg.spike_factor:g} for {cfg.spike_steps} steps",
             transform=top.get_xaxis_transform(), va="top", fontsize=8, color="C1")
    top.set_ylabel("held-out loss (nats/token)")
    top.set_title(f"Tiny Pythia on a synthetic language, LR {cfg.lr:g}: averaging the latest {k} checkpoints",
                  fontsize=10)
    top.legend(loc="upper right", fontsize=8, frameon=False, bbox_to_anchor=(1, 0.9))
    bottom.set_ylabel("raw − averaged\n(> 0: averaging wins)", fontsize=9)
    bottom.set_xlabel("training step")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    return p


__all__ = ["DEMO", "DemoConfig", "DemoData", "DemoResult", "TrainConfig", "build_run", "run_demo", "save_plot",
           "write_data"]
