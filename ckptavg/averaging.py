"""``average`` (in memory) and ``average_to`` a folder: fetch → plan → stream → manifest.

The inputs' files are made local (Hub revisions downloaded into the HF cache), their headers read
and checked against each other, the weights computed by the method, then :func:`ckptavg.engine.stream`
averages tensor by tensor into a state dict or an HF-loadable folder that appears atomically, with
the newest input's config/tokenizer files and ``ckptavg.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, overload

from . import manifest as _manifest
from . import methods, sources
from .engine import ACCUMULATORS, stream
from .errors import SelectionError, UsageError
from .io import formats
from .io.dtypes import DType, parse_dtype
from .io.files import load_json
from .io.layout import CONFIG_FILES, code_files, read_tensors, weights_stem
from .io.readers import CheckpointReader
from .io.safetensors import TensorInfo, parse_size
from .io.sinks import SafetensorsDirSink, Sink, StateDictSink, atomic_directory, check_inputs, check_output
from .keys import strip_plan
from .selection import Selection
from .tokens import tokens_seen
from .trajectory import HUB_PREFIX, Checkpoint, Trajectory, check_compatible, check_step_units


def ensure_tensors(ckpts: Sequence[Checkpoint]) -> list[Checkpoint]:
    """The checkpoints with ``tensors`` read from their (local) headers where not known yet."""
    out = []
    for c in ckpts:
        if c.tensors is None:
            c = replace(c, tensors=read_tensors(c.format, list(c.files), c.index, c.key))
        out.append(c)
    return out


def _copy_configs(src: Path | None, dst: Path, dtype: DType | None) -> list[str]:
    copied: list[str] = []
    if src is None:
        return copied
    for name in (*CONFIG_FILES, *code_files(src)):  # with auto_map's modeling_*.py: trust_remote_code loads the output
        p = src / name
        if p.is_file():
            shutil.copyfile(p, dst / name)
            copied.append(name)
    if dtype is not None and "config.json" in copied:
        # The config's dtype tells from_pretrained(dtype="auto") what the weights are.
        cfg_path = dst / "config.json"
        cfg = load_json(cfg_path, "config.json")
        keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]  # 4.x and 5.x both read torch_dtype
        for key in keys:
            cfg[key] = dtype.torch_name
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return copied


_ADAPTER_NOTE = ("LoRA A and B averaged separately: mean(B)·mean(A) is not mean(B·A); "
                 "`--peft merged-delta` averages the products exactly")


def finish_directory(
    tmp: Path, ckpts: Sequence[Checkpoint], weights: Sequence[float], method: str, params: dict[str, Any],
    out_dtype: DType | None, accumulate: str, root: str, hashes: dict[Path, str] | None = None,
    *, fingerprints: Sequence[dict[str, Any]] | None = None, max_shard_size: int | None = None,
    note: Mapping[str, Any] | None = None,
) -> None:
    """Config/tokenizer files of the newest input and ``ckptavg.json`` next to the weights: what was
    averaged, how the folder was written, and each input's fingerprint (what a re-run compares)."""
    _copy_configs(ckpts[-1].config_dir, tmp, out_dtype)
    if weights_stem(ckpts[-1].files) == "adapter_model":
        note = {"peft": {"mode": "adapter", "why": _ADAPTER_NOTE}} | dict(note or {})
    files = sorted([p.name for p in tmp.iterdir()] + [_manifest.MANIFEST_NAME])
    _manifest.write(tmp, _manifest.build(
        ckpts, weights, method, params,
        dtype=out_dtype.torch_name if out_dtype else "same as inputs",
        accumulate=accumulate, trajectory=root, hashes=hashes, files=files,
        fingerprints=fingerprints, max_shard_size=max_shard_size,
    ) | dict(note or {}))


def check_write_options(dtype: str | None, max_shard_size: str | int | None) -> tuple[DType | None, int | None]:
    """``dtype`` and ``max_shard_size`` as given by a user, checked (``--dry-run`` checks them too).

    Raises:
        UsageError: an unknown dtype or a size that cannot be parsed.
    """
    try:
        return (parse_dtype(dtype) if dtype else None,
                parse_size(max_shard_size) if max_shard_size else None)
    except ValueError as e:
        raise UsageError(str(e)) from None


def input_paths(ckpts: Sequence[Checkpoint], root: str = "") -> list[Path]:
    """Every local path an output must keep clear of: the run folder, each checkpoint, its files."""
    paths = [Path(root)] if root and not root.startswith(HUB_PREFIX) else []
    for c in ckpts:
        if not c.location.startswith(HUB_PREFIX):
            paths.append(Path(c.location))
        paths += [Path(f) for f in c.files]
    return paths


class StateDict(dict[str, Any]):
    """An averaged model in memory: ``{name: torch.Tensor}`` plus ``manifest``, the record
    ``ckptavg.json`` would hold for it (inputs, steps, weights, method)."""

    manifest: dict[str, Any]


Source = str | os.PathLike[str] | Trajectory | Sequence[Checkpoint]


def _checkpoints(source: Source, selection: Selection | None) -> tuple[list[Checkpoint], str]:
    """The selected checkpoints (oldest first) and the trajectory's root, from any source."""
    if isinstance(source, (str, os.PathLike)):
        source = sources.discover(source)
    root = str(getattr(source, "root", ""))
    if selection is not None and not selection.is_empty:
        if not isinstance(source, Trajectory):
            source = Trajectory("selection", tuple(source), root)
        source = selection.apply(source)
    ckpts = list(source)
    if not ckpts:
        raise SelectionError("nothing selected: the selection has no checkpoints")
    return ckpts, root


def method_weights(ckpts: Sequence[Checkpoint], method: str, params: dict[str, Any],
                   root: str = "") -> tuple[list[float], dict[str, Any]]:
    """Weights of ``method`` for ``ckpts`` and the parameters ``ckptavg.json`` records with them.

    Beyond what was given, the record holds the tokens each input had seen (``tokens``, and where
    that came from, ``tokens_from``) when the method counts tokens, and what
    :func:`ckptavg.methods.details` says (``power-ema``: ``gamma``, ``profile_error``).

    Raises:
        MethodError: a bad method or parameters; tokens asked for where the run does not record them.
    """
    given = {k: v for k, v in params.items() if v is not None}
    check_step_units(ckpts, given)
    steps = [c.step for c in ckpts]
    extra: dict[str, Any] = {}
    if given.get("half_life_tokens") is not None and method == "ema":
        tokens, source = tokens_seen(ckpts, given.pop("tokens_per_step", None), root)
        extra = {"tokens": tokens, "tokens_from": source}
    w = methods.weights(method, steps, **given, **({"tokens": extra["tokens"]} if extra else {}))
    return w, {**params, **extra, **methods.details(method, steps, **given)}


@overload
def average(source: Source, out: None = None, **kwargs: Any) -> StateDict: ...
@overload
def average(source: Source, out: str | os.PathLike[str], **kwargs: Any) -> Path: ...
def average(  # type: ignore[misc]  # the overloads differ only in what out gives back
    source: Source,
    out: str | os.PathLike[str] | None = None,
    *,
    selection: Selection | None = None,
    method: str = "uniform",
    weights: Sequence[float] | None = None,
    decay: float | None = None,
    half_life: float | None = None,
    half_life_tokens: float | None = None,
    tokens_per_step: float | None = None,
    schedule: str | None = None,
    sigma_rel: float | None = None,
    dtype: str | None = None,
    accumulate: Literal["float32", "float64"] = "float32",
    max_shard_size: int | str | None = None,
    force: bool = False,
    hash_inputs: bool = False,
    allow_nonfinite: bool = False,
    allow_duplicates: bool = False,
    fsync: bool = True,
    threads: int | None = None,
    note: Mapping[str, Any] | None = None,
    progress: bool = True,
    output_format: str = "hf",
    exclude_anomalies: bool = False,
    anomalies: str | os.PathLike[str] | None = None,
) -> Path | StateDict:
    """Average checkpoints, streaming one tensor chunk at a time.

    Args:
        source: a run (folder or ``hf://org/name``), a Trajectory, or a list of Checkpoints,
            oldest first.
        out: output directory (HF-loadable: safetensors + config/tokenizer files of the newest
            checkpoint + ``ckptavg.json``), written atomically. ``None``: return a state dict.
        selection: which checkpoints of ``source`` (default: all of them).
        method: ``uniform``, ``weighted`` (with ``weights``), ``ema`` (with ``decay``, ``half_life``
            in steps or ``half_life_tokens``, tokens per step from the run or ``tokens_per_step``),
            ``wsm`` (with ``schedule``), ``wma`` or ``power-ema`` (with ``sigma_rel``); see
            :mod:`ckptavg.methods`.
        dtype: output dtype of floating tensors (default: the inputs' dtype).
        accumulate: ``float32`` (default) or ``float64`` accumulator.
        max_shard_size: shard the output (``"5GB"``), with an HF index file.
        force: replace an existing non-empty ``out``.
        hash_inputs: record each input file's sha256 in the manifest (one extra read).
        allow_nonfinite: average tensors holding NaN/Inf instead of refusing.
        allow_duplicates: average Hub revisions whose weights are byte-identical to another step
            branch's instead of refusing (see :func:`ckptavg.hub.materialise`).
        fsync: flush every output file and the folder to disk before the output appears (off:
            faster, but a power loss may leave a complete-looking folder of empty files).
        threads: workers, each averaging whole chunks (default: the CPUs this process may use);
            the output is bit-identical for any number.
        note: entries that replace or extend ``ckptavg.json``'s (e.g. ``{"method": …}`` saying
            why these checkpoints), written with it before the output appears.
        progress: show a tqdm bar (bytes read) on stderr.
        exclude_anomalies: leave out the selected checkpoints :mod:`ckptavg.stability` flags (NaN/Inf,
            a whole-model update spike), judged against the checkpoints of ``source`` before them;
            ``ckptavg.json`` records which and why (``excluded``, ``exclusion``).
        anomalies: as ``exclude_anomalies``, from this ``ckptavg inspect --json`` report instead.
        output_format: ``hf`` (default: the folder above), ``same`` (the input's own format) or one
            of ``nanogpt`` (``out/ckpt.pt``), ``lightning`` (``out/model.ckpt``), ``dcp`` (a
            model-only DCP folder): the newest input's file with its model replaced by the average,
            its optimizer state dropped (see :mod:`ckptavg.io.formats`). Holds one model in memory.

    Returns:
        The output directory, or a :class:`StateDict` (``{name: torch.Tensor}`` with a
        ``manifest``) when ``out`` is None.

    Raises:
        SelectionError, MethodError: an empty selection, a bad method or weights.
        CheckpointError, IncompatibleError: unreadable or mismatched inputs.
        NonFiniteError: NaN/Inf in an input. OutputError: an unusable output path.

    Example:
        >>> average("runs/tiny", "tiny-lawa5", selection=Selection(window=5))   # doctest: +SKIP
        >>> sd = average(discover("runs/tiny").window(5))                       # doctest: +SKIP
    """
    if isinstance(source, (str, os.PathLike)):
        source = sources.discover(source)  # the whole run: the history the anomaly rule needs
    ckpts, root = _checkpoints(source, selection)
    if exclude_anomalies or anomalies is not None:
        from .stability import without_anomalies

        ckpts, excluded = without_anomalies(source, ckpts, anomalies, threads=threads, progress=progress,
                                            allow_duplicates=allow_duplicates)
        note = excluded | dict(note or {})
    if accumulate not in ACCUMULATORS:
        raise UsageError(f"accumulate must be float32 or float64, got {accumulate!r}")
    given: dict[str, Any] = {"weights": list(weights) if weights is not None else None, "decay": decay,
                             "half_life": half_life, "half_life_tokens": half_life_tokens,
                             "tokens_per_step": tokens_per_step, "schedule": schedule, "sigma_rel": sigma_rel}
    w, params = method_weights(ckpts, method, given, root)
    out_dtype, shard_bytes = check_write_options(dtype, max_shard_size)
    dt = out_dtype.torch_name if out_dtype else "same as inputs"
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    if output_format != "hf" and (out is None or shard_bytes):
        raise UsageError(f"--format {output_format} needs an output folder and no --max-shard-size (hf only)")
    stream_kw: dict[str, Any] = dict(accumulate=accumulate, allow_nonfinite=allow_nonfinite, progress=progress,
                                     threads=threads)
    if out is None:
        ckpts, plan, entries = _ready(ckpts, allow_duplicates, progress, out_dtype)
        hashes = {f: _manifest.sha256_file(f) for c in ckpts for f in c.files} if hash_inputs else None
        prints = [_manifest.fingerprint(c) for c in ckpts]
        sd_sink = StateDictSink(entries)
        _stream(ckpts, w, plan, entries, sd_sink, **stream_kw)
        state = StateDict(sd_sink.state_dict())
        state.manifest = _manifest.build(ckpts, w, method, params, dtype=dt, accumulate=accumulate, trajectory=root,
                                         hashes=hashes, fingerprints=prints) | dict(note or {})
        return state
    paths = input_paths(ckpts, root)
    output_kind(ckpts, output_format)  # a format these inputs cannot give is refused before the lock too
    check_output(Path(out), force, paths)  # before the lock: a plain refusal needs no lock file
    # Locked from here to the rename: a second run writing the same folder is refused, not raced.
    with atomic_directory(Path(out), force=force, fsync=fsync, inputs=paths) as tmp:
        ckpts, plan, entries = _ready(ckpts, allow_duplicates, progress, out_dtype)
        check_inputs(Path(out), input_paths(ckpts, root))  # again: downloads add files (the HF cache)
        hashes = {f: _manifest.sha256_file(f) for c in ckpts for f in c.files} if hash_inputs else None
        prints = [_manifest.fingerprint(c) for c in ckpts]  # before reading: a later change shows
        fmt = output_kind(ckpts, output_format)[0]
        if fmt != "hf":
            record = _write_format(fmt, tmp, ckpts, w, plan, entries, stream_kw, Path(os.path.abspath(out)), fsync)
            finish_directory(tmp, ckpts, w, method, params, out_dtype, accumulate, root, hashes,
                             fingerprints=prints, note={"format": record} | dict(note or {}))
            return Path(os.path.abspath(out))
        strip = strip_plan([e.name for e in entries], ckpts[-1].config_dir)  # HF names for from_pretrained
        note = {"keys": strip[1]} | dict(note or {}) if strip else note
        dir_sink = SafetensorsDirSink(tmp, entries, shard_bytes, label=Path(os.path.abspath(out)),
                                      stem=weights_stem(ckpts[-1].files), strip=strip[0] if strip else "")
        try:
            _stream(ckpts, w, plan, entries, dir_sink, **stream_kw)
        except BaseException:
            dir_sink.abort()
            raise
        dir_sink.close()
        finish_directory(tmp, ckpts, w, method, params, out_dtype, accumulate, root, hashes,
                         fingerprints=prints, max_shard_size=shard_bytes, note=note)
    return Path(os.path.abspath(out))


def output_kind(ckpts: Sequence[Checkpoint], requested: str = "same") -> tuple[str, str | None]:
    """(the format ``requested`` writes for these inputs, what the newest input is) — see
    :func:`ckptavg.io.formats.resolve`; a Hub revision not yet downloaded counts as ``hf``.

    Raises:
        UsageError: the format cannot be written from these inputs (one line naming the newest).
    """
    c = ckpts[-1]
    kind = "hf" if c.source is not None and not c.files else formats.input_kind(c.format, c.files, c.key)
    return formats.resolve(requested, kind, str(c.files[0] if c.files else c.location), c.key), kind


def _write_format(fmt: str, tmp: Path, ckpts: Sequence[Checkpoint], w: Sequence[float], plan: list[TensorInfo],
                  entries: list[TensorInfo], stream_kw: dict[str, Any], label: Path, fsync: bool) -> dict[str, Any]:
    """Average into memory (one model: ``torch.save`` and DCP's writer take the whole state dict), then
    write ``fmt`` into ``tmp``; the ``format`` record of ``ckptavg.json``."""
    sink = StateDictSink(entries)
    _stream(ckpts, w, plan, entries, sink, **stream_kw)
    newest = ckpts[-1]
    if fmt != "dcp":
        return formats.write_torch_file(fmt, tmp, sink.state_dict(), newest.files[0], label)
    prefix: tuple[str, ...] = ()
    dropped: list[str] = []
    if newest.format == "dcp":
        from .io.dcp import DcpFile

        inner = DcpFile(newest.files[0], newest.key)
        prefix, dropped = inner.prefix, sorted(inner.skipped)
    return formats.write_dcp(tmp, sink.state_dict(), prefix, label, fsync, dropped)


def _ready(ckpts: list[Checkpoint], allow_duplicates: bool, progress: bool,
           out_dtype: DType | None) -> tuple[list[Checkpoint], list[TensorInfo], list[TensorInfo]]:
    """Local files, headers read and checked → (checkpoints, the newest's tensors, output entries)."""
    ckpts = ensure_tensors(sources.materialise(ckpts, allow_duplicates=allow_duplicates, progress=progress))
    check_compatible(ckpts)
    assert ckpts[-1].tensors is not None
    plan = list(ckpts[-1].tensors.values())
    entries = [TensorInfo(t.name, out_dtype if out_dtype and t.dtype.floating else t.dtype, t.shape) for t in plan]
    return ckpts, plan, entries


def _stream(ckpts: Sequence[Checkpoint], w: Sequence[float], plan: list[TensorInfo], entries: list[TensorInfo],
            sink: Sink, *, accumulate: str, allow_nonfinite: bool, progress: bool, threads: int | None) -> None:
    out_dtypes = {e.name: e.dtype for e in entries}
    active = sum(x != 0.0 for x in w)
    total = sum(t.nbytes * (active if t.dtype.floating else 1) for t in plan)
    from tqdm import tqdm

    readers: list[CheckpointReader] = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="averaging", disable=not progress, leave=False) as bar:
        try:
            readers = [CheckpointReader(c.files, c.format, str(c), key=c.key) for c in ckpts]
            stream(readers, w, plan, out_dtypes, sink, accumulate=accumulate, allow_nonfinite=allow_nonfinite,
                   on_bytes=bar.update, threads=threads)
        finally:
            for r in readers:
                r.close()


__all__ = ["StateDict", "average", "ensure_tensors", "finish_directory", "check_write_options", "input_paths",
           "output_kind"]
