"""Never a silent wrong model, never a lost byte: the output side, attacked the way users hit it.

1. ckptavg deletes or replaces only what it provably wrote: real symlinks between run and output,
   another run's checkpoints under ``-o``, links at the output, ``--force`` leftovers.
2. A series output is kept only if these arguments made it from these input bytes.
3. Two real processes writing one output: one wins, the other gets one line; stale locks and
   other hosts' temporaries.
4. A full disk (real tmpfs, RLIMIT_FSIZE, and injected ENOSPC/EDQUOT/EFBIG) is one line naming the
   file, with nothing left behind and the inputs untouched.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckptavg
from ckptavg import manifest as manifest_module
from ckptavg.cli import cli
from ckptavg.errors import OutputError, OutputExistsError, OutputLockedError
from ckptavg.io.lock import HOST, lock_path
from ckptavg.selection import Selection
from ckptavg.series import series
from conftest import tree_hash


def run_cli(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r) -> str:  # type: ignore[no-untyped-def]
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), r.output
    return lines[0]


def hidden_beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


def mean(states: dict[int, dict[str, torch.Tensor]], steps: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {n: torch.stack([states[s][n].double() for s in steps]).mean(0).float() for n in states[steps[0]]}


def assert_model(folder: Path, want: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
    got = load_file(folder / "model.safetensors")
    assert got.keys() == want.keys()
    for n, v in want.items():
        assert got[n].dtype == dtype and torch.equal(got[n], v.to(dtype)), n


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# 1. Destroying what it did not create ---------------------------------------------------------------


def test_series_refuses_another_runs_checkpoints_under_o_then_force_replaces_them(make_run):
    root, states = make_run("safetensors", steps=(1, 2, 3))
    other, _ = make_run("safetensors", steps=(2, 3), name="other-run")  # a training run's own step2/, step3/
    before = tree_hash(other)
    line = one_line_error(run_cli("series", root, "--window", 2, "-o", other, "-q"))
    assert f"{other / 'step2'}: exists and was not written by ckptavg (and 1 more step folders)" in line
    assert "--force" in line and "another -o" in line
    assert tree_hash(other) == before and hidden_beside(other / "step2") == []
    r = run_cli("series", root, "--window", 2, "-o", other, "-q", "--force")
    assert r.exit_code == 0, r.output
    for s in (2, 3):
        assert_model(other / f"step{s}", mean(states, (s - 1, s)))


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_series_never_deletes_inputs_linked_into_the_output_folder(make_run, tmp_path, force):
    """The run's step folders are symlinks into the output folder: the inputs *are* DIR/step{S}."""
    store, states = make_run("safetensors", steps=(1, 2, 3), name="store")
    run = tmp_path / "linked-run"
    run.mkdir()
    for s in (1, 2, 3):
        (run / f"step{s}").symlink_to(store / f"step{s}", target_is_directory=True)
    before = tree_hash(store)
    args = ["series", run, "--window", 2, "-o", store, "-q"] + (["--force"] if force else [])
    line = one_line_error(run_cli(*args))
    assert "the output folder contains the input" in line and f"really {store / 'step1'}" in line
    with pytest.raises(OutputError, match="contains the input"):
        series(ckptavg.discover(run), store, Selection(window=2), force=force, progress=False)
    assert tree_hash(store) == before
    assert all((run / f"step{s}").is_symlink() for s in (1, 2, 3))


def test_output_inside_an_input_through_a_symlink_is_refused(make_run, tmp_path):
    root, _ = make_run("safetensors", steps=(1, 2, 3))
    link = tmp_path / "shortcut"
    link.symlink_to(root / "step2", target_is_directory=True)
    before = tree_hash(root)
    assert "inside the input" in one_line_error(run_cli("series", root, "--window", 2, "-o", link / "avg", "-q"))
    assert "inside the input" in one_line_error(run_cli("merge", root, "-o", link / "avg", "-q", "--force"))
    # merge --force -o <a folder holding the run>: replacing it would delete the inputs
    assert "contains the input" in one_line_error(run_cli("merge", root, "-o", tmp_path, "-q", "--force"))
    assert tree_hash(root) == before


def test_a_link_at_the_output_is_replaced_never_followed(make_run, tmp_path):
    root, states = make_run("safetensors", steps=(1, 2, 3))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    # series: DIR/step2 is a link to a user's folder
    out = tmp_path / "lawa"
    out.mkdir()
    (out / "step2").symlink_to(precious, target_is_directory=True)
    line = one_line_error(run_cli("series", root, "--window", 2, "-o", out, "-q"))
    assert f"{out / 'step2'}: exists and was not written by ckptavg" in line
    assert run_cli("series", root, "--window", 2, "-o", out, "-q", "--force").exit_code == 0
    assert not (out / "step2").is_symlink()
    assert_model(out / "step2", mean(states, (1, 2)))
    # merge: -o is a link to the user's folder
    m = tmp_path / "m"
    m.symlink_to(precious, target_is_directory=True)
    assert "is a symbolic link" in one_line_error(run_cli("merge", root, "-o", m, "-q"))
    assert run_cli("merge", root, "-o", m, "-q", "--force").exit_code == 0
    assert not m.is_symlink()
    assert_model(m, mean(states, (1, 2, 3)))
    assert [p.name for p in precious.iterdir()] == ["notes.txt"] and (precious / "notes.txt").read_text() == "mine"
    assert hidden_beside(m) == [] and hidden_beside(out / "step2") == []


def test_merge_force_replace_leaves_nothing_behind(make_run, tmp_path):
    root, states = make_run("safetensors", steps=(1, 2, 3))
    out = tmp_path / "o"
    assert run_cli("merge", root, "--window", 2, "-o", out, "-q").exit_code == 0
    (out / "extra").mkdir()  # the old output holds a folder with a link out of it: deleted, never followed
    (out / "extra" / "link").symlink_to(root, target_is_directory=True)
    before = tree_hash(root)
    assert run_cli("merge", root, "--window", 3, "-o", out, "-q", "--force").exit_code == 0
    assert_model(out, mean(states, (1, 2, 3)))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert tree_hash(root) == before


def test_series_will_not_replace_its_output_once_a_user_added_a_file(make_run, tmp_path):
    root, _ = make_run("safetensors", steps=(1, 2, 3))
    out = tmp_path / "s"
    series(ckptavg.discover(root), out, Selection(window=2), progress=False)
    (out / "step3" / "scores.json").write_text('{"acc": 0.9}')
    again = series(ckptavg.discover(root), out, Selection(window=2), progress=False)
    assert [r.written for r in again] == [False, False]  # same recipe: kept, the user's file with it
    with pytest.raises(OutputExistsError, match=r"step3: exists and was not written by ckptavg; use --force"):
        series(ckptavg.discover(root), out, Selection(window=2), dtype="float16", progress=False)
    assert (out / "step3" / "scores.json").read_text() == '{"acc": 0.9}'
    assert load_file(out / "step2" / "model.safetensors")["gpt_neox.embed_in.weight"].dtype == torch.float32


# 2. Completeness is "made by these arguments from these inputs" ------------------------------------


@pytest.mark.parametrize("change, check", [
    (["--window", "2", "--dtype", "float16"], "float16"),
    (["--window", "2", "--max-shard-size", "20KB"], "shards"),
    (["--method", "ema", "--decay", "0.5"], "ema"),
], ids=["dtype", "max-shard-size", "method"])
def test_series_redoes_outputs_made_with_other_arguments(make_run, tmp_path, change, check):
    root, states = make_run("safetensors", steps=(1, 2, 3, 4))
    out = tmp_path / "s"
    assert run_cli("series", root, "--window", 2, "-o", out, "-q").exit_code == 0
    r = run_cli("series", root, *change, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    outs = json.loads(r.output)["outputs"]
    assert all(o["written"] for o in outs)
    for o in outs:
        s = o["step"]
        folder = Path(o["path"])
        if check == "float16":
            assert_model(folder, mean(states, (s - 1, s)), torch.float16)
        elif check == "shards":
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            assert len(set(index["weight_map"].values())) > 1 and not (folder / "model.safetensors").exists()
            got = {}
            for f in set(index["weight_map"].values()):
                got.update(load_file(folder / f))
            want = mean(states, (s - 1, s))
            assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
        else:
            steps = [x for x in (1, 2, 3, 4) if x <= s]
            raw = [0.5 ** (len(steps) - 1 - i) for i in range(len(steps))]
            want = {n: sum(w / sum(raw) * states[x][n].double() for w, x in zip(raw, steps)).float() for n in states[1]}
            got = load_file(folder / "model.safetensors")
            for n in want:
                torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-6)
    r = run_cli("series", root, *change, "-o", out, "--json")
    assert not any(o["written"] for o in json.loads(r.output)["outputs"])  # now they match: kept


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["resaved", "same-size-and-mtime"])
def test_series_redoes_outputs_of_an_input_replaced_in_place(make_run, tmp_path, keep_mtime):
    root, states = make_run("safetensors", steps=(1, 2, 3, 4, 5))
    out = tmp_path / "s"
    first = series(ckptavg.discover(root), out, Selection(window=2), progress=False)
    mtimes = {r.step: (r.path / "model.safetensors").stat().st_mtime_ns for r in first}
    f = root / "step3" / "model.safetensors"
    st = f.stat()
    states[3] = {n: v + 1 for n, v in states[3].items()}  # the trainer re-saved step 3 in place
    save_file(states[3], f, metadata={"format": "pt"})
    if keep_mtime:  # same size, and mtime put back: only the bytes (the file's ends) differ
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert f.stat().st_size == st.st_size
    again = series(ckptavg.discover(root), out, Selection(window=2), progress=False)
    assert {r.step: r.written for r in again} == {2: False, 3: True, 4: True, 5: False}
    for r in again:
        assert_model(r.path, mean(states, (r.step - 1, r.step)))
        if not r.written:
            assert (r.path / "model.safetensors").stat().st_mtime_ns == mtimes[r.step]
    prints = json.loads((out / "step3" / "ckptavg.json").read_text())["inputs"][1]["fingerprint"]["files"]
    assert prints[0]["name"] == "model.safetensors" and prints[0]["size"] == f.stat().st_size


# 3. Two writers, one output ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> tuple[Path, list[torch.Tensor]]:
    """Three checkpoints of 16 MB: a merge holds its lock for a while (fsync included)."""
    root = tmp_path_factory.mktemp("race") / "run"
    values = []
    for i in range(3):
        d = root / f"step{i + 1}"
        d.mkdir(parents=True)
        values.append(torch.full((2**22,), float(4 * i)))
        save_file({"w": values[-1]}, d / "model.safetensors")
    return root, values


def _ckptavg(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ckptavg", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop_when(path: Path, proc: subprocess.Popen) -> None:
    """SIGSTOP ``proc`` as soon as ``path`` exists (it is then a live holder of its lock)."""
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
    proc.send_signal(signal.SIGSTOP)


@pytest.mark.parametrize("command", ["merge", "series"])
def test_a_second_writer_is_refused_while_the_first_holds_the_lock(big_run, tmp_path, command):
    root, values = big_run
    out = tmp_path / "out"
    args = ("--window", 2, "-o", out, "-q")
    lock = lock_path(out) if command == "merge" else lock_path(out / "step3")
    first = _ckptavg(command, root, *args)
    _stop_when(lock, first)
    try:
        second = subprocess.run([sys.executable, "-m", "ckptavg", command, str(root), *map(str, args), "--force"],
                                capture_output=True, text=True)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait() == 0, first.communicate()
    err = second.stderr.strip()
    assert second.returncode == 1 and len(err.splitlines()) == 1, err
    assert f"another ckptavg run (pid {first.pid} on {HOST}" in err and "wait for it to finish" in err
    made = out if command == "merge" else out / "step3"
    with safe_open(made / "model.safetensors", framework="pt") as f:
        assert torch.equal(f.get_tensor("w"), (values[1] + values[2]) / 2)
    assert not lock.exists() and hidden_beside(made) == []


def test_two_merges_started_together_never_both_succeed(big_run, tmp_path):
    root, values = big_run
    out = tmp_path / "out"
    procs = [_ckptavg("merge", root, "--window", 3, "-o", out, "-q") for _ in range(2)]
    results = [(p.wait(), p.communicate()[1]) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    loser = next(err for rc, err in results if rc == 1).strip()
    assert len(loser.splitlines()) == 1 and ("is writing it" in loser or "already exists" in loser), loser
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert torch.equal(f.get_tensor("w"), torch.stack(values).mean(0))
    assert hidden_beside(out) == []


def test_a_dead_processs_lock_on_this_host_is_taken_over(make_run, tmp_path):
    root, states = make_run("safetensors", steps=(1, 2))
    out = tmp_path / "o"
    lock_path(out).write_text(json.dumps({"host": HOST, "pid": dead_pid(), "nonce": "x", "since": "earlier"}))
    assert run_cli("merge", root, "-o", out, "-q").exit_code == 0
    assert_model(out, mean(states, (1, 2)))
    assert hidden_beside(out) == []


def test_taking_over_a_stale_lock_never_removes_a_live_one_that_replaced_it(tmp_path, monkeypatch):
    """Race: we read a dead process's lock, but before we move it another run has taken it over."""
    from ckptavg.io import lock

    out = tmp_path / "o"
    live = {"host": HOST, "pid": os.getpid(), "nonce": "fresh", "since": "now"}
    lock_path(out).write_text(json.dumps(live))
    real_read, calls = lock._read, []

    def stale_first(path: Path):  # type: ignore[no-untyped-def]
        calls.append(path)
        return {"host": HOST, "pid": dead_pid(), "nonce": "old"} if len(calls) == 1 else real_read(path)

    monkeypatch.setattr(lock, "_read", stale_first)
    with pytest.raises(OutputLockedError, match=rf"another ckptavg run \(pid {os.getpid()} on {HOST}"):
        lock.acquire(out)
    assert json.loads(lock_path(out).read_text()) == live and hidden_beside(out) == [lock_path(out).name]


@pytest.mark.parametrize("content", [
    {"host": "gpu-node-7", "pid": 1, "nonce": "x", "since": "2024-01-01T00:00:00+00:00"},
    "not json at all",
], ids=["another-host", "unreadable"])
def test_a_lock_we_cannot_judge_is_never_removed(make_run, tmp_path, content):
    root, _ = make_run("safetensors", steps=(1, 2))
    out = tmp_path / "o"
    lock = lock_path(out)
    lock.write_text(content if isinstance(content, str) else json.dumps(content))
    line = one_line_error(run_cli("merge", root, "-o", out, "-q"))
    assert f"delete {lock}" in line or f"{lock} exists but is not a lock" in line
    if isinstance(content, dict):
        assert "another host (pid 1 on gpu-node-7" in line
    with pytest.raises(OutputLockedError):
        ckptavg.average(ckptavg.discover(root), out, progress=False)
    assert lock.read_text() == (content if isinstance(content, str) else json.dumps(content)) and not out.exists()


def test_cleanup_removes_only_this_hosts_dead_temporaries(make_run, tmp_path):
    root, _ = make_run("safetensors", steps=(1, 2))
    out = tmp_path / "o"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead-here": f".o.ckptavg-tmp-{HOST}-{dead_pid()}-0000dead",
            "live-here": f".o.ckptavg-tmp-{HOST}-{sleeper.pid}-00001ive",
            "other-host": f".o.ckptavg-tmp-gpu-node-7-{dead_pid()}-0000beef",  # that pid means nothing here
            "old-name": f".o.ckptavg-tmp-{dead_pid()}-0000a1d0",  # no host: cannot be judged
        }
        for n in names.values():
            (tmp_path / n).mkdir()
            (tmp_path / n / "model.safetensors").write_bytes(b"partial")
        assert run_cli("merge", root, "-o", out, "-q").exit_code == 0
    finally:
        sleeper.kill()
        sleeper.wait()
    assert {k for k, n in names.items() if (tmp_path / n).exists()} == {"live-here", "other-host", "old-name"}


# 4. Disk full names the file -----------------------------------------------------------------------


def _unshare_ok() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(sys.platform != "linux" or not _unshare_ok(), reason="needs unshare -rm and tmpfs (Linux)")
@pytest.mark.parametrize("command", ["merge", "series"])
def test_a_real_full_disk_is_one_line_naming_the_file(make_run, tmp_path, command):
    """A 32 KB tmpfs (a real ENOSPC from the kernel) is too small for the ~50 KB model."""
    root, _ = make_run("safetensors", steps=(1, 2))
    before = tree_hash(root)
    disk = tmp_path / "disk"
    disk.mkdir()
    script = ('mount -t tmpfs -o size=32k tmpfs "$1" || exit 99; "$2" -m ckptavg "$3" "$4" --window 2 -o "$1/out" -q; '
              'echo "rc=$?"; ls -A "$1"; [ -d "$1/out" ] && ls -A "$1/out"; true')
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(disk), sys.executable, command, str(root)],
                       capture_output=True, text=True)
    lines = r.stdout.split()
    assert lines[0] == "rc=1", (r.stdout, r.stderr)
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    named = disk / "out" / ("model.safetensors" if command == "merge" else "step2/model.safetensors")
    assert f"{named}: No space left on device while writing the output (the output needs about" in err
    assert "nothing was left in place" in err
    assert lines[1:] == ([] if command == "merge" else ["out"])  # series: its (empty) folder only
    assert tree_hash(root) == before


def test_series_over_the_file_size_limit_keeps_the_earlier_outputs(make_run, tmp_path):
    root, states = make_run("safetensors", steps=(1, 2, 3))
    out = tmp_path / "s"
    series(ckptavg.discover(root), out, Selection(window=2), progress=False)
    before, outputs = tree_hash(root), tree_hash(out)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # smaller than the ~50 KB model

    r = subprocess.run([sys.executable, "-m", "ckptavg", "series", str(root), "--window", "3", "--partial", "-o",
                        str(out), "-q"], capture_output=True, text=True, preexec_fn=limit)
    err = r.stderr.strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1, err
    assert f"{out / 'step1' / 'model.safetensors'}: File too large while writing the output" in err
    assert tree_hash(out) == outputs and sorted(p.name for p in out.iterdir()) == ["step2", "step3"]
    assert tree_hash(root) == before
    assert_model(out / "step3", mean(states, (2, 3)))  # the earlier window-2 outputs, intact


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG], ids=["ENOSPC", "EDQUOT", "EFBIG"])
@pytest.mark.parametrize("where", ["weights", "manifest"])
def test_disk_full_anywhere_in_the_write_names_that_file(make_run, tmp_path, monkeypatch, code, where):
    root, _ = make_run("safetensors", steps=(1, 2))
    before = tree_hash(root)
    out = tmp_path / "o"
    if where == "weights":
        real = os.pwrite

        def pwrite(fd: int, data, pos: int) -> int:  # type: ignore[no-untyped-def]
            if pos > 10_000:  # the header is in; the disk fills up in the tensor data
                raise OSError(code, os.strerror(code))
            return real(fd, data, pos)

        monkeypatch.setattr(os, "pwrite", pwrite)
        named = out / "model.safetensors"
    else:
        def write(directory: Path, manifest) -> None:  # type: ignore[no-untyped-def]
            raise OSError(code, os.strerror(code), str(directory / "ckptavg.json"))

        monkeypatch.setattr(manifest_module, "write", write)
        named = out / "ckptavg.json"
    with pytest.raises(OutputError) as e:
        ckptavg.average(ckptavg.discover(root), out, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{named}: {os.strerror(code)} while writing the output") and "\n" not in msg
    assert ("needs about" in msg) == (where == "weights") and "free space or choose another -o" in msg
    assert not out.exists() and hidden_beside(out) == [] and tree_hash(root) == before
