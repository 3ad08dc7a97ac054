"""A sweep's recipe: frozen dataclasses (one per YAML section) and the YAML loader that fills them.

Every default lives in the dataclasses. Checks that need no file run in ``__post_init__``, so a
:class:`Recipe` built in Python is validated exactly like one read from YAML. The target steps are
a :class:`~ckptavg.selection.Selection`, the vocabulary every command shares: in YAML either a list
of steps or a mapping of its keys other than ``window`` (each variant says its own window).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import SelectionError, UsageError
from ..schedules import SCHEDULES
from ..selection import Selection

# The Selection keys a recipe's ``steps:`` mapping takes: ``window`` is per variant, not per sweep.
STEPS_KEYS = ("start", "stop", "spacing", "every", "at", "steps")


@dataclass(frozen=True)
class Variants:
    """What to score at each target: the raw checkpoint, LAWA windows (uniform average of the
    latest k checkpoints), EMAs with these half-lives in training steps over the latest
    ``ema_window`` checkpoints (``None``: every checkpoint up to the target), WSM windows (the
    merge that emulates a ``wsm_schedule`` decay) and WMA windows (weights ∝ 1 … k).
    ``exclude_anomalies``: every average leaves out the checkpoints ``ckptavg inspect`` flags (NaN/Inf,
    a whole-model update spike; :mod:`ckptavg.stability`), and its name says so (``uniform5-xa``).

    Raises:
        UsageError: a window or half-life out of range, or no variant at all.
    """

    raw: bool = True
    uniform: tuple[int, ...] = ()
    ema_half_life: tuple[float, ...] = ()
    ema_window: int | None = None
    wsm: tuple[int, ...] = ()
    wsm_schedule: str = "1-sqrt"
    wma: tuple[int, ...] = ()
    exclude_anomalies: bool = False

    def __post_init__(self) -> None:
        for name in ("uniform", "wsm", "wma"):
            if any(k < 1 for k in getattr(self, name)):
                raise UsageError(f"variants.{name}: windows must be at least 1, got {list(getattr(self, name))}")
        if self.wsm_schedule not in SCHEDULES:
            close = difflib.get_close_matches(self.wsm_schedule, SCHEDULES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"variants.wsm_schedule: unknown {self.wsm_schedule!r}; {hint}"
                             f"(known: {', '.join(SCHEDULES)})")
        if any(not h > 0 for h in self.ema_half_life):
            raise UsageError(f"variants.ema_half_life: half-lives must be positive, got {list(self.ema_half_life)}")
        if self.ema_window is not None and self.ema_window < 1:
            raise UsageError(f"variants.ema_window must be at least 1, got {self.ema_window}")
        if not (self.raw or self.uniform or self.ema_half_life or self.wsm or self.wma):
            raise UsageError("no variants to score: set raw: true, uniform: [k, …], ema_half_life: [h, …], "
                             "wsm: [k, …] or wma: [k, …]")

    def expand(self) -> list[Variant]:
        """The variants in table order: raw, uniform by k, EMA by half-life, WSM by k, WMA by k.

        Returns:
            One :class:`Variant` each; its ``name`` is the table's ``variant`` column.
        """
        out = [Variant("raw")] if self.raw else []
        out += [Variant(f"uniform{k}", "uniform", k) for k in sorted(set(self.uniform))]
        w = self.ema_window
        out += [Variant(f"ema-h{h:g}" + (f"-w{w}" if w else ""), "ema", w, h) for h in sorted(set(self.ema_half_life))]
        out += [Variant(f"wsm-{self.wsm_schedule}{k}", "wsm", k, schedule=self.wsm_schedule) for k in sorted(set(self.wsm))]
        out += [Variant(f"wma{k}", "wma", k) for k in sorted(set(self.wma))]
        if self.exclude_anomalies:  # another name: a table never mixes averages with and without exclusion
            out = [v if v.name == "raw" else dataclasses.replace(v, name=f"{v.name}-xa", exclude_anomalies=True)
                   for v in out]
        return out


@dataclass(frozen=True)
class EvalSpec:
    """How every job is scored; the arguments of :func:`ckptavg.eval.score` of the same names.

    Raises:
        UsageError: nothing to score, a limit or batch size out of range.
    """

    tasks: tuple[str, ...] = ()
    include_path: tuple[str, ...] = ()
    text: str | None = None
    seq_len: int | None = None
    limit: float | None = None
    batch_size: int | str = 1
    device: str = "cpu"
    dtype: str = "auto"
    offline: bool = False

    def __post_init__(self) -> None:
        if not self.tasks and self.text is None:
            raise UsageError("nothing to score: set eval.tasks (e.g. [ckptavg_basics]) and/or eval.text")
        if self.limit is not None and not self.limit > 0:
            raise UsageError(f"eval.limit must be positive, got {self.limit}")
        if isinstance(self.batch_size, str) and self.batch_size != "auto" and not self.batch_size.isdigit():
            raise UsageError(f"eval.batch_size must be an integer or 'auto', got {self.batch_size!r}")
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise UsageError(f"eval.batch_size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class RayOptions:
    """Resources of each job as a Ray task. ``num_gpus`` defaults to 1 when ``eval.device`` is
    CUDA, else 0; ``memory_gb`` (RAM reserved per job) is unset by default.

    Raises:
        UsageError: a negative amount.
    """

    num_cpus: float = 1
    num_gpus: float | None = None
    memory_gb: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_cpus", "num_gpus", "memory_gb"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise UsageError(f"ray.{name} must not be negative, got {v}")


@dataclass(frozen=True)
class Recipe:
    """A sweep: trajectory × target steps × variants, scored with one eval spec, into ``output``.

    ``steps`` picks the target checkpoints (:meth:`Selection.targets`; default: every checkpoint).
    Relative paths (a local trajectory, ``output``, ``eval.text``, ``eval.include_path``) are
    relative to the working directory, like every path on the command line.

    Raises:
        UsageError: an empty trajectory or output; a ``steps`` selection with a ``window``.

    Example:
        >>> Recipe("runs/tiny", "sweeps/tiny", EvalSpec(tasks=("ckptavg_basics",), limit=50),
        ...        variants=Variants(uniform=(5,))).variants.expand()[1].name
        'uniform5'
    """

    trajectory: str
    output: str
    eval: EvalSpec
    steps: Selection = field(default_factory=Selection)
    variants: Variants = field(default_factory=Variants)
    ray: RayOptions = field(default_factory=RayOptions)
    step_pattern: str | None = None
    evict: bool = False

    def __post_init__(self) -> None:
        if not str(self.trajectory).strip():
            raise UsageError("trajectory must name a run folder or an hf://org/name repo")
        if not str(self.output).strip():
            raise UsageError("output must name a folder for the results table")
        if self.steps.window is not None:
            # A window here would silently mean nothing: each variant averages its own window.
            raise UsageError("steps.window is not a target filter; give LAWA windows as variants.uniform")


@dataclass(frozen=True)
class Variant:
    """One thing scored at each target: ``method`` over the latest ``window`` checkpoints up to
    the target (``None``: all of them). ``raw`` is the window of one."""

    name: str
    method: str = "uniform"
    window: int | None = 1
    half_life: float | None = None
    schedule: str | None = None  # wsm's decay shape
    exclude_anomalies: bool = False  # inputs without the steps ckptavg inspect flags (the sweep drops them)


# YAML → dataclasses ----------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (" or null" if type(None) in args else "")
    if origin is tuple:
        return f"a list of {_type_name(args[0]).split(' ', 1)[-1]}s"
    if tp is Selection:
        return f"a mapping ({', '.join(STEPS_KEYS)}) or a list of steps"
    if dataclasses.is_dataclass(tp):
        return "a mapping of keys to values"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _steps_words(message: str, where: str) -> str:
    """Selection names its fields as CLI flags (``--from``, ``--spacing``); a recipe's reader
    wrote ``steps.start``, ``steps.spacing``: say it in their words."""
    flags = {"from": "start", "to": "stop"}
    return re.sub(r"--(\w+)", lambda m: f"{where}.{flags.get(m.group(1), m.group(1))}", message)


def _selection(value: Any, where: str) -> Selection:
    """``steps:`` as a Selection: a list of steps, or a mapping of :data:`STEPS_KEYS`."""
    if isinstance(value, list):
        steps = _coerce(tuple[int, ...], value, where)
        if not steps:
            raise SelectionError(f"{where}: the list of target steps is empty")
        kwargs: dict[str, Any] = {"steps": steps}
    else:
        kwargs = _kwargs(Selection, value, where, STEPS_KEYS)
    try:
        return Selection(**kwargs)
    except SelectionError as e:
        raise SelectionError(_steps_words(str(e), where)) from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed YAML) as type ``tp``; UsageError naming ``where`` when it is not one."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            with contextlib.suppress(UsageError):
                return _coerce(a, value, where)
    elif origin is tuple:
        item = typing.get_args(tp)[0]
        if isinstance(value, str) and item is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, list):
            return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    elif tp is Selection:
        if isinstance(value, (list, Mapping)):
            return _selection(value, where)
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, Mapping):
            return _build(tp, value, where)  # type: ignore[arg-type]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise UsageError(f"{where} must be {_type_name(tp)}, got {value!r}")


def _kwargs(cls: type, data: Any, where: str, known: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``data``'s keys coerced to ``cls``'s field types; unknown keys refused with "did you mean"."""
    label = where or "the recipe"
    if not isinstance(data, Mapping):
        raise UsageError(f"{label} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = list(known) if known is not None else [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"unknown key {path!r}; {hint}(known in {label}: {', '.join(names)})")
        kwargs[key] = _coerce(hints[key], value, path)
    return kwargs


def _build(cls: type, data: Any, where: str = "") -> Any:
    kwargs = _kwargs(cls, data, where)
    required = [f.name for f in fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in kwargs:
            raise UsageError(f"missing key {(f'{where}.' if where else '') + name!r}")
    return cls(**kwargs)


def load_recipe(source: str | os.PathLike[str] | Mapping[str, Any]) -> Recipe:
    """Read a sweep recipe.

    Args:
        source: a YAML file, or the same content as a mapping.

    Returns:
        The frozen :class:`Recipe` (defaults filled in from the dataclasses).

    Raises:
        UsageError: an unreadable file or YAML, an unknown key (with "did you mean …?"), a value of
            the wrong type, a missing ``trajectory``/``output``, values out of range (target steps:
            :class:`~ckptavg.errors.SelectionError`) — one line naming the file and the key.

    Example:
        >>> load_recipe({"trajectory": "runs/tiny", "output": "sweeps/tiny", "eval": {"tasks": ["piqa"]},
        ...              "variants": {"uniform": [5]}, "steps": {"start": 1000, "spacing": 1000}}).steps
        Selection(start=1000, spacing=1000)
    """
    if isinstance(source, Mapping):
        data, name = source, "recipe"
    else:
        import yaml

        path = Path(source)
        name = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise UsageError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f":{mark.line + 1}" if mark is not None else ""
            raise UsageError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    try:
        return _build(Recipe, data if data is not None else {})
    except UsageError as e:
        raise type(e)(f"{name}: {e}") from None


__all__ = ["STEPS_KEYS", "EvalSpec", "RayOptions", "Recipe", "Variant", "Variants", "load_recipe"]
