"""Everything ``ckptavg`` shows people: tables and reports built from what the library returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..demo import DemoResult
    from ..sweep import SweepReport


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def step_source_note(traj: Sequence[Any]) -> str | None:
    """One line for ``list`` when steps do not come from the checkpoints' names: accelerate save
    indices (no step recorded), or steps read from a file inside each folder."""
    if any(c.counts_saves for c in traj):
        return ("steps are save indices, not training steps: accelerate's checkpoint_N counts saves and no folder "
                "records a step (optimizer.bin step counts, custom_checkpoint_*.pkl); --half-life/--sigma-rel are "
                "refused unless --steps-per-save N says how many steps lie between saves")
    given = next((c.step_from for c in traj if (c.step_from or "").startswith("--steps-per-save")), None)
    if given is not None:
        return f"steps are (save index + 1) × {given.split()[-1]}, from {given} (accelerate's checkpoint_N counts saves)"
    sources = sorted({c.step_from for c in traj if c.step_from})
    return f"steps from {', '.join(sources)} inside each checkpoint folder, not the folder names" if sources else None


def preflight_report(pf: Mapping[str, Any]) -> str:
    """``merge --dry-run``'s cost lines, from :meth:`ckptavg.preflight.Preflight.to_dict`."""
    cached = pf.get("cached_bytes")
    where = "" if cached is None else (
        f" ({human_bytes(cached)} of it in the page cache: "
        + ("reads at memory speed)" if cached >= pf["read_bytes"] else "the rest comes from the disk)"))
    lines = [f"reads {human_bytes(pf['read_bytes'])} from {pf['inputs']} checkpoints, each file once{where}",
             "writes " + (human_bytes(pf["write_bytes"]) if pf["write_bytes"] is not None else "an unknown size (Hub .bin: "
                          "tensors are known after download)"),
             f"holds at most {human_bytes(pf['memory_bytes'])} of buffers ({pf.get('threads', 1)} threads) beyond the "
             + ("interpreter and torch (~225 MB: its kernels convert bf16/fp16 faster than numpy), "
                if pf.get("kernels") == "torch" else "interpreter, ")
             + ("whatever the model's size" if pf.get("format", "hf") == "hf" else
                f"one whole model included (--format {pf['format']} saves a complete state dict)")]
    if pf["free_bytes"] is not None:
        verdict = {True: "", False: " — NOT ENOUGH for the output", None: ""}[pf["fits"]]
        lines.append(f"free at the output: {human_bytes(pf['free_bytes'])}{verdict}")
    return "\n".join(lines)


def format_notes(fmt: str, kind: str | None, out: str = "OUT") -> list[str]:
    """What ``merge`` says about an output of format ``fmt`` from inputs of ``kind``
    (:func:`ckptavg.averaging.output_kind`): how to load it, and what it leaves out."""
    from ..io.formats import DESCRIBE, DROPPED, LOAD

    lines = [f"load with: {LOAD[fmt].replace('OUT', out)}"]
    if fmt in DROPPED:
        lines.append(f"note: dropped from the newest input's checkpoint: {', '.join(DROPPED[fmt])} (an average has no "
                     "optimizer state of its own); everything else in it is kept")
    elif fmt == "dcp":
        lines.append("note: a model-only checkpoint: the inputs' optimizer and train state are not in it")
    if fmt != kind and kind in ("nanogpt", "lightning", "dcp"):
        lines.append(f"note: the inputs are {DESCRIBE[kind]}, and that tool cannot load this {fmt} output as "
                     f"its own checkpoint; --format {kind} (or same) writes one it can")
    return lines


def list_hint(kind: str | None) -> str | None:
    """``list``'s line on what merge writes for a run whose newest checkpoint is ``kind``."""
    from ..io.formats import LOAD

    if kind not in ("nanogpt", "lightning", "dcp"):
        return None
    tool = {"nanogpt": "nanoGPT", "lightning": "Lightning", "dcp": "a DCP loader"}[kind]
    return (f"merge writes an HF-style folder (model.safetensors) by default, which {tool} cannot load as its own "
            f"checkpoint: add --format same for one it can; load with: {LOAD[kind]}")


def weights_table(steps: Sequence[int], weights: Sequence[float], record: Mapping[str, Any]) -> str:
    """``--dry-run``'s lines: each input's step and weight, with its tokens when the method counted
    them, then what the method says about its approximation (power-ema)."""
    tokens = record.get("tokens")
    lines = []
    for i, (s, x) in enumerate(zip(steps, weights)):
        seen = f"  tokens {tokens[i]:.4g}" if tokens else ""
        lines.append(f"  step {s:>10}  weight {x:.6f}{seen}")
    if tokens:
        lines.append(f"  tokens from {record['tokens_from']}")
    if "profile_error" in record:
        lines.append(f"  power profile gamma {record['gamma']:.3f}; relative L2 error of the realised profile "
                     f"{record['profile_error']:.3f}")
    return "\n".join(lines)


def coarse_warning(record: Mapping[str, Any]) -> None:
    """One line on stderr when the checkpoints are too sparse for the power-EMA profile asked for."""
    from ..methods import COARSE_ERROR

    err = record.get("profile_error")
    if err is not None and err > COARSE_ERROR:
        import click

        click.echo(f"warning: the checkpoints are too sparse for --sigma-rel {record.get('sigma_rel')}: the realised "
                   f"profile is {err:.0%} off the exact one (relative L2, above {COARSE_ERROR:.0%}); select denser "
                   "checkpoints or a larger --sigma-rel", err=True)


def _describe(prov: Mapping[str, Any]) -> str:
    rec = prov.get("weights") or {}
    inputs = rec.get("inputs") or []
    steps = [i["step"] for i in inputs]
    method = (rec.get("method") or {}).get("name", "?")
    if prov["loaded_from"] == "disk":
        made = f" (ckptavg.json: {method} of {len(steps)} checkpoints, steps {steps[0]}..{steps[-1]})" if steps else ""
        return f"weights: {prov['target']} from disk{made}"
    if len(steps) == 1:
        return f"weights: step {steps[0]} of {rec.get('trajectory') or prov['target']}, in memory"
    return f"weights: {method} average of {len(steps)} checkpoints (steps {steps[0]}..{steps[-1]}), in memory"


def eval_table(result: Mapping[str, Any]) -> str:
    """A short human table: one row per task metric, plus the held-out loss."""
    lines = [_describe(result["ckptavg"])] if "ckptavg" in result else []
    rows: list[tuple[str, str, str, str]] = []
    for task, metrics in (result.get("results") or {}).items():
        for key, value in metrics.items():
            metric, _, flt = key.partition(",")
            if not flt or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{metric}_stderr,{flt}")
            err_s = f"± {err:.4f}" if isinstance(err, (int, float)) else ""
            rows.append((task, metric if flt == "none" else f"{metric} ({flt})", f"{value:.4f}", err_s))
    if held := result.get("held_out"):
        rows.append((f"held-out {Path(held['file']).name}", "loss", f"{held['loss']:.4f}",
                     f"ppl {held['perplexity']:.2f}, {held['predicted_tokens']} tokens"))
    if rows:
        rows.insert(0, ("task", "metric", "value", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip())
    return "\n".join(lines)


def sweep_report(self: SweepReport) -> str:
    """What ``ckptavg sweep`` prints: job counts, where the table is, failures."""
    ok = self.ran - len(self.failed)
    lines = [f"{self.jobs} jobs: {self.ran} run now ({ok} ok, {len(self.failed)} failed), "
             f"{self.skipped} already in the table",
             f"table: {self.table} (summaries: {self.csv.name}, {self.markdown.name})"]
    lines += [f"failed: step {s} {v}: {e}" for s, v, e in self.failed]
    if self.failed:
        lines.append("re-run the sweep to retry the failed jobs")
    return "\n".join(lines)




def demo_report(self: DemoResult) -> str:
    """The table ``ckptavg demo`` prints: held-out loss by step, wins per phase, the spike, zero-shot."""
    from ..demo import TASK_NAME

    cfg, k = self.config, self.demo.window
    how = "trained in" if self.trained else "cached; trained in"
    lines = [
        f"run {self.run}: {len(self.raw)} checkpoints, steps {min(self.raw)}..{max(self.raw)} "
        f"({how} {self.seconds['train']:.0f} s)",
        f"held-out loss (nats/token): raw checkpoint, LAWA k={k}, EMA half-life {self.demo.ema_half_life:g} steps, "
        f"WSM ({self.demo.wsm_schedule}) and WMA over LAWA's {k} checkpoints",
        f"{'step':>6}  {'phase':<8} {'raw':>7} {f'lawa{k}':>7} {'ema':>7} {f'wsm{k}':>7} {f'wma{k}':>7}",
    ]
    show = [s for s in sorted(self.raw) if s >= 2 * cfg.save_every
            and (s % (2 * cfg.save_every) == 0 or abs(s - cfg.spike_end) <= cfg.save_every)]
    for s in show:
        cells = [f"{c[s]:.4f}" if s in c else "-" for c in (self.raw, self.lawa, self.ema, self.wsm, self.wma)]
        mark = "  <- spike" if s == cfg.spike_end else ""
        lines.append(f"{s:>6}  {cfg.phase(s):<8} " + " ".join(f"{c:>7}" for c in cells) + mark)
    for phase in ("high-lr", "cooldown"):
        for curve, label in (("lawa", f"LAWA k={k}"), ("ema", "EMA"), ("wsm", f"WSM k={k}"), ("wma", f"WMA k={k}")):
            g = sorted(self.gains(phase, curve).values())
            if g:
                lines.append(f"{phase:>8}: {label} beats raw at {sum(x > 0 for x in g)}/{len(g)} checkpoints; "
                             f"raw − {curve}: median {g[len(g) // 2]:+.4f}, mean {sum(g) / len(g):+.4f} nats")
    end = cfg.spike_end
    before = max(s for s in self.raw if s <= end - cfg.spike_steps)
    if end in self.raw and end in self.lawa and end in self.ema:
        lines.append(f"   spike: raw {self.raw[before]:.3f} at step {before} -> {self.raw[end]:.3f} at {end}; "
                     f"there LAWA k={k} {self.lawa[end]:.3f}, EMA {self.ema[end]:.3f}"
                     + (f", WSM {self.wsm[end]:.3f}" if end in self.wsm else "")
                     + (f", WMA {self.wma[end]:.3f}" if end in self.wma else ""))
    for s, xa in sorted(self.lawa_xa.items()):  # LAWA with and without merge --exclude-anomalies
        kept = self.xa_inputs.get(s, [])
        lines.append(f"  step {s}: LAWA k={k} {self.lawa[s]:.4f}, without the checkpoints ckptavg inspect flags "
                     f"{xa:.4f} (averaged {', '.join(map(str, kept))})")
    if self.zero_shot:
        by_step: dict[int, dict[str, float]] = {}
        for z in self.zero_shot:
            by_step.setdefault(z["step"], {})[z["variant"]] = z["acc"]
        lines.append(f"zero-shot {TASK_NAME} accuracy (lm-eval; at {len(by_step)} steps only, "
                     "as each call costs ~1 s):")
        lines.append(f"{'step':>6}  {'raw':>6} {f'lawa{k}':>6} {'ema':>6}")
        for s, v in sorted(by_step.items()):
            cells = [f"{v[n]:.3f}" if n in v else "-" for n in ("raw", "lawa", "ema")]
            lines.append(f"{s:>6}  " + " ".join(f"{x:>6}" for x in cells))
    if self.merged is not None:
        lines.append(f"wrote {self.merged} (LAWA k={k} at the last step, HF-loadable)")
    if self.plot is not None:
        lines.append(f"wrote {self.plot}")
    lines.append("time: " + ", ".join(f"{n} {s:.1f} s" for n, s in self.seconds.items()))
    return "\n".join(lines)




__all__ = ["step_source_note", "demo_report", "eval_table", "format_notes", "human_bytes", "list_hint", "coarse_warning", "weights_table", "sweep_report"]
