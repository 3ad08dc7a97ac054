"""Never a silent wrong model, never a hang: inputs built the way users meet them.

By class: (A) files whose tensors only look like a model — a state dict under an unknown key beside
an RNG tensor, DeepSpeed ZeRO-3 placeholders; (B) inputs that used to hang or crash the process —
FIFOs where a file is expected, a ``.bin`` truncated while open, JSON bombs, meta/sparse/quantized
tensors; (C) resource limits — a run of 100 checkpoints under a 64-descriptor limit. Every refusal
is one line naming the file (and the tensor), a non-zero exit, and no output.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import ckptavg
from ckptavg.cli import cli
from ckptavg.errors import CheckpointError, CkptavgError
from conftest import integer_state, tree_hash, write_checkpoint

STEPS = (1, 2, 3)


def _merge(*args: object) -> object:
    return CliRunner().invoke(cli, ["merge", *map(str, args), "-q"])


def _refused(r: object, code: int, *fragments: str) -> str:
    """The CLI failed with ``code`` and one line holding every fragment; returns the line."""
    out = r.output if hasattr(r, "output") else r.stderr  # type: ignore[attr-defined]
    rc = r.exit_code if hasattr(r, "exit_code") else r.returncode  # type: ignore[attr-defined]
    assert rc == code, out
    assert "Traceback" not in out, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _nothing_written(out: Path) -> None:
    assert not os.path.lexists(out)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def _read_output(out: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _assert_mean(out: Path, states: list[dict[str, torch.Tensor]]) -> None:
    got = _read_output(out)
    assert set(got) == set(states[0])
    for k in got:
        assert torch.equal(got[k], torch.stack([s[k] for s in states]).mean(0)), k


# A. Plausible but wrong models ---------------------------------------------------------------


def _sd(base: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return integer_state(base, 100 + i)


# (layout name) -> (what torch.save gets for state dict sd at step i, the --key that holds the model)
WRONG = {
    # an unknown key for the model and a stray tensor beside it: used to merge the RNG state alone
    "unknown-key-beside-rng": (lambda sd, i: {"weights_of_model": sd, "rng_state": torch.arange(16, dtype=torch.uint8)},
                               "weights_of_model"),
    # two small top-level tensors beside the real weights, nested: the nested dict holds the bytes
    "small-tensors-beside-big-dict": (lambda sd, i: {"net": sd, "scale": torch.ones(1), "shift": torch.zeros(1)},
                                      "net"),
    # the model two levels down (EMA weights next to the raw ones): nothing at a known key is a state dict
    "nested-ema": (lambda sd, i: {"model": {"raw": {k: -v for k, v in sd.items()}, "ema": sd}, "step": i},
                   "model.ema"),
}


@pytest.mark.parametrize("layout", sorted(WRONG), ids=sorted(WRONG))
def test_tensors_that_do_not_look_like_a_model_are_refused_until_key_says_where(tmp_path, base_state_dict, layout):
    wrap, key = WRONG[layout]
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    states = []
    for i, s in enumerate(STEPS):
        states.append(_sd(base_state_dict, i))
        torch.save(wrap(states[-1], s), run / f"ckpt_{s}.pt")
    before = tree_hash(run)

    line = _refused(_merge(run, "-o", out), 1, f"{run / 'ckpt_1.pt'}: no state dict found", "top-level keys: ",
                    "--key NAME")
    top = key.split(".")[0]
    assert f"{top} (dict of " in line  # each key listed with what it holds
    _nothing_written(out)
    with pytest.raises(CheckpointError, match="no state dict found"):
        ckptavg.discover(run)

    r = _merge(run, "-o", out, "--key", key)
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    _assert_mean(out, states)
    sd = ckptavg.average(ckptavg.discover(run, key=key), progress=False)
    assert all(torch.equal(sd[k], torch.stack([s[k] for s in states]).mean(0)) for k in states[0])
    # every command that reads a trajectory takes --key: list, and series (each input read again)
    r = CliRunner().invoke(cli, ["list", str(run), "--key", key, "--json"])
    assert r.exit_code == 0 and len(json.loads(r.output)["checkpoints"]) == len(STEPS), r.output
    r = CliRunner().invoke(cli, ["series", str(run), "--window", "2", "--key", key, "-o", str(tmp_path / "lawa"), "-q"])
    assert r.exit_code == 0, r.output
    _assert_mean(tmp_path / "lawa" / "step3", states[1:])
    assert tree_hash(run) == before


def test_a_key_that_leads_nowhere_lists_what_is_there(tmp_path, base_state_dict):
    run = tmp_path / "run"
    run.mkdir()
    for i, s in enumerate(STEPS):
        torch.save({"model": {"raw": _sd(base_state_dict, i), "ema": _sd(base_state_dict, i)}, "step": s},
                   run / f"ckpt_{s}.pt")
    _refused(_merge(run, "-o", tmp_path / "out", "--key", "model.emma"), 1,
             f"{run / 'ckpt_1.pt'}: --key model.emma: no key 'emma' in model", "raw (dict of", "ema (dict of")
    _refused(_merge(run, "-o", tmp_path / "out", "--key", "step"), 1, "--key step holds no model state dict (int)")
    _nothing_written(tmp_path / "out")


def test_key_on_a_safetensors_run_is_a_usage_error(make_run, tmp_path):
    run, _ = make_run("safetensors", steps=STEPS)
    _refused(_merge(run, "-o", tmp_path / "out", "--key", "model"), 2, "--key applies to .bin/.pt")
    with pytest.raises(ckptavg.UsageError):
        ckptavg.discover(run, key="model")


@pytest.mark.parametrize("layout", ["nanogpt", "optimizer-saved-first", "lightning", "flat-with-extra"], ids=str)
def test_the_usual_trainer_layouts_need_no_key(tmp_path, base_state_dict, layout):
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    states = []
    for i, s in enumerate(STEPS):
        sd = states.append(_sd(base_state_dict, i)) or states[-1]
        moments = {k: torch.randn(v.shape) for k, v in sd.items()}  # optimizer state: as many bytes as the model
        obj = {
            "nanogpt": {"model": sd, "optimizer": {"state": moments}, "iter_num": s},
            # Adam moments of the model's exact sizes stored before it: reading them instead is a plausible model
            "optimizer-saved-first": {"optimizer": {"state": moments}, "model": sd},
            "lightning": {"state_dict": sd, "optimizer_states": [moments, moments], "epoch": 1},
            "flat-with-extra": {**sd, "_step": s},  # a plain state dict with one non-tensor entry
        }[layout]
        torch.save(obj, run / f"ckpt_{s}.pt")
    r = _merge(run, "-o", out)
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    _assert_mean(out, states)


def _zero3_model_states(path: Path, sd: dict[str, torch.Tensor], step: int, optim: bool = False) -> None:
    """``zero_pp_rank_0_mp_rank_00_model_states.pt`` with the keys and types DeepSpeed 0.19.8's
    ``save_checkpoint`` writes under ZeRO-3 (inspected from a real CPU run): ``module`` holds 0-element
    placeholders, the real shapes are in ``param_shapes`` (a list of dicts, one per param group).
    ``optim``: an optimizer-state file beside it that holds the weights but says no ZeRO stage."""
    from collections import OrderedDict

    path.mkdir(parents=True)
    torch.save({
        "module": OrderedDict((k, torch.empty(0, dtype=v.dtype)) for k, v in sd.items()),
        "buffer_names": [], "optimizer": None,
        "param_shapes": [OrderedDict((k, v.shape) for k, v in sd.items())],
        "frozen_param_shapes": OrderedDict(), "shared_params": {}, "frozen_param_fragments": OrderedDict(),
        "lr_scheduler": None, "data_sampler": None, "random_ltd": None, "skipped_steps": 0, "global_steps": step,
        "global_samples": 2 * step, "dp_world_size": 1, "mp_world_size": 1, "checkpoint_parallel_dimensions": {},
        "ds_config": {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}}, "ds_version": "0.19.8",
    }, path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    flat = torch.cat([v.reshape(-1).float() for v in sd.values()])  # where ZeRO-3 really keeps the weights
    if optim:
        torch.save({"optimizer_state_dict": {"fp32_flat_groups": [flat]}, "ds_version": "0.19.8"},
                   path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def test_deepspeed_zero3_placeholders_beside_optimizer_states_without_a_stage_are_refused(tmp_path, base_state_dict):
    """Optimizer states that say no ZeRO stage (DeepSpeed's stage-0 bf16 optimizer) are not read as
    ZeRO partitions: the model-states file is read as saved, and its placeholders are refused."""
    run, out = tmp_path / "run", tmp_path / "out"
    for i, s in enumerate(STEPS):
        _zero3_model_states(run / f"global_step{s}", _sd(base_state_dict, i), s, optim=True)
    f = run / "global_step1" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    _refused(_merge(run, "-o", out), 1, f"{f}: tensor", "DeepSpeed ZeRO-3 placeholder")
    _nothing_written(out)


def test_deepspeed_zero3_placeholders_without_optimizer_states_are_refused(tmp_path, base_state_dict):
    run, out = tmp_path / "run", tmp_path / "out"
    for i, s in enumerate(STEPS):
        _zero3_model_states(run / f"global_step{s}", _sd(base_state_dict, i), s)
    (run / "latest").write_text("global_step3")
    first = next(iter(base_state_dict))
    f = run / "global_step1" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    _refused(_merge(run, "-o", out), 1, f"{f}: tensor {first!r} is empty but the file's param_shapes give",
             "DeepSpeed ZeRO-3 placeholder", "zero_to_fp32.py")
    _nothing_written(out)
    with pytest.raises(CheckpointError, match="ZeRO-3 placeholder"):
        ckptavg.discover(run / "global_step2")


DS_TRAIN = textwrap.dedent("""
    import os, sys
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch, deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
           "zero_allow_untested_optimizer": True, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    for step in (1, 2, 3):
        engine.backward(engine(torch.randn(2, 8)).pow(2).mean())
        engine.step()
        engine.save_checkpoint(sys.argv[1], tag=f"global_step{step}")
    torch.distributed.destroy_process_group()  # a clean exit: gloo's threads down before the interpreter's
""")


@pytest.mark.slow
def test_real_deepspeed_zero3_checkpoint_without_its_optimizer_states_is_refused(tmp_path):
    """With its optimizer states a real ZeRO-3 run averages the fp32 master weights (equal to DeepSpeed's
    own consolidation; tests/test_tools_deepspeed.py covers every stage); without them it is refused."""
    pytest.importorskip("deepspeed")
    run = tmp_path / "ds"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0"}
    r = subprocess.run([sys.executable, "-c", DS_TRAIN, str(run), str(29500 + os.getpid() % 400)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    r = _merge(run, "--window", "2", "-o", tmp_path / "avg")
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    states = [{k: v.detach() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(run), tag=f"global_step{s}").items()}
              for s in (2, 3)]
    got = _read_output(tmp_path / "avg")
    for k, t in got.items():
        torch.testing.assert_close(t, (states[0][k].double() + states[1][k].double()).div(2).float(), rtol=1e-6, atol=0)
    for f in run.glob("global_step*/*_optim_states.pt"):
        f.unlink()
    f = run / "global_step1" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    _refused(_merge(run, "-o", tmp_path / "out"), 1, f"{f}: tensor '0.weight' is empty", "DeepSpeed ZeRO-3 placeholder")
    _nothing_written(tmp_path / "out")


def _empty_everywhere(run: Path, base: dict, step: int, i: int) -> dict:
    return {k: (torch.empty(0, dtype=v.dtype) if v.is_floating_point() else v) for k, v in _sd(base, i).items()}


# (case) -> (state dict of step s given base and index i, format, file named, expected fragment)
EMPTY = {
    "every-float-empty": (lambda base, s, i: _empty_everywhere(Path(), base, s, i), "safetensors",
                          "step1/model.safetensors", "as has every floating tensor"),
    "empty-where-another-step-has-data": (  # nanoGPT files: no config.json to say what the model holds
        lambda base, s, i: {**_sd(base, i), "gpt_neox.embed_in.weight": torch.empty(0)} if s == 2 else _sd(base, i),
        "pt-file", "ckpt_2.pt", "has 0 elements but step 1 has shape"),
    "empty-weight-beside-config": (lambda base, s, i: {**_sd(base, i), "extra.weight": torch.empty(0)}, "safetensors",
                                   "step1/model.safetensors", "config.json describes a model"),
}


@pytest.mark.parametrize("case", sorted(EMPTY), ids=sorted(EMPTY))
def test_empty_tensors_where_data_is_expected_are_refused(tmp_path, base_state_dict, case):
    make, fmt, fname, fragment = EMPTY[case]
    run, out = tmp_path / "run", tmp_path / "out"
    for i, s in enumerate(STEPS):
        write_checkpoint(run, s, make(base_state_dict, s, i), fmt)
    _refused(_merge(run, "-o", out), 1, f"{run / fname}: tensor '", fragment, "DeepSpeed ZeRO-3 placeholder")
    _nothing_written(out)


def _megatron_like(sd: dict[str, torch.Tensor], step: int, extra: dict) -> dict:
    """What megatron/training's generate_state_dict puts beside the model (--ckpt-format torch)."""
    import argparse
    import io
    import random

    import numpy as np

    return {"args": argparse.Namespace(iteration=step, lr=1e-3, params_dtype=torch.bfloat16),
            "checkpoint_version": 3.0, "iteration": step, "model": {**sd, "layer._extra_state": io.BytesIO(b"te")},
            "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                           "torch_rng_state": torch.get_rng_state()}], **extra}


def test_megatron_records_load_but_object_arrays_are_refused(tmp_path, base_state_dict):
    """numpy's RNG state (a uint32 array) and Transformer Engine's BytesIO load through the allow-list;
    a numpy object array, which would unpickle arbitrary objects, is still refused in one line."""
    import numpy as np

    run, out = tmp_path / "run", tmp_path / "out"
    states = [_sd(base_state_dict, i) for i in range(len(STEPS))]
    for s, sd in zip(STEPS, states):
        (run / f"iter_{s:07d}" / "mp_rank_00").mkdir(parents=True)
        torch.save(_megatron_like(sd, s, {}), run / f"iter_{s:07d}" / "mp_rank_00" / "model_optim_rng.pt")
    r = _merge(run, "-o", out)
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    _assert_mean(out, states)
    f = run / f"iter_{STEPS[1]:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    torch.save(_megatron_like(states[1], STEPS[1], {"odd": np.array([1, "x"], dtype=object)}), f)
    # numpy ≥ 1.25 pickles the dtype as numpy.dtypes.ObjectDType, older numpy as numpy.dtype[object_]
    named = "ObjectDType" if hasattr(getattr(np, "dtypes", None), "ObjectDType") else "dtype[object_]"
    _refused(_merge(run, "-o", tmp_path / "out2"), 1, f"{f}: not a readable torch checkpoint", named)
    _nothing_written(tmp_path / "out2")


# B. Hangs and crashes become one-line errors ---------------------------------------------------


def _fifo(p: Path) -> Path:
    if p.exists():
        p.unlink()
    os.mkfifo(p)
    return p


# (case) -> (format of the run, builds the FIFO in the run and returns it, the path to merge)
FIFOS = {
    "model.safetensors": ("safetensors", lambda run: _fifo(run / "step2" / "model.safetensors"), None),
    "pytorch_model.bin": ("bin", lambda run: _fifo(run / "step2" / "pytorch_model.bin"), None),
    "index.json": ("safetensors-sharded", lambda run: _fifo(run / "step2" / "model.safetensors.index.json"), None),
    "config.json": ("safetensors", lambda run: _fifo(run / "step2" / "config.json"), None),
    "ckpt_2.pt": ("pt-file", lambda run: _fifo(run / "ckpt_2.pt"), None),
    "the-path-given": ("safetensors", lambda run: _fifo(run.parent / "model.safetensors"), "fifo"),
}


@pytest.mark.parametrize("case", sorted(FIFOS), ids=sorted(FIFOS))
def test_a_fifo_where_a_file_is_expected_is_refused_not_waited_on(tmp_path, base_state_dict, case):
    fmt, make, target = FIFOS[case]
    run, out = tmp_path / "run", tmp_path / "out"
    for i, s in enumerate(STEPS):
        write_checkpoint(run, s, _sd(base_state_dict, i), fmt)
    fifo = make(run)
    # a subprocess with a timeout: a regression must fail the test, not hang the suite
    r = subprocess.run([sys.executable, "-m", "ckptavg", "merge", str(fifo if target else run), "-o", str(out), "-q"],
                       capture_output=True, text=True, timeout=120)
    _refused(r, 1, f"{fifo}: is a FIFO, not a regular file")
    _nothing_written(out)


TRUNCATE = textwrap.dedent("""
    import subprocess, sys
    from pathlib import Path
    from ckptavg.errors import CheckpointError
    from ckptavg.io.readers import CheckpointReader
    path, name, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    with CheckpointReader([path], "torch") as r:
        r.read(other, 0, 4)  # open and reading
        subprocess.run([sys.executable, "-c", f"import os; os.truncate({str(path)!r}, 4096)"], check=True)
        try:
            r.read(name)
        except CheckpointError as e:
            print(e)
""")


@pytest.mark.parametrize("name", ["strided", "contiguous"])
def test_a_bin_truncated_by_another_process_while_open_is_an_error_not_sigbus(tmp_path, name):
    big = torch.arange(1 << 20, dtype=torch.float32).reshape(1024, 1024)
    p = tmp_path / "pytorch_model.bin"
    torch.save({"strided": big.t(), "contiguous": big.clone()}, p)  # .t(): a view read through its storage
    other = "contiguous" if name == "strided" else "strided"
    r = subprocess.run([sys.executable, "-c", TRUNCATE, str(p), name, other], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"killed by signal {-r.returncode}" if r.returncode < 0 else r.stderr
    assert r.stdout.strip() == f"{p}: file ended while reading tensor {name!r} (truncated while being read?)"


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _st_with_header(path: Path, header_text: str) -> None:
    raw = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def _set_json(path: Path, text: str) -> None:
    path.write_text(text)


# (case) -> (format, edit of step2 given its folder, file named, fragment)
BOMBS = {
    "st-header-nested-100k-deep": ("safetensors", lambda d: _st_with_header(
        d / "model.safetensors", '{"a": ' + _deep(100_000) + "}"), "model.safetensors", "nested too deeply"),
    "st-header-5000-digit-int": ("safetensors", lambda d: _st_with_header(
        d / "model.safetensors", '{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}'),
        "model.safetensors", "not UTF-8 JSON"),
    "st-header-shape-past-u64": ("safetensors", lambda d: _st_with_header(
        d / "model.safetensors", '{"a": {"dtype": "F32", "shape": [' + str(2**70) + '], "data_offsets": [0, 4]}}'),
        "model.safetensors", "bad shape"),
    "index-nested-100k-deep": ("safetensors-sharded", lambda d: _set_json(
        d / "model.safetensors.index.json", '{"weight_map": ' + _deep(100_000) + "}"),
        "model.safetensors.index.json", "nested too deeply"),
    "index-5000-digit-int": ("safetensors-sharded", lambda d: _set_json(
        d / "model.safetensors.index.json", '{"metadata": {"total_size": ' + "9" * 5000 + '}, "weight_map": {}}'),
        "model.safetensors.index.json", "not a valid index file"),
    "config-nested-100k-deep": ("safetensors", lambda d: _set_json(d / "config.json", _deep(100_000)),
                                "config.json", "nested too deeply"),
    "config-5000-digit-int": ("safetensors", lambda d: _set_json(d / "config.json", '{"hidden_size": ' + "9" * 5000 + "}"),
                              "config.json", "not a valid config.json"),
}


@pytest.mark.parametrize("case", sorted(BOMBS), ids=sorted(BOMBS))
def test_json_bombs_are_one_line_errors_naming_the_file(tmp_path, base_state_dict, case):
    fmt, edit, fname, fragment = BOMBS[case]
    run, out = tmp_path / "run", tmp_path / "out"
    for i, s in enumerate(STEPS):
        write_checkpoint(run, s, _sd(base_state_dict, i), fmt)
    edit(run / "step2")
    for args in ([], ["--dtype", "bfloat16"]):  # --dtype rewrites the copied config.json
        _refused(_merge(run, "-o", out, *args), 1, f"{run / 'step2' / fname}: ", fragment)
        _nothing_written(out)
    with pytest.raises(CkptavgError, match=fragment):
        ckptavg.discover(run)


ODD = {
    "meta": (lambda: torch.empty(4, 4, device="meta"), "is on device meta"),
    "sparse-coo": (lambda: torch.eye(4).to_sparse(), "has layout torch.sparse_coo"),
    "sparse-csr": (lambda: torch.eye(4).to_sparse_csr(), "has layout torch.sparse_csr"),
    "quantized": (lambda: torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 0, torch.qint8), "is quantized (qint8)"),
}


@pytest.mark.parametrize("case", sorted(ODD), ids=sorted(ODD))
def test_meta_sparse_and_quantized_tensors_are_refused_by_name(tmp_path, base_state_dict, case):
    make, fragment = ODD[case]
    run, out = tmp_path / "run", tmp_path / "out"
    for i, s in enumerate(STEPS):
        sd = _sd(base_state_dict, i)
        write_checkpoint(run, s, {**sd, "odd.weight": make()} if s == 2 else {**sd, "odd.weight": torch.eye(4)}, "bin")
    _refused(_merge(run, "-o", out), 1, f"{run / 'step2' / 'pytorch_model.bin'}: tensor 'odd.weight' {fragment}")
    _nothing_written(out)


# C. Resource limits -----------------------------------------------------------------------------


def test_fd_pool_keeps_at_most_capacity_files_open(tmp_path):
    from ckptavg.io.files import FdPool, LazyFd

    pool = FdPool(capacity=3)
    files = []
    for i in range(10):
        (tmp_path / f"f{i}").write_bytes(bytes([i]) * 8)
        files.append(LazyFd(tmp_path / f"f{i}", pool=pool))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        for i, f in enumerate(files):
            with f.use() as fd:
                assert os.pread(fd, 8, 0) == bytes([i]) * 8
            assert pool.open_count <= 3
            assert len(os.listdir("/proc/self/fd")) - before <= 3
    for f in files:
        f.close()
    assert pool.open_count == 0 and len(os.listdir("/proc/self/fd")) == before


N_CKPTS, WINDOW, FD_LIMIT = 100, 5, 64


def _limit_fds() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@pytest.mark.parametrize("fmt", ["safetensors", pytest.param("bin", marks=pytest.mark.slow)])  # bin: 100 torch.loads
def test_series_over_100_checkpoints_fits_in_64_descriptors(tmp_path, fmt):
    run, out = tmp_path / "run", tmp_path / "out"
    states = {}
    for s in range(1, N_CKPTS + 1):
        states[s] = {"w": torch.full((3, 4), float(s)), "b": torch.arange(4.0) * s}
        d = run / f"step{s}"
        d.mkdir(parents=True)
        if fmt == "safetensors":
            save_file(states[s], d / "model.safetensors")
        else:
            torch.save(states[s], d / "pytorch_model.bin")
    cmd = [sys.executable, "-m", "ckptavg", "series", str(run), "--window", str(WINDOW), "-o", str(out), "-q",
           "--no-fsync", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, preexec_fn=_limit_fds)
    assert r.returncode == 0, r.stderr
    outputs = json.loads(r.stdout)["outputs"]
    assert [o["step"] for o in outputs] == list(range(WINDOW, N_CKPTS + 1))
    for step in (WINDOW, 50, N_CKPTS):
        _assert_mean(out / f"step{step}", [states[s] for s in range(step - WINDOW + 1, step + 1)])
    merged = tmp_path / "all"
    r = subprocess.run([sys.executable, "-m", "ckptavg", "merge", str(run), "-o", str(merged), "-q", "--no-fsync"],
                       capture_output=True, text=True, timeout=600, preexec_fn=_limit_fds)
    assert r.returncode == 0, r.stderr
    _assert_mean(merged, list(states.values()))


def test_a_header_read_again_is_shared_only_while_the_file_is_unchanged(tmp_path):
    from ckptavg.io.safetensors import read_header

    p = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, p)
    first, _ = read_header(p)
    assert read_header(p)[0] is first  # a merge's readers reuse what discovery parsed
    with open(p, "r+b") as f:  # rewritten in place, same size and inode: the names swapped
        raw = f.read()
        f.seek(0)
        f.write(raw.replace(b'"a"', b'"x"'))
    again, _ = read_header(p)
    assert again is not first and set(again) == {"x", "b"} and set(first) == {"a", "b"}
