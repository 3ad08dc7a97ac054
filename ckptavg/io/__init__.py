"""Tensor I/O, the leaf of the package: it imports nothing of ckptavg but :mod:`ckptavg.errors`.

- :mod:`.dtypes`: safetensors dtypes, numpy storage, bf16 conversion, fp32/fp64 accumulators;
- :mod:`.files`: regular files only (a FIFO is refused, not waited on), a bounded pool of descriptors,
  JSON read with size and nesting caps;
- :mod:`.layout`: which files of a folder are the weights, index files, shard checks;
- :mod:`.safetensors`, :mod:`.torchfile`: one reader per format (``pread``, never a mapping);
- :mod:`.dcp`: ``torch.distributed.checkpoint`` folders, one tensor at a time through torch's reader;
- :mod:`.zero`: DeepSpeed ZeRO 1/2/3 folders, the fp32 master weights read from the optimizer states;
- :mod:`.readers`: all the files of one checkpoint behind one ``read(name, start, count)``;
- :mod:`.sinks`: where averaged chunks go (a safetensors folder, written atomically, or memory).
- :mod:`.formats`: outputs in the input's own shape (nanoGPT ``ckpt.pt``, Lightning ``.ckpt``, DCP).
- :mod:`.lock`: who is writing an output (its lock file; temporaries named after host and pid).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .readers import CheckpointReader, open_file
    from .safetensors import SafetensorsFile, TensorInfo

_LAZY = {"CheckpointReader": "readers", "open_file": "readers", "SafetensorsFile": "safetensors", "TensorInfo": "safetensors"}
__all__ = ["CheckpointReader", "SafetensorsFile", "TensorInfo", "open_file"]


def __getattr__(name: str) -> Any:  # numpy loads with the first reader, not with the package
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ckptavg.io' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)
