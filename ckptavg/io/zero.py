"""DeepSpeed ZeRO 1/2/3 checkpoint folders (``global_stepN/``): the fp32 master weights, per tensor.

What DeepSpeed writes into ``global_stepN/`` (``latest`` beside it names the newest):

- ZeRO-1/2: ``mp_rank_00_model_states.pt`` (the module's state dict in the training dtype — a bf16
  copy under bf16 — plus ``param_shapes``, ``buffer_names``, ``shared_params``, frozen parameters)
  and one ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` per data-parallel rank R, whose
  ``single_partition_of_fp32_groups[g]`` is rank R's slice of param group g's flat fp32 vector.
  Joined over ranks, the group's vector holds its parameters one after another in ``param_shapes``
  order (``param_alignment_paddings`` between them when recorded), padded at the end to a multiple
  of 2 × world size.
- ZeRO-3: ``zero_pp_rank_R_mp_rank_00_model_states.pt`` per rank (the module's parameters are
  0-element placeholders; buffers are real) and per rank ``fp32_flat_groups``: every parameter is
  split into world-size parts of ceil(numel / world size) elements (the last one zero-padded), and
  rank R's groups, read one after another, hold part R of each parameter in ``param_shapes`` order.

The true weights are the fp32 master partitions: :class:`ZeroFile` learns from the pickles (loaded
memory-mapped with ``weights_only=True``: Adam moments and every other tensor stay on disk) where
each parameter's pieces are in which file, and ``read`` gathers a chunk with ``pread``, so memory
is one chunk per input, never a model — as DeepSpeed's own ``zero_to_fp32.py`` does in its lazy
mode, but without keeping any mapping open. Buffers come from rank 0's model states (floating ones
as fp32, as ``zero_to_fp32`` gives them), frozen parameters from ``frozen_param_fragments``, shared
(tied) parameters under both names. A folder whose optimizer shards do not match the world size
DeepSpeed recorded, or that lacks a rank, is refused in one line; tensor-parallel ZeRO
(``mp_rank_01``) and pipeline stages are refused too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .dtypes import DTYPES, DType, bf16_to_f32, from_torch
from .files import LazyFd
from .safetensors import TensorInfo, pread_into
from .torchfile import file_offset, load_mapped

MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
SOURCE = "fp32 master weights from the optimizer states"
_F32 = DTYPES["F32"]


def zero_files(names: Collection[str]) -> list[str] | None:
    """A ZeRO checkpoint folder's files, model states (rank order) then optimizer states (rank
    order), when ``names`` (its plain files) hold both; else None (a model-states file alone is
    read as a plain torch file)."""
    model = sorted((n for n in names if MODEL_STATES.match(n)), key=_rank)
    optim = sorted((n for n in names if OPTIM_STATES.match(n)), key=_rank)
    return [*model, *optim] if model and optim else None


def find_zero(folder: Path, names: Collection[str]) -> list[str] | None:
    """:func:`zero_files` of ``folder``, when its first optimizer-state file says a ZeRO stage (1-3);
    else None: DeepSpeed's stage-0 bf16 optimizer writes ``bf16_zero_pp_rank_*`` files without one,
    and its model-states file is then read as a plain torch file (the module as saved)."""
    files = zero_files(names)
    if files is None:
        return None
    obj, _ = load_mapped(folder / next(n for n in files if OPTIM_STATES.match(n)))
    osd = obj.get("optimizer_state_dict") if isinstance(obj, Mapping) else None
    return files if isinstance(osd, Mapping) and osd.get("zero_stage") in (1, 2, 3) else None


def _rank(name: str) -> tuple[int, int]:
    m = MODEL_STATES.match(name) or OPTIM_STATES.match(name)
    assert m is not None
    return int(m.group(2)), int(m.group(1) or 0)


@dataclass(frozen=True)
class _Piece:
    """``count`` elements of one tensor, stored at byte ``pos`` of file number ``file``."""

    file: int
    pos: int
    count: int


def _shape(v: Any) -> tuple[int, ...] | None:
    return tuple(int(d) for d in v) if isinstance(v, (tuple, list)) and all(isinstance(d, int) for d in v) else None


class ZeroFile:
    """One DeepSpeed ZeRO ``global_stepN/`` folder as one weight "file" (see the module docstring).

    Args:
        path: any file of the folder (the first model-states file, as discovery gives it).
        key: unused (``--key`` picks a part of a plain torch file; a ZeRO folder has one model).
    """

    def __init__(self, path: Path, key: str | None = None) -> None:
        self.path = Path(path)
        self.folder = self.path.parent
        names = zero_files([p.name for p in self.folder.iterdir() if p.is_file()])
        if names is None:
            raise CheckpointError(f"{self.folder}: not a DeepSpeed ZeRO checkpoint (no *_model_states.pt beside "
                                  "*_optim_states.pt)")
        self._paths = [self.folder / n for n in names]
        model = [n for n in names if MODEL_STATES.match(n)]
        optim = [n for n in names if OPTIM_STATES.match(n)]
        tp = sorted({_rank(n)[0] for n in names})
        if tp != [0]:
            raise CheckpointError(f"{self.folder}: DeepSpeed ZeRO with {len(tp)} tensor-parallel ranks (mp_rank_"
                                  f"{tp[-1]:02d}): not supported; consolidate with the training code's own tools first")
        self.tensors: dict[str, TensorInfo] = {}
        self._pieces: dict[str, tuple[DType, list[_Piece]]] = {}  # name → dtype stored, pieces in order
        self._rest: dict[str, tuple[DType, tuple[int, ...], int, int]] = {}  # module tensors: dtype, shape, pos, numel
        states = self._model_states(model)
        stage, world = self._optimizer_states(optim, len(model), states)
        self.stage, self.world_size = stage, world
        self.source = f"{SOURCE} (ZeRO-{stage}, {world} data-parallel {'rank' if world == 1 else 'ranks'})"
        for alias, target in (states.get("shared_params") or {}).items():
            if isinstance(alias, str) and target in self.tensors:
                self.tensors[alias] = TensorInfo(alias, self.tensors[target].dtype, self.tensors[target].shape)
                self._pieces[alias] = self._pieces[target]
        if stage <= 2:  # DeepSpeed records frozen parameters only from ZeRO-2 on; ZeRO-1's are in the module as saved
            for k, (dtype, shape, pos, n) in self._rest.items():
                if k not in self.tensors:
                    self._add(k, dtype, shape, [_Piece(0, pos, n)], dtype)
        self._rest.clear()
        self._files = [LazyFd(p) for p in self._paths]
        self._dense: tuple[str, np.ndarray] | None = None

    # -- discovery ---------------------------------------------------------------------------
    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.folder}: {what}")

    def _add(self, name: str, dtype: DType, shape: tuple[int, ...], pieces: list[_Piece], stored: DType) -> None:
        if sum(p.count for p in pieces) != math.prod(shape):
            raise self._fail(f"tensor {name!r}: its pieces hold {sum(p.count for p in pieces)} elements, its shape "
                             f"{list(shape)} needs {math.prod(shape)} (a truncated or mismatched rank file?)")
        self.tensors[name] = TensorInfo(name, dtype, shape)
        self._pieces[name] = (stored, pieces)

    def _model_states(self, model: Sequence[str]) -> dict[str, Any]:
        """Buffers (and frozen parameters) from the model-states files; DeepSpeed's records of rank 0."""
        import torch

        first: dict[str, Any] = {}
        frozen: list[dict[str, Any]] = []
        for i, name in enumerate(model):
            obj, base = load_mapped(self.folder / name)
            if not isinstance(obj, Mapping) or "param_shapes" not in obj or not isinstance(obj.get("module"), Mapping):
                raise self._fail(f"{name} is not a DeepSpeed model-states file (no module and param_shapes)")
            if base is None:
                raise self._fail(f"{name}: cannot locate its tensors in the zip archive (a rewritten or compressed "
                                 "file?)")
            frags = obj.get("frozen_param_fragments") or {}
            frozen.append({k: (from_torch(t.dtype), file_offset(t, base), t.numel()) for k, t in frags.items()
                           if isinstance(t, torch.Tensor) and t.is_contiguous()})
            if i:
                continue
            first = {k: obj.get(k) for k in ("param_shapes", "frozen_param_shapes", "shared_params", "dp_world_size")}
            module, buffers = obj["module"], set(obj.get("buffer_names") or ())
            for k, t in module.items():
                if not isinstance(t, torch.Tensor):
                    continue
                if k not in buffers:  # ZeRO-1/2: what no other record holds (frozen params under ZeRO-1)
                    if t.is_contiguous() and t.numel():
                        self._rest[k] = (from_torch(t.dtype), tuple(t.shape), file_offset(t, base), t.numel())
                    continue
                if not t.is_contiguous():
                    raise self._fail(f"{name}: buffer {k!r} is a strided view; save it contiguous")
                stored = from_torch(t.dtype)
                shown = _F32 if stored.floating and stored.name in ("BF16", "F16") else stored
                self._add(k, shown, tuple(t.shape), [_Piece(i, file_offset(t, base), t.numel())] if t.numel() else [],
                          stored)
            del module, obj
        fshapes = {k: _shape(v) for k, v in (first.get("frozen_param_shapes") or {}).items()}
        for k, shape in fshapes.items():
            if shape is None:
                raise self._fail(f"frozen parameter {k!r} has no readable shape in frozen_param_shapes")
            have = [f.get(k) for f in frozen]
            if any(h is None for h in have):
                raise self._fail(f"frozen parameter {k!r} is missing from frozen_param_fragments of "
                                 f"{model[have.index(None)]}")
            dtype = have[0][0]  # type: ignore[index]
            numel, left, pieces = math.prod(shape), math.prod(shape), []
            for r, (_, pos, n) in enumerate(have):  # type: ignore[misc]
                take = min(n, left) if len(have) > 1 else n  # ZeRO-3: rank parts, the last one padded
                if take:
                    pieces.append(_Piece(r, pos, take))
                left -= take
            if left or (len(have) == 1 and have[0][2] != numel):  # type: ignore[index]
                raise self._fail(f"frozen parameter {k!r}: its fragments do not hold its shape {list(shape)}")
            self._add(k, dtype, shape, pieces, dtype)
        return first

    def _optimizer_states(self, optim: Sequence[str], n_model: int, states: Mapping[str, Any]) -> tuple[int, int]:
        """Locate every trainable parameter in the fp32 partitions; returns (stage, world size)."""
        import torch

        groups: list[list[tuple[int, int]]] = []  # per rank: (file offset, numel) of each flat fp32 group
        stage = world = paddings = None
        for r, name in enumerate(optim):
            if _rank(name)[1] != r:
                raise self._fail(f"rank {r}'s optimizer states (zero_pp_rank_{r}_mp_rank_00_optim_states.pt) are "
                                 f"missing: the folder holds {', '.join(optim[:4])}; a checkpoint every rank saved "
                                 "is needed")
            obj, base = load_mapped(self.folder / name)
            osd = obj.get("optimizer_state_dict") if isinstance(obj, Mapping) else None
            if not isinstance(osd, Mapping) or not isinstance(osd.get("zero_stage"), int):
                raise self._fail(f"{name} holds no ZeRO optimizer state (no optimizer_state_dict.zero_stage): not "
                                 "written by a ZeRO stage 1-3 optimizer")
            s, pc = int(osd["zero_stage"]), osd.get("partition_count")
            w = max(pc) if isinstance(pc, (list, tuple)) and pc else pc
            if not isinstance(w, int) or s not in (1, 2, 3):
                raise self._fail(f"{name}: unreadable ZeRO stage {s} / partition count {pc!r}")
            if stage is None:
                stage, world, paddings = s, w, osd.get("param_alignment_paddings")
            elif (s, w) != (stage, world):
                raise self._fail(f"{name} says ZeRO-{s} over {w} ranks but rank 0 says ZeRO-{stage} over {world}: "
                                 "files of different runs or saves mixed in one folder")
            flat = osd.get("fp32_flat_groups" if s == 3 else "single_partition_of_fp32_groups")
            if not isinstance(flat, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in flat):
                raise self._fail(f"{name}: no fp32 partitions ({'fp32_flat_groups' if s == 3 else 'single_partition_of_fp32_groups'})")
            if base is None or not all(t.is_contiguous() and t.dtype == torch.float32 for t in flat):
                raise self._fail(f"{name}: the fp32 partitions cannot be located in the zip archive as fp32 data")
            groups.append([(file_offset(t, base), t.numel()) for t in flat])
            del osd, obj, flat
        assert stage is not None and world is not None
        if len(optim) != world:
            raise self._fail(f"DeepSpeed recorded {world} data-parallel ranks but {len(optim)} optimizer-state files "
                             f"are here ({', '.join(optim[:4])}): a rank's file is missing or another run's was left "
                             "behind; a checkpoint every rank saved is needed")
        dp = states.get("dp_world_size")
        if isinstance(dp, int) and dp != world:
            raise self._fail(f"the model states say {dp} data-parallel ranks, the optimizer states {world}")
        if stage == 3 and n_model != world:
            raise self._fail(f"ZeRO-3 over {world} ranks but {n_model} *_model_states.pt files")
        if any(len(g) != len(groups[0]) for g in groups):
            raise self._fail("the ranks' optimizer states hold different numbers of param groups")
        shapes = [{k: _shape(v) for k, v in g.items()} for g in (states.get("param_shapes") or [])
                  if isinstance(g, Mapping)]
        bad = next((k for g in shapes for k, v in g.items() if v is None), None)
        if bad is not None or not shapes:
            raise self._fail(f"the model states' param_shapes give no shape for {bad!r}" if bad else
                             "the model states hold no param_shapes")
        first_optim = n_model  # the optimizer files follow the model files in self._paths
        if stage == 3:
            self._zero3(shapes, groups, first_optim)
        else:
            self._zero12(shapes, groups, first_optim, paddings)
        return stage, world

    def _zero12(self, shapes: list[dict[str, Any]], groups: list[list[tuple[int, int]]], first: int,
                paddings: Any) -> None:
        world = len(groups)
        if len(shapes) != len(groups[0]):
            raise self._fail(f"param_shapes has {len(shapes)} groups, the optimizer states {len(groups[0])}")
        for g, params in enumerate(shapes):
            parts = [(first + r, groups[r][g][0], groups[r][g][1]) for r in range(world)]  # (file, pos, numel)
            pads = paddings[g] if isinstance(paddings, (list, tuple)) and len(paddings) > g else None
            offset = 0
            for i, (name, shape) in enumerate(params.items()):
                numel = math.prod(shape)
                self._add(name, _F32, shape, _span(parts, offset, numel, self.folder), _F32)
                offset += numel + (int(pads[i]) if pads is not None else 0)
            avail = sum(p[2] for p in parts)
            align = 2 * world
            if align * math.ceil(offset / align) != align * math.ceil(avail / align):
                raise self._fail(f"param group {g}: the parameters need {offset} elements but the ranks' fp32 "
                                 f"partitions hold {avail}: param_shapes and optimizer states disagree")

    def _zero3(self, shapes: list[dict[str, Any]], groups: list[list[tuple[int, int]]], first: int) -> None:
        world = len(groups)
        params = {k: v for g in shapes for k, v in g.items()}
        offset = 0
        for name, shape in params.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            pieces: list[_Piece] = []
            left = numel
            for r in range(world):
                rank_parts = [(first + r, pos, n) for pos, n in groups[r]]
                take = min(part, left)
                if take:
                    pieces.extend(_span(rank_parts, offset, take, self.folder))
                left -= take
            self._add(name, _F32, shape, pieces, _F32)
            offset += part
        avail = sum(n for _, n in groups[0])
        if offset != avail:
            raise self._fail(f"the parameters' partitions need {offset} elements per rank but rank 0's fp32 "
                             f"partitions hold {avail}: param_shapes and optimizer states disagree")

    # -- reading -----------------------------------------------------------------------------
    def read(self, info: TensorInfo, start: int = 0, count: int | None = None) -> np.ndarray:
        """Elements [start, start+count) of flattened ``info`` as raw storage values of ``info.dtype``."""
        if count is None:
            count = info.numel - start
        stored, pieces = self._pieces[info.name]
        out = np.empty(count, info.dtype.storage)
        at, done = 0, 0  # at: the element where the current piece begins
        for p in pieces:
            if done == count:
                break
            lo, hi = max(start + done, at), min(start + count, at + p.count)
            if lo < hi:
                raw = np.empty(hi - lo, stored.storage)
                fd = self._files[p.file].acquire()
                try:
                    pread_into(fd, raw, p.pos + (lo - at) * stored.itemsize, self._paths[p.file], info.name)
                finally:
                    self._files[p.file].done()
                dest = out[done : done + hi - lo]
                if stored is info.dtype:
                    dest[...] = raw
                elif stored.name == "BF16":
                    bf16_to_f32(raw, dest)
                else:
                    dest[...] = raw.astype(np.float32)
                done += hi - lo
            at += p.count
        if done != count:
            raise CheckpointError(f"{self.folder}: tensor {info.name!r} has no elements [{start}, {start + count})")
        return out

    def close(self) -> None:
        for f in self._files:
            f.close()


def describe(path: Path) -> str:
    """What is averaged from the ZeRO folder of ``path`` (its first model-states file), in one clause."""
    z = ZeroFile(path)
    z.close()
    copy = "0-element placeholders" if z.stage == 3 else "module weights (a bf16/fp16 copy under mixed precision)"
    return (f"DeepSpeed ZeRO-{z.stage} over {z.world_size} data-parallel {'rank' if z.world_size == 1 else 'ranks'}: "
            f"averaging the {SOURCE}; the model states' {copy} and the Adam moments are not averaged")


def _span(parts: Sequence[tuple[int, int, int]], offset: int, numel: int, where: Path) -> list[_Piece]:
    """``numel`` elements from ``offset`` of the vector that ``parts`` (file, byte pos, fp32 numel)
    form one after another, as pieces."""
    pieces, at = [], 0
    for f, pos, n in parts:
        lo, hi = max(offset, at), min(offset + numel, at + n)
        if lo < hi:
            pieces.append(_Piece(f, pos + (lo - at) * 4, hi - lo))
        at += n
    if sum(p.count for p in pieces) != numel:
        raise CheckpointError(f"{where}: elements [{offset}, {offset + numel}) lie past the end of the fp32 "
                              f"partitions ({at} elements): param_shapes and optimizer states disagree")
    return pieces


__all__ = ["MODEL_STATES", "OPTIM_STATES", "SOURCE", "ZeroFile", "describe", "find_zero", "zero_files"]
