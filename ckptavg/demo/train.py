"""The demo's run: a tiny Pythia-architecture model trained on Critter, saved in Pythia's layout.

A GPT-NeoX model (0.92M parameters) is trained on the synthetic language of
:mod:`ckptavg.demo.synthlang` at a deliberately high constant learning rate with one injected loss
spike, then a short cool-down. Checkpoints are saved in Pythia's layout and naming: ``step0/ step1/
step2/ step4/ … step600/``, each an HF directory (config.json, model.safetensors, tokenizer files).
A finished run is reused, keyed by its recipe (:class:`TrainConfig`). :func:`write_data` writes
what the run is scored on: held-out documents and the zero-shot task.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CkptavgError, OutputError
from . import synthlang

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

# The training process's environment, set before it imports torch: the same code path, hence the
# same bits, on every x86-64 CPU with AVX2 whatever the user's own settings. torch picks its
# vectorised kernels (AVX-512 or AVX2) and MKL its GEMM kernels by CPU model, and a different kernel
# sums in another order: bit-for-bit equal runs need both pinned (MKL's "conditional numerical
# reproducibility"). One thread for OpenMP and MKL, whatever OMP_NUM_THREADS says outside.
ARITHMETIC = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE", "MKL_CBWR": "AVX2",
              "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
              "PYTHONHASHSEED": "0"}

def pin_arithmetic() -> bool:
    """Put :data:`ARITHMETIC` in this process's environment if torch is not imported yet, so that
    scoring, like training, takes the same kernels on every run (``ckptavg demo`` and ``ckptavg
    study`` call it first). Once torch is loaded its kernels are chosen: nothing is changed.

    Returns:
        True if the environment was set.
    """
    import sys

    if "torch" in sys.modules:
        return False
    os.environ.update(ARITHMETIC)
    return True


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
    # torch threads while training and scoring. One: the arithmetic (every sum's order) is then the
    # same on any machine, and on a loaded one it is faster than two, whose OpenMP threads spin
    # waiting for each other (measured here at load 12: 1.3 s a step with one, 10 s with two).
    threads: int = 1

    def key(self) -> str:
        """The run's cache key: a cached run is reused only if it matches.

        Returns:
            16 hex digits of the hash of the recipe, the generator version, the tokenizer's settings
            and the arithmetic the run is trained with (:data:`ARITHMETIC`).
        """
        blob = json.dumps({"config": asdict(self), "generator": synthlang.GENERATOR_VERSION,
                           "tokenizer": synthlang.TOKENIZER_SETTINGS, "arithmetic": ARITHMETIC}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def save_steps(self) -> tuple[int, ...]:
        """Where checkpoints are saved, Pythia-style.

        Returns:
            0, the powers of two below ``save_every``, then its multiples, and the last step.
        """
        early = [0] + [2**i for i in range(32) if 2**i < self.save_every]
        regular = list(range(self.save_every, self.steps + 1, self.save_every))
        return tuple(sorted(set(early + regular + [self.steps])))

    def lr_at(self, step: int) -> float:
        """The schedule.

        Args:
            step: an update, counted from 0.

        Returns:
            The learning rate of the update that turns ``step{step}`` into ``step{step+1}``.
        """
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
        """The part of the schedule a checkpoint was saved in.

        Args:
            step: the checkpoint's step.

        Returns:
            ``warmup``, ``high-lr`` or ``cooldown``.
        """
        if step <= self.warmup:
            return "warmup"
        return "high-lr" if step <= self.steps - self.cooldown else "cooldown"


DEMO = TrainConfig()


# Data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoData:
    """Files for scoring: held-out documents (JSONL ``{"text"}``) and the zero-shot task folder."""

    heldout: Path
    task_dir: Path
    task: str = TASK_NAME


def write_data(folder: str | os.PathLike[str], config: TrainConfig = DEMO) -> DemoData:
    """Write the files the demo run is scored on, generated from ``config``'s seed.

    Args:
        folder: where to write ``heldout.jsonl`` and ``task/critter_facts.{yaml,jsonl}``.
        config: the run's recipe (its seed and corpus sizes decide the documents).

    Returns:
        The paths, as a :class:`DemoData`.
    """
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
    return stamp


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
    with another key, or an unfinished one, is trained again. Training runs in a fresh Python
    process with :data:`ARITHMETIC` in its environment (set before torch is imported), so the
    weights are the same bits on every run, whatever this process's threads and environment. It
    writes to a hidden sibling folder renamed into place at the end, so an interrupted run never
    looks finished.

    Args:
        run: the run folder.
        config: the recipe.
        progress: a progress bar on stderr.

    Returns:
        ``(run, stamp)``; the stamp holds ``key``, ``config``, ``seconds`` (training time),
        ``log`` (per update: ``lr`` and training ``loss``), ``versions`` (torch, transformers,
        tokenizers, the CPU capability used) and ``trained`` (False: reused).

    Raises:
        OutputError: ``run`` exists, is not empty and was not made by the demo.
        CkptavgError: the training process failed (its error is printed above).

    Example:
        >>> run, stamp = build_run("example/pythia-critter")          # doctest: +SKIP
    """
    import subprocess
    import sys

    run = Path(run)
    stamp = _cached(run, config)
    if stamp is not None:
        return run, stamp | {"trained": False}
    if run.is_dir() and any(run.iterdir()) and not (run / STAMP).is_file():
        raise OutputError(f"{run}: exists and was not made by ckptavg demo; choose another --out")
    tmp = run.parent / f".{run.name}.training-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # stderr is inherited: the child's progress bar and, if it fails, its traceback show here
        code = "import sys; from ckptavg.demo.train import _train_main; _train_main(sys.argv[1:])"
        args = [str(tmp), json.dumps(asdict(config)), "1" if progress else "0"]
        done = subprocess.run([sys.executable, "-c", code, *args], env=os.environ | ARITHMETIC,
                              stdout=subprocess.DEVNULL, check=False)
        if done.returncode != 0 or not (tmp / STAMP).is_file():
            raise CkptavgError(f"{run}: training the demo run failed (exit code {done.returncode}; "
                               "the training process's error is above)")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stamp = json.loads((tmp / STAMP).read_text())
    finished = _cached(run, config)  # another process finished the same run meanwhile: keep theirs
    if finished is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return run, finished | {"trained": False}
    if run.exists():
        shutil.rmtree(run)  # an older recipe's run (checked above to be the demo's)
    tmp.rename(run)
    return run, stamp | {"trained": True}


def _train_main(argv: Sequence[str]) -> None:
    """The training process (:func:`build_run`): ``FOLDER CONFIG_JSON PROGRESS``."""
    folder, blob, progress = argv
    fields = json.loads(blob)
    fields["betas"] = tuple(fields["betas"])
    _train(Path(folder), TrainConfig(**fields), progress=progress == "1")


def _train(tmp: Path, config: TrainConfig, *, progress: bool) -> None:
    """Train ``config`` into ``tmp/step{S}/`` and write the stamp last. Deterministic: one thread,
    deterministic algorithms, every seed from ``config.seed``, data order from a seeded generator."""
    import platform

    import tokenizers
    import torch
    import transformers
    from tqdm import tqdm
    from transformers import GPTNeoXForCausalLM

    t0 = time.perf_counter()
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    torch.set_float32_matmul_precision("highest")
    transformers.set_seed(config.seed)  # Python's random, numpy and torch
    c = synthlang.corpus(config.seed, n_train=config.n_train, n_heldout=config.n_heldout)
    tokenizer = synthlang.train_tokenizer(c.train, config.vocab_size)
    rows = _packed(tokenizer, c.train, config.context)  # (N, T)
    saves = set(config.save_steps())
    log: dict[str, list[float]] = {"lr": [], "loss": []}
    torch.manual_seed(config.seed)
    model = GPTNeoXForCausalLM(_model_config(config, tokenizer))
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on biases and norms
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=config.betas,
                            foreach=False)  # the plain per-tensor loop: one code path everywhere
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
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip, foreach=False)
            opt.step()
            log["lr"].append(lr)
            log["loss"].append(round(loss.item(), 5))
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine()}
    stamp = {"key": config.key(), "config": asdict(config), "generator": synthlang.GENERATOR_VERSION,
             "seconds": round(time.perf_counter() - t0, 1), "versions": versions, "log": log}
    (tmp / STAMP).write_text(json.dumps(stamp) + "\n")


__all__ = ["ARITHMETIC", "DEMO", "RUN_NAME", "STAMP", "TASK_NAME", "DemoData", "TrainConfig", "build_run", "pin_arithmetic", "write_data"]
