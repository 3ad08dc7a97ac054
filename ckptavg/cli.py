"""``ckptavg`` command line: each command parses flags, calls one library function, prints.

Only click and light modules are imported at start-up; numpy/torch load inside the commands.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from ._version import __version__
from .errors import CkptavgError

F = TypeVar("F", bound=Callable[..., Any])


def _one_line_warnings(show: Callable[..., None]) -> Callable[..., None]:
    """``warnings.showwarning`` printing ckptavg's own warnings as one line, others as ``show`` does."""

    def one_line(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        from .hub import HubWarning

        if issubclass(category, HubWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            show(message, category, *args, **kwargs)

    return one_line


def _friendly_errors(fn: F) -> F:
    """Expected bad input → one line on stderr and exit 1, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warnings(warnings.showwarning)
                return fn(*args, **kwargs)
        except CkptavgError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written was left in place (finished outputs are kept)", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _int_list(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


_SELECTION_OPTIONS = (
    click.option("--window", "-k", type=int, help="Average the latest k checkpoints (LAWA)."),
    click.option("--at", type=int, help="Take the window that ends at this step."),
    click.option("--from", "start", type=int, help="First step to consider (inclusive)."),
    click.option("--to", "stop", type=int, help="Last step to consider (inclusive)."),
    click.option("--every", type=int, help="Keep every n-th checkpoint (counted back from the newest)."),
    click.option("--steps", help="Exactly these steps, comma-separated."),
    click.option("--method", "-m", default="uniform", show_default=True, help="uniform, weighted or ema."),
    click.option("--weights", help="weighted: one weight per selected checkpoint, comma-separated."),
    click.option("--decay", type=float, help="ema: decay per checkpoint, e.g. 0.9."),
    click.option("--half-life", type=float, help="ema: half-life in training steps (handles irregular spacing)."),
)


def _selection_options(fn: F) -> F:
    """The selection and method flags, spelled the same for every command that averages."""
    for option in reversed(_SELECTION_OPTIONS):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckptavg")
def cli() -> None:
    """Average a training run's checkpoints: uniform, weighted, EMA and LAWA windows,
    streamed one tensor at a time in bounded memory."""


_STEP_PATTERN_HELP = r"hf:// only: regex whose group is the step in a branch name [default: ^step(\d+)$]."


@cli.command("list")
@click.argument("path")
@click.option("--step-pattern", help=_STEP_PATTERN_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_friendly_errors
def list_cmd(path: str, step_pattern: str | None, as_json: bool) -> None:
    """List the checkpoints of a run: step, format, size, dtype.

    PATH is a run folder, or hf://org/name for the step branches of a Hub model repo
    (metadata only: nothing is downloaded).
    """
    from .discovery import discover

    traj = discover(path, step_pattern=step_pattern)
    rows = []
    for c in traj:
        dtypes = sorted({t.dtype.name for t in (c.tensors or {}).values()})
        rows.append({
            "step": c.step, "format": c.format, "size": c.size, "dtypes": dtypes,
            "tensors": len(c.tensors or {}), "location": c.location,
            "duplicates": list(c.source.same_as) if c.source else [],
        })
    if as_json:
        click.echo(json.dumps({"trajectory": traj.name, "checkpoints": rows}, indent=2))
        return
    click.echo(f"{traj.name}: {len(rows)} checkpoints")
    click.echo(f"{'step':>10}  {'format':<11} {'size':>9}  {'dtype':<9} location")
    for r in rows:
        same = f"  [same weights as {', '.join(r['duplicates'][:3])}]" if r["duplicates"] else ""
        click.echo(f"{r['step']:>10}  {r['format']:<11} {_human(r['size']):>9}  {','.join(r['dtypes']):<9} {r['location']}{same}")
    dupes = sum(bool(r["duplicates"]) for r in rows)
    if dupes:
        click.echo(f"warning: {dupes} revisions have byte-identical weight files (same LFS sha256) under another "
                   "step's name; merge refuses them unless --allow-duplicates", err=True)


def _default_out(root: str, method: str, k: int, last_step: int, decay: float | None, half_life: float | None) -> Path:
    # hf://org/name → ./name-…: a Hub run has no folder to sit beside
    base = Path.cwd() / root.rstrip("/").split("/")[-1] if root.startswith("hf://") else Path(root).resolve()
    if method == "ema":
        tag = f"ema-h{half_life:g}" if half_life is not None else f"ema{decay:g}"
    else:
        tag = f"{method}{k}"
    return base.parent / f"{base.name}-{tag}-step{last_step}"


@cli.command()
@click.argument("path")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Output directory [default: <run>-<method><k>-step<S> beside the run].")
@_selection_options
@click.option("--dtype", help="Output dtype: float32, float16, bfloat16 [default: the inputs'].")
@click.option("--accumulate", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--max-shard-size", help="Shard the output, e.g. 5GB, with model.safetensors.index.json.")
@click.option("--force", is_flag=True, help="Replace an existing non-empty output directory.")
@click.option("--hash", "hash_inputs", is_flag=True, help="Record each input file's sha256 in ckptavg.json.")
@click.option("--allow-nonfinite", is_flag=True, help="Average tensors with NaN/Inf instead of refusing.")
@click.option("--step-pattern", help=_STEP_PATTERN_HELP)
@click.option("--allow-duplicates", is_flag=True, help="hf:// only: average revisions whose weights are byte-identical to another step's.")
@click.option("--evict", is_flag=True, help="hf:// only: delete the inputs' weight files from the HF cache after the merge.")
@click.option("--dry-run", is_flag=True, help="Show the selection and weights; read no tensor data.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result on stdout.")
@_friendly_errors
def merge(path: str, out: Path | None, window: int | None, at: int | None, start: int | None, stop: int | None,
          every: int | None, steps: str | None, method: str, weights: str | None, decay: float | None,
          half_life: float | None, dtype: str | None, accumulate: str, max_shard_size: str | None, force: bool,
          hash_inputs: bool, allow_nonfinite: bool, step_pattern: str | None, allow_duplicates: bool, evict: bool,
          dry_run: bool, quiet: bool, as_json: bool) -> None:
    """Average checkpoints of the run at PATH into one HF-loadable directory.

    PATH may be hf://org/name: the step branches of a Hub model repo, downloaded into the
    standard HF cache (HF_HUB_OFFLINE=1: from the cache alone).

    \b
    Examples:
      ckptavg merge runs/pythia-tiny --window 5
      ckptavg merge runs/pythia-tiny --window 5 --at 20000
      ckptavg merge runs/pythia-tiny --method ema --half-life 2000
      ckptavg merge hf://EleutherAI/pythia-1b-deduped --window 5 --at 20000
    """
    from . import methods
    from .discovery import discover
    from .engine import average
    from .selection import Selection

    traj = discover(path, step_pattern=step_pattern)
    sel = Selection(window, at, start, stop, every, _int_list(steps)).apply(traj)
    wlist = _float_list(weights)
    w = methods.weights(method, sel.steps, weights=wlist, decay=decay, half_life=half_life)
    target = out or _default_out(traj.root, method, len(sel), sel.steps[-1] if len(sel) else 0, decay, half_life)
    summary: dict[str, Any] = {"output": str(target), "method": method, "steps": sel.steps, "weights": w}
    if not dry_run:
        average(sel, target, method=method, weights=wlist, decay=decay, half_life=half_life, dtype=dtype,
                accumulate=accumulate, max_shard_size=max_shard_size, force=force,  # type: ignore[arg-type]
                hash_inputs=hash_inputs, allow_nonfinite=allow_nonfinite, allow_duplicates=allow_duplicates,
                progress=not quiet and not as_json)
        if evict:
            from .hub import evict as evict_inputs

            summary["evicted_bytes"] = evict_inputs(sel)
    if as_json:
        click.echo(json.dumps(summary | {"dry_run": dry_run}, indent=2))
        return
    verb = "would write" if dry_run else "wrote"
    click.echo(f"{verb} {target}: {method} of {len(sel)} checkpoints, steps {sel.steps[0]}..{sel.steps[-1]}")
    if "evicted_bytes" in summary:
        click.echo(f"evicted the inputs' weight files from the HF cache ({_human(summary['evicted_bytes'])} freed)")
    if dry_run:
        for s, x in zip(sel.steps, w):
            click.echo(f"  step {s:>10}  weight {x:.6f}")


@cli.command("series")
@click.argument("path")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Folder for step{S}/ outputs.")
@click.option("--window", "-k", type=int, help="uniform: average the latest k checkpoints at every target (LAWA).")
@click.option("--method", "-m", type=click.Choice(["uniform", "ema"]), default="uniform", show_default=True)
@click.option("--decay", type=float, help="ema: decay per checkpoint.")
@click.option("--half-life", type=float, help="ema: half-life in training steps.")
@click.option("--stride", type=int, default=1, show_default=True, help="A target at every n-th checkpoint.")
@click.option("--from", "start", type=int, help="First target step (windows may reach before it).")
@click.option("--to", "stop", type=int, help="Last target step.")
@click.option("--steps", help="Exactly these target steps, comma-separated.")
@click.option("--partial", is_flag=True, help="Targets before the first full window average what exists [default: skipped].")
@click.option("--non-overlapping", is_flag=True, help="Disjoint windows (stride = k), as the LAWA authors' script.")
@click.option("--dtype", help="Output dtype [default: the inputs'].")
@click.option("--max-shard-size", help="Shard each output, e.g. 5GB.")
@click.option("--allow-nonfinite", is_flag=True, help="Write averages with NaN/Inf instead of refusing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result on stdout.")
@_friendly_errors
def series_cmd(path: str, out: Path, window: int | None, method: str, decay: float | None, half_life: float | None,
               stride: int, start: int | None, stop: int | None, steps: str | None, partial: bool,
               non_overlapping: bool, dtype: str | None, max_shard_size: str | None, allow_nonfinite: bool,
               quiet: bool, as_json: bool) -> None:
    """Write the averaged model at every target step of the run at PATH (OUT/step{S}/),
    reading each input once. Re-running resumes: complete outputs are kept.

    \b
    Examples:
      ckptavg series runs/pythia-tiny --window 5 -o lawa5
      ckptavg series runs/pythia-tiny --method ema --half-life 2000 -o ema
    """
    from .discovery import discover
    from .series import series

    results = series(discover(path), out, window=window, method=method, decay=decay, half_life=half_life,
                     stride=stride, start=start, stop=stop, steps=_int_list(steps), partial=partial,
                     non_overlapping=non_overlapping, dtype=dtype, max_shard_size=max_shard_size,
                     allow_nonfinite=allow_nonfinite, progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps({"outputs": [{"step": r.step, "path": str(r.path), "written": r.written}
                                           for r in results]}, indent=2))
        return
    kept = sum(not r.written for r in results)
    click.echo(f"wrote {len(results) - kept} averaged checkpoints to {out}" + (f" ({kept} kept from an earlier run)" if kept else ""))
    for r in results:
        click.echo(f"  step {r.step:>10}  {'written' if r.written else 'kept'}  {r.path}")


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("example"), show_default=True,
              help="Folder for the run (reused if already trained), the plot and the LAWA merge.")
@click.option("--zero-shot/--no-zero-shot", default=True, show_default=True,
              help="Also score the lm-eval multiple-choice task at a few steps.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_friendly_errors
def demo(out: Path, zero_shot: bool, quiet: bool) -> None:
    """Train a tiny Pythia on a synthetic language at a high learning rate (or reuse the run in
    OUT), average it at every checkpoint (LAWA k=5, EMA), score raw vs averaged on held-out text,
    print a table and save OUT/lawa.png. About a minute on 2 CPU cores."""
    from .demo import run_demo

    click.echo(run_demo(out, zero_shot=zero_shot, progress=not quiet).report())


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
@_selection_options
@click.option("--text", type=click.Path(dir_okay=False, path_type=Path),
              help="Held-out loss and perplexity on this .txt or .jsonl (\"text\" field) file; needs no lm-eval.")
@click.option("--seq-len", type=int, help="--text window length [default: the model's context, at most 2048].")
@click.option("--tokenizer", help="Tokenizer name or path [default: the checkpoint's files].")
@click.option("--offline", is_flag=True, help="Set HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE: local files and caches only.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the results as JSON: lm-eval's format plus ckptavg provenance.")
@click.option("--quiet", "-q", is_flag=True, help="No averaging progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result on stdout.")
@_friendly_errors
def eval_cmd(target: str, tasks: str | None, include_path: tuple[Path, ...], limit: float | None, batch_size: str,
             device: str, dtype: str, step: int | None, window: int | None, at: int | None, start: int | None,
             stop: int | None, every: int | None, steps: str | None, method: str, weights: str | None,
             decay: float | None, half_life: float | None, text: Path | None, seq_len: int | None,
             tokenizer: str | None, offline: bool, output: Path | None, quiet: bool, as_json: bool) -> None:
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
    from .evaluate import score, summary_table, to_json
    from .selection import Selection

    spec = Selection(window, at, start, stop, every, _int_list(steps))
    result = score(
        target, tasks, include_path=include_path, limit=limit,
        batch_size=batch_size, device=device, dtype=dtype, step=step, selection=None if spec == Selection() else spec,
        method=method, weights=_float_list(weights), decay=decay, half_life=half_life, text=text, seq_len=seq_len,
        tokenizer=tokenizer, offline=offline, output=output, progress=not quiet and not as_json,
    )
    click.echo(to_json(result) if as_json else summary_table(result))


@cli.command("sweep")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: one job after the other here; ray: a Ray task per job (its GPU when eval.device is cuda).")
@click.option("--address", help="ray: the cluster to join, e.g. auto [default: start a local Ray].")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder [default: the recipe's output].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_friendly_errors
def sweep_cmd(recipe: Path, executor: str, address: str | None, out: Path | None, quiet: bool) -> None:
    """Score the raw checkpoint and its LAWA/EMA averages at every target step of RECIPE.

    RECIPE is a YAML file: trajectory (folder or hf://org/name), steps, variants, eval, output.
    Results are appended to OUTPUT/results.jsonl (with results.csv and results.md);
    re-running resumes, retrying failed jobs. Exit code 1 when a job failed.

    \b
    Examples:
      ckptavg sweep recipes/demo.yaml
      ckptavg sweep recipes/pythia-160m-deduped-lawa.yaml --executor ray --address auto
    """
    from .sweep import run_sweep

    try:
        report = run_sweep(recipe, out=out, executor=executor, address=address, progress=not quiet)
    except KeyboardInterrupt:
        click.echo("interrupted; finished jobs are in the table: run the same command to resume", err=True)
        sys.exit(130)
    click.echo(report.summary())
    if report.failed:
        sys.exit(1)


@cli.command("plot")
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), help="PNG to write [default: results.png beside the table].")
@click.option("--task", "tasks", multiple=True, help="Only this task (held_out: the held-out loss); repeatable.")
@click.option("--metric", "metrics", multiple=True, help="Only this metric, e.g. acc; repeatable.")
@_friendly_errors
def plot_cmd(results: Path, out: Path | None, tasks: tuple[str, ...], metrics: tuple[str, ...]) -> None:
    """Draw metric vs step, one line per variant, from a sweep's RESULTS (its folder or results.jsonl).

    \b
    Example:
      ckptavg plot sweeps/demo --task held_out -o demo.png
    """
    from .plot import plot_results

    click.echo(f"wrote {plot_results(results, out, tasks=tasks, metrics=metrics)}")


def main() -> None:
    cli(prog_name="ckptavg")


if __name__ == "__main__":
    main()
