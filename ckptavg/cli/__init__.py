"""``ckptavg`` command line: each command parses flags, calls one library function, prints.

Only click and light modules are imported at start-up; numpy/torch load inside the commands.
Flags shared by several commands come from the option groups in :mod:`.options`; everything
printed for people is built in :mod:`.present`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .._version import __version__
from ..errors import UsageError
from .inspect import inspect_cmd, merge_exclusions
from .options import (
    KEY_HELP,
    STEP_PATTERN_HELP,
    anomaly_options,
    deprecated_alias,
    format_option,
    friendly_errors,
    method_from,
    method_options,
    output_options,
    peft_options,
    selection_from,
    selection_options,
    steps_per_save_option,
    trajectory_options,
    write_options,
)
from .present import (
    coarse_warning,
    format_notes,
    human_bytes,
    list_hint,
    preflight_report,
    step_source_note,
    weights_table,
)
from .study import study_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckptavg")
def cli() -> None:
    """Average a training run's checkpoints: uniform, weighted, EMA and LAWA windows,
    streamed one tensor at a time in bounded memory."""


cli.add_command(inspect_cmd)
cli.add_command(study_cmd)


@cli.command("list")
@click.argument("path")
@click.option("--step-pattern", help=STEP_PATTERN_HELP)
@click.option("--key", help=KEY_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@steps_per_save_option
@friendly_errors
def list_cmd(path: str, step_pattern: str | None, key: str | None, as_json: bool, steps_per_save: int | None) -> None:
    """List the checkpoints of a run: step, format, size, dtype.

    PATH is a run folder, or hf://org/name for the step branches of a Hub model repo
    (metadata only: nothing is downloaded).
    """
    from ..sources import discover

    traj = discover(path, step_pattern=step_pattern, key=key, steps_per_save=steps_per_save)
    newest = traj[-1] if len(traj) else None
    from ..io.formats import input_kind

    kind = input_kind(newest.format, newest.files, newest.key) if newest is not None and newest.files else None
    from ..tokens import learning_rates

    rows: list[dict[str, Any]] = []
    for c, lr in zip(traj, learning_rates(list(traj))):
        dtypes = sorted({t.dtype.name for t in (c.tensors or {}).values()})
        rows.append({
            "step": c.step, "format": c.format, "size": c.size, "dtypes": dtypes,
            "tensors": len(c.tensors or {}), "location": c.location,
            "duplicates": list(c.source.same_as) if c.source else [],
            **({"step_from": c.step_from} if c.step_from else {}),
            **({"learning_rate": lr} if lr is not None else {}),
        })
    steps_note = step_source_note(traj)
    if as_json:
        click.echo(json.dumps({"trajectory": traj.name, "checkpoints": rows, "ignored": list(traj.ignored),
                               "input_format": kind, "steps_are_save_indices": any(c.counts_saves for c in traj),
                               **({"steps_note": steps_note} if steps_note else {})}, indent=2))
        return
    click.echo(f"{traj.name}: {len(rows)} checkpoints")
    lrs = any("learning_rate" in r for r in rows)  # a column only where the run logged it (HF Trainer)
    click.echo(f"{'step':>10}  {'format':<11} {'size':>9}  {'dtype':<9} " + ("lr        " if lrs else "") + "location")
    for r in rows:
        same = f"  [same weights as {', '.join(r['duplicates'][:3])}]" if r["duplicates"] else ""
        rate = f"{r['learning_rate']:<9.3g} " if "learning_rate" in r else ("-         " if lrs else "")
        click.echo(f"{r['step']:>10}  {r['format']:<11} {human_bytes(r['size']):>9}  {','.join(r['dtypes']):<9} "
                   f"{rate}{r['location']}{same}")
    for note in traj.ignored:
        click.echo(f"ignored: {note}")
    if steps_note:
        click.echo(f"note: {steps_note}")
    if hint := list_hint(kind):
        click.echo(hint)
    dupes = sum(bool(r["duplicates"]) for r in rows)
    if dupes:
        click.echo(f"warning: {dupes} revisions have byte-identical weight files (same LFS sha256) under another "
                   "step's name; merge refuses them unless --allow-duplicates", err=True)


def _default_out(root: str, k: int, last_step: int, how: dict[str, Any]) -> Path:
    # hf://org/name → ./name-…: a Hub run has no folder to sit beside
    from ..sources import is_hub

    base = Path.cwd() / root.rstrip("/").split("/")[-1] if is_hub(root) else Path(root).resolve()
    method = how["method"]
    if method == "ema":
        if how.get("half_life_tokens") is not None:
            tag = f"ema-ht{how['half_life_tokens']:g}"
        else:
            tag = f"ema-h{how['half_life']:g}" if how.get("half_life") is not None else f"ema{how['decay']:g}"
    elif method == "wsm":
        tag = f"wsm-{how['schedule']}{k}"
    elif method == "power-ema":
        tag = f"power-ema{how['sigma_rel']:g}-{k}"
    else:
        tag = f"{method}{k}"
    return base.parent / f"{base.name}-{tag}-step{last_step}"


@cli.command()
@click.argument("path")
@click.option("-o", "--out", type=click.Path(path_type=Path),
              help="Output directory [default: <run>-<method><k>-step<S> beside the run].")
@selection_options
@method_options
@trajectory_options
@steps_per_save_option
@click.option("--dtype", help="Output dtype: float32, float16, bfloat16 [default: the inputs'].")
@click.option("--accumulate", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--max-shard-size", help="Shard the output, e.g. 5GB, with model.safetensors.index.json.")
@format_option
@click.option("--force", is_flag=True,
              help="Replace an existing non-empty output directory (never an input; a link is replaced, not followed).")
@click.option("--hash", "hash_inputs", is_flag=True, help="Record each input file's sha256 in ckptavg.json.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Workers, each averaging whole chunks [default: the CPUs this process may use]; same output for any number.")
@click.option("--allow-nonfinite", is_flag=True, help="Average tensors with NaN/Inf instead of refusing.")
@click.option("--evict", is_flag=True, help="hf:// only: delete the inputs' weight files from the HF cache after the merge.")
@click.option("--dry-run", is_flag=True, help="Show the selection and weights; read no tensor data.")
@peft_options
@anomaly_options
@write_options
@output_options
@friendly_errors
def merge(path: str, out: Path | None, evict: bool, dry_run: bool, quiet: bool, as_json: bool, step_pattern: str | None,
          key: str | None, peft: str, base: Path | None, steps_per_save: int | None, **kw: Any) -> None:
    """Average checkpoints of the run at PATH into one HF-loadable directory (--format: the input's own).

    PATH may be hf://org/name: the step branches of a Hub model repo, downloaded into the
    standard HF cache (HF_HUB_OFFLINE=1: from the cache alone).

    \b
    Examples:
      ckptavg merge runs/pythia-tiny --window 5
      ckptavg merge runs/pythia-tiny --window 5 --at 20000
      ckptavg merge runs/pythia-tiny --method ema --half-life 2000
      ckptavg merge out-nanogpt --window 5 --format same    # OUT/ckpt.pt for sample.py
      ckptavg merge hf://EleutherAI/pythia-1b-deduped --window 5 --at 20000
    """
    from ..averaging import average, check_write_options, method_weights, output_kind
    from ..sources import discover
    from ..sources import evict as evict_inputs

    out_dtype, _ = check_write_options(kw.get("dtype"), kw.get("max_shard_size"))  # checked even with --dry-run
    selection = selection_from(kw)
    how = method_from(kw)
    traj = discover(path, step_pattern=step_pattern, key=key, steps_per_save=steps_per_save)
    sel = selection.apply(traj)
    sel, excluded = merge_exclusions(traj, sel, kw, dry_run, progress=not quiet and not as_json)
    w, record = method_weights(list(sel), how["method"], {k: v for k, v in how.items() if k != "method"}, traj.root)
    target = out or _default_out(traj.root, len(sel), sel.steps[-1], how)
    fmt, kind = output_kind(list(sel), kw["output_format"])  # refused (exit 2) before any work, --dry-run too
    summary: dict[str, Any] = {"output": str(target), "method": how["method"], "steps": sel.steps, "weights": w,
                               "format": fmt, "input_format": kind}
    summary |= {k: record[k] for k in ("tokens", "tokens_from", "gamma", "profile_error") if k in record}
    summary |= {"excluded": excluded["excluded"]} if excluded else {}
    coarse_warning(record)
    if len(sel) == 1:  # any method of one checkpoint is that checkpoint: say so rather than look like an average
        click.echo(f"warning: the selection is one checkpoint (step {sel.steps[0]}); the output is a copy of it, "
                   "not an average (widen --window/--from/--steps to average several)", err=True)
    if dry_run:
        from ..preflight import preflight

        pf = preflight(list(sel), target, out_dtype, output_format=fmt, threads=kw.get("threads"))
        summary["preflight"] = pf.to_dict()
    elif peft == "merged-delta" or base is not None:
        from ..peft import merge_adapters

        if peft != "merged-delta" or kw["output_format"] != "hf":
            raise UsageError("--base goes with --peft merged-delta, which writes an hf folder")
        unused = [f"--{k.replace('_', '-')}" for k in ("dtype", "max_shard_size", "hash_inputs") if kw.get(k)]
        if unused:
            raise UsageError(f"{unused[0]} does not apply to --peft merged-delta (the base's dtype, one file)")
        merge_adapters(sel, target, **how, base=base, force=kw["force"], fsync=kw["fsync"])
    else:
        average(sel, target, **how, **kw, note=excluded or None, progress=not quiet and not as_json)
        if evict:
            summary["evicted_bytes"] = evict_inputs(sel)
    if as_json:
        click.echo(json.dumps(summary | {"dry_run": dry_run}, indent=2))
        return
    verb = "would write" if dry_run else "wrote"
    click.echo(f"{verb} {target}: {how['method']} of {len(sel)} checkpoints, steps {sel.steps[0]}..{sel.steps[-1]}")
    for x in excluded.get("excluded", []):
        click.echo(f"left out step {x['step']}: {x['reason']}")
    if "evicted_bytes" in summary:
        click.echo(f"evicted the inputs' weight files from the HF cache ({human_bytes(summary['evicted_bytes'])} freed)")
    for line in format_notes(fmt, kind, str(target)) if fmt != "hf" or kind != "hf" else ():
        click.echo(line)
    if dry_run:
        click.echo(weights_table(sel.steps, w, record))
        click.echo(preflight_report(summary["preflight"]))


@cli.command("soup")
@click.argument("path")
@click.option("--text", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Held-out .txt or .jsonl (\"text\" field) file that decides which checkpoints join.")
@click.option("-o", "--out", type=click.Path(path_type=Path),
              help="Output directory [default: <run>-soup<k>-step<S> beside the run].")
@selection_options
@trajectory_options
@click.option("--seq-len", type=int, help="Held-out window length [default: the model's context, at most 2048].")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, mps …")
@click.option("--force", is_flag=True, help="Replace an existing output directory ckptavg wrote.")
@write_options
@output_options
@friendly_errors
def soup_cmd(path: str, text: Path, out: Path | None, step_pattern: str | None, key: str | None,
             allow_duplicates: bool, seq_len: int | None, device: str, force: bool, fsync: bool, quiet: bool,
             as_json: bool, **kw: Any) -> None:
    """Greedy soup of the selected checkpoints of the run at PATH (Wortsman et al. 2022): newest
    first, a checkpoint joins the uniform average only if the held-out loss on --text improves.
    Candidates are averaged and scored in memory; the chosen soup is written like merge, with the
    choice and every candidate's loss in ckptavg.json. Merge only: series has no soup.

    \b
    Example:
      ckptavg soup runs/pythia-tiny --window 10 --text heldout.jsonl
    """
    from ..soup import greedy_soup
    from ..sources import discover

    selection = selection_from(kw)
    traj = discover(path, step_pattern=step_pattern, key=key)
    sel = selection.apply(traj)
    target = out or _default_out(traj.root, len(sel), sel.steps[-1], {"method": "soup"})
    result = greedy_soup(traj, text, selection, out=target, seq_len=seq_len, device=device, force=force, fsync=fsync,
                         allow_duplicates=allow_duplicates, progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps({"output": str(result.out), **result.record}, indent=2))
        return
    click.echo(f"wrote {result.out}: greedy soup of {len(result.steps)} of {len(sel)} checkpoints, "
               f"held-out loss {result.loss:.4f}")
    for s in result.curve:
        click.echo(f"  step {s.step:>10}  loss {s.loss:.4f}  {'kept' if s.kept else 'left out'}")


@cli.command("series")
@click.argument("path")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output directory: one step{S}/ per target.")
@selection_options
@method_options
@trajectory_options
@steps_per_save_option
@click.option("--stride", type=int, hidden=True, callback=deprecated_alias("--every"))
@click.option("--partial", is_flag=True, help="Targets before the first full window average what exists [default: skipped].")
@click.option("--non-overlapping", is_flag=True, help="Disjoint windows of k from the first checkpoint, as the LAWA authors' script.")
@click.option("--dtype", help="Output dtype [default: the inputs'].")
@click.option("--max-shard-size", help="Shard each output, e.g. 5GB.")
@click.option("--allow-nonfinite", is_flag=True, help="Write averages with NaN/Inf instead of refusing.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Workers, each owning whole chunks [default: the CPUs this process may use]; same outputs for any number.")
@click.option("--force", is_flag=True,
              help="Replace step{S} entries ckptavg did not write (never an input; a link is replaced, not followed).")
@anomaly_options
@write_options
@output_options
@friendly_errors
def series_cmd(path: str, out: Path, stride: int | None, quiet: bool, as_json: bool, step_pattern: str | None,
               key: str | None, allow_duplicates: bool, steps_per_save: int | None, **kw: Any) -> None:
    """Write the averaged model at every target step of the run at PATH (OUT/step{S}/),
    reading each input once. The selection flags pick the targets; --window is each
    uniform target's window. Re-running resumes: outputs made by the same arguments from the
    same inputs are kept, ckptavg's other outputs redone; anything else is refused without --force.

    \b
    Examples:
      ckptavg series runs/pythia-tiny --window 5 -o lawa5
      ckptavg series runs/pythia-tiny --window 5 --every 2 --from 10000 -o lawa5
      ckptavg series runs/pythia-tiny --method ema --half-life 2000 -o ema
    """
    from dataclasses import replace

    from ..series import series
    from ..sources import discover

    selection = selection_from(kw)
    if stride is not None:
        selection = replace(selection, every=stride)
    how = method_from(kw)
    if how.pop("weights") is not None:
        raise click.UsageError("series averages uniform windows or EMAs; --weights applies to merge")
    results = series(discover(path, step_pattern=step_pattern, key=key, steps_per_save=steps_per_save), out, selection, **how, **kw,
                     allow_duplicates=allow_duplicates, progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps({"outputs": [{"step": r.step, "path": str(r.path), "written": r.written}
                                           for r in results]}, indent=2))
        return
    kept = sum(not r.written for r in results)
    click.echo(f"wrote {len(results) - kept} averaged checkpoints to {out}" + (f" ({kept} kept from an earlier run)" if kept else ""))
    for r in results:
        click.echo(f"  step {r.step:>10}  {'written' if r.written else 'kept'}  {r.path}")


@cli.command()
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("example"), show_default=True,
              help="Output directory: the run (reused if already trained), the plot and the LAWA merge.")
@click.option("--zero-shot/--no-zero-shot", default=True, show_default=True,
              help="Also score the lm-eval multiple-choice task at a few steps.")
@output_options
@friendly_errors
def demo(out: Path, zero_shot: bool, quiet: bool, as_json: bool) -> None:
    """Train a tiny Pythia on a synthetic language at a high learning rate (or reuse the run in
    OUT), average it at every checkpoint (LAWA k=5, EMA, WSM, WMA; LAWA without flagged checkpoints
    around the spike), score raw vs averaged on held-out text, print a table and save OUT/lawa.png.
    Deterministic: the same weights and table on every run. A few minutes on 2 CPU cores."""
    from ..demo import pin_arithmetic, run_demo
    from .present import demo_report

    pin_arithmetic()  # the same kernels for scoring as for training: the same table on every run
    result = run_demo(out, zero_shot=zero_shot, progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    click.echo(demo_report(result))


@cli.command("eval")
@click.argument("target")
@click.option("--tasks", "-t", help="Comma-separated lm-eval task names: ckptavg_basics (packaged, offline), "
              "built-ins such as lambada_openai,piqa,sciq, or tasks under --include-path.")
@click.option("--include-path", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder of local task YAMLs (e.g. dataset_path: json + data_files); repeatable.")
@click.option("--limit", type=float, help="At most N examples per task (a fraction if < 1), for quick checks.")
@click.option("--batch-size", default="1", show_default=True, help="Batch size (an integer or auto).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, mps …")
@click.option("--dtype", default="auto", show_default=True, help="Model dtype: auto (the config's), float32, bfloat16, float16.")
@click.option("--step", type=int, help="Score the one checkpoint at this step of the run at TARGET.")
@selection_options
@method_options
@trajectory_options
@steps_per_save_option
@click.option("--text", type=click.Path(dir_okay=False, path_type=Path),
              help="Held-out loss and perplexity on this .txt or .jsonl (\"text\" field) file; needs no lm-eval.")
@click.option("--seq-len", type=int, help="--text window length [default: the model's context, at most 2048].")
@click.option("--tokenizer", help="Tokenizer name or path [default: the checkpoint's files].")
@click.option("--offline", is_flag=True, help="Set HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE: local files and caches only.")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results to this JSON file: lm-eval's format plus ckptavg provenance.")
@click.option("--output", "-o", "old_output", type=click.Path(dir_okay=False, path_type=Path), hidden=True,
              callback=deprecated_alias("--results"))
@output_options
@friendly_errors
def eval_cmd(target: str, results: Path | None, old_output: Path | None, quiet: bool, as_json: bool, key: str | None,
             step_pattern: str | None, allow_duplicates: bool, steps_per_save: int | None, **kw: Any) -> None:
    """Score TARGET zero-shot with lm-evaluation-harness and/or a held-out loss.

    TARGET is a merged directory, one checkpoint of a run (PATH --step S), or a merge spec
    (PATH --window 5 --at S, any --method; PATH local or hf://) averaged in memory and never
    written to disk.

    \b
    Examples:
      ckptavg eval runs/pythia-tiny-uniform5-step8000 --tasks ckptavg_basics
      ckptavg eval runs/pythia-tiny --window 5 --tasks lambada_openai,piqa --limit 200
      ckptavg eval runs/pythia-tiny --step 8000 --text valid.jsonl --json
    """
    from ..eval import score, to_json
    from ..sources import discover
    from .present import eval_table

    selection = selection_from(kw)
    how = method_from(kw)
    source: Any = (discover(target, step_pattern=step_pattern, key=key, steps_per_save=steps_per_save)
                   if step_pattern or key or steps_per_save else target)
    result = score(source, kw.pop("tasks"), selection=None if selection.is_empty else selection, **how, **kw,
                   allow_duplicates=allow_duplicates, output=results or old_output,
                   progress=not quiet and not as_json)
    click.echo(to_json(result) if as_json else eval_table(result))


@cli.command("sweep")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: one job after the other here; ray: a Ray task per job (its GPU when eval.device is cuda).")
@click.option("--address", help="ray: the cluster to join, e.g. auto [default: start a local Ray].")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory for the results table [default: the recipe's output].")
@output_options
@friendly_errors
def sweep_cmd(recipe: Path, executor: str, address: str | None, out: Path | None, quiet: bool, as_json: bool) -> None:
    """Score the raw checkpoint and its LAWA/EMA averages at every target step of RECIPE.

    RECIPE is a YAML file: trajectory (folder or hf://org/name), steps, variants, eval, output.
    Results are appended to OUTPUT/results.jsonl (with results.csv and results.md);
    re-running resumes, retrying failed jobs. Exit code 1 when a job failed.

    \b
    Examples:
      ckptavg sweep recipes/demo.yaml
      ckptavg sweep recipes/pythia-160m-deduped-lawa.yaml --executor ray --address auto
    """
    from ..sweep import run_sweep
    from .present import sweep_report

    try:
        report = run_sweep(recipe, out=out, executor=executor, address=address, progress=not quiet and not as_json)
    except KeyboardInterrupt:
        click.echo("interrupted; finished jobs are in the table: run the same command to resume", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        click.echo(sweep_report(report))
    if report.failed:
        sys.exit(1)


@cli.command("plot")
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), help="PNG to write [default: results.png beside the table].")
@click.option("-o", "--out", "old_out", type=click.Path(dir_okay=False, path_type=Path), hidden=True,
              callback=deprecated_alias("--png"))
@click.option("--task", "tasks", multiple=True, help="Only this task (held_out: the held-out loss); repeatable.")
@click.option("--metric", "metrics", multiple=True, help="Only this metric, e.g. acc; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result on stdout.")
@friendly_errors
def plot_cmd(results: Path, png: Path | None, old_out: Path | None, tasks: tuple[str, ...], metrics: tuple[str, ...],
             as_json: bool) -> None:
    """Draw metric vs step, one line per variant, from a sweep's RESULTS (its folder or results.jsonl).

    \b
    Example:
      ckptavg plot sweeps/demo --task held_out --png demo.png
    """
    from ..sweep.plot import plot_results

    path = plot_results(results, png or old_out, tasks=tasks, metrics=metrics)
    click.echo(json.dumps({"png": str(path)}) if as_json else f"wrote {path}")


def main() -> None:
    cli(prog_name="ckptavg")


if __name__ == "__main__":
    main()
