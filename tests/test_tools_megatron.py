"""Megatron-Core: a tiny GPT trained with Megatron on CPU (gloo), saved with its own ``torch_dist``
checkpointing (``dist_checkpointing.save``), one run with tensor-parallel size 1 and one with 2.

The oracle is Megatron's own loading: ``dist_checkpointing.load`` of each checkpoint into the model
(tensor-parallel 1, so a TP=2 run is resharded by Megatron), averaged in fp64. The output (full,
global tensors under Megatron's checkpoint keys) is loaded back into the model the way Megatron
maps checkpoint keys to parameters: each ``ShardedTensor`` of ``model.sharded_state_dict()`` takes
its ``global_slice()`` of the tensor under its ``key``.

Megatron-Core assumes a CUDA device in four places (an attention scratch buffer, its RNG tracker,
two calls in the torch_dist writer); the script gives each its CPU equivalent and says so.

The legacy ``iter_N/mp_rank_XX/model_optim_rng.pt`` files are written by ``megatron/training``,
which the megatron-core wheel does not ship: here each rank ``torch.save``s what its
``generate_state_dict`` builds (args with the ``ModelType`` enum, the model's
``state_dict_for_save_checkpoint()``, optimizer, scheduler, numpy/torch RNG state), from the real
model and optimizer, and Megatron's own loading (``torch.load`` + ``load_state_dict``) is the
oracle. A tensor-parallel legacy run is refused, naming the ranks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckptavg.cli import cli

pytestmark = pytest.mark.slow
if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
    pytest.skip("megatron-core is not installed (make install installs it: pip install megatron-core==0.16.1)",
                allow_module_level=True)

STEPS = [2, 4, 6, 8]
SCRIPT = r'''"""Megatron-Core on CPU: train a tiny GPT and save torch_dist checkpoints; or load checkpoints/outputs with Megatron."""
import argparse
import contextlib
import os
import sys

import torch
import torch.multiprocessing as mp


def _cpu_shims():
    # Megatron-Core assumes a CUDA device in four places; on CPU each gets the CPU equivalent:
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.utils as mcu

    # its attention scratch buffer is allocated on the current CUDA device: plain memory instead
    mcu.GlobalMemoryBuffer.get_tensor = lambda self, shape, dtype, name, *a, **k: torch.empty(shape, dtype=dtype)
    # its model-parallel RNG tracker forks CUDA generator states: nothing to fork (dropout is 0)
    mrandom.CudaRNGStatesTracker.fork = lambda self, *a, **k: contextlib.nullcontext()
    # its torch_dist writer syncs the device after copying to host, and gathers failure flags on it
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"


def _model(tp):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    _cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=4, use_cpu_initialization=True,
                            hidden_dropout=0.0, attention_dropout=0.0, pipeline_dtype=torch.float32)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=64,
                    max_sequence_length=8)


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def _train(rank, world, port):
    """Megatron's GPT on world tensor-parallel ranks, 8 AdamW iterations; yields (iteration, model,
    optimizer) every 2, where Megatron's trainer saves."""
    _init(rank, world, port)
    model = _model(world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    mask = torch.triu(torch.ones(1, 1, 8, 8), diagonal=1).bool()  # causal; Megatron's default mask is made on cuda
    pos = torch.arange(8).unsqueeze(0).expand(2, 8)
    for it in range(1, 9):
        tok = torch.randint(0, 64, (2, 8), generator=g)
        loss = model(tok, pos, attention_mask=mask, labels=tok).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 2 == 0:
            yield it, model, opt


def _saved(rank, out, it):
    """After every rank has saved iteration ``it``: rank 0 records it as Megatron does."""
    torch.distributed.barrier()
    if rank == 0:
        with open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(it))


def train(rank, world, out, port):
    """world ranks, all tensor-parallel; a checkpoint every 2 of 8 iterations, as Megatron's trainer lays them out."""
    from megatron.core import dist_checkpointing

    for it, model, _ in _train(rank, world, port):
        d = os.path.join(out, f"iter_{it:07d}")
        os.makedirs(d, exist_ok=True)
        # what megatron/training/checkpointing.py saves for --ckpt-format torch_dist (model, no optimizer)
        state = {"model": model.sharded_state_dict(), "iteration": it, "checkpoint_version": 3.0,
                 "args": argparse.Namespace(tensor_model_parallel_size=world, iteration=it)}
        dist_checkpointing.save(state, d)
        _saved(rank, out, it)


def train_legacy(rank, world, out, port):
    """As train, but each rank saves what megatron/training's generate_state_dict builds for
    --ckpt-format torch (args, iteration, model, optimizer, scheduler, rng state) with torch.save, at
    iter_N/mp_rank_XX/model_optim_rng.pt (megatron/training is not in the megatron-core wheel)."""
    import random

    import numpy as np
    from megatron.core import parallel_state
    from megatron.core.enums import ModelType

    args = argparse.Namespace(model_type=ModelType.encoder_or_decoder, tensor_model_parallel_size=world,
                              params_dtype=torch.float32, ckpt_format="torch", lr=1e-2)
    for it, model, opt in _train(rank, world, port):
        tp = parallel_state.get_tensor_model_parallel_rank()
        d = os.path.join(out, f"iter_{it:07d}", f"mp_rank_{tp:02d}")
        os.makedirs(d, exist_ok=True)
        rng = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}]
        state = {"args": args, "checkpoint_version": 3.0, "iteration": it,
                 "model": model.state_dict_for_save_checkpoint(), "optimizer": opt.state_dict(),
                 "opt_param_scheduler": {"max_lr": 1e-2, "num_steps": it * 2}, "rng_state": rng}
        torch.save(state, os.path.join(d, "model_optim_rng.pt"))
        _saved(rank, out, it)


def load(out_file, folders, averaged):
    """Megatron's own loading, one process (tensor-parallel 1), saving the model's state_dict after
    each: a torch_dist folder through dist_checkpointing.load, a model_optim_rng.pt through
    torch.load and load_state_dict (as megatron/training does), an average of torch_dist
    checkpoints ("averaged") through the model's sharded state dict (each parameter takes its
    slice of the global tensor Megatron says it holds), an average of legacy files ("flat") through
    load_state_dict."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    _init(0, 1, int(os.environ["PORT"]))
    model = _model(1)
    got = {}
    for f in folders:
        if averaged == "flat":  # an average of model_optim_rng.pt files: the model's own state_dict names
            from safetensors.torch import load_file

            missing, unexpected = model.load_state_dict(load_file(os.path.join(f, "model.safetensors")), strict=False)
            assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        elif f.endswith("model_optim_rng.pt"):  # Megatron's own legacy loading: torch.load, then the model
            model.load_state_dict(torch.load(f, map_location="cpu", weights_only=False)["model"], strict=False)
        elif averaged == "averaged":  # an average of torch_dist checkpoints: Megatron's global checkpoint keys
            from safetensors.torch import load_file

            flat = load_file(os.path.join(f, "model.safetensors"))
            sharded = model.sharded_state_dict()
            sd = {}
            for name, sh in sharded.items():
                if isinstance(sh, ShardedTensor):
                    sd[name] = flat[sh.key][sh.global_slice()].reshape(sh.local_shape)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        else:
            loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, f)
            model.load_state_dict(loaded["model"], strict=False)
        got[f] = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    torch.save(got, out_file)


if __name__ == "__main__":
    if sys.argv[1] in ("train", "legacy"):
        world = int(sys.argv[3])
        mp.spawn(train if sys.argv[1] == "train" else train_legacy, args=(world, sys.argv[2], int(sys.argv[4])),
                 nprocs=world)
    else:
        load(sys.argv[2], sys.argv[4:], sys.argv[3])
'''


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(script: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PORT": str(_free_port())}
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("megatron") / "mg.py"
    p.write_text(SCRIPT)
    return p


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def run(request: pytest.FixtureRequest, script: Path) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    """(run folder, Megatron's own loading of each checkpoint: step → the model's state_dict)."""
    tp = request.param
    out = script.parent / f"tp{tp}"
    _run(script, "train", str(out), str(tp), str(_free_port()))
    assert sorted(p.name for p in out.glob("iter_*")) == [f"iter_{s:07d}" for s in STEPS]
    dump = script.parent / f"tp{tp}.pt"
    _run(script, "load", str(dump), "raw", *(str(out / f"iter_{s:07d}") for s in STEPS))
    loaded = torch.load(dump)
    return out, {s: loaded[str(out / f"iter_{s:07d}")] for s in STEPS}


def _check(script: Path, outs: list[Path], states: dict[int, dict[str, torch.Tensor]],
           weights: list[dict[int, float]], mode: str = "averaged") -> None:
    """Each output, loaded into the model Megatron's way, equals the fp64 weighted average."""
    dump = outs[0].parent / f"{outs[0].name}.loaded.pt"
    _run(script, "load", str(dump), mode, *map(str, outs))
    loaded = torch.load(dump)
    for out, w in zip(outs, weights):
        got = loaded[str(out)]
        total = sum(w.values())
        assert got and set(got) == set(states[STEPS[0]])
        for name, t in got.items():
            want = sum(c * states[s][name].double() for s, c in w.items()) / total
            torch.testing.assert_close(t.double(), want, rtol=1e-6, atol=1e-7, msg=name)


def test_list(run: tuple[Path, dict[int, dict[str, torch.Tensor]]]) -> None:
    folder, _ = run
    result = CliRunner().invoke(cli, ["list", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [c["step"] for c in doc["checkpoints"]] == STEPS
    assert {c["format"] for c in doc["checkpoints"]} == {"dcp"}
    assert any("_extra_state" in n for n in doc["ignored"])  # Megatron's per-layer extra state: bytes, not averaged


def test_merge_window(run: tuple[Path, dict[int, dict[str, torch.Tensor]]], script: Path, tmp_path: Path) -> None:
    folder, states = run
    out = tmp_path / "lawa3"
    result = CliRunner().invoke(cli, ["merge", str(folder), "--window", "3", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    _check(script, [out], states, [dict.fromkeys(STEPS[-3:], 1.0)])


def test_merge_ema_and_series(run: tuple[Path, dict[int, dict[str, torch.Tensor]]], script: Path,
                              tmp_path: Path) -> None:
    folder, states = run
    ema, series, h = tmp_path / "ema", tmp_path / "series", 3.0
    result = CliRunner().invoke(cli, ["merge", str(folder), "--method", "ema", "--half-life", str(h), "-o", str(ema),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["series", str(folder), "--window", "2", "-o", str(series), "--quiet"])
    assert result.exit_code == 0, result.output
    targets = [series / f"step{s}" for s in STEPS[1:]]
    assert sorted(p.name for p in series.iterdir() if not p.name.startswith(".")) == [t.name for t in targets]
    _check(script, [ema, *targets], states,
           [{s: 0.5 ** ((STEPS[-1] - s) / h) for s in STEPS}, *({s - 2: 1.0, s: 1.0} for s in STEPS[1:])])


@pytest.fixture(scope="module")
def legacy(script: Path) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    """A tensor-parallel-1 run in the legacy format, and Megatron's loading of each checkpoint."""
    out = script.parent / "legacy"
    _run(script, "legacy", str(out), "1", str(_free_port()))
    files = [out / f"iter_{s:07d}" / "mp_rank_00" / "model_optim_rng.pt" for s in STEPS]
    dump = script.parent / "legacy.pt"
    _run(script, "load", str(dump), "raw", *map(str, files))
    loaded = torch.load(dump)
    return out, {s: loaded[str(f)] for s, f in zip(STEPS, files)}


def test_legacy_format(legacy: tuple[Path, dict[int, dict[str, torch.Tensor]]], script: Path, tmp_path: Path) -> None:
    folder, states = legacy
    result = CliRunner().invoke(cli, ["list", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    assert [c["step"] for c in json.loads(result.stdout)["checkpoints"]] == STEPS
    lawa, ema, series, h = tmp_path / "lawa3", tmp_path / "ema", tmp_path / "series", 3.0
    for args in (["--window", "3", "-o", str(lawa)], ["--method", "ema", "--half-life", str(h), "-o", str(ema)]):
        result = CliRunner().invoke(cli, ["merge", str(folder), *args, "--quiet"])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["series", str(folder), "--window", "2", "-o", str(series), "--quiet"])
    assert result.exit_code == 0, result.output
    targets = [series / f"step{s}" for s in STEPS[1:]]
    _check(script, [lawa, ema, *targets], states,
           [dict.fromkeys(STEPS[-3:], 1.0), {s: 0.5 ** ((STEPS[-1] - s) / h) for s in STEPS},
            *({s - 2: 1.0, s: 1.0} for s in STEPS[1:])], mode="flat")


def test_legacy_tensor_parallel_ranks_are_refused(script: Path, tmp_path: Path) -> None:
    out = tmp_path / "tp2"
    _run(script, "legacy", str(out), "2", str(_free_port()))
    result = CliRunner().invoke(cli, ["merge", str(out), "--window", "3", "-o", str(tmp_path / "avg")])
    assert result.exit_code == 1
    line = result.output.strip()
    assert "\n" not in line and "iter_0000002: 2 tensor-parallel ranks (mp_rank_00 … mp_rank_01)" in line, line
    assert "torch_dist" in line and not (tmp_path / "avg").exists()
