"""``ckptavg study``: the averaging study on the demo's tiny Pythia (:mod:`ckptavg.demo.study`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import UsageError
from .options import friendly_errors, output_options


@click.command("study")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("study"), show_default=True,
              help="Output directory: the runs (reused when already trained), the scores, study.json/.md/.png.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Seeds 0..N-1: each changes the synthetic world, the data order and the initialisation.")
@click.option("--lrs", default="1e-3,3e-3,1e-2", show_default=True,
              help="Peak learning rates, comma-separated; must include the demo's 3e-3.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Runs trained and scored at once (0: the CPUs this process may use).")
@click.option("--quick", is_flag=True, help="The smallest study (2 seeds, 2 LRs, 80 steps): a check, not a result.")
@click.option("--plot/--no-plot", default=True, show_default=True, help="Write OUT/study.png (needs matplotlib).")
@output_options
@friendly_errors
def study_cmd(out: Path, seeds: int, lrs: str, workers: int, quick: bool, plot: bool, quiet: bool,
              as_json: bool) -> None:
    """Does averaging help, and when? Trains the demo's tiny Pythia for several seeds and peak
    learning rates (plus a constant-LR twin of the demo's LR), then measures the LAWA and WSM
    papers' claims: the gain vs the learning rate, vs checkpoint spacing at a fixed window span, as
    the learning rate anneals, at a loss spike, and a WSM merge vs an annealed branch. Prints the
    tables (OUT/study.md); OUT/study.json has every number. About 10 minutes on 2 idle CPU cores.

    \b
    Examples:
      ckptavg study                      # 3 seeds x 3 LRs: 12 runs of 600 steps
      ckptavg study --seeds 5 --lrs 1e-3,3e-3,6e-3,1e-2
    """
    from dataclasses import replace

    from ..demo import pin_arithmetic
    from ..demo.study import StudyConfig, run_study
    from ..demo.study import quick as quick_config

    pin_arithmetic()  # the same kernels for scoring as for training: the same study.json on every run

    try:
        rates = tuple(float(x) for x in lrs.split(","))
    except ValueError:
        raise UsageError(f"--lrs: expected numbers separated by commas, got {lrs!r}") from None
    cfg = quick_config() if quick else StudyConfig(seeds=tuple(range(seeds)), lrs=rates)
    if workers:
        cfg = replace(cfg, workers=workers)
    result = run_study(out, cfg, plot=plot, progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps(result, indent=1, sort_keys=True))
        return
    click.echo((out / "study.md").read_text())
    click.echo(f"wrote {out / 'study.json'}, {out / 'study.md'}" + (f", {out / 'study.png'}" if plot else "")
               + f" ({result['seconds']:.0f} s)")


__all__ = ["study_cmd"]
