"""What a merge will cost before it starts: bytes to read and write, the memory bound, free disk.

``ckptavg merge --dry-run`` prints this, so the user of a 70B run knows before starting whether the
output fits and how much memory the engine will hold. Nothing here reads tensor data: sizes come
from the files (or the Hub's listing) and the headers discovery already read.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .engine import CHUNK_ELEMS, MERGE_CHUNK, PREFETCH, ROW_GROUP, WRITE_DEPTH
from .io.dtypes import DType
from .io.kernels import worth_torch
from .pipeline import available_cpus
from .trajectory import Checkpoint


@dataclass(frozen=True)
class Preflight:
    """The figures of one merge, before it runs (bytes unless said otherwise)."""

    read_bytes: int  # every selected input's weight files, each read once
    write_bytes: int | None  # the output's tensor data; None while a Hub .bin's tensors are unknown
    memory_bytes: int  # the engine's buffers (+ one model for --format other than hf; interpreter not included)
    free_bytes: int | None  # free space where the output will be written; None if that cannot be told
    inputs: int
    format: str = "hf"  # what is written (--format); not hf: the whole model is held in memory once
    threads: int = 1  # workers, each owning whole chunks
    kernels: str = "numpy"  # who converts bf16/fp16: torch (importing it adds ~225 MB beyond the buffers) or numpy
    cached_bytes: int | None = None  # of read_bytes, in the page cache now (Linux; None: unknown, or not downloaded)

    @property
    def fits(self) -> bool | None:
        """Whether the output fits in the free space (None when either is unknown)."""
        if self.write_bytes is None or self.free_bytes is None:
            return None
        return self.write_bytes <= self.free_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"fits": self.fits}


def _input_bytes(c: Checkpoint) -> int:
    if c.source is not None and not c.files:  # hf:// before download: the Hub lists the sizes
        return sum(f.size for f in c.source.weights)
    return sum(os.path.getsize(f) for f in c.files)


def _cached(checkpoints: Sequence[Checkpoint]) -> int | None:
    """Bytes of the inputs in the page cache (mincore on a mapping: no data read); None when
    some input is not local yet (Hub) or the system cannot tell."""
    if any(not c.files for c in checkpoints):
        return None
    from .io.residency import cached_bytes

    return cached_bytes(f for c in checkpoints for f in c.files)


def _free(out: Path) -> int | None:
    probe = Path(os.path.abspath(out))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def memory_bound(k: int, in_itemsize: int, out_itemsize: int, accumulate_itemsize: int = 8, threads: int = 1) -> int:
    """Bytes the merge engine holds, whatever the model's size.

    One thread (chunks of ``CHUNK_ELEMS``): the reader thread keeps ``PREFETCH`` chunk sets read
    ahead (plus the one being added): one raw chunk per input each; every accumulator dtype keeps
    ``WRITE_DEPTH + 2`` running sums, each a sum and a converted scratch chunk; the writer holds up to
    ``WRITE_DEPTH + 1`` output chunks. ``threads`` workers (chunks of ``MERGE_CHUNK``, added in
    blocks of ``CHUNK_ELEMS``): each holds a block of every input, up to ``ROW_GROUP + 1`` converted
    blocks, the block's sum and scratch, and its chunk of output.
    """
    if threads > 1:
        converted = min(k, ROW_GROUP) + 1
        return threads * (CHUNK_ELEMS * (k * in_itemsize + (converted + 2) * accumulate_itemsize)
                          + MERGE_CHUNK * out_itemsize)
    reads = (PREFETCH + 1) * k * CHUNK_ELEMS * in_itemsize
    sums = (WRITE_DEPTH + 2) * 2 * CHUNK_ELEMS * accumulate_itemsize
    writes = (WRITE_DEPTH + 1) * CHUNK_ELEMS * out_itemsize
    return reads + sums + writes


def preflight(checkpoints: Sequence[Checkpoint], out: str | os.PathLike[str], out_dtype: DType | None = None,
              accumulate: str = "float32", output_format: str = "hf", threads: int | None = None) -> Preflight:
    """The cost of averaging ``checkpoints`` into ``out``, from sizes and headers only.

    Args:
        checkpoints: the selection, oldest first (discovered; Hub revisions need not be downloaded).
        out: the output folder (need not exist).
        out_dtype: the output dtype of floating tensors (None: as the inputs).
        accumulate: ``float32`` or ``float64``.
        output_format: anything but ``hf`` holds the whole averaged model in memory too (``torch.save``
            and DCP's writer take a complete state dict).
        threads: the workers (default: the CPUs this process may use).

    Returns:
        A :class:`Preflight`.

    Example:
        >>> pf = preflight(discover("runs/tiny").window(5), "avg")        # doctest: +SKIP
        >>> pf.read_bytes, pf.memory_bytes, pf.fits                        # doctest: +SKIP
    """
    newest = checkpoints[-1]
    tensors = newest.tensors
    write: int | None = None
    in_size = out_size = 4
    if tensors:
        sizes = [t.dtype.itemsize for t in tensors.values()]
        in_size = max(sizes)
        outs = [(out_dtype if out_dtype is not None and t.dtype.floating else t.dtype).itemsize for t in tensors.values()]
        out_size = max(outs)
        write = sum(t.numel * o for t, o in zip(tensors.values(), outs))
    acc = 8 if accumulate == "float64" or any(t.dtype.name == "F64" for t in (tensors or {}).values()) else 4
    threads = available_cpus() if threads is None else threads
    read = sum(_input_bytes(c) for c in checkpoints)
    names = {t.dtype.name for t in (tensors or {}).values()} | ({out_dtype.name} if out_dtype is not None else set())
    kernels = "torch" if worth_torch(read, names, threads) else "numpy"
    return Preflight(
        read_bytes=read,
        write_bytes=write,
        memory_bytes=memory_bound(len(checkpoints), in_size, out_size, acc, threads) + (
            (write or 0) if output_format != "hf" else 0),
        free_bytes=_free(Path(out)),
        inputs=len(checkpoints),
        format=output_format,
        threads=threads,
        kernels=kernels,
        cached_bytes=_cached(checkpoints),
    )


__all__ = ["Preflight", "memory_bound", "preflight"]
