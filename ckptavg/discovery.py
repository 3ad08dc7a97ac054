"""Local run folders → Trajectory.

Layouts recognised (children of the run folder):
- checkpoint directories: ``step1000/``, ``checkpoint-500/`` (HF Trainer; ``trainer_state.json``
  ``global_step`` when the name has no number), ``global_step2000/`` (DeepSpeed),
  ``iter_0001000/`` (Megatron, weights under ``mp_rank_00/``), or any name with one number;
- single files: ``ckpt_3000.pt``, ``model_500.safetensors``, ``checkpoint_N.pt``, ``step-N.bin`` …

Inside a checkpoint directory, weights are found in this order: ``model.safetensors.index.json``,
``model.safetensors``, ``pytorch_model.bin.index.json``, ``pytorch_model.bin``, then any single
safetensors/torch file that is not optimizer or trainer state.

Only headers are read here (safetensors JSON headers; for torch files the pickle, with tensor data
left on disk). Duplicate steps, mixed architectures and empty folders are reported before any
tensor data is read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CkptavgError
from .trajectory import Checkpoint, Trajectory

if TYPE_CHECKING:
    from .io.safetensors import TensorInfo

SAFETENSORS_EXT = (".safetensors",)
TORCH_EXT = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_EXT = SAFETENSORS_EXT + TORCH_EXT

# Names of files that sit next to the weights in training checkpoints but are not the model.
# (Megatron's model_optim_rng.pt holds the model under 'model', so it is kept.)
_NOT_WEIGHTS = re.compile(r"^(?!model_optim_rng\.).*(optim|scheduler|rng_state|training_args|scaler|trainer_state)", re.I)
_KNOWN_STEP = re.compile(
    r"^(?:global[_-]?step|step|checkpoint|ckpt|iter|iteration)[-_]?(\d+)(?=$|[-_.])", re.I
)
_DIGITS = re.compile(r"\d+")

CONFIG_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
    "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
)


def parse_step(name: str) -> tuple[int | None, bool]:
    """Step number from a checkpoint's file or directory name.

    Returns (step, known): ``known`` is True when the name follows a checkpoint convention
    (``step``, ``checkpoint-``, ``global_step``, ``iter_``, ``ckpt_`` …), False when the step is
    the only number in an otherwise free-form name. (None, False) when no step can be read.

    >>> parse_step("checkpoint-500"), parse_step("ckpt_3000.pt"), parse_step("epoch3")
    ((500, True), (3000, True), (3, False))
    """
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
    import stat

    try:
        return stat.S_ISDIR(os.stat(p).st_mode)
    except FileNotFoundError:
        if p.is_symlink():
            raise CkptavgError(f"{p}: dangling symlink") from None
        return False
    except OSError as e:  # e.g. ELOOP
        raise CkptavgError(f"{p}: cannot open: {e.strerror or e}") from None


def _listdir(p: Path) -> list[Path]:
    try:
        return sorted(p.iterdir())
    except OSError as e:
        raise CkptavgError(f"{p}: cannot list: {e.strerror or e}") from None


def _weight_files(d: Path) -> list[Path]:
    out = []
    for c in _listdir(d):
        if c.name.lower().endswith(WEIGHT_EXT) and not _NOT_WEIGHTS.search(c.name):
            try:
                if c.is_file():
                    out.append(c)
            except OSError:
                continue
    return out


def find_weights(d: Path) -> tuple[str, list[Path], Path | None] | None:
    """(format, weight files, index file) inside checkpoint directory ``d``, or None."""
    for index_name, fmt in (("model.safetensors.index.json", "safetensors"),
                            ("pytorch_model.bin.index.json", "torch")):
        idx = d / index_name
        if idx.is_file():
            return fmt, _index_shards(idx, d), idx
        single = d / index_name.replace(".index.json", "")
        if single.is_file():
            return fmt, [single], None
    indexes = sorted(d.glob("*.index.json"))
    if len(indexes) == 1:
        fmt = "safetensors" if ".safetensors." in indexes[0].name else "torch"
        return fmt, _index_shards(indexes[0], d), indexes[0]
    files = _weight_files(d)
    sts = [f for f in files if f.name.endswith(SAFETENSORS_EXT)]
    pts = [f for f in files if not f.name.endswith(SAFETENSORS_EXT)]
    for fmt, group in (("safetensors", sts), ("torch", pts)):
        if len(group) == 1:
            return fmt, group, None
        if len(group) > 1:
            raise CkptavgError(
                f"{d}: several weight files and no index ({', '.join(f.name for f in group[:4])}); "
                "point at one file or add an index.json"
            )
    # Megatron: iter_0001000/mp_rank_00/model_optim_rng.pt
    ranks = sorted(p for p in d.glob("mp_rank_*") if _is_dir(p))
    if len(ranks) == 1:
        found = find_weights(ranks[0])
        if found is None:
            return None
        fmt, files_, idx = found
        return fmt, files_, idx
    if len(ranks) > 1:
        raise CkptavgError(f"{d}: {len(ranks)} tensor-parallel ranks; consolidate them into one checkpoint first")
    return None


def _pairs_no_dupes(path: Path):  # type: ignore[no-untyped-def]
    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen: dict[str, object] = {}
        for k, v in pairs:
            if k in seen:
                raise CkptavgError(f"{path}: key {k!r} appears twice (a tensor mapped to two shards?)")
            seen[k] = v
        return seen

    return hook


def read_index(idx: Path) -> dict[str, str]:
    """Validated ``weight_map`` of an HF index file: tensor name → shard file name."""
    try:
        doc = json.loads(idx.read_text(encoding="utf-8"), object_pairs_hook=_pairs_no_dupes(idx))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CkptavgError(f"{idx}: not a valid index file: {e.__class__.__name__}: {e}") from None
    except OSError as e:
        raise CkptavgError(f"{idx}: cannot read: {e.strerror or e}") from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CkptavgError(f"{idx}: not a valid index file: no weight_map")
    for name, fname in wm.items():
        if not isinstance(fname, str) or not fname:
            raise CkptavgError(f"{idx}: tensor {name!r} maps to {fname!r}, not a file name")
        if os.path.isabs(fname) or "/" in fname or "\\" in fname or fname in (".", ".."):
            raise CkptavgError(f"{idx}: tensor {name!r} maps to {fname!r}, outside the checkpoint folder")
    return wm  # type: ignore[return-value]


def _index_shards(idx: Path, d: Path) -> list[Path]:
    wm = read_index(idx)
    shards = []
    for fname in dict.fromkeys(sorted(wm.values())):
        p = d / fname
        if not p.is_file():
            raise CkptavgError(f"{idx}: shard {fname} is missing")
        shards.append(p)
    return shards


def read_tensors(fmt: str, files: list[Path], index: Path | None) -> dict[str, TensorInfo]:
    """Tensor name → TensorInfo over all shards, headers only; checks the index agrees."""
    from .io import open_file

    tensors: dict[str, TensorInfo] = {}
    owner: dict[str, Path] = {}
    for f in files:
        reader = open_file(f, fmt)
        try:
            for name, info in reader.tensors.items():
                if name in tensors:
                    raise CkptavgError(f"tensor {name!r} is in two shards: {owner[name].name} and {f.name}")
                tensors[name], owner[name] = info, f
        finally:
            reader.close()
    if index is not None:
        wm = read_index(index)
        for name, fname in wm.items():
            if name not in owner:
                raise CkptavgError(f"{index}: tensor {name!r} is listed in {fname} but not stored there")
            if owner[name].name != fname:
                raise CkptavgError(f"{index}: tensor {name!r} is listed in {fname} but stored in {owner[name].name}")
        extra = sorted(set(owner) - set(wm))
        if extra:
            raise CkptavgError(f"{index}: tensor {extra[0]!r} in {owner[extra[0]].name} is missing from the index")
    return tensors


def _trainer_step(d: Path) -> int | None:
    ts = d / "trainer_state.json"
    if ts.is_file():
        try:
            step = json.loads(ts.read_text()).get("global_step")
        except (OSError, ValueError):
            return None
        return step if isinstance(step, int) else None
    return None


def _checkpoint(path: Path, step: int, fmt: str, files: list[Path], index: Path | None, config_dir: Path) -> Checkpoint:
    tensors = read_tensors(fmt, files, index)
    size = sum(f.stat().st_size for f in files)
    return Checkpoint(step, str(path), fmt, tuple(files), index, config_dir, tensors, size)


def _single(path: Path, step: int | None) -> Checkpoint | None:
    """``path`` as one checkpoint (a weight file or a directory holding weights), or None."""
    if path.is_file():
        if not path.name.lower().endswith(WEIGHT_EXT):
            raise CkptavgError(f"{path}: not a checkpoint file (expected {', '.join(WEIGHT_EXT)})")
        fmt = "safetensors" if path.name.endswith(SAFETENSORS_EXT) else "torch"
        s = step if step is not None else parse_step(path.name)[0]
        return _checkpoint(path, s or 0, fmt, [path], None, path.parent)
    found = find_weights(path)
    if found is None:
        return None
    fmt, files, index = found
    s = step if step is not None else (parse_step(path.name)[0] if parse_step(path.name)[0] is not None else _trainer_step(path))
    return _checkpoint(path, s or 0, fmt, files, index, path)


_STANDARD = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")


def _has_standard_weights(d: Path) -> bool:
    return any((d / n).is_file() for n in _STANDARD)


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


def discover(path: str | os.PathLike[str], *, check: bool = True, step_pattern: str | None = None) -> Trajectory:
    """Find the checkpoints of a run.

    Args:
        path: a run folder (children ``step1000/``, ``checkpoint-500/``, ``ckpt_3000.pt`` …), a
            single checkpoint directory, or a single weight file; or ``hf://org/name`` (the step
            branches of a Hub model repo) / ``hf://org/name@step1000`` — see :mod:`ckptavg.hub`.
        check: verify that every checkpoint has the same tensor names, shapes and dtypes.
        step_pattern: ``hf://`` only: regex whose group is the step in a branch name
            (default ``^step(\\d+)$``).

    Returns:
        A Trajectory sorted by step.

    Raises:
        CkptavgError: empty or unreadable folder, duplicate steps, corrupt headers, mixed
            architectures — each naming the file, step or tensor.

    Example:
        >>> traj = discover("runs/pythia-tiny")            # doctest: +SKIP
        >>> traj.window(5, at=5000).steps                  # doctest: +SKIP
        [1000, 2000, 3000, 4000, 5000]
    """
    if isinstance(path, str) and path.startswith("hf://"):
        from . import hub

        return hub.discover(path, step_pattern=step_pattern or hub.DEFAULT_STEP_PATTERN)
    if step_pattern is not None:
        raise CkptavgError(f"{path}: --step-pattern applies to hf:// trajectories only")
    root = Path(path)
    if not root.exists():
        raise CkptavgError(f"{root}: no such file or directory")
    name = root.resolve().name or str(root)
    if root.is_file() or _has_standard_weights(root) or (not _looks_like_run(root) and find_weights(root)):
        ckpt = _single(root, None)
        assert ckpt is not None
        return Trajectory(name, (ckpt,), str(root))
    ckpts: list[Checkpoint] = []
    for child in _listdir(root):
        if child.name.startswith("."):
            continue  # hidden entries, including our own temporary outputs
        step, known = parse_step(child.name)
        if _is_dir(child):
            if step is None:
                step = _trainer_step(child)
            if step is None:
                continue
            ckpt = _single(child, step)
            if ckpt is None:
                if known:
                    raise CkptavgError(f"{child}: looks like a checkpoint (step {step}) but holds no weight files")
                continue
            ckpts.append(ckpt)
        elif child.name.lower().endswith(WEIGHT_EXT) and step is not None and not _NOT_WEIGHTS.search(child.name):
            ckpt = _single(child, step)
            assert ckpt is not None
            ckpts.append(ckpt)
    if not ckpts:
        raise CkptavgError(
            f"{root}: no checkpoints found (expected children like step1000/, checkpoint-500/, "
            "ckpt_3000.pt, or weight files in the folder itself)"
        )
    traj = Trajectory(name, tuple(ckpts), str(root))
    if check:
        check_compatible(traj)
    return traj


def check_compatible(checkpoints: Trajectory | list[Checkpoint]) -> None:
    """Every checkpoint has the newest one's tensor names, shapes and dtypes."""
    known = [c for c in checkpoints if c.tensors is not None]
    if len(known) < 2:
        return
    ref = known[-1]
    ref_t = ref.tensors or {}
    for c in known[:-1]:
        t = c.tensors or {}
        where = f"step {c.step} ({c.location})"
        missing = [n for n in ref_t if n not in t]
        if missing:
            raise CkptavgError(
                f"{where}: tensor {missing[0]!r} is missing (present at step {ref.step}); "
                "mixed architectures cannot be averaged"
            )
        extra = [n for n in t if n not in ref_t]
        if extra:
            raise CkptavgError(
                f"{where}: extra tensor {extra[0]!r} not present at step {ref.step}; "
                "mixed architectures cannot be averaged"
            )
        for n, info in ref_t.items():
            if t[n].shape != info.shape:
                raise CkptavgError(
                    f"{where}: tensor {n!r} has shape {list(t[n].shape)}, step {ref.step} has {list(info.shape)}"
                )
            if t[n].dtype != info.dtype:
                raise CkptavgError(
                    f"{where}: tensor {n!r} is {t[n].dtype.name}, step {ref.step} has {info.dtype.name}; "
                    "convert them to one dtype first"
                )
