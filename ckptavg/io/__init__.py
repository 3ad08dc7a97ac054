"""Readers (safetensors, torch, sharded) and writers; one tensor chunk at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import CkptavgError
from ..trajectory import Checkpoint
from .safetensors import SafetensorsFile, TensorInfo


class WeightFile(Protocol):
    path: Path
    tensors: dict[str, TensorInfo]

    def read(self, info: TensorInfo, start: int = 0, count: int | None = None) -> np.ndarray: ...
    def close(self) -> None: ...


def open_file(path: Path, fmt: str) -> WeightFile:
    if fmt == "safetensors":
        return SafetensorsFile(path)
    from .torchfile import TorchFile

    return TorchFile(path)


class CheckpointReader:
    """All weight files of one checkpoint behind one ``read(name, start, count)``."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.checkpoint = ckpt
        self._files: list[WeightFile] = []
        self._where: dict[str, tuple[WeightFile, TensorInfo]] = {}
        try:
            for f in ckpt.files:
                wf = open_file(f, ckpt.format)
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
        try:
            wf, info = self._where[name]
        except KeyError:
            raise CkptavgError(f"step {self.checkpoint.step} ({self.checkpoint.location}): no tensor {name!r}") from None
        return wf.read(info, start, count)

    def close(self) -> None:
        for wf in self._files:
            wf.close()
        self._files.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CheckpointReader", "SafetensorsFile", "TensorInfo", "open_file"]
