"""Option groups shared by the commands (defined once, so flags cannot drift apart), and the
wrapper that turns expected errors into one line and an exit code."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import CkptavgError, UsageError

F = TypeVar("F", bound=Callable[..., Any])
STEP_PATTERN_HELP = r"hf:// only: regex whose group is the step in a branch name [default: ^step(\d+)$]."


def _group(*options: Callable[[F], F]) -> Callable[[F], F]:
    def apply(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


def int_list(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


# Which checkpoints: the words of ckptavg.Selection, the same for every command.
selection_options = _group(
    click.option("--window", "-k", type=int, help="The latest k checkpoints (LAWA's window)."),
    click.option("--at", type=int, help="Up to this step (the window that ends there)."),
    click.option("--from", "start", type=int, help="First step to consider (inclusive)."),
    click.option("--to", "stop", type=int, help="Last step to consider (inclusive)."),
    click.option("--every", type=int, help="Every n-th checkpoint, counted back from the newest."),
    click.option("--spacing", type=int, help="Steps a multiple of this many training steps from --from (or 0)."),
    click.option("--steps", help="Exactly these steps, comma-separated."),
)

# How to weigh them: the parameters of ckptavg.methods.
method_options = _group(
    click.option("--method", "-m", default="uniform", show_default=True,
                 help="uniform, weighted, ema, wsm, wma or power-ema."),
    click.option("--weights", help="weighted: one weight per selected checkpoint, comma-separated."),
    click.option("--decay", type=float, help="ema: decay per checkpoint, e.g. 0.9."),
    click.option("--half-life", type=float, help="ema: half-life in training steps (handles irregular spacing)."),
    click.option("--half-life-tokens", type=float,
                 help="ema: half-life in training tokens, e.g. 4e9 (tokens per step from the run, or --tokens-per-step)."),
    click.option("--tokens-per-step", type=float, help="Training tokens per step, where the run does not record it."),
    click.option("--schedule", help="wsm: the decay to emulate: linear, cosine, 1-sqrt or inv-sqrt."),
    click.option("--sigma-rel", type=float, help="power-ema: EDM2's relative EMA length, e.g. 0.05 (at most 0.3)."),
)

# Where the trajectory comes from: flags for hf:// runs (errors recommend them by name).
KEY_HELP = ("Where the state dict sits in each .bin/.pt, dotted for nesting (e.g. model.ema) "
            "[default: the top level or model, state_dict, module, …].")
trajectory_options = _group(
    click.option("--step-pattern", help=STEP_PATTERN_HELP),
    click.option("--key", help=KEY_HELP),
    click.option("--allow-duplicates", is_flag=True,
                 help="hf:// only: use revisions whose weights are byte-identical to another step's."),
)

# accelerate save_state runs: checkpoint_N counts saves (ckptavg.io.accelerate).
steps_per_save_option = click.option(
    "--steps-per-save", type=click.IntRange(min=1),
    help="accelerate save_state runs whose folders record no step: training steps between saves "
         "(checkpoint_N is step (N+1)×this).")

# How an output folder is written (merge, series).
write_options = _group(
    click.option("--no-fsync", "fsync", flag_value=False, default=True,
                 help="Skip flushing outputs to disk before they appear (faster; a power loss may leave empty files)."),
)

# What merge writes: the HF-style folder, or the input's own shape (ckptavg.io.formats).
FORMAT_HELP = ("Output: hf (safetensors folder), same (the input's own format), nanogpt (OUT/ckpt.pt), lightning "
               "(OUT/model.ckpt) or dcp (a model-only DCP folder); optimizer state is dropped.")
format_option = click.option("--format", "output_format", default="hf", show_default=True,
                             type=click.Choice(["hf", "same", "nanogpt", "lightning", "dcp"]), help=FORMAT_HELP)

# PEFT adapter runs (ckptavg.peft): average the adapter tensors, or the exact mean of their updates.
peft_options = _group(
    click.option("--peft", type=click.Choice(["adapter", "merged-delta"]), default="adapter", show_default=True,
                 help="Adapter runs: adapter averages LoRA A and B separately (a PEFT adapter); merged-delta writes "
                      "base + the mean of s·B·A (exact; a full model)."),
    click.option("--base", type=click.Path(exists=True, file_okay=False, path_type=Path),
                 help="--peft merged-delta: the base model's folder [default: the adapter's base_model_name_or_path]."),
)

# Spike-aware averaging (merge, series): leave out what ckptavg inspect flags (ckptavg.stability).
anomaly_options = _group(
    click.option("--exclude-anomalies", is_flag=True,
                 help="Leave out checkpoints where ckptavg inspect finds NaN/Inf or a whole-model update spike "
                      "(judged against the 8 checkpoints before each); ckptavg.json records which and why."),
    click.option("--anomalies", type=click.Path(dir_okay=False, path_type=Path),
                 help="Like --exclude-anomalies, from this saved `ckptavg inspect --json` report (its own rule)."),
)

# What the command shows.
output_options = _group(
    click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    click.option("--json", "as_json", is_flag=True, help="Machine-readable result on stdout."),
)


def selection_from(kw: dict[str, Any]) -> Any:
    """Pop the selection flags from a command's keyword arguments → ckptavg.Selection."""
    from ..selection import Selection

    return Selection(kw.pop("window"), kw.pop("at"), kw.pop("start"), kw.pop("stop"), kw.pop("every"),
                     kw.pop("spacing"), int_list(kw.pop("steps")))


def method_from(kw: dict[str, Any]) -> dict[str, Any]:
    """Pop the method flags → keyword arguments of ckptavg.average and friends."""
    return {"method": kw.pop("method"), "weights": float_list(kw.pop("weights")), "decay": kw.pop("decay"),
            "half_life": kw.pop("half_life"), "half_life_tokens": kw.pop("half_life_tokens"),
            "tokens_per_step": kw.pop("tokens_per_step"), "schedule": kw.pop("schedule"),
            "sigma_rel": kw.pop("sigma_rel")}


def _one_line_warnings(show: Callable[..., None]) -> Callable[..., None]:
    """``warnings.showwarning`` printing ckptavg's own warnings as one line, others as ``show`` does."""

    def one_line(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        from ..hub.transport import HubWarning

        if issubclass(category, HubWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            show(message, category, *args, **kwargs)

    return one_line


class _UsageException(click.ClickException):
    exit_code = 2


def friendly_errors(fn: F) -> F:
    """Expected bad input → one line on stderr, exit 2 for bad flags and 1 otherwise, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warnings(warnings.showwarning)
                return fn(*args, **kwargs)
        except UsageError as e:
            raise _UsageException(str(e)) from None
        except CkptavgError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written was left in place (finished outputs are kept)", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def deprecated_alias(new: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """Callback of a hidden old flag: warn once on stderr, pass the value on."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value not in (None, (), False):
            click.echo(f"warning: {param.opts[-1]} is deprecated; use {new}", err=True)
        return value

    return callback


__all__ = ["FORMAT_HELP", "KEY_HELP", "deprecated_alias", "float_list", "format_option", "friendly_errors", "int_list", "method_from", "method_options",
           "output_options", "peft_options", "selection_from", "steps_per_save_option", "write_options", "selection_options", "trajectory_options"]
