"""Where a trajectory comes from: a local run folder or ``hf://`` step branches — the one place
that tells them apart. Everything above it (averaging, series, eval, sweeps) calls these three."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace

from .errors import UsageError
from .trajectory import HUB_PREFIX, Checkpoint, Trajectory


def is_hub(path: object) -> bool:
    """True for an ``hf://`` string."""
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def canonical(path: str | os.PathLike[str]) -> str:
    """A trajectory's stable name: ``hf://…`` as given, a local path made absolute (symlinks resolved)."""
    text = os.fspath(path)
    return text if is_hub(text) else os.path.realpath(text)


def discover(
    path: str | os.PathLike[str], *, check: bool = True, step_pattern: str | None = None, key: str | None = None,
    steps_per_save: int | None = None,
) -> Trajectory:
    """Find the checkpoints of a run, reading headers or Hub metadata only.

    Args:
        path: a run folder (children ``step1000/``, ``checkpoint-500/``, ``ckpt_3000.pt`` …), a
            single checkpoint directory or weight file; or ``hf://org/name`` (the step branches of a
            Hub model repo), ``hf://org/name@step1000`` (one branch).
        check: verify that every local checkpoint has the same tensor names, shapes and dtypes.
        step_pattern: ``hf://`` only: regex whose group is the step in a branch name
            (default ``^step(\\d+)$``; OLMo: ``^step(\\d+)-tokens\\d+B?$``).
        key: ``.bin``/``.pt`` checkpoints only: where the state dict sits in each file, dotted for
            nesting (``"model.ema"``); default: a plain state dict or one under ``model``,
            ``state_dict``, ``module`` … (a file whose tensors do not look like a model is refused,
            listing its keys).
        steps_per_save: accelerate ``save_state`` runs: training steps per save (their
            ``checkpoint_N`` names count saves); see :func:`ckptavg.local.discover`.

    Returns:
        A Trajectory sorted by step.

    Raises:
        CheckpointError: empty or unreadable folder, corrupt headers, naming the file.
        IncompatibleError: mixed architectures. HubError: the Hub or the cache cannot answer.
        UsageError: ``step_pattern`` for a local folder, a bad URI or pattern.

    Example:
        >>> traj = discover("runs/pythia-tiny")            # doctest: +SKIP
        >>> traj.window(5, at=5000).steps                  # doctest: +SKIP
        [1000, 2000, 3000, 4000, 5000]
    """
    if is_hub(path):
        from . import hub

        if steps_per_save is not None:
            raise UsageError(f"{path}: --steps-per-save applies to local accelerate save_state runs only")
        traj = hub.discover(str(path), step_pattern=step_pattern or hub.DEFAULT_STEP_PATTERN)
        if key is None:
            return traj
        st = next((c for c in traj if c.format == "safetensors"), None)
        if st is not None:
            raise UsageError(f"{st}: --key applies to .bin/.pt checkpoints; this one is safetensors")
        return replace(traj, checkpoints=tuple(replace(c, key=key) for c in traj))
    if step_pattern is not None:
        raise UsageError(f"{path}: --step-pattern applies to hf:// trajectories only")
    from . import local

    return local.discover(path, check=check, key=key, steps_per_save=steps_per_save)


def materialise(
    checkpoints: Iterable[Checkpoint], *, allow_duplicates: bool = False, progress: bool = True
) -> list[Checkpoint]:
    """The checkpoints with local files: Hub revisions downloaded (verified) into the HF cache, local
    ones unchanged. See :func:`ckptavg.hub.materialise`."""
    ckpts = list(checkpoints)
    if not any(c.source is not None and not c.files for c in ckpts):
        return ckpts
    from . import hub

    return hub.materialise(ckpts, allow_duplicates=allow_duplicates, progress=progress)


def evict(checkpoints: Iterable[Checkpoint]) -> int:
    """Delete consumed Hub revisions' weight files from the HF cache; bytes freed (0 for local runs)."""
    ckpts = [c for c in checkpoints if c.source is not None]
    if not ckpts:
        return 0
    from . import hub

    return hub.evict(ckpts)


__all__ = ["discover", "evict", "is_hub", "materialise"]
