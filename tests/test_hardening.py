"""Bad inputs, hostile files and crashes never cost a user data.

Every case of the corpus runs through the CLI and through the API and must give a one-line error
naming the file, tensor or step, a non-zero exit, no output directory (and no temporary left
beside it), every input byte-identical afterwards, and no side effect of a hostile pickle.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import ckptavg
from ckptavg.cli import cli
from ckptavg.errors import CkptavgError
from ckptavg.selection import Selection
from conftest import HEAD, integer_state, tree_hash, write_checkpoint

MARKER_NAME = "PWNED"


@dataclass
class Case:
    build: Callable[[Path, dict], None]  # (run folder, base state dict) -> writes the bad run
    expect: str  # substring of the one-line error
    args: list[str] = field(default_factory=list)  # extra CLI flags
    api: dict = field(default_factory=dict)  # Selection fields and average() kwargs


def _good(run: Path, base: dict, steps=(1, 2, 3), fmt="safetensors") -> dict[int, dict]:
    states = {}
    for i, s in enumerate(steps):
        states[s] = integer_state(base, i)
        write_checkpoint(run, s, states[s], fmt)
    return states


def _st(run: Path) -> Path:
    return run / "step2" / "model.safetensors"


def _patch_bytes(p: Path, fn: Callable[[bytes], bytes]) -> None:
    p.write_bytes(fn(p.read_bytes()))


def _rewrite_header(p: Path, fn: Callable[[dict], dict], n_override: int | None = None) -> None:
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = fn(json.loads(raw[8 : 8 + n]))
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    p.write_bytes(struct.pack("<Q", n_override if n_override is not None else len(h)) + h + raw[8 + n :])


def _first_tensor(h: dict) -> str:
    return next(k for k in h if k != "__metadata__")


def _set_offsets(delta_begin: int, delta_end: int):  # type: ignore[no-untyped-def]
    def fn(h: dict) -> dict:
        ordered = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        k = ordered[1]
        b, e = h[k]["data_offsets"]
        h[k]["data_offsets"] = [b + delta_begin, e + delta_end]
        return h
    return fn


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _evil_bin(run: Path, base: dict, legacy: bool = False) -> None:
    _good(run, base, steps=(1, 3), fmt="bin")
    d = run / "step2"
    d.mkdir()
    sd = dict(integer_state(base, 9))
    torch.save({"state": sd, "payload": Evil(run.parent / MARKER_NAME)}, d / "pytorch_model.bin",
               _use_new_zipfile_serialization=not legacy)


class EvalPayload:
    """A pickle whose top-level global is ``eval`` (torch names it differently from a REDUCE of os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (eval, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _evil_global(run: Path, base: dict) -> None:
    _good(run, base, steps=(1, 3), fmt="bin")
    d = run / "step2"
    d.mkdir()
    torch.save({"model": dict(integer_state(base, 9)), "hook": EvalPayload(run.parent / MARKER_NAME)},
               d / "pytorch_model.bin")


def _raw_pickle_bin(run: Path, base: dict, protocol: int = 2) -> None:
    _good(run, base, steps=(1, 3), fmt="bin")
    (run / "step2").mkdir()
    (run / "step2" / "pytorch_model.bin").write_bytes(pickle.dumps(Evil(run.parent / MARKER_NAME), protocol=protocol))


def _sharded(run: Path, base: dict, edit: Callable[[dict], None]) -> None:
    _good(run, base, steps=(1, 3), fmt="safetensors-sharded")
    write_checkpoint(run, 2, integer_state(base, 5), "safetensors-sharded")
    idx = run / "step2" / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    edit(doc)
    idx.write_text(json.dumps(doc) if isinstance(doc, dict) else doc)


def _dup_key_index(run: Path, base: dict) -> None:
    _sharded(run, base, lambda d: None)
    idx = run / "step2" / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    name, fname = next(iter(doc["weight_map"].items()))
    other = "model-00002-of-00002.safetensors" if fname.endswith("1-of-00002.safetensors") else "model-00001-of-00002.safetensors"
    text = json.dumps(doc)[:-2] + f', "{name}": "{other}"}}}}'
    idx.write_text(text)


def _modify_state(edit: Callable[[dict], None], fmt: str = "safetensors"):  # type: ignore[no-untyped-def]
    def build(run: Path, base: dict) -> None:
        states = _good(run, base, steps=(1, 3), fmt=fmt)
        sd = dict(integer_state(base, 7))
        edit(sd)
        write_checkpoint(run, 2, sd, fmt)
        del states
    return build


def _nan(sd: dict) -> None:
    t = sd["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"].clone()
    t[0, 0] = float("nan")
    sd["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"] = t


def _inf(sd: dict) -> None:
    t = sd["gpt_neox.final_layer_norm.weight"].clone()
    t[1] = float("-inf")
    sd["gpt_neox.final_layer_norm.weight"] = t


def _symlink_loop(run: Path, base: dict) -> None:
    _good(run, base)
    (run / "step4").symlink_to(run / "step4")


def _dup_steps(run: Path, base: dict) -> None:
    _good(run, base)
    shutil.copytree(run / "step2", run / "checkpoint-2")


def _no_steps(run: Path, base: dict) -> None:
    run.mkdir(parents=True)
    (run / "notes").mkdir()
    (run / "final-v2-old").mkdir()
    (run / "readme.txt").write_text("x")


CASES: dict[str, Case] = {
    # safetensors structure
    "st-truncated": Case(lambda r, b: (_good(r, b), _patch_bytes(_st(r), lambda x: x[:-100])), "truncated file?"),
    "st-header-beyond-file": Case(lambda r, b: (_good(r, b), _patch_bytes(_st(r), lambda x: struct.pack("<Q", len(x) + 10) + x[8:])), "runs past the end"),
    "st-overlap": Case(lambda r, b: (_good(r, b), _rewrite_header(_st(r), _set_offsets(-4, -4))), "overlaps"),
    "st-out-of-range": Case(lambda r, b: (_good(r, b), _rewrite_header(_st(r), lambda h: (h[_first_tensor(h)].update(data_offsets=[10**12, 10**12 + 4]), h)[1])), "outside the"),
    "st-unknown-dtype": Case(lambda r, b: (_good(r, b), _rewrite_header(_st(r), lambda h: (h[_first_tensor(h)].update(dtype="F42"), h)[1])), "unknown dtype 'F42'"),
    "st-absurd-header": Case(lambda r, b: (_good(r, b), _patch_bytes(_st(r), lambda x: struct.pack("<Q", 2**62) + x[8:])), "exceeds"),
    "st-non-utf8": Case(lambda r, b: (_good(r, b), _patch_bytes(_st(r), lambda x: x[:8] + b"\xff\xfe\xfd" + x[11:])), "not UTF-8 JSON"),
    "st-json-garbage": Case(lambda r, b: (_good(r, b), _patch_bytes(_st(r), lambda x: x[:8] + b"{{{{" + x[12:])), "not UTF-8 JSON"),
    "st-size-mismatch": Case(lambda r, b: (_good(r, b), _rewrite_header(_st(r), lambda h: (h[_first_tensor(h)].update(shape=[1, 1]), h)[1])), "needs"),
    "st-empty-file": Case(lambda r, b: (_good(r, b), _st(r).write_bytes(b"")), "shorter than the 8-byte"),
    # pickles
    "bin-runs-code-zip": Case(lambda r, b: _evil_bin(r, b), "refused to load: the pickle asks for the global posix.system, code that ckptavg never runs"),
    "bin-runs-code-legacy": Case(lambda r, b: _evil_bin(r, b, legacy=True), "refused to load: the pickle asks for the global posix.system"),
    "pt-asks-for-eval": Case(lambda r, b: _evil_global(r, b), "refused to load: the pickle asks for the global eval, code that"),
    "bin-raw-pickle-code": Case(_raw_pickle_bin, "step2/pytorch_model.bin: refused to load"),
    "bin-raw-pickle-proto5": Case(lambda r, b: _raw_pickle_bin(r, b, 5), "step2/pytorch_model.bin: not a readable torch checkpoint"),
    "bin-not-a-checkpoint": Case(lambda r, b: (_good(r, b, fmt="bin"), (r / "step2" / "pytorch_model.bin").write_bytes(os.urandom(4096))), "not a readable torch checkpoint"),
    "bin-no-state-dict": Case(lambda r, b: (_good(r, b, steps=(1, 3), fmt="bin"), (r / "step2").mkdir(), torch.save({"lr": 1.0}, r / "step2" / "pytorch_model.bin")), "no state dict found"),
    # index files
    "index-missing-shard": Case(lambda r, b: _sharded(r, b, lambda d: d["weight_map"].update({k: "model-00009-of-00009.safetensors" for k in list(d["weight_map"])[:1]})), "shard model-00009-of-00009.safetensors is missing"),
    "index-dotdot": Case(lambda r, b: _sharded(r, b, lambda d: d["weight_map"].update({k: "../step1/model-00001-of-00002.safetensors" for k in list(d["weight_map"])[:1]})), "outside the checkpoint folder"),
    "index-absolute": Case(lambda r, b: _sharded(r, b, lambda d: d["weight_map"].update({k: "/etc/passwd" for k in list(d["weight_map"])[:1]})), "outside the checkpoint folder"),
    "index-two-shards": Case(_dup_key_index, "appears twice"),
    "index-wrong-shard": Case(lambda r, b: _sharded(r, b, lambda d: d["weight_map"].update({k: ("model-00002-of-00002.safetensors" if v.startswith("model-00001") else "model-00001-of-00002.safetensors") for k, v in list(d["weight_map"].items())[:1]})), "but stored in"),
    "index-not-json": Case(lambda r, b: _sharded(r, b, lambda d: d.clear() or d.update({"weight_map": "x"})), "no weight_map"),
    # architectures and values
    "missing-tensor": Case(_modify_state(lambda sd: sd.pop("gpt_neox.final_layer_norm.bias")), "'gpt_neox.final_layer_norm.bias' is missing"),
    "extra-tensor": Case(_modify_state(lambda sd: sd.update(extra=torch.zeros(2))), "extra tensor 'extra'"),
    "other-shape": Case(_modify_state(lambda sd: sd.update({HEAD: torch.zeros(3, 3)})), f"'{HEAD}' has shape [3, 3]"),
    "other-dtype": Case(_modify_state(lambda sd: sd.update({HEAD: sd[HEAD].half()})), f"'{HEAD}' is F16"),
    "nan": Case(_modify_state(_nan), "step 2 "),
    "inf-bin": Case(_modify_state(_inf, fmt="bin"), "'gpt_neox.final_layer_norm.weight' has NaN/Inf"),
    # folders
    "duplicate-steps": Case(_dup_steps, "duplicate step 2"),
    "unparseable-names": Case(_no_steps, "no checkpoints found"),
    "empty-folder": Case(lambda r, b: r.mkdir(parents=True), "no checkpoints found"),
    "symlink-loop": Case(_symlink_loop, "step4: cannot open"),
    "step-dir-without-weights": Case(lambda r, b: (_good(r, b), (r / "step9").mkdir()), "step9: looks like a checkpoint"),
    # selections and methods
    "at-missing-step": Case(lambda r, b: _good(r, b), "no checkpoint at step 7", ["--window", "2", "--at", "7"], {"window": 2, "at": 7}),
    "negative-weight": Case(lambda r, b: _good(r, b), "non-negative", ["--method", "weighted", "--weights", "1,-1,1"], {"method": "weighted", "weights": [1, -1, 1]}),
}


def _api_call(run: Path, out: Path, api: dict) -> None:
    sel_keys = {"window", "at", "start", "stop", "every", "steps"}
    sel = Selection(**{k: v for k, v in api.items() if k in sel_keys})
    ckptavg.average(sel.apply(ckptavg.discover(run)), out, progress=False,
                    **{k: v for k, v in api.items() if k not in sel_keys})


def _assert_clean(tmp: Path, out: Path, before: dict, run: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert not (tmp / MARKER_NAME).exists(), "a hostile pickle ran code"
    if run.exists():
        assert tree_hash(run) == before


@pytest.mark.parametrize("name", sorted(CASES), ids=sorted(CASES))
def test_bad_input_corpus(tmp_path, base_state_dict, name):
    case = CASES[name]
    run = tmp_path / "run"
    case.build(run, base_state_dict)
    before = tree_hash(run) if run.exists() else {}
    out = tmp_path / "out"

    r = CliRunner().invoke(cli, ["merge", str(run), "-o", str(out), "-q", *case.args])
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert case.expect in lines[0], lines[0]
    _assert_clean(tmp_path, out, before, run)

    with pytest.raises(CkptavgError) as e:
        _api_call(run, out, case.api)
    assert case.expect in str(e.value) and "\n" not in str(e.value)
    _assert_clean(tmp_path, out, before, run)


# Output-side failures ---------------------------------------------------------------------


def test_output_exists_is_untouched(make_run, tmp_path):
    root, _ = make_run("safetensors", steps=(1, 2))
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    r = CliRunner().invoke(cli, ["merge", str(root), "-o", str(out), "-q"])
    assert r.exit_code == 1 and "already exists" in r.output
    assert (out / "model.safetensors").read_bytes() == b"precious"


def test_output_inside_input_checkpoint(make_run):
    root, _ = make_run("safetensors", steps=(1, 2))
    before = tree_hash(root)
    r = CliRunner().invoke(cli, ["merge", str(root), "-o", str(root / "step2" / "avg"), "-q"])
    assert r.exit_code == 1 and "inside the input" in r.output
    assert tree_hash(root) == before


def _cli_subprocess(args: list[str], **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run([sys.executable, "-m", "ckptavg", *args], capture_output=True, text=True, **kw)


def test_disk_full_is_a_clean_one_line_error(make_run, tmp_path):
    root, _ = make_run("safetensors", steps=(1, 2))
    before = tree_hash(root)
    out = tmp_path / "out"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # smaller than the 50 KB model

    r = _cli_subprocess(["merge", str(root), "-o", str(out), "-q"], preexec_fn=limit)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "File too large" in r.stderr
    _assert_clean(tmp_path, out, before, root)


def _drop_dac_override() -> None:
    """In the child: remove CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH from the bounding set, so that
    even root is held to file modes after exec (prctl PR_CAPBSET_DROP)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_no_write_permission(base_state_dict):
    base = Path(tempfile.mkdtemp(prefix="ckptavg-perm-"))
    try:
        os.chmod(base, 0o755)
        run = base / "run"
        _good(run, base_state_dict, steps=(1, 2))
        ro = base / "readonly"
        ro.mkdir()
        for p in [base, *base.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(ro, 0o555)
        before = tree_hash(run)
        drop = _drop_dac_override if os.geteuid() == 0 else None  # root ignores modes otherwise
        r = _cli_subprocess(["merge", str(run), "-o", str(ro / "out"), "-q"], preexec_fn=drop)
        assert r.returncode == 1, r.stderr
        assert "Permission denied" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (ro / "out").exists() and tree_hash(run) == before
    finally:
        os.chmod(base / "readonly", 0o755)
        shutil.rmtree(base)


# Crash safety -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory) -> Path:
    """A run whose merge takes long enough (~0.5 s) to be killed in the middle."""
    root = tmp_path_factory.mktemp("crash") / "run"
    for i in range(6):
        d = root / f"step{i + 1}"
        d.mkdir(parents=True)
        save_file({f"w{j}": torch.full((2**20,), float(i + j)) for j in range(12)}, d / "model.safetensors")
    return root


def _loads_as_model(out: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(out / "model.safetensors", framework="np") as f:
            for k in f.keys():
                f.get_tensor(k)
        return (out / "ckptavg.json").is_file()
    except Exception:
        return False


@pytest.mark.slow
def test_sigkill_never_leaves_a_loadable_partial_output(slow_run, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "ckptavg", "merge", str(slow_run), "-o", str(out), "-q", "--force"]
    t0 = time.perf_counter()
    subprocess.run(args, check=True)
    full = time.perf_counter() - t0
    shutil.rmtree(out)
    rng = random.Random(0)
    for frac in sorted(rng.uniform(0.2, 1.0) for _ in range(6)):
        p = subprocess.Popen(args)
        time.sleep(full * frac)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if out.exists():  # the kill came after the rename: then it must be whole
            assert _loads_as_model(out)
            shutil.rmtree(out)
    leftovers = [q for q in tmp_path.iterdir() if q.name.startswith(".out.ckptavg-tmp-")]
    subprocess.run(args, check=True)  # the next run succeeds and removes dead runs' temporaries
    assert _loads_as_model(out)
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".out.ckptavg-tmp-")]
    assert not [q for q in leftovers if q.exists()]
    assert ckptavg.discover(slow_run).steps == [1, 2, 3, 4, 5, 6]  # inputs still discoverable as before
