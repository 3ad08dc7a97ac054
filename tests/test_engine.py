"""The streamed average equals an independent computation, for every input layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ckptavg
from ckptavg import engine
from ckptavg.errors import CkptavgError
from ckptavg.selection import Selection
from conftest import FORMATS, HEAD, tiny_config


def load_output(out: Path) -> dict[str, torch.Tensor]:
    """Read an output directory back with safetensors itself (index-aware)."""
    idx = out / "model.safetensors.index.json"
    if idx.exists():
        files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(out / f, framework="pt") as fh:
            for k in fh.keys():
                sd[k] = fh.get_tensor(k)
    return sd


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMATS)
def test_uniform_window_equals_stack_mean_for_every_format(make_run, tmp_path, fmt):
    root, states = make_run(fmt, steps=(10, 20, 30, 40, 50, 60))
    traj = ckptavg.discover(root)
    assert traj.steps == [10, 20, 30, 40, 50, 60]
    out = ckptavg.average(traj.window(4, at=50), tmp_path / "out", progress=False)
    got = load_output(out)
    for name in states[50]:
        oracle = torch.stack([states[s][name] for s in (20, 30, 40, 50)]).mean(0)
        assert torch.equal(got[name], oracle), name
    man = json.loads((out / "ckptavg.json").read_text())
    assert [i["step"] for i in man["inputs"]] == [20, 30, 40, 50]
    assert [i["weight"] for i in man["inputs"]] == [0.25] * 4


def test_window_of_five_random_values_close_to_float64_oracle(make_run, tmp_path):
    root, states = make_run("safetensors", values="random")
    out = ckptavg.average(ckptavg.discover(root).last(5), tmp_path / "o", progress=False)
    got = load_output(out)
    for name, t in got.items():
        oracle = torch.stack([states[s][name].double() for s in states]).mean(0)
        torch.testing.assert_close(t.double(), oracle, rtol=1e-6, atol=1e-7)


def test_ema_half_life_matches_closed_form_weights(make_run, tmp_path):
    steps = (0, 1, 2, 4, 8, 16, 512, 1000)  # Pythia-like log spacing, then regular
    root, states = make_run("safetensors", steps=steps, values="random")
    h = 300.0
    out = ckptavg.average(ckptavg.discover(root), tmp_path / "ema", method="ema", half_life=h, progress=False)
    raw = [0.5 ** ((1000 - s) / h) for s in steps]
    w = [x / sum(raw) for x in raw]
    got = load_output(out)
    for name, t in got.items():
        oracle = sum(wi * states[s][name].double() for wi, s in zip(w, steps))
        torch.testing.assert_close(t.double(), oracle, rtol=1e-6, atol=1e-6)
    man = json.loads((out / "ckptavg.json").read_text())
    assert man["method"] == {"name": "ema", "half_life": h}
    assert [i["weight"] for i in man["inputs"]] == pytest.approx(w)


def test_ema_decay_is_the_recursive_ema_with_bias_correction(make_run):
    root, states = make_run("safetensors", values="random", steps=(1, 2, 3, 4))
    beta = 0.7
    sd = ckptavg.average(ckptavg.discover(root), method="ema", decay=beta, progress=False)
    name = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"
    e = torch.zeros_like(states[1][name], dtype=torch.float64)
    for s in (1, 2, 3, 4):  # the training-loop EMA, zero-initialised, then debiased
        e = beta * e + (1 - beta) * states[s][name].double()
    oracle = e / (1 - beta**4)
    torch.testing.assert_close(sd[name].double(), oracle, rtol=1e-6, atol=1e-6)


def test_weighted_explicit_weights(make_run):
    root, states = make_run("bin", steps=(1, 2, 3))
    sd = ckptavg.average(ckptavg.discover(root), method="weighted", weights=[1, 1, 2], progress=False)
    for name, t in sd.items():
        oracle = (states[1][name] + states[2][name] + 2 * states[3][name]) / 4
        assert torch.equal(t, oracle), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_accumulates_in_fp32_and_rounds_like_torch(make_run, dtype):
    root, states = make_run("safetensors", dtype=dtype, values="random", steps=tuple(range(1, 9)))
    sd = ckptavg.average(ckptavg.discover(root), progress=False)
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    oracle = torch.stack([states[s][name].float() for s in states]).mean(0).to(dtype)
    assert sd[name].dtype == dtype
    assert torch.equal(sd[name], oracle)
    # Summing in the input dtype (fairseq's script) would not give this result.
    naive = states[1][name].clone()
    for s in range(2, 9):
        naive += states[s][name]
    assert not torch.equal(naive / 8, oracle)


@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_tensors_are_averaged_and_the_manifest_says_what_was_copied(tmp_path, fp8):
    """fp8 weights used to be copied from the newest input while the manifest said "averaged".
    Four inputs: every sum of fp8 values is exact in fp32 and /4 is exact, so the mean is exact and
    its rounding to fp8 (ties to even, which happen often here) must match torch's cast bit for bit."""
    from safetensors.torch import save_file

    dt = getattr(torch, fp8)
    g = torch.Generator().manual_seed(0)
    states = {}
    for step in (1, 2, 3, 4):
        w = (torch.randn(64, 48, generator=g) * 8).to(dt)
        states[step] = {"w": w, "mask": torch.full((4,), step, dtype=torch.int64)}
        d = tmp_path / "run" / f"step{step}"
        d.mkdir(parents=True)
        save_file(states[step], d / "model.safetensors")
    out = ckptavg.average(ckptavg.discover(tmp_path / "run"), tmp_path / "o", progress=False)
    got = load_file(out / "model.safetensors")
    want = torch.stack([states[s]["w"].float() for s in states]).mean(0).to(dt)
    assert got["w"].dtype == dt
    assert torch.equal(got["w"].view(torch.uint8), want.view(torch.uint8))
    assert not torch.equal(got["w"].view(torch.uint8), states[4]["w"].view(torch.uint8))
    assert torch.equal(got["mask"], states[4]["mask"])  # integers: the newest, and the record says so
    record = json.loads((out / "ckptavg.json").read_text())
    assert record["tensors"] == {"averaged": 1, "copied_from_newest": ["mask"]}


def test_output_dtype_conversion_and_config_dtype(make_run, tmp_path):
    root, states = make_run("safetensors", values="random", steps=(1, 2))
    out = ckptavg.average(ckptavg.discover(root), tmp_path / "bf", dtype="bf16", progress=False)
    got = load_output(out)
    name = HEAD
    oracle = ((states[1][name] + states[2][name]) / 2).to(torch.bfloat16)
    assert torch.equal(got[name], oracle)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_non_floating_buffers_are_copied_from_the_newest(make_run):
    extra = {
        "gpt_neox.layers.0.attention.bias": lambda i: torch.tril(torch.ones(8, 8, dtype=torch.bool)) ^ (i % 2 == 1),
        "step_counter": lambda i: torch.tensor([i * 7], dtype=torch.int64),
    }
    root, states = make_run("bin", steps=(1, 2, 3), extra=extra)
    sd = ckptavg.average(ckptavg.discover(root), progress=False)
    for k in extra:
        assert sd[k].dtype == states[3][k].dtype
        assert torch.equal(sd[k], states[3][k])


def test_sharded_output_has_index_and_same_values(make_run, tmp_path):
    root, states = make_run("safetensors-sharded", steps=(1, 2))
    out = ckptavg.average(ckptavg.discover(root), tmp_path / "sh", max_shard_size="20KB", progress=False)
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = 0
    for f in shards:
        with safe_open(out / f, framework="pt") as fh:
            for k in fh.keys():
                assert idx["weight_map"][k] == f
                total += fh.get_tensor(k).numel() * 4
    assert idx["metadata"]["total_size"] == total
    got = load_output(out)
    assert set(got) == set(states[1])
    for k, t in got.items():
        assert torch.equal(t, (states[1][k] + states[2][k]) / 2)


def test_fp64_accumulation_option(make_run):
    root, states = make_run("safetensors", values="random", steps=(1, 2, 3))
    sd = ckptavg.average(ckptavg.discover(root), accumulate="float64", progress=False)
    name = HEAD
    oracle = torch.stack([states[s][name].double() for s in (1, 2, 3)]).mean(0).float()
    assert torch.equal(sd[name], oracle)


def test_chunking_does_not_change_the_result(make_run, monkeypatch):
    root, states = make_run("bin", values="random", steps=(1, 2, 3))
    whole = ckptavg.average(ckptavg.discover(root), progress=False)
    monkeypatch.setattr(engine, "CHUNK_ELEMS", 37)  # odd sizes: chunks and their blocks straddle rows
    monkeypatch.setattr(engine, "MERGE_CHUNK", 100)
    small = ckptavg.average(ckptavg.discover(root), progress=False)
    for k in whole:
        assert torch.equal(whole[k], small[k]), k


def test_output_loads_with_transformers_and_logits_match_independent_average(make_run, tmp_path):
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

    root, states = make_run("bin", values="random", steps=(1, 2, 3, 4))
    out = ckptavg.average(ckptavg.discover(root).last(3), tmp_path / "hf", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out)
    ref = GPTNeoXForCausalLM(tiny_config())
    avg = {k: torch.stack([states[s][k] for s in (2, 3, 4)]).mean(0) for k in states[4]}
    ref.load_state_dict(avg, strict=False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_nonfinite_values_are_refused_naming_step_and_tensor(make_run, tmp_path):
    root, states = make_run("safetensors", steps=(1, 2, 3))
    from safetensors.torch import save_file

    bad = dict(states[2])
    bad[HEAD] = bad[HEAD].clone()
    bad[HEAD][3, 3] = float("nan")
    save_file(bad, root / "step2" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CkptavgError, match=rf"step 2 .*'{HEAD}'.*NaN"):
        ckptavg.average(ckptavg.discover(root), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    sd = ckptavg.average(ckptavg.discover(root), allow_nonfinite=True, progress=False)
    assert torch.isnan(sd[HEAD][3, 3])


def test_state_dict_sink_equals_directory_output(make_run, tmp_path):
    root, _ = make_run("safetensors", values="random")
    traj = ckptavg.discover(root).last(3)
    sd = ckptavg.average(traj, progress=False)
    out = load_file(ckptavg.average(traj, tmp_path / "d", progress=False) / "model.safetensors")
    assert sd.keys() == out.keys()
    for k in sd:
        assert torch.equal(sd[k], out[k])


def test_manifest_hashes_and_configs_come_from_the_newest(make_run, tmp_path):
    import hashlib

    root, _ = make_run("safetensors-sharded", steps=(1, 2, 3))
    (root / "step3" / "tokenizer.json").write_text('{"newest": true}')
    (root / "step1" / "tokenizer.json").write_text('{"newest": false}')
    (root / "step3" / "optimizer.pt").write_bytes(b"not copied")
    out = ckptavg.average(ckptavg.discover(root), tmp_path / "m", hash_inputs=True, progress=False)
    assert json.loads((out / "tokenizer.json").read_text()) == {"newest": True}
    assert not (out / "optimizer.pt").exists()
    man = json.loads((out / "ckptavg.json").read_text())
    for entry in man["inputs"]:
        for fname, digest in entry["sha256"].items():
            assert digest == hashlib.sha256((Path(entry["location"]) / fname).read_bytes()).hexdigest()
    assert set(man["files"]) == {p.name for p in out.iterdir()}


def _run_of(tmp_path, values: dict[int, dict[str, torch.Tensor]]):
    from safetensors.torch import save_file

    for step, sd in values.items():
        (tmp_path / "run" / f"step{step}").mkdir(parents=True)
        save_file(sd, tmp_path / "run" / f"step{step}" / "model.safetensors")
    return ckptavg.discover(tmp_path / "run")


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the overflow is expected and handled: no warning, on any thread
@pytest.mark.parametrize("threads", [1, 2])
def test_finite_inputs_whose_fp32_sum_overflows_still_average_exactly(tmp_path, threads):
    big = torch.tensor([3e38, -3e38, 1.0, 3.4e38])
    traj = _run_of(tmp_path, {1: {"w": big}, 2: {"w": big.clone()}, 3: {"w": big * 0.5}})
    got = ckptavg.average(traj, progress=False, threads=threads)["w"]  # the fp32 running sum reaches 7.5e38: inf
    assert torch.isfinite(got).all()
    assert torch.equal(got, torch.stack([big.double(), big.double(), (big * 0.5).double()]).mean(0).float())
    from ckptavg.series import iter_series, series

    # The in-memory and on-disk series too: their fp32 sums overflow the same way.
    [(_, sd)] = list(iter_series(traj, Selection(window=3), threads=threads))
    assert torch.equal(sd["w"], got)
    [o] = series(traj, tmp_path / "s", Selection(window=3), progress=False, threads=threads)
    assert torch.equal(load_file(o.path / "model.safetensors")["w"], got)


def test_iter_series_names_the_step_that_holds_nan(tmp_path):
    ok = torch.tensor([1.0, 2.0])
    traj = _run_of(tmp_path, {1: {"w": ok}, 2: {"w": torch.tensor([1.0, float("nan")])}, 3: {"w": ok}})
    from ckptavg.series import iter_series

    with pytest.raises(ckptavg.NonFiniteError, match=r"step 2: tensor 'w' holds NaN/Inf; refusing to average it into step 3"):
        list(iter_series(traj, Selection(window=2, steps=[3])))


def test_a_cast_that_overflows_is_refused_naming_tensor_and_dtype(tmp_path):
    traj = _run_of(tmp_path, {1: {"w": torch.tensor([1e5, 1.0])}, 2: {"w": torch.tensor([1e5, 3.0])}})
    with pytest.raises(ckptavg.NonFiniteError, match=r"tensor 'w': the average reaches 1e\+05, beyond float16's range"):
        ckptavg.average(traj, tmp_path / "o", dtype="float16", progress=False)
    assert not (tmp_path / "o").exists()
    assert ckptavg.average(traj, dtype="bfloat16", progress=False)["w"].tolist() == [99840.0, 2.0]  # bf16 holds it
    from ckptavg.series import iter_series

    with pytest.raises(ckptavg.NonFiniteError, match="beyond float16's range"):
        next(iter_series(traj, Selection(window=2), dtype="float16"))


def test_float64_checkpoints_are_averaged_in_float64(tmp_path):
    xs = [torch.tensor([1.0 + 1e-10, 1.0 + 3e-10], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)]
    traj = _run_of(tmp_path, {1: {"w": xs[0]}, 2: {"w": xs[1]}})
    got = ckptavg.average(traj, progress=False)["w"]  # fp32 would round both to 1.0
    assert got.dtype == torch.float64 and torch.equal(got, torch.stack(xs).mean(0))


def test_outputs_reach_the_disk_before_they_appear(make_run, tmp_path, monkeypatch):
    """Durability: every output file and the folder are fsynced before the rename that makes the
    output visible, and the parent after it (so a power loss never shows a folder of empty files)."""
    import os

    root, _ = make_run("safetensors", steps=(1, 2))
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(os, "rename", lambda a, b: events.append(("rename", str(b))) or real_rename(a, b))
    out = ckptavg.average(ckptavg.discover(root), tmp_path / "o", progress=False)
    rename = events.index(("rename", str(out)))
    synced = {Path(p).name for kind, p in events[:rename] if kind == "fsync"}
    assert {p.name for p in out.iterdir()} <= synced  # every file, before the rename
    assert any(kind == "fsync" and Path(p).name.startswith(".o.ckptavg-tmp-") for kind, p in events[:rename])
    assert ("fsync", str(tmp_path)) in events[rename:]
    events.clear()
    ckptavg.average(ckptavg.discover(root), tmp_path / "fast", fsync=False, progress=False)
    assert not [e for e in events if e[0] == "fsync"]


@pytest.mark.parametrize("acc", ["float32", "float64"])
@pytest.mark.parametrize("name", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("k", [1, 2, 4, 5, 9])
def test_rows_summed_at_once_give_the_bits_of_adding_one_by_one(acc, name, k):
    """RunningAverage.add_rows (k inputs converted in one call, summed by grouped reductions)
    against add() input by input: -0.0, NaN, Inf, overflow and mixed magnitudes, uniform and
    weighted, with groups smaller than k (the sum so far leads each later group)."""
    import numpy as np

    from ckptavg.io.dtypes import DTYPES
    from ckptavg.io.kernels import NUMPY

    rng = np.random.default_rng(k)
    dt, n = DTYPES[name], 3000
    x = (rng.standard_normal((k, n)) * 10.0 ** rng.integers(-4, 4, (k, 1))).astype(np.float32)
    x[:, :5] = -0.0
    x[0, 5] = 0.0
    x[:, 6] = np.inf
    x[k // 2, 7] = np.nan
    x[:, 8] = 6e4 if name == "F16" else 3e38  # overflows the sum
    raws = NUMPY.from_acc(x, dt) if name != "F32" else x
    # weights as numpy float64 and as Python floats: numpy promotes the two differently (NEP 50)
    for weights in ([1.0] * k, list(rng.uniform(0.1, 2.0, k)), [float(w) for w in rng.uniform(0.1, 2.0, k)]):
        one, rows = engine.RunningAverage(n, acc), engine.RunningAverage(n, acc)
        with np.errstate(over="ignore", invalid="ignore"):
            for r, w in zip(raws, weights):
                one.add(r, dt, w)
            rows.add_rows(np.ascontiguousarray(raws), dt, weights, np.empty(3 * n, acc))  # groups of 3 (2 + the sum)
        view = np.uint32 if acc == "float32" else np.uint64
        diff = np.flatnonzero(one.sum.view(view) != rows.sum.view(view))
        assert diff.size == 0, (diff[:5], one.sum[diff[:3]], rows.sum[diff[:3]], weights[:2])
        assert rows.norm == one.norm and len(rows.members) == k
