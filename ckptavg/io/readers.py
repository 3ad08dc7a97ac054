"""One reader per weight-file format, and all the files of one checkpoint behind one ``read``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import CheckpointError
from .files import LazyFd
from .safetensors import SafetensorsFile, TensorInfo

Extent = tuple[LazyFd, int]  # a tensor stored as plain little-endian bytes: its file, and where element 0 lies


class WeightFile(Protocol):
    path: Path
    tensors: dict[str, TensorInfo]

    def read(self, info: TensorInfo, start: int = 0, count: int | None = None) -> np.ndarray: ...
    def close(self) -> None: ...


def open_file(path: Path, fmt: str, key: str | None = None) -> WeightFile:
    """A reader for one weight file of format ``safetensors``, ``torch`` or ``dcp`` (a DCP folder's
    ``.metadata``).

    ``key``: torch files only, where the state dict sits (dotted, e.g. ``model.ema``; see
    :func:`ckptavg.io.torchfile.find_state_dict`).
    """
    if fmt == "safetensors":
        return SafetensorsFile(path)
    if fmt == "dcp":  # path: the folder's .metadata; the folder is one "file"
        from .dcp import DcpFile

        return DcpFile(path, key)
    if fmt == "zero":  # path: a DeepSpeed ZeRO folder's first model-states file; the folder is one "file"
        from .zero import ZeroFile

        return ZeroFile(path, key)
    from .torchfile import TorchFile

    return TorchFile(path, key)


class CheckpointReader:
    """The weight files of one checkpoint (its shards) behind one ``read(name, start, count)``.

    Args:
        files: the weight files, in shard order.
        fmt: ``safetensors``, ``torch`` or ``dcp``.
        label: how messages name this checkpoint, e.g. ``step 5000 (runs/x/step5000)``.
        key: torch files only: where the state dict sits (``--key``), e.g. ``model.ema``.

    Files are opened when read and may be closed between reads, so any number of readers can be
    open at once (see :class:`~ckptavg.io.files.LazyFd`).
    """

    def __init__(self, files: Sequence[Path], fmt: str, label: str = "", *, key: str | None = None) -> None:
        self.label = label or (str(files[0]) if files else "checkpoint")
        self._files: list[WeightFile] = []
        if fmt in ("dcp", "zero"):  # one DCP or ZeRO folder: files[0] is opened, the rest is read through it
            files = files[:1]
        try:
            for f in files:
                self._files.append(open_file(Path(f), fmt, key))
        except BaseException:
            self.close()
            raise
        # One file (most checkpoints): its own dict, not a copy — a million-tensor header is ~100 MB a dict.
        self._only = self._files[0] if len(self._files) == 1 else None
        self.tensors: dict[str, TensorInfo] = self._only.tensors if self._only is not None else {}
        self._owner: dict[str, WeightFile] = {}  # tensor → its shard, for several files
        for wf in self._files if self._only is None else ():
            self.tensors.update(wf.tensors)
            self._owner.update(dict.fromkeys(wf.tensors, wf))

    def read(self, name: str, start: int = 0, count: int | None = None) -> np.ndarray:
        """Elements [start, start+count) of flattened tensor ``name``, as raw storage values."""
        try:
            info = self.tensors[name]
            wf = self._only or self._owner[name]
        except KeyError:
            raise CheckpointError(f"{self.label}: no tensor {name!r}") from None
        return wf.read(info, start, count)

    def read_into(self, buffer: np.ndarray, name: str, start: int = 0, count: int | None = None) -> np.ndarray:
        """:meth:`read` into a reused byte ``buffer`` (a uint8 array of at least count × itemsize),
        where the format allows (safetensors); the result is then a view of ``buffer``, valid until
        the next read into it. Saves an allocation and its page faults per chunk."""
        wf = self._only or self._owner.get(name)
        if isinstance(wf, SafetensorsFile):
            return wf.read(self.tensors[name], start, count, buffer)
        return self.read(name, start, count)

    def extent(self, name: str) -> Extent | None:
        """Where tensor ``name``'s values lie as plain contiguous bytes in one file (safetensors, and
        zip-format torch files): read them there with ``pread``; None for any other storage."""
        wf = self._only or self._owner.get(name)
        where = getattr(wf, "extent", None)
        return where(self.tensors[name]) if where is not None and name in self.tensors else None

    def close(self) -> None:
        for wf in self._files:
            wf.close()
        self._files.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CheckpointReader", "Extent", "WeightFile", "open_file"]
