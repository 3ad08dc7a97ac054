"""One reader per weight-file format, and all the files of one checkpoint behind one ``read``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import CheckpointError
from .safetensors import SafetensorsFile, TensorInfo


class WeightFile(Protocol):
    path: Path
    tensors: dict[str, TensorInfo]

    def read(self, info: TensorInfo, start: int = 0, count: int | None = None) -> np.ndarray: ...
    def close(self) -> None: ...


def open_file(path: Path, fmt: str) -> WeightFile:
    """A reader for one weight file of format ``safetensors`` or ``torch``."""
    if fmt == "safetensors":
        return SafetensorsFile(path)
    from .torchfile import TorchFile

    return TorchFile(path)


class CheckpointReader:
    """The weight files of one checkpoint (its shards) behind one ``read(name, start, count)``.

    Args:
        files: the weight files, in shard order.
        fmt: ``safetensors`` or ``torch``.
        label: how messages name this checkpoint, e.g. ``step 5000 (runs/x/step5000)``.
    """

    def __init__(self, files: Sequence[Path], fmt: str, label: str = "") -> None:
        self.label = label or (str(files[0]) if files else "checkpoint")
        self._files: list[WeightFile] = []
        self._where: dict[str, tuple[WeightFile, TensorInfo]] = {}
        try:
            for f in files:
                wf = open_file(Path(f), fmt)
                self._files.append(wf)
                for name, info in wf.tensors.items():
                    self._where[name] = (wf, info)
        except BaseException:
            self.close()
            raise

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return {n: info for n, (_, info) in self._where.items()}

    def read(self, name: str, start: int = 0, count: int | None = None) -> np.ndarray:
        """Elements [start, start+count) of flattened tensor ``name``, as raw storage values."""
        try:
            wf, info = self._where[name]
        except KeyError:
            raise CheckpointError(f"{self.label}: no tensor {name!r}") from None
        return wf.read(info, start, count)

    def close(self) -> None:
        for wf in self._files:
            wf.close()
        self._files.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CheckpointReader", "WeightFile", "open_file"]
