"""``torch.distributed.checkpoint`` runs written by ``dcp.save`` itself, in the layouts of torchtitan
(``step-N/``, model keys at the top), OLMo-core (``stepN/model_and_optim/``, ``{"model", "optim"}``)
and accelerate's FSDP (``checkpoint_N/pytorch_model_fsdp_0/`` + ``optimizer_0/``), with optimizer
and train state beside the model; and one sharded across 2 gloo ranks. Averages are checked against
an fp64 average of what ``dcp.load`` gives."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from safetensors.torch import load_file

from ckptavg import discover
from ckptavg.cli import cli
from ckptavg.errors import CheckpointError
from ckptavg.io.dcp import DcpFile
from conftest import tiny_config

STEPS = [1, 2, 3, 4]


def _save(state: dict[str, object], folder: Path) -> None:
    with warnings.catch_warnings():  # "torch.distributed is disabled … single process": intended
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder, no_dist=True)


def _torchtitan(run: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> Path:
    folder = run / f"step-{step}"
    _save({**model.state_dict(), "optimizer": opt.state_dict(), "train_state": {"step": step},
           "lr_scheduler": {"last_epoch": step}}, folder)
    return folder


def _olmo_core(run: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> Path:
    folder = run / f"step{step}" / "model_and_optim"
    _save({"model": model.state_dict(), "optim": opt.state_dict()}, folder)
    (run / f"step{step}" / "train").mkdir()
    return folder


def _accelerate(run: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> Path:
    folder = run / f"checkpoint_{step}" / "pytorch_model_fsdp_0"
    _save({"model": model.state_dict()}, folder)
    _save({"optimizer": opt.state_dict()}, run / f"checkpoint_{step}" / "optimizer_0")
    return folder


LAYOUTS: dict[str, Callable[[Path, int, torch.nn.Module, torch.optim.Optimizer], Path]] = {
    "torchtitan": _torchtitan, "olmo-core": _olmo_core, "accelerate-fsdp": _accelerate,
}
SKIPPED = {"torchtitan": {"optimizer", "train_state", "lr_scheduler"}, "olmo-core": {"optim"},
           "accelerate-fsdp": set()}


def _model(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(tiny_config()).to(dtype)


# One layout in the fast lane; the others (a few seconds each) in the slow one.
@pytest.fixture(scope="module", params=[
    pytest.param((name, dt), id=f"{name}-{dt}", marks=() if (name, dt) == ("olmo-core", "float32") else pytest.mark.slow)
    for name in LAYOUTS for dt in ("float32", "bfloat16")
])
def dcp_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict[int, Path]]:
    layout, dtype = request.param
    run = tmp_path_factory.mktemp(layout) / "run"
    model = _model(getattr(torch, dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    folders = {}
    for step in STEPS:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        folders[step] = LAYOUTS[layout](run, step, model, opt)
    return layout, run, folders


def _dcp_model(folder: Path, layout: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What a DCP user gets: dcp.load into the model's own (preallocated) state dict."""
    sd = {k: torch.zeros_like(v) for k, v in _model(dtype).state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if layout == "torchtitan":
            dcp.load(sd, checkpoint_id=folder, no_dist=True)
        else:
            dcp.load({"model": sd}, checkpoint_id=folder, no_dist=True)
    return sd


def _expected(folders: dict[int, Path], layout: str, weights: dict[int, float]) -> dict[str, torch.Tensor]:
    sds = {s: _dcp_model(folders[s], layout, _stored_dtype(folders[s])) for s in weights}
    total = sum(weights.values())
    newest = sds[max(sds)]
    return {n: (sum(sds[s][n].double() * (w / total) for s, w in weights.items()).to(t.dtype)
                if t.is_floating_point() else t) for n, t in newest.items()}


def _stored_dtype(folder: Path) -> torch.dtype:
    md = dcp.FileSystemReader(str(folder)).read_metadata()  # the test's own file
    return next(v.properties.dtype for v in md.state_dict_metadata.values() if hasattr(v, "properties"))


def _assert_output(out: Path, want: dict[str, torch.Tensor]) -> None:
    got = load_file(out / "model.safetensors")
    assert set(got) == set(want)
    for n, t in want.items():
        assert got[n].dtype == t.dtype, n
        torch.testing.assert_close(got[n], t, rtol=0 if t.dtype == torch.bfloat16 else 1e-6, atol=0 if
                                   t.dtype == torch.bfloat16 else 1e-7, msg=n)
    model = _model(next(iter(want.values())).dtype)
    model.load_state_dict(got)  # the averaged weights load into the model


def test_list(dcp_run: tuple[str, Path, dict[int, Path]]) -> None:
    layout, run, folders = dcp_run
    traj = discover(run)
    assert traj.steps == STEPS and {c.format for c in traj} == {"dcp"}
    assert set(traj[0].tensors or {}) == set(_model(torch.float32).state_dict())
    noted = " ".join(traj.ignored)
    assert all(f"{k} (" in noted for k in SKIPPED[layout])
    result = CliRunner().invoke(cli, ["list", str(run)])
    assert result.exit_code == 0, result.output
    assert "4 checkpoints" in result.output and " dcp " in result.output


def test_merge_window(dcp_run: tuple[str, Path, dict[int, Path]], tmp_path: Path) -> None:
    layout, run, folders = dcp_run
    out = tmp_path / "lawa3"
    result = CliRunner().invoke(cli, ["merge", str(run), "--window", "3", "-o", str(out), "--quiet",
                                      "--accumulate", "float64", "--hash"])
    assert result.exit_code == 0, result.output
    _assert_output(out, _expected(folders, layout, dict.fromkeys(STEPS[-3:], 1.0)))
    inputs = json.loads((out / "ckptavg.json").read_text())["inputs"]
    assert [i["format"] for i in inputs] == ["dcp"] * 3
    assert set(inputs[0]["sha256"]) == {".metadata", "__0_0.distcp"}  # the data, not only the metadata


def test_merge_ema_and_series(dcp_run: tuple[str, Path, dict[int, Path]], tmp_path: Path) -> None:
    layout, run, folders = dcp_run
    out = tmp_path / "ema"
    result = CliRunner().invoke(cli, ["merge", str(run), "--method", "ema", "--half-life", "2", "-o", str(out),
                                      "--quiet", "--accumulate", "float64"])
    assert result.exit_code == 0, result.output
    _assert_output(out, _expected(folders, layout, {s: 0.5 ** ((4 - s) / 2) for s in STEPS}))
    series = tmp_path / "series"
    result = CliRunner().invoke(cli, ["series", str(run), "--window", "2", "-o", str(series), "--quiet"])
    assert result.exit_code == 0, result.output
    for s in STEPS[1:]:
        _assert_output(series / f"step{s}", _expected(folders, layout, {s - 1: 1.0, s: 1.0}))


def test_one_checkpoint_folder(dcp_run: tuple[str, Path, dict[int, Path]]) -> None:
    layout, run, folders = dcp_run
    traj = discover(folders[2])
    assert len(traj) == 1 and traj[0].format == "dcp"


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_metadata_that_asks_for_code_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    _save({"model": {"w": torch.ones(3)}}, run / "step-1")
    (run / "step-1" / ".metadata").write_bytes(pickle.dumps(_Boom()))
    monkeypatch.chdir(tmp_path)  # where `touch pwned` would land
    with pytest.raises(CheckpointError, match=r"step-1/\.metadata: refused to load: .*global posix\.system"):
        discover(run)
    assert not (tmp_path / "pwned").exists()


def test_truncated_shard_names_the_tensor(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _save({"model": {"w": torch.ones(3), "b": torch.zeros(2)}}, run / "step-1")
    _save({"model": {"w": torch.ones(3), "b": torch.zeros(2)}}, run / "step-2")
    (run / "step-2" / "__0_0.distcp").write_bytes(b"")
    result = CliRunner().invoke(cli, ["merge", str(run), "--window", "2", "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code != 0
    assert "step-2: tensor 'model." in result.output and "cannot be read" in result.output


def _full(step: int) -> dict[str, torch.Tensor]:
    """The model at ``step`` as full tensors: odd sizes, so the 2 ranks' shards are uneven."""
    g = torch.Generator().manual_seed(step)
    return {"embed.weight": torch.randn(7, 3, generator=g), "proj.weight": torch.randn(5, 4, generator=g),
            "proj.bias": torch.randn(5, generator=g), "norm.weight": torch.randn(4, generator=g).bfloat16()}


def _sharded_rank(rank: int, run: str, init: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        for step in STEPS:
            sd = {n: distribute_tensor(t, mesh, [Replicate() if n == "proj.bias" else Shard(0)])
                  for n, t in _full(step).items()}
            optim = {n: distribute_tensor(t * 0 + step, mesh, [Shard(0)]) for n, t in _full(step).items()}
            dcp.save({"model": sd, "optim": {"exp_avg": optim}, "step": step},
                     checkpoint_id=os.path.join(run, f"step{step}", "model_and_optim"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_across_two_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    run = tmp_path / "run"
    mp.spawn(_sharded_rank, args=(str(run), f"file://{tmp_path / 'pg'}"), nprocs=2, join=True)
    assert {p.name for p in (run / "step4" / "model_and_optim").iterdir()} == {".metadata", "__0_0.distcp",
                                                                             "__1_0.distcp"}
    traj = discover(run)
    assert traj.steps == STEPS and {n: list(t.shape) for n, t in (traj[0].tensors or {}).items()} == \
        {n: list(t.shape) for n, t in _full(1).items()}
    out = tmp_path / "lawa3"
    result = CliRunner().invoke(cli, ["merge", str(run), "--window", "3", "-o", str(out), "-q",
                                      "--accumulate", "float64"])
    assert result.exit_code == 0, result.output
    got = load_file(out / "model.safetensors")
    for n, t in _full(4).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = {s: {"model": {n: torch.zeros_like(t)}} for s in STEPS[-3:]}
            for s in STEPS[-3:]:  # what dcp.load reassembles from both ranks' shards …
                dcp.load(loaded[s], checkpoint_id=run / f"step{s}" / "model_and_optim", no_dist=True)
                torch.testing.assert_close(loaded[s]["model"][n], _full(s)[n], rtol=0, atol=0)  # … is what was saved
        want = (sum(loaded[s]["model"][n].double() for s in STEPS[-3:]) / 3).to(t.dtype)
        torch.testing.assert_close(got[n], want, rtol=0 if t.dtype == torch.bfloat16 else 1e-6,
                                   atol=0 if t.dtype == torch.bfloat16 else 1e-7, msg=n)


# --- chunk-wise reads: elements are pread from the .distcp files, never through torch's DCP load ---

def _storage_values(t: torch.Tensor) -> np.ndarray:
    """``t``'s elements, flattened, as the raw storage values ``DcpFile.read`` returns."""
    flat = t.detach().reshape(-1)
    return flat.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else flat.numpy()


def _read_in_chunks(f: DcpFile, name: str, size: int) -> np.ndarray:
    info = f.tensors[name]
    return np.concatenate([f.read(info, i, min(size, info.numel - i)) for i in range(0, info.numel, size)])


def _no_torch_load(*args: object, **kwargs: object) -> None:
    raise AssertionError("torch's DCP load was called: the chunk was not read with pread")


def test_chunks_are_pread_not_loaded_through_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    g = torch.Generator().manual_seed(0)
    for step in (1, 2):
        _save({"model": {"w": torch.randn(37, 41, generator=g), "b": torch.randn(5, generator=g).bfloat16(),
                         "s": torch.tensor(float(step))},
               "optim": {"m": torch.ones(3)}}, run / f"step-{step}")
    want = {s: {"model": {"w": torch.zeros(37, 41), "b": torch.zeros(5, dtype=torch.bfloat16),
                          "s": torch.zeros(())}} for s in (1, 2)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in (1, 2):  # the oracle: what dcp.load gives, before it is made to fail
            dcp.load(want[s], checkpoint_id=run / f"step-{s}", no_dist=True)
    monkeypatch.setattr(dcp, "load", _no_torch_load)
    f = DcpFile(run / "step-2" / ".metadata")
    for name, t in want[2]["model"].items():
        for size in (1, 7, 1000):
            assert np.array_equal(_read_in_chunks(f, name, size), _storage_values(t)), (name, size)
    f.close()
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["merge", str(run), "--window", "2", "-o", str(out), "-q",
                                      "--accumulate", "float64"])
    assert result.exit_code == 0, result.output
    got = load_file(out / "model.safetensors")
    for name, t in want[2]["model"].items():
        mean = ((want[1]["model"][name].double() + t.double()) / 2).to(t.dtype)
        torch.testing.assert_close(got[name], mean, rtol=0, atol=0, msg=name)


def test_a_chunk_not_readable_in_place_is_read_by_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dcp.save keeps a transposed view as it is (a strided blob): no run of its elements lies in
    order in the file, so torch's reader loads that tensor whole, once, with the same elements."""
    g = torch.Generator().manual_seed(1)
    w, t = torch.randn(9, 5, generator=g), torch.randn(6, 4, generator=g).t()
    _save({"model": {"w": w, "t": t}}, tmp_path / "c")
    calls = []
    load = dcp.load
    monkeypatch.setattr(dcp, "load", lambda *a, **k: calls.append(1) or load(*a, **k))
    f = DcpFile(tmp_path / "c" / ".metadata")
    assert np.array_equal(_read_in_chunks(f, "w", 7), _storage_values(w)) and calls == []
    assert np.array_equal(_read_in_chunks(f, "t", 7), _storage_values(t))
    assert calls == [1]  # one whole-tensor load, shared by the 4 chunk reads


def _tp_full() -> dict[str, torch.Tensor]:
    """Odd sizes, so the shards are uneven."""
    g = torch.Generator().manual_seed(0)
    return {"fsdp": torch.randn(7, 5, generator=g), "row_col": torch.randn(9, 7, generator=g),
            "col": torch.randn(6, 9, generator=g), "col_col": torch.randn(5, 11, generator=g),
            "mid_last": torch.randn(3, 5, 7, generator=g), "last_first": torch.randn(4, 6, 10, generator=g).bfloat16(),
            "vector": torch.randn(11, generator=g)}


def _tp_placements() -> dict[str, list[object]]:
    from torch.distributed.tensor import Replicate, Shard

    # FSDP/torchtitan: dim 0; tensor parallel (Megatron torch_dist): dim 1, or both; 3-d: inner dims
    return {"fsdp": [Shard(0), Replicate()], "row_col": [Shard(0), Shard(1)], "col": [Shard(1), Replicate()],
            "col_col": [Shard(1), Shard(1)], "mid_last": [Shard(1), Shard(2)], "last_first": [Shard(2), Shard(0)],
            "vector": [Shard(0), Shard(0)]}


def _tp_rank(rank: int, folder: str, init: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=4)
    try:
        mesh = init_device_mesh("cpu", (2, 2))
        places = _tp_placements()
        dcp.save({"model": {n: distribute_tensor(t, mesh, places[n]) for n, t in _tp_full().items()}},
                 checkpoint_id=folder)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_shards_along_any_dim_are_gathered_chunk_wise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.multiprocessing as mp

    folder = tmp_path / "c"
    mp.spawn(_tp_rank, args=(str(folder), f"file://{tmp_path / 'pg'}"), nprocs=4, join=True)
    f = DcpFile(folder / ".metadata")
    md = dcp.FileSystemReader(str(folder)).read_metadata()
    for name, t in _tp_full().items():
        assert len(md.state_dict_metadata[f"model.{name}"].chunks) in (2, 4), name  # really sharded
        want = {"model": {name: torch.zeros_like(t)}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(want, checkpoint_id=folder, no_dist=True)  # the oracle: torch's own reassembly
        torch.testing.assert_close(want["model"][name], t, rtol=0, atol=0)
        with monkeypatch.context() as m:
            m.setattr(dcp, "load", _no_torch_load)
            for size in (1, 3, 7, 13, t.numel()):
                assert np.array_equal(_read_in_chunks(f, name, size), _storage_values(want["model"][name])), \
                    (name, size)


def test_a_chunk_outside_the_folder_is_refused(tmp_path: Path) -> None:
    """The metadata names the file of each chunk: one outside the checkpoint's folder is not read."""
    run = tmp_path / "run"
    for step in (1, 2):
        _save({"model": {"w": torch.ones(3) * step}}, run / f"step-{step}")
    secret = tmp_path / "secret.distcp"
    secret.write_bytes((run / "step-2" / "__0_0.distcp").read_bytes())
    md = dcp.FileSystemReader(str(run / "step-2")).read_metadata()  # the test's own file
    for where in md.storage_data.values():
        where.relative_path = "../../secret.distcp"
    (run / "step-2" / ".metadata").write_bytes(pickle.dumps(md))
    result = CliRunner().invoke(cli, ["merge", str(run), "--window", "2", "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code != 0 and not (tmp_path / "out").exists()
    assert "step-2/.metadata: a chunk is stored in '../../secret.distcp', outside this folder" in result.output
