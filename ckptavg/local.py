"""Local run folders → Trajectory.

Layouts recognised (children of the run folder):
- checkpoint directories: ``step1000/``, ``checkpoint-500/`` (HF Trainer; ``trainer_state.json``
  ``global_step`` when the name has no number), ``global_step2000/`` (DeepSpeed),
  ``iter_0001000/`` (Megatron, weights under ``mp_rank_00/``), or any name with one number;
- single files: ``ckpt_3000.pt``, ``model_500.safetensors``, ``checkpoint_N.pt``, ``step-N.bin`` …,
  Lightning's ``epoch=E-step=N.ckpt`` (``last.ckpt``, a copy of the newest, is not a step);
- DCP folders (``.metadata`` + ``*.distcp``), directly or one level down: torchtitan ``step-N/``,
  OLMo-core ``stepN/model_and_optim/``, accelerate ``checkpoint_N/pytorch_model_fsdp_0/``.

A run folder that also holds weights of its own beside such children (HF Trainer's ``output_dir``
after ``trainer.save_model()``) is the run of its children; its top-level weights are not a step and
are listed in ``Trajectory.ignored``.

Inside a checkpoint directory, weights are found in this order: ``model.safetensors.index.json``,
``model.safetensors``, ``pytorch_model.bin.index.json``, ``pytorch_model.bin``, then any single
safetensors/torch file that is not optimizer or trainer state.

Only headers are read here (safetensors JSON headers; for torch files the pickle, with tensor data
left on disk). Duplicate steps, mixed architectures and empty folders are reported before any
tensor data is read; so are a FIFO or device where a weight, index or config file is expected
(never opened: reading one blocks forever), an unparsable ``config.json`` (it would be copied next
to the average), and empty tensors where a model needs data — DeepSpeed ZeRO-3 writes its
``*_model_states.pt`` with 0-element placeholders, and averaging those gives a model of nothing.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .errors import CheckpointError, UsageError
from .io.files import load_json, not_regular
from .io.layout import (
    ADAPTER_WEIGHTS,
    CONFIG_FILES,
    DCP_METADATA,
    STANDARD_WEIGHTS,
    WEIGHT_EXT,
    format_of,
    is_dcp,
    is_weight_file,
    no_weights_reason,
    pick_weights,
    read_index,
    read_tensors,
)
from .trajectory import Checkpoint, Trajectory, check_compatible

_KNOWN_STEP = re.compile(
    r"^(?:global[_-]?step|step|checkpoint|ckpt|iter|iteration)[-_]?(\d+)(?=$|[-_.])", re.I
)
_DIGITS = re.compile(r"\d+")
# Lightning's ModelCheckpoint default name epoch=E-step=N.ckpt (and any other metric=value part)
_LIGHTNING_STEP = re.compile(r"(?:^|[-_])step=(\d+)(?=$|[-_.])", re.I)
# Lightning's save_last copy of the newest checkpoint (last.ckpt, last-v1.ckpt): not a step of its own
_LIGHTNING_LAST = re.compile(r"^last(?:-v\d+)?\.ckpt$", re.I)

def parse_step(name: str) -> tuple[int | None, bool]:
    """Step number from a checkpoint's file or directory name.

    Returns (step, known): ``known`` is True when the name follows a checkpoint convention
    (``step``, ``checkpoint-``, ``global_step``, ``iter_``, ``ckpt_`` …), False when the step is
    the only number in an otherwise free-form name. (None, False) when no step can be read.

    >>> parse_step("checkpoint-500"), parse_step("ckpt_3000.pt"), parse_step("epoch3")
    ((500, True), (3000, True), (3, False))
    >>> parse_step("epoch=2-step=300.ckpt"), parse_step("last-v1.ckpt")
    ((300, True), (None, False))
    """
    if _LIGHTNING_LAST.match(name):
        return None, False
    m = _LIGHTNING_STEP.search(name)
    if m:
        return int(m.group(1)), True
    stem = name
    for ext in WEIGHT_EXT:
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    m = _KNOWN_STEP.match(stem)
    if m:
        return int(m.group(1)), True
    nums = _DIGITS.findall(stem)
    if len(nums) == 1:
        return int(nums[0]), False
    return None, False


def _is_dir(p: Path) -> bool:
    """Like Path.is_dir, but a symlink loop or unreadable entry is an error, not 'no'."""
    try:
        return stat.S_ISDIR(os.stat(p).st_mode)
    except FileNotFoundError:
        if p.is_symlink():
            raise CheckpointError(f"{p}: dangling symlink") from None
        return False
    except OSError as e:  # e.g. ELOOP
        raise CheckpointError(f"{p}: cannot open: {e.strerror or e}") from None


def _listdir(p: Path) -> list[Path]:
    try:
        return sorted(p.iterdir())
    except OSError as e:
        raise CheckpointError(f"{p}: cannot list: {e.strerror or e}") from None


def _matters(name: str) -> bool:
    """A file name ckptavg would open: weights, an index, a config or trainer state."""
    return name.lower().endswith(WEIGHT_EXT) or name.endswith(".index.json") or name in CONFIG_FILES \
        or name == "trainer_state.json"


def _plain_files(d: Path) -> list[str]:
    """Names of the regular files in ``d``; a FIFO, socket or device named like a file ckptavg would
    open is an error (naming it), since opening it could block forever."""
    out = []
    for c in _listdir(d):
        try:
            mode = os.stat(c).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode):
            out.append(c.name)
        elif not stat.S_ISDIR(mode) and _matters(c.name):
            raise not_regular(c, mode)
    return out


def _dcp_folder(d: Path) -> Path | None:
    """The one DCP model folder inside ``d`` (OLMo-core ``model_and_optim/``, accelerate
    ``pytorch_model_fsdp_0/``; never ``optimizer_0/``), or None."""
    found = [c for c in _listdir(d) if not c.name.startswith((".", "optimizer")) and _is_dir(c)
             and (c / DCP_METADATA).is_file() and is_dcp([p.name for p in _listdir(c)])]
    if len(found) > 1:
        raise CheckpointError(f"{d}: {len(found)} DCP checkpoints ({', '.join(c.name for c in found[:4])}); "
                              "point at one of them")
    return found[0] if found else None


def find_weights(d: Path) -> tuple[str, list[Path], Path | None] | None:
    """(format, weight files, index file) inside checkpoint directory ``d``, or None. A DCP
    checkpoint is format ``dcp``: its ``.metadata``, then its ``.distcp`` shards."""
    names = _plain_files(d)
    if is_dcp(names):  # .metadata first (what is opened), then the shards (sizes, fingerprints, --hash)
        return "dcp", [d / DCP_METADATA, *(d / n for n in sorted(names) if n.endswith(".distcp"))], None
    from .io.zero import find_zero

    zero = find_zero(d, names)  # DeepSpeed ZeRO 1-3: model + optimizer states (the fp32 master weights)
    if zero is not None:
        return "zero", [d / n for n in zero], None
    found = pick_weights(names, lambda name: read_index(d / name), str(d))
    if found is not None:
        return found.format, [d / f for f in found.files], (d / found.index if found.index else None)
    inner = _dcp_folder(d)
    if inner is not None:
        return find_weights(inner)
    # Megatron: iter_0001000/mp_rank_00/model_optim_rng.pt
    ranks = sorted(p for p in d.glob("mp_rank_*") if _is_dir(p))
    if len(ranks) == 1:
        return find_weights(ranks[0])
    if len(ranks) > 1:
        raise CheckpointError(f"{d}: {len(ranks)} tensor-parallel ranks ({ranks[0].name} … {ranks[-1].name}), each a "
                              "slice of the model, which ckptavg does not average rank by rank: save with Megatron's "
                              "--ckpt-format torch_dist (read whole, any tensor-parallel size) or convert to one rank "
                              "with Megatron's checkpoint converter first")
    return None


def why_no_weights(d: Path) -> str:
    """What folder ``d`` holds instead of weights, in one clause (see :func:`no_weights_reason`)."""
    names = _plain_files(d)
    subdirs = [c for c in _listdir(d) if _is_dir(c)]
    dcp = [c.name for c in subdirs if any(n.endswith(".distcp") for n in os.listdir(c))]
    return no_weights_reason(names, [c.name for c in subdirs], dcp)


def _trainer_step(d: Path) -> int | None:
    ts = d / "trainer_state.json"
    if ts.is_file():
        try:
            doc = load_json(ts, "trainer_state.json")
        except CheckpointError:
            return None
        step = doc.get("global_step") if isinstance(doc, dict) else None
        return step if isinstance(step, int) else None
    return None


def _config(d: Path | None) -> dict[str, object] | None:
    """``config.json`` beside the weights, checked (it is copied next to the average), or None."""
    p = d / "config.json" if d is not None else None
    if p is None or not os.path.lexists(p):
        return None
    cfg = load_json(p, "config.json", limit=16_000_000)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{p}: not a valid config.json: not a JSON object")
    return cfg


def _checkpoint(
    path: Path, step: int, fmt: str, files: list[Path], index: Path | None, config_dir: Path, key: str | None
) -> Checkpoint:
    if key is not None and fmt == "safetensors":
        raise UsageError(f"{path}: --key applies to .bin/.pt checkpoints; this one is safetensors, whose tensors "
                         "are named at the top level")
    tensors = read_tensors(fmt, files, index, key)
    size = sum(f.stat().st_size for f in files)
    ckpt = Checkpoint(step, str(path), fmt, tuple(files), index, config_dir, tensors, size, key=key)
    _refuse_placeholders(ckpt, _config(config_dir))
    return ckpt


_PLACEHOLDER = ("this looks like a DeepSpeed ZeRO-3 placeholder (the real weights are partitioned across the optimizer "
                "state files); consolidate first with the zero_to_fp32.py script DeepSpeed saves beside the checkpoint")
_MODEL_DIMS = ("hidden_size", "d_model", "n_embd", "dim", "vocab_size")


def _where(c: Checkpoint) -> str:
    return str(c.files[0]) if len(c.files) == 1 else c.location


def _refuse_placeholders(c: Checkpoint, config: dict[str, object] | None) -> None:
    """Empty floating tensors where a model has data: every one of them empty, or a parameter
    (``*weight``/``*bias``) of a model whose config.json gives it positive dimensions."""
    empty = [t for t in (c.tensors or {}).values() if 0 in t.shape and t.dtype.floating]
    if not empty:
        return
    if len(empty) == sum(t.dtype.floating for t in (c.tensors or {}).values()):
        raise CheckpointError(f"{_where(c)}: tensor {empty[0].name!r} has 0 elements, as has every floating tensor "
                              f"of this checkpoint: {_PLACEHOLDER}")
    sized = config is not None and any(isinstance(config.get(k), int) and config.get(k) for k in _MODEL_DIMS)
    param = next((t for t in empty if t.name.endswith(("weight", "bias"))), None)
    if sized and param is not None:
        raise CheckpointError(f"{_where(c)}: tensor {param.name!r} has 0 elements but config.json describes a model "
                              f"with data there: {_PLACEHOLDER}")


def _refuse_placeholders_across(ckpts: list[Checkpoint]) -> None:
    """A tensor empty in one checkpoint that another checkpoint of the run holds data for."""
    empty = [(c, t) for c in ckpts for t in (c.tensors or {}).values() if 0 in t.shape and t.dtype.floating]
    for c, t in empty:
        for o in ckpts:
            sized = (o.tensors or {}).get(t.name)
            if sized is not None and 0 not in sized.shape:
                raise CheckpointError(f"{_where(c)}: tensor {t.name!r} has 0 elements but step {o.step} has shape "
                                      f"{list(sized.shape)}: {_PLACEHOLDER}")


def _single(path: Path, step: int | None, key: str | None = None) -> Checkpoint | None:
    """``path`` as one checkpoint (a weight file or a directory holding weights), or None."""
    if not _is_dir(path):
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode)
        if not path.name.lower().endswith(WEIGHT_EXT):
            raise CheckpointError(f"{path}: not a checkpoint file (expected {', '.join(WEIGHT_EXT)})")
        fmt = format_of(path.name)
        s = step if step is not None else parse_step(path.name)[0]
        return _checkpoint(path, s or 0, fmt, [path], None, path.parent, key)
    found = find_weights(path)
    if found is None:
        return None
    fmt, files, index = found
    s = step if step is not None else (parse_step(path.name)[0] if parse_step(path.name)[0] is not None else _trainer_step(path))
    return _checkpoint(path, s or 0, fmt, files, index, path, key)


def _has_standard_weights(d: Path) -> bool:
    return any((d / n).is_file() for n in (*STANDARD_WEIGHTS, *ADAPTER_WEIGHTS))


def _looks_like_run(d: Path) -> bool:
    """Some child is a step-numbered checkpoint directory or weight file."""
    for c in _listdir(d):
        if c.name.startswith("."):
            continue
        step, _ = parse_step(c.name)
        if step is not None and (c.name.lower().endswith(WEIGHT_EXT) or _is_dir(c)):
            return True
        if _is_dir(c) and (c / "trainer_state.json").is_file():
            return True
    return False


def _has_step_children(d: Path) -> bool:
    """Some child directory is named like a checkpoint (``checkpoint-500/``, ``step1000/`` …, or holds
    ``trainer_state.json``) and holds weights: ``d`` is a run even with weights of its own."""
    for c in _listdir(d):
        if c.name.startswith(".") or not _is_dir(c):
            continue
        if parse_step(c.name)[1] or (c / "trainer_state.json").is_file():
            try:
                if find_weights(c) is not None:
                    return True
            except CheckpointError:
                return True  # a broken checkpoint: read as a run, so that the error names it
    return False


def _dcp_skipped(ckpts: list[Checkpoint]) -> tuple[str, ...]:
    """What the newest DCP checkpoint holds besides the model (optimizer, train state …), for ``list``."""
    newest = next((c for c in reversed(ckpts) if c.format == "dcp"), None)
    if newest is None:
        return ()
    from .io.dcp import DcpFile

    skipped = DcpFile(newest.files[0], newest.key).skipped
    if not skipped:
        return ()
    what = ", ".join(f"{k} ({n} {'entry' if n == 1 else 'entries'})" for k, n in sorted(skipped.items()))
    return (f"{newest.files[0].parent}: DCP entries that are not the model, not averaged: {what}",)


def _zero_source(ckpts: list[Checkpoint]) -> tuple[str, ...]:
    """Which weights of the newest DeepSpeed checkpoint are averaged, for ``list``."""
    newest = max(ckpts, key=lambda c: c.step) if ckpts else None
    if newest is None or not newest.files:
        return ()
    from .io.zero import MODEL_STATES, describe

    if newest.format == "zero":
        return (f"{newest.location}: {describe(newest.files[0])}",)
    if newest.format == "torch" and MODEL_STATES.match(newest.files[0].name):
        return (f"{newest.location}: DeepSpeed model states without optimizer states: averaging the module weights "
                "as saved (a bf16/fp16 model copy when trained in mixed precision), not the fp32 master weights",)
    return ()


_FINAL = "the final weights (trainer.save_model()) beside the step checkpoints, not a step"
_LAST = "Lightning's copy of the newest checkpoint (save_last), not a step"


def _accelerate_steps(ckpts: list[Checkpoint], steps_per_save: int | None) -> list[Checkpoint]:
    """accelerate ``save_state`` children (``checkpoint_N/``: N counts saves) with their real training
    step where the folder records one (see :mod:`ckptavg.io.accelerate`), else marked as save indices;
    ``steps_per_save`` makes save N step (N + 1) × steps_per_save."""
    from dataclasses import replace

    from .io.accelerate import SAVE_INDEX, is_save_state, save_index, saved_step

    saves = {id(c): save_index(Path(c.location).name) for c in ckpts}
    names = {id(c): _plain_files(Path(c.location)) for c in ckpts if saves[id(c)] is not None}
    if not ckpts or any(saves[id(c)] is None or not is_save_state(names[id(c)]) for c in ckpts):
        if steps_per_save is not None:
            raise UsageError("--steps-per-save applies to accelerate save_state runs (checkpoint_0/, checkpoint_1/ … "
                             "beside optimizer.bin), whose names count saves")
        return ckpts
    if steps_per_save is not None:
        if steps_per_save < 1:
            raise UsageError(f"--steps-per-save must be at least 1, got {steps_per_save}")
        return [replace(c, step=(saves[id(c)] + 1) * steps_per_save,  # type: ignore[operator]
                        step_from=f"--steps-per-save {steps_per_save}") for c in ckpts]
    found = [saved_step(Path(c.location), names[id(c)]) for c in ckpts]
    if all(f is not None for f in found) and len({f[0] for f in found if f is not None}) == len(found):
        return [replace(c, step=f[0], step_from=f[1]) for c, f in zip(ckpts, found) if f is not None]
    return [replace(c, step_from=SAVE_INDEX) for c in ckpts]


def discover(path: str | os.PathLike[str], *, check: bool = True, key: str | None = None,
             steps_per_save: int | None = None) -> Trajectory:
    """Find the checkpoints of a local run (:func:`ckptavg.discover` also takes ``hf://``).

    Args:
        path: a run folder (children ``step1000/``, ``checkpoint-500/``, ``ckpt_3000.pt`` …), a
            single checkpoint directory, or a single weight file.
        check: verify that every checkpoint has the same tensor names, shapes and dtypes.
        key: ``.bin``/``.pt`` only: where the state dict sits in each file, dotted for nesting
            (``"model.ema"``); default: a plain state dict, or one under a known key (``model``,
            ``state_dict``, ``module`` …).
        steps_per_save: accelerate ``save_state`` runs only: training steps between saves, so that
            ``checkpoint_N`` is step (N + 1) × it (default: the step recorded in the folder, else N,
            marked as a save index).

    Returns:
        A Trajectory sorted by step.

    Raises:
        CheckpointError: empty or unreadable folder, corrupt headers, a FIFO or device where a file
            is expected, a file whose tensors do not look like a model (the message lists its keys:
            pass ``key``), DeepSpeed ZeRO-3 placeholders — naming the file.
        IncompatibleError: mixed architectures, naming the step and tensor.
        SelectionError: two checkpoints with the same step.

    Example:
        >>> traj = discover("runs/pythia-tiny")            # doctest: +SKIP
        >>> traj.window(5, at=5000).steps                  # doctest: +SKIP
        [1000, 2000, 3000, 4000, 5000]
    """
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such file or directory")
    name = root.resolve().name or str(root)
    standard = _is_dir(root) and _has_standard_weights(root)
    if not _is_dir(root) or (standard and not _has_step_children(root)) \
            or (not standard and not _looks_like_run(root) and find_weights(root)):
        ckpt = _single(root, None, key)
        assert ckpt is not None
        return Trajectory(name, (ckpt,), str(root), _dcp_skipped([ckpt]) + _zero_source([ckpt]))
    ignored: tuple[str, ...] = ()
    if standard:  # HF Trainer's output_dir after save_model(): checkpoint-N/ children and the final model on top
        top = find_weights(root)
        ignored = tuple(f"{f}: {_FINAL}" for f in top[1]) if top is not None else ()
    ckpts: list[Checkpoint] = []
    for child in _listdir(root):
        if child.name.startswith("."):
            continue  # hidden entries, including our own temporary outputs
        step, known = parse_step(child.name)
        if _LIGHTNING_LAST.match(child.name) and not _is_dir(child):
            ignored += (f"{child}: {_LAST}",)
            continue
        if _is_dir(child):
            if step is None:
                step = _trainer_step(child)
            if step is None:
                continue
            ckpt = _single(child, step, key)
            if ckpt is None:
                if known:
                    raise CheckpointError(f"{child}: looks like a checkpoint (step {step}) but holds no weight "
                                          f"files: {why_no_weights(child)}")
                continue
            ckpts.append(ckpt)
        elif step is not None and is_weight_file(child.name):
            ckpt = _single(child, step, key)
            assert ckpt is not None
            ckpts.append(ckpt)
    if not ckpts:
        found = why_no_weights(root)
        raise CheckpointError(
            f"{root}: no checkpoints found (expected children like step1000/, checkpoint-500/, "
            "ckpt_3000.pt, or weight files in the folder itself)" + ("" if found.startswith("found ") or
                                                                       found == "it is empty" else f"; it holds {found}")
        )
    ckpts = _accelerate_steps(ckpts, steps_per_save)
    _refuse_placeholders_across(ckpts)
    traj = Trajectory(name, tuple(ckpts), str(root), ignored + _dcp_skipped(sorted(ckpts, key=lambda c: c.step))
                      + _zero_source(ckpts))
    if check:
        check_compatible(traj)
    return traj


__all__ = ["discover", "find_weights", "parse_step"]
