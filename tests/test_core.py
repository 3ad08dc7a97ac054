"""The shared pieces every path uses: Selection's one vocabulary, the RunningAverage arithmetic,
the error classes users catch, and ``average`` taking any source with a selection."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import ckptavg
from ckptavg import errors
from ckptavg.engine import RunningAverage
from ckptavg.io.dtypes import DTYPES, f32_to_bf16
from ckptavg.selection import Selection
from conftest import tree_hash

F32, BF16, F16 = DTYPES["F32"], DTYPES["BF16"], DTYPES["F16"]


# Selection ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, msg", [
    ({"window": 0}, "--window must be a whole number of at least 1, got 0"),
    ({"every": 0}, "--every must be a whole number of at least 1, got 0"),
    ({"spacing": -1000}, "--spacing must be a whole number of at least 1"),
    ({"window": 2.5}, "--window must be a whole number"),
    ({"at": -1}, "--at must be a step"),
    ({"start": 5, "stop": 1}, "--from 5 is after --to 1"),
    ({"steps": ()}, "--steps is empty"),
    ({"steps": (1, -2)}, "--steps must be steps"),
], ids=["window-0", "every-0", "spacing-negative", "window-float", "at-negative", "from-after-to", "steps-empty",
        "steps-negative"])
def test_selection_refuses_out_of_range_values(kw, msg):
    with pytest.raises(errors.SelectionError, match=msg):
        Selection(**kw)


def test_one_vocabulary_for_inputs_and_targets(make_run):
    root, _ = make_run("safetensors", steps=(0, 1, 2, 4, 8, 1000, 2000, 3000, 4000, 5000))
    traj = ckptavg.discover(root)
    assert Selection(spacing=1000).apply(traj).steps == [0, 1000, 2000, 3000, 4000, 5000]
    assert Selection(start=1, spacing=1000).targets(traj).steps == [1]  # distance from --from, as sweeps count
    assert Selection(every=2).apply(traj).steps == [1, 4, 1000, 3000, 5000]  # back from the newest
    assert Selection(window=3, at=4000).apply(traj).steps == [2000, 3000, 4000]
    assert Selection(window=3, at=4000).targets(traj).steps == [0, 1, 2, 4, 8, 1000, 2000, 3000, 4000]
    assert Selection(steps=(8, 2000)).apply(traj).steps == [8, 2000]
    with pytest.raises(errors.SelectionError, match="no checkpoint at step 7; nearest: 4, 8"):
        Selection(at=7).apply(traj)
    with pytest.raises(errors.SelectionError, match=r"nothing selected by Selection\(start=9, stop=999\)"):
        Selection(start=9, stop=999).apply(traj)


# RunningAverage ------------------------------------------------------------------------------------
def test_running_average_add_remove_decay_emit_against_closed_forms():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(1000).astype(np.float32) for _ in range(6)]
    st = RunningAverage(1000, np.float64)
    for j in range(3):
        st.add(xs[j], F32, key=j)
    st.remove(xs[0], F32, key=0)
    st.add(xs[3], F32, key=3)
    assert st.members == {1, 2, 3}
    np.testing.assert_allclose(st.emit(DTYPES["F64"], np.empty(1000)), np.stack(xs[1:4]).astype(np.float64).mean(0),
                               rtol=1e-12)
    ema = RunningAverage(1000, np.float64)  # EMA with bias correction: Σ β^(n-1-j) x_j / Σ β^(n-1-j)
    for j, x in enumerate(xs):
        ema.decay(0.7)
        ema.add(x, F32, key=j)
    w = np.array([0.7 ** (5 - j) for j in range(6)])
    np.testing.assert_allclose(ema.emit(DTYPES["F64"], np.empty(1000)), (w[:, None] * xs).sum(0) / w.sum(), rtol=1e-12)


def test_running_average_converts_bf16_and_fp16_inputs_exactly():
    x = torch.arange(-8, 8, dtype=torch.float32) / 4  # exact in bf16 and fp16
    bits = f32_to_bf16(x.numpy())
    st = RunningAverage(16)
    st.add(bits, BF16)
    st.add(x.numpy().astype(np.float16), F16)
    assert torch.equal(torch.from_numpy(st.emit(F32).copy()), x)
    st.reset(16)
    st.add(bits, BF16)
    assert np.array_equal(st.emit(BF16), bits)  # bf16 out: the same bits back


def test_running_average_drift_is_flagged_and_recompute_is_exact():
    rng = np.random.default_rng(1)
    xs = [(rng.standard_normal(4096) * 1e4).astype(np.float32) for _ in range(40)]
    st = RunningAverage(4096, np.float32)
    k = 4
    for j in range(k):
        st.add(xs[j], F32, key=j)
    flagged = 0
    for j in range(k, 40):
        st.remove(xs[j - k], F32, key=j - k)
        st.add(xs[j], F32, key=j)
        if st.drifted:
            flagged += 1
            st.recompute((m, xs[m], F32, 1.0) for m in sorted(st.members))
            exact = xs[j - k + 1].copy()
            for m in range(j - k + 2, j + 1):
                exact += xs[m]  # the same fp32 additions in the same order: bit for bit
            assert np.array_equal(st.sum, exact)
    assert flagged >= (40 - k) // (k + 1)  # 2 updates per step, flagged after more than 2k
    assert st.members == set(range(36, 40))


def test_running_average_refuses_nan_inf_unless_allowed():
    st = RunningAverage(4)
    st.add(np.array([1, np.inf, 0, 0], np.float32), F32)
    with pytest.raises(errors.NonFiniteError, match="tensor 'x'"):
        st.emit(F32, np.empty(4, np.float32), lambda: "step 3: tensor 'x' holds NaN/Inf")
    ok = RunningAverage(4, allow_nonfinite=True)
    ok.add(np.array([1, np.inf, 0, 0], np.float32), F32)
    assert np.isinf(ok.emit(F32)[1])


# Errors users catch ------------------------------------------------------------------------------
def test_error_classes_are_what_users_can_catch(make_run, tmp_path, base_state_dict):
    root, _ = make_run("safetensors", steps=(1, 2, 3))
    traj = ckptavg.discover(root)
    assert issubclass(errors.SelectionError, errors.UsageError) and issubclass(errors.UsageError, ValueError)
    with pytest.raises(errors.SelectionError, match="window 9 needs 9 checkpoints"):
        ckptavg.average(traj, selection=Selection(window=9), progress=False)
    with pytest.raises(errors.MethodError, match="did you mean 'ema'"):
        ckptavg.average(traj, method="emma", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(errors.OutputExistsError):
        ckptavg.average(traj, tmp_path / "busy", progress=False)
    with pytest.raises(errors.OutputError, match="inside the input"):
        ckptavg.average(traj, root / "step1" / "avg", progress=False)
    with pytest.raises(errors.CheckpointError, match="no such file or directory"):
        ckptavg.discover(tmp_path / "nowhere")
    for e in (errors.SelectionError, errors.MethodError, errors.OutputExistsError, errors.CheckpointError,
              errors.IncompatibleError, errors.NonFiniteError, errors.HubError, errors.DuplicateError):
        assert issubclass(e, ckptavg.CkptavgError) and getattr(ckptavg, e.__name__) is e


# average(): any source, one selection ------------------------------------------------------------
def test_average_takes_a_path_or_trajectory_with_a_selection_and_records_provenance(make_run, tmp_path):
    root, states = make_run("safetensors", steps=(10, 20, 30, 40))
    before = tree_hash(root)
    sd = ckptavg.average(str(root), selection=Selection(window=2, at=30), progress=False)
    for name, t in sd.items():
        assert torch.equal(t, torch.stack([states[20][name], states[30][name]]).mean(0)), name
    assert [(i["step"], i["weight"]) for i in sd.manifest["inputs"]] == [(20, 0.5), (30, 0.5)]
    assert sd.manifest["trajectory"] == str(root)
    same = ckptavg.average(ckptavg.discover(root), tmp_path / "o", selection=Selection(window=2, at=30), progress=False)
    from safetensors.torch import load_file

    assert all(torch.equal(v, sd[k]) for k, v in load_file(same / "model.safetensors").items())
    assert tree_hash(root) == before


def test_old_module_names_warn_and_still_work():
    import importlib
    import sys

    sys.modules.pop("ckptavg.discovery", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module("ckptavg.discovery")
    assert mod.discover is ckptavg.discover
    assert any(issubclass(w.category, DeprecationWarning) and "ckptavg.discovery" in str(w.message) for w in caught)
