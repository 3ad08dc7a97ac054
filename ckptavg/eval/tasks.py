"""Which tasks to score and what scoring needs installed: ckptavg's packaged tasks, task names
resolved through lm-eval's TaskManager, the optional-dependency checks, and the HF offline switch.

lm_eval and transformers are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import HubError, MissingDependencyError, UsageError

EXTRA_HINT = "pip install 'ckptavg[eval]'"
TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"  # packaged tasks: TASKS_DIR/<name>/<name>.yaml
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# Where each library keeps the switch it read from the environment at import time.
_OFFLINE_SWITCHES = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                     ("datasets.config", "HF_DATASETS_OFFLINE"))


# Optional dependencies -----------------------------------------------------------------------
def require_transformers() -> None:
    """Fail early, in one line, when the ``eval`` extra's transformers is not installed.

    Raises:
        MissingDependencyError: transformers (or a module it needs) cannot be imported; the
            message names the extra to install.
    """
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"ckptavg eval needs transformers (missing module {e.name!r}): {EXTRA_HINT}"
        ) from None


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, checked to be usable for scoring a model object.

    Returns:
        The imported ``lm_eval`` module.

    Raises:
        MissingDependencyError: lm-evaluation-harness, or accelerate (which its HFLM wrapper
            needs), is not installed; the message names the extra to install.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (fails without accelerate, part of the extra)
    except ImportError as e:
        raise MissingDependencyError(
            f"scoring tasks needs lm-evaluation-harness (missing module {e.name!r}): {EXTRA_HINT}"
        ) from None
    _quiet_git_hash()
    return lm_eval


def _quiet_git_hash() -> None:
    """lm-eval records ``git describe --always`` of the working directory in its results, letting
    git print "fatal: not a git repository" on the terminal outside a checkout. Same value, with
    git's stderr dropped (lm-eval 0.4.3 → 0.4.x call the function by this name from evaluator.py)."""
    import importlib
    import subprocess

    try:
        evaluator = importlib.import_module("lm_eval.evaluator")  # where simple_evaluate looks the name up
    except ImportError:
        return
    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None or getattr(original, "ckptavg", False):
        return

    def get_git_commit_hash() -> Any:
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, OSError):
            from_path = getattr(sys.modules.get("lm_eval.loggers.utils"), "get_commit_from_path", None)
            return from_path(os.getcwd()) if from_path is not None else None

    get_git_commit_hash.ckptavg = True  # type: ignore[attr-defined]
    setattr(evaluator, "get_git_commit_hash", get_git_commit_hash)  # noqa: B010


@contextmanager
def offline_env(enabled: bool) -> Iterator[None]:
    """Set the HF offline variables for the duration of a call, then restore them.

    Args:
        enabled: when False, change nothing (so callers need no second code path).

    Returns:
        A context manager; inside it ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` and
        ``TRANSFORMERS_OFFLINE`` are ``"1"``.

    Raises:
        Nothing of its own; whatever the body raises passes through after the restore.
    """
    if not enabled:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in OFFLINE_VARS}
    # huggingface_hub and datasets read the variables once, when first imported: modules already
    # imported (by a notebook, or an earlier call) only see the switch if their copy is flipped too.
    saved_flags = [(mod, attr, getattr(mod, attr)) for name, attr in _OFFLINE_SWITCHES
                   if (mod := sys.modules.get(name)) is not None and hasattr(mod, attr)]
    os.environ.update({k: "1" for k in OFFLINE_VARS})
    for mod, attr, _ in saved_flags:
        setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in saved_flags:
            setattr(mod, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Packaged tasks ------------------------------------------------------------------------------
def packaged_tasks() -> list[str]:
    """Names of the tasks shipped with ckptavg (they need no download).

    Returns:
        Sorted task names: the folders of :data:`TASKS_DIR` holding ``<name>/<name>.yaml``.

    Raises:
        Nothing: a missing tasks folder gives an empty list.
    """
    if not TASKS_DIR.is_dir():
        return []
    return sorted(p.name for p in TASKS_DIR.iterdir() if (p / f"{p.name}.yaml").is_file())


def packaged_task(name: str) -> dict[str, Any]:
    """A packaged task's lm-eval config, ready for ``simple_evaluate(tasks=[cfg])``.

    Args:
        name: one of :func:`packaged_tasks`.

    Returns:
        The task's YAML as a dict, with ``dataset_kwargs.data_files`` made absolute (the YAML
        names them relative to itself, which lm-eval would resolve against the working directory).

    Raises:
        UsageError: ``name`` is not a packaged task.
    """
    import yaml

    folder = TASKS_DIR / name
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise UsageError(f"{name!r} is not a packaged task; ckptavg ships {', '.join(packaged_tasks()) or 'none'}")
    cfg = yaml.safe_load(path.read_text())
    files = cfg.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, Mapping):
        cfg["dataset_kwargs"]["data_files"] = {k: str(folder / v) for k, v in files.items()}
    elif isinstance(files, str):
        cfg["dataset_kwargs"]["data_files"] = str(folder / files)
    return cfg


# Task names → lm-eval specs ------------------------------------------------------------------
def parse_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """Task names from a list or a comma-separated string (the ``--tasks`` flag).

    Args:
        tasks: ``None``, ``"a,b"`` or ``["a", "b"]``; blanks around names are dropped.

    Returns:
        The names in order, empty when none were given.

    Raises:
        Nothing.
    """
    if tasks is None:
        return []
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    return [t.strip() for t in tasks if t.strip()]


def _is_yaml_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def resolve_tasks(tasks: Sequence[str], include_path: Sequence[str]) -> tuple[list[Any], Any]:
    """lm-eval task specs for ``tasks`` and a TaskManager that knows them.

    Called before any averaging so that a typo costs nothing. lm-eval's built-in tasks are only
    indexed when a name is not packaged or local, since scanning them takes seconds.

    Args:
        tasks: names: lm-eval built-ins, ckptavg's packaged tasks, names defined under
            ``include_path``, or paths of task YAML files.
        include_path: folders of task YAMLs; their definitions win over packaged ones of the same name.

    Returns:
        ``(specs, task_manager)``: a packaged task becomes its config dict (absolute data files),
        any other name stays a name for ``task_manager`` to resolve.

    Raises:
        UsageError: an ``include_path`` that is not a folder, or an unknown task (with close
            matches when there are some).
        MissingDependencyError: lm-eval is not installed.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    for p in include_path:
        if not Path(p).is_dir():
            raise UsageError(f"{p}: --include-path must be a folder of task YAMLs")
    shipped = packaged_tasks()
    paths = list(include_path) or None
    tm = TaskManager(include_path=paths, include_defaults=False)

    def unknown() -> list[str]:
        return [t for t in tasks if t not in shipped and t not in tm.all_tasks and not _is_yaml_path(t)]

    if unknown():
        tm = TaskManager(include_path=paths)
    if missing := unknown():
        close = difflib.get_close_matches(missing[0], shipped + tm.all_tasks, n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise UsageError(
            f"unknown task {missing[0]!r}; {hint}(lm-eval's built-in names, ckptavg's packaged "
            f"{', '.join(shipped)}, or a task under --include-path)"
        )
    local = set(tm.all_tasks) if include_path else set()
    return [packaged_task(t) if t in shipped and t not in local else t for t in tasks], tm


def download_hint(error: ConnectionError) -> HubError:
    """The error to raise when lm-eval could not download a task's data.

    Args:
        error: what ``datasets``/``huggingface_hub`` raised.

    Returns:
        A :class:`~ckptavg.errors.HubError` saying how to score without a network.

    Raises:
        Nothing (the caller raises the result).
    """
    return HubError(
        f"{error}; built-in tasks download their data once (later runs, --offline too, read the "
        "cache); with no network use ckptavg_basics or a local task YAML with --include-path"
    )


__all__ = ["EXTRA_HINT", "OFFLINE_VARS", "TASKS_DIR", "download_hint", "offline_env", "packaged_task",
           "packaged_tasks", "parse_tasks", "require_lm_eval", "require_transformers", "resolve_tasks"]
