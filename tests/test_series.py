"""Series: every output equals an independent per-window average; inputs are read once."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import ckptavg
from ckptavg import engine
from ckptavg.cli import cli
from ckptavg.errors import CkptavgError
from ckptavg.io import CheckpointReader
from ckptavg.selection import Selection
from ckptavg.series import iter_series, plan, series

STEPS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 3000)  # Pythia-like spacing


def window_oracle(states, steps, k, i):
    ins = steps[max(0, i - k + 1): i + 1]
    return {n: torch.stack([states[s][n].double() for s in ins]).mean(0).float() for n in states[steps[i]]}


def ema_oracle(states, steps, h, i):
    raw = [0.5 ** ((steps[i] - s) / h) for s in steps[: i + 1]]
    tot = sum(raw)
    return {n: sum(w / tot * states[s][n].double() for w, s in zip(raw, steps[: i + 1])).float()
            for n in states[steps[i]]}


@pytest.mark.parametrize("values", ["integer", "random"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_every_window_equals_independent_average(make_run, tmp_path, fmt, values, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK_ELEMS", 1000)  # several chunks per tensor
    root, states = make_run(fmt, steps=STEPS, values=values)
    res = series(ckptavg.discover(root), tmp_path / "s", Selection(window=3), progress=False)
    assert [r.step for r in res] == list(STEPS[2:]) and all(r.written for r in res)
    for i, s in enumerate(STEPS):
        if i < 2:
            assert not (tmp_path / "s" / f"step{s}").exists()
            continue
        got = load_file(tmp_path / "s" / f"step{s}" / "model.safetensors")
        want = window_oracle(states, STEPS, 3, i)
        for n in want:
            if values == "integer":
                assert torch.equal(got[n], want[n]), (s, n)
            else:
                torch.testing.assert_close(got[n], want[n], rtol=2e-7, atol=1e-7)
        man = json.loads((tmp_path / "s" / f"step{s}" / "ckptavg.json").read_text())
        assert [x["step"] for x in man["inputs"]] == list(STEPS[i - 2: i + 1])


def test_long_run_does_not_drift(make_run, tmp_path, monkeypatch):
    """Windows wider than AFRESH_MAX keep an fp64 running sum: 60 add/subtract updates on values
    of very different magnitude stay equal to the fp64 oracle."""
    from ckptavg.engine_series import AFRESH_MAX

    monkeypatch.setattr(engine, "CHUNK_ELEMS", 4096)
    g = torch.Generator().manual_seed(0)
    steps = tuple(range(1, 41))
    w = AFRESH_MAX + 2
    extra = {"big": lambda i: (torch.randn(64, generator=g) * 10.0 ** (i % 7 - 3)).float()}
    root, states = make_run("safetensors", steps=steps, values="random", extra=extra)
    series(ckptavg.discover(root), tmp_path / "s", Selection(window=w), progress=False)
    for i in range(w - 1, len(steps)):
        out = tmp_path / "s" / f"step{steps[i]}"
        got = load_file(out / "model.safetensors")["big"]
        want = torch.stack([states[s]["big"].double() for s in steps[i - w + 1: i + 1]]).mean(0).float()
        torch.testing.assert_close(got, want, rtol=2e-7, atol=0)
        assert json.loads((out / "ckptavg.json").read_text())["accumulate"] == "float64"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", [{"method": "uniform"}, {"method": "wsm", "schedule": "1-sqrt"}])
def test_narrow_windows_are_bit_identical_to_merge(make_run, tmp_path, monkeypatch, how, dtype):
    """Up to AFRESH_MAX inputs, each target is summed afresh in fp32 as merge sums it: series at
    step S writes the very bytes merge writes for the same window at S, for any thread count."""
    monkeypatch.setattr(engine, "CHUNK_ELEMS", 1000)
    g = torch.Generator().manual_seed(1)
    extra = {"big": lambda i: (torch.randn(3000, generator=g) * 10.0 ** (i % 5 - 2)).to(dtype)}
    root, _ = make_run("safetensors", steps=STEPS[:8], values="random", dtype=dtype, extra=extra)
    traj = ckptavg.discover(root)
    for threads in (1, 3):
        res = series(traj, tmp_path / f"s{threads}", Selection(window=3), progress=False, threads=threads, **how)
        for r in res:
            i = traj.steps.index(r.step)
            merged = ckptavg.average(list(traj)[i - 2: i + 1], tmp_path / f"m{r.step}-{threads}", progress=False, **how)
            assert (r.path / "model.safetensors").read_bytes() == (merged / "model.safetensors").read_bytes(), r.step
            assert json.loads((r.path / "ckptavg.json").read_text())["accumulate"] == "float32"


def test_ema_series_matches_merge_at_each_step(make_run, tmp_path):
    root, states = make_run("safetensors", steps=STEPS, values="random")
    series(ckptavg.discover(root), tmp_path / "e", method="ema", half_life=300, progress=False)
    for i, s in enumerate(STEPS):
        got = load_file(tmp_path / "e" / f"step{s}" / "model.safetensors")
        want = ema_oracle(states, STEPS, 300, i)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7)


def test_reads_each_input_once_whatever_k(make_run, tmp_path, monkeypatch):
    root, _ = make_run("safetensors", steps=tuple(range(1, 13)), values="random")
    counts = {}
    real, real_into = CheckpointReader.read, CheckpointReader.read_into

    def counting(self, name, start=0, count=None):
        out = real(self, name, start, count)
        counts[self.label] = counts.get(self.label, 0) + out.nbytes
        return out

    def counting_into(self, buffer, name, start=0, count=None):  # safetensors: never through read
        out = real_into(self, buffer, name, start, count)
        counts[self.label] = counts.get(self.label, 0) + out.nbytes
        return out

    monkeypatch.setattr(CheckpointReader, "read", counting)
    monkeypatch.setattr(CheckpointReader, "read_into", counting_into)
    traj = ckptavg.discover(root)
    size = sum(t.nbytes for t in traj[0].tensors.values())
    for k in (2, 5, 10):
        counts.clear()
        series(traj, tmp_path / f"k{k}", Selection(window=k), progress=False)
        assert sorted(counts.values()) == [size] * 12, k  # every input once, none twice


def test_partial_stride_non_overlapping_and_range(make_run, tmp_path):
    root, states = make_run("safetensors", steps=tuple(range(10, 110, 10)))
    traj = ckptavg.discover(root)
    assert [t.step for t in plan(traj, Selection(window=3))] == list(range(30, 110, 10))
    assert [t.step for t in plan(traj, Selection(window=3), partial=True)][:2] == [10, 20]
    assert plan(traj, Selection(window=3), partial=True)[0].inputs == (0,)
    no = plan(traj, Selection(window=3), non_overlapping=True)
    assert [t.inputs for t in no] == [(0, 1, 2), (3, 4, 5), (6, 7, 8)]
    assert [t.step for t in plan(traj, Selection(window=2, every=4))] == [20, 60, 100]
    with pytest.warns(DeprecationWarning, match=r"plan\(window, stride=…\) is deprecated"):
        assert [t.step for t in plan(traj, window=2, stride=4)] == [20, 60, 100]  # the old keywords, for one release
    assert [t.step for t in plan(traj, Selection(window=2, start=50, stop=70))] == [50, 60, 70]
    res = series(traj, tmp_path / "n", Selection(window=3), non_overlapping=True, progress=False)
    got = load_file(res[1].path / "model.safetensors")
    for n, v in got.items():
        assert torch.equal(v, torch.stack([states[s][n] for s in (40, 50, 60)]).mean(0))
    with pytest.raises(CkptavgError, match="fewer than 3 checkpoints"):
        plan(traj, Selection(window=3, steps=[20]))
    with pytest.raises(CkptavgError, match="drop --window"):
        plan(traj, Selection(window=3), method="ema", half_life=10)
    with pytest.raises(CkptavgError, match="series supports"):
        plan(traj, Selection(window=3), method="weighted")


def test_resume_skips_complete_targets_and_redoes_broken_ones(make_run, tmp_path):
    root, states = make_run("safetensors", steps=tuple(range(1, 8)))
    traj = ckptavg.discover(root)
    first = series(traj, tmp_path / "r", Selection(window=2), progress=False)
    mtimes = {r.step: (r.path / "model.safetensors").stat().st_mtime_ns for r in first}
    (first[2].path / "model.safetensors").write_bytes(b"broken")
    again = series(traj, tmp_path / "r", Selection(window=2), progress=False)
    assert [r.written for r in again] == [False, False, True, False, False, False]
    for r in again:
        if r.written:
            got = load_file(r.path / "model.safetensors")
            for n, v in got.items():
                assert torch.equal(v, (states[r.step - 1][n] + states[r.step][n]) / 2)
        else:
            assert (r.path / "model.safetensors").stat().st_mtime_ns == mtimes[r.step]
    # Other arguments make other outputs: nothing is reused.
    assert all(r.written for r in series(traj, tmp_path / "r", Selection(window=3), progress=False))


def test_iter_series_in_memory_equals_disk_series(make_run, tmp_path):
    root, states = make_run("bin", steps=STEPS[:8], values="random")
    traj = ckptavg.discover(root)
    disk = {r.step: load_file(r.path / "model.safetensors") for r in series(traj, tmp_path / "d", Selection(window=3), progress=False)}
    seen = []
    for t, sd in iter_series(traj, Selection(window=3)):
        seen.append(t.step)
        for n in sd:
            torch.testing.assert_close(sd[n], disk[t.step][n], rtol=2e-7, atol=1e-7)
    assert seen == sorted(disk)
    for t, sd in iter_series(traj, method="ema", decay=0.5):
        want = ema_oracle_decay(states, STEPS[:8], 0.5, t.index)
        for n in sd:
            torch.testing.assert_close(sd[n], want[n], rtol=1e-6, atol=1e-7)


def ema_oracle_decay(states, steps, beta, i):
    raw = [beta ** (i - j) for j in range(i + 1)]
    return {n: sum(w / sum(raw) * states[steps[j]][n].double() for j, w in enumerate(raw)).float() for n in states[steps[i]]}


def test_series_cli_json_and_resume(make_run, tmp_path):
    root, _ = make_run("safetensors", steps=(1, 2, 3, 4))
    args = ["series", str(root), "--window", "2", "-o", str(tmp_path / "c"), "--json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert [o["written"] for o in json.loads(r.output)["outputs"]] == [True, True, True]
    r = CliRunner().invoke(cli, args)
    assert [o["written"] for o in json.loads(r.output)["outputs"]] == [False, False, False]
    r = CliRunner().invoke(cli, ["series", str(root), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "needs --window" in r.output  # a missing flag is a usage error
    r = CliRunner().invoke(cli, ["series", str(root), "--window", "2", "-o", str(root / "inside")])
    assert r.exit_code == 1 and "inside the input" in r.output


def test_nonfinite_input_is_refused_naming_the_target(make_run, tmp_path):
    extra = {"x": lambda i: torch.tensor([1.0, float("inf") if i == 2 else 2.0])}
    root, _ = make_run("safetensors", steps=(1, 2, 3, 4, 5), extra=extra)
    with pytest.raises(CkptavgError, match=r"step 3: tensor 'x' averages to NaN/Inf"):
        series(ckptavg.discover(root), tmp_path / "s", Selection(window=2), progress=False)
    assert not [p for p in (tmp_path / "s").iterdir()]  # no output, complete or temporary
    res = series(ckptavg.discover(root), tmp_path / "s", Selection(window=2), allow_nonfinite=True, progress=False)
    assert torch.isinf(load_file(res[1].path / "model.safetensors")["x"][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_iter_series_is_bit_identical_for_any_thread_count(make_run, monkeypatch, dtype):
    """Workers take spans of every fold and every output (uniform add/remove, EMA decay, weighted
    windows); each element's arithmetic is the same whoever does it. Small spans: many per tensor
    (and big enough that numpy lets go of the GIL), so a buffer shared between workers would show
    as differing bits."""
    import threading

    from ckptavg import series as series_mod

    big = {"big": lambda i: torch.randn(300_000, generator=torch.Generator().manual_seed(i)).to(dtype)}
    root, states = make_run("safetensors", steps=STEPS[:7], values="random", dtype=dtype, extra=big)
    traj = ckptavg.discover(root)
    for mod in (series_mod, engine):
        monkeypatch.setattr(mod, "MERGE_CHUNK", 16384)
    monkeypatch.setattr(series_mod, "CHUNK_ELEMS", 4096)
    readers: set[str] = set()  # the threads that read (pool threads are named ckptavg-work_0, _1, …)
    real = CheckpointReader.read_into

    def spy(self, *a, **k):
        readers.add(threading.current_thread().name)
        return real(self, *a, **k)

    monkeypatch.setattr(CheckpointReader, "read_into", spy)
    recipes = {"window": dict(selection=Selection(window=3)), "ema": dict(method="ema", decay=0.7),
               "wsm": dict(selection=Selection(window=3), method="wsm", schedule="1-sqrt")}
    for name, kw in recipes.items():
        got = {}
        for threads in (1, 3):
            readers.clear()
            got[threads] = [(t.step, sd) for t, sd in iter_series(traj, threads=threads, **kw)]
            if threads == 1:
                assert readers == {threading.main_thread().name}, name
            else:  # the workers did read, several of them, and no more than asked for
                assert 1 < len(readers) <= 3 and all(r.startswith("ckptavg-work_") for r in readers), (name, readers)
        assert [s for s, _ in got[1]] == [s for s, _ in got[3]]
        for (step, one), (_, three) in zip(got[1], got[3]):
            for n in one:
                assert one[n].dtype == dtype and torch.equal(one[n].view(torch.int16), three[n].view(torch.int16)), (name, step, n)
        if name == "window":  # and the values are the windows' means
            for step, sd in got[3]:
                i = STEPS.index(step)
                for n, t in sd.items():
                    want = sum(states[s][n].double() for s in STEPS[i - 2 : i + 1]) / 3
                    torch.testing.assert_close(t.double(), want.to(dtype).double(), rtol=1e-2, atol=0)
