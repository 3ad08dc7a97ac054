"""hf:// trajectories driven through the real huggingface_hub client against a loopback Hub.

The endpoint (tests/hubserver.py) serves a tiny GPT-NeoX "Pythia": step branches in .bin, sharded
.bin and safetensors, one branch byte-identical to another, ``main`` and a non-step branch. Every
test gets its own HF cache in tmp_path and its own server; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hubserver import HubServer, Repo, set_client
from safetensors.torch import load_file
from safetensors.torch import save as st_save

import ckptavg
from ckptavg import hub as hubmod
from ckptavg.cli import cli
from ckptavg.errors import CkptavgError
from ckptavg.selection import Selection
from conftest import integer_state, tiny_config

REPO = "org/pythia-tiny"
URI = f"hf://{REPO}"
# step → layout, as Pythia mixes them across its suite (fp32 here so averages are exact)
LAYOUT = {1000: "bin", 2000: "bin", 3000: "bin-sharded", 4000: "safetensors", 5000: "safetensors"}
DUPLICATE = (6000, 5000)  # step6000's branch holds step5000's bytes


def _bin(sd: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def _weights(sd: dict[str, torch.Tensor], layout: str) -> dict[str, bytes]:
    if layout == "bin":
        return {"pytorch_model.bin": _bin(sd)}
    if layout == "safetensors":
        return {"model.safetensors": st_save(sd, metadata={"format": "pt"})}
    names = list(sd)
    half = len(names) // 2
    files, wm = {}, {}
    for i, part in enumerate((names[:half], names[half:]), 1):
        fname = f"pytorch_model-{i:05d}-of-00002.bin"
        files[fname] = _bin({k: sd[k] for k in part})
        wm |= {k: fname for k in part}
    files["pytorch_model.bin.index.json"] = json.dumps({"metadata": {}, "weight_map": wm}).encode()
    return files


def _revision(step: int, weights: dict[str, bytes]) -> dict[str, bytes]:
    return weights | {
        "config.json": tiny_config().to_json_string().encode(),
        "tokenizer_config.json": json.dumps({"step": step}).encode(),  # tells which revision it came from
        "README.md": b"# tiny\n",
    }


@pytest.fixture(scope="session")
def states(base_state_dict) -> dict[int, dict[str, torch.Tensor]]:
    return {s: integer_state(base_state_dict, seed=7 + i) for i, s in enumerate(LAYOUT)}


@pytest.fixture(scope="session")
def repos(states) -> list[Repo]:
    pythia = Repo(REPO)
    for step, layout in LAYOUT.items():
        pythia.commit(f"step{step}", _revision(step, _weights(states[step], layout)))
    dup, of = DUPLICATE
    pythia.commit(f"step{dup}", _revision(dup, _weights(states[of], LAYOUT[of])))
    pythia.branches["main"] = pythia.branches[f"step{dup}"]
    pythia.commit("dev", _revision(0, _weights(states[1000], "bin")))

    olmo = Repo("org/olmo-tiny")  # OLMo names its branches stepN-tokensM
    for i, step in enumerate((10, 20)):
        olmo.commit(f"step{step}-tokens{step // 10}B", _revision(step, _weights(states[1000 * (i + 1)], "safetensors")))
    olmo.branches["main"] = olmo.branches["step20-tokens2B"]

    bad = Repo("org/bad")
    sd = states[1000]
    missing_shard = _weights(sd, "bin-sharded")
    del missing_shard["pytorch_model-00002-of-00002.bin"]
    bad.commit("step1", _revision(1, missing_shard))
    bad.commit("step2", _revision(2, {"pytorch_model.bin.index.json": b"{not json", "pytorch_model-00001-of-00001.bin": _bin(sd)}))
    names = list(sd)
    lying = {"model-00001-of-00002.safetensors": st_save({k: sd[k] for k in names[:3]}),
             "model-00002-of-00002.safetensors": st_save({k: sd[k] for k in names[3:]}),
             "model.safetensors.index.json": json.dumps({"weight_map": {  # names[0] sits in shard 1, not 2
                 k: f"model-0000{1 + (i >= 3 or i == 0)}-of-00002.safetensors" for i, k in enumerate(names)}}).encode()}
    bad.commit("step3", _revision(3, lying))

    reshaped = Repo("org/reshaped")  # same names, one tensor flattened at the later step
    flat = dict(sd) | {names[0]: sd[names[0]].reshape(-1)}
    reshaped.commit("step10", _revision(10, _weights(sd, "safetensors")))
    reshaped.commit("step20", _revision(20, _weights(flat, "safetensors")))
    return [pythia, olmo, bad, reshaped]


@pytest.fixture
def hub(repos, tmp_path, monkeypatch):
    """A live loopback Hub and an empty HF cache for this test; huggingface_hub pointed at both."""
    server = HubServer(repos)
    home = tmp_path / "hf_home"
    set_client(monkeypatch, ENDPOINT=server.url,
               HUGGINGFACE_CO_URL_TEMPLATE=server.url + "/{repo_id}/resolve/{revision}/{filename}",
               HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), HF_HUB_OFFLINE=False,
               HF_TOKEN_PATH=str(home / "token"), HF_STORED_TOKENS_PATH=str(home / "stored_tokens"),
               AGENT_HARNESSES_PATH=str(home / "agents.json"), HF_HUB_DISABLE_TELEMETRY=True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hubmod.transport, "RETRY_WAIT", 0.01)
    with server:
        server.home = home  # type: ignore[attr-defined]
        yield server


def offline(monkeypatch, on: bool = True) -> None:
    set_client(monkeypatch, HF_HUB_OFFLINE=on)


def oracle(states, steps) -> dict[str, torch.Tensor]:
    """The independent average: torch.stack(...).mean(0) over the selected steps' state dicts."""
    return {k: torch.stack([states[s][k] for s in steps]).mean(0) for k in states[steps[0]]}


def assert_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def run(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def repo_cache(server) -> Path:  # type: ignore[no-untyped-def]
    return server.home / "hub" / "models--org--pythia-tiny"


# Discovery ---------------------------------------------------------------------------------------

def test_discovery_reads_step_branches_and_lfs_metadata_only(hub):
    traj = ckptavg.discover(URI)
    pythia = hub.repos[REPO]
    assert traj.name == "pythia-tiny" and traj.root == URI
    assert traj.steps == [1000, 2000, 3000, 4000, 5000, 6000]  # main and dev carry no step
    assert [c.format for c in traj] == ["torch", "torch", "torch", "safetensors", "safetensors", "safetensors"]
    for c in traj:
        files = pythia.commits[pythia.branches[f"step{c.step}"]]
        assert c.location == f"{URI}@step{c.step}" and c.files == () and c.tensors is None
        assert c.source.commit == pythia.branches[f"step{c.step}"]
        assert c.size == sum(len(files[f.name]) for f in c.source.weights)
        assert all(len(f.sha256) == 64 for f in c.source.weights)
    assert [f.name for f in traj.at(3000).source.weights] == ["pytorch_model-00001-of-00002.bin",
                                                             "pytorch_model-00002-of-00002.bin"]
    assert traj.at(5000).source.same_as == ("step6000",) and traj.at(6000).source.same_as == ("step5000",)
    assert not any(traj.at(s).source.same_as for s in (1000, 2000, 3000, 4000))
    # Only the sharded revision's small index file was fetched; no weights, no headers.
    assert [h.path.rsplit("/", 1)[-1] for h in hub.downloads()] == ["pytorch_model.bin.index.json"]


def test_one_revision_and_other_step_patterns(hub):
    assert ckptavg.discover(f"{URI}@step2000").steps == [2000]
    olmo = ckptavg.discover("hf://org/olmo-tiny", step_pattern=r"^step(\d+)-tokens\d+B$")
    assert olmo.steps == [10, 20] and olmo.at(20).location == "hf://org/olmo-tiny@step20-tokens2B"
    with pytest.raises(CkptavgError, match=r"no branch matches the step pattern .*branches: main, step10-tokens1B"):
        ckptavg.discover("hf://org/olmo-tiny")


@pytest.mark.parametrize("uri, pattern, msg", [
    ("hf://org/nope", None, r"^hf://org/nope: no such model repository on http://127\.0\.0\.1"),
    ("hf://datasets/org/pythia-tiny", None, "a dataset repository; only model repositories"),
    ("hf://org/pythia-tiny/config.json", None, "a path inside the repo"),
    ("hf://org/pythia-tiny@main", None, r"branch 'main' does not match the step pattern"),
    ("hf://org/pythia-tiny@step999", None, r"the repo has no branch 'step999'; `ckptavg list hf://org/pythia-tiny`"),
    (URI, "step(", "not a regular expression"),
    (URI, "^step", "needs one group holding the step"),
    ("hf://org/bad@step1", None, r"^hf://org/bad@step1/pytorch_model\.bin\.index\.json: shard pytorch_model-00002-of-00002\.bin is missing$"),
    ("hf://org/bad@step2", None, r"^hf://org/bad@step2/pytorch_model\.bin\.index\.json: not a valid index file"),
], ids=["unknown-repo", "dataset", "path", "main-not-a-step", "unknown-branch", "bad-regex", "no-group",
        "index-missing-shard", "index-not-json"])
def test_discovery_errors_are_one_line_and_name_repo_revision_file(hub, uri, pattern, msg):
    with pytest.raises(CkptavgError, match=msg) as e:
        ckptavg.discover(uri, step_pattern=pattern)
    assert "\n" not in str(e.value)


def test_list_cli_shows_hub_checkpoints_and_duplicates(hub):
    r = run("list", URI)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "pythia-tiny: 6 checkpoints"
    row = next(line for line in lines if line.strip().startswith("5000"))
    assert row.endswith(f"{URI}@step5000  [same weights as step6000]")
    assert "warning: 2 revisions have byte-identical weight files" in r.stderr
    data = json.loads(run("list", URI, "--json").stdout)
    assert [c["duplicates"] for c in data["checkpoints"]] == [[], [], [], [], ["step6000"], ["step5000"]]
    r = run("list", "hf://org/nope")
    assert r.exit_code == 1 and r.stderr.startswith("Error: hf://org/nope: no such model repository")
    assert "Traceback" not in r.output


# Merging -----------------------------------------------------------------------------------------

def test_merge_mixed_layouts_equals_independent_average_and_downloads_each_file_once(hub, states, tmp_path):
    sel = ckptavg.discover(URI).window(4, at=4000)  # .bin, .bin, sharded .bin, safetensors
    out = ckptavg.average(sel, tmp_path / "lawa4", progress=False)
    assert_exact(load_file(out / "model.safetensors"), oracle(states, [1000, 2000, 3000, 4000]))
    # config/tokenizer files come from the newest revision only, and are fetched from it alone
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"step": 4000}
    fetched = [h.path for h in hub.downloads() if h.path.endswith(("config.json", "README.md"))]
    step4000 = hub.repos[REPO].branches["step4000"]
    assert sorted(p.rsplit("/", 1)[-1] for p in fetched) == ["config.json", "tokenizer_config.json"]
    assert all(f"/{step4000}/" in p for p in fetched)
    manifest = json.loads((out / "ckptavg.json").read_text())
    assert [i["location"] for i in manifest["inputs"]] == [f"{URI}@step{s}" for s in (1000, 2000, 3000, 4000)]
    assert [i["commit"] for i in manifest["inputs"]] == [hub.repos[REPO].branches[f"step{s}"] for s in (1000, 2000, 3000, 4000)]

    from transformers import GPTNeoXForCausalLM

    GPTNeoXForCausalLM.from_pretrained(out)  # an HF-loadable directory

    # Into the standard cache layout, refs included, so other HF tools (and offline runs) reuse them.
    cache = repo_cache(hub)
    assert sorted(p.name for p in (cache / "refs").iterdir()) == ["step1000", "step2000", "step3000", "step4000"]
    weights = [f for c in sel for f in c.source.weights]
    assert sorted(p.name for p in (cache / "blobs").iterdir() if len(p.name) == 64) == sorted(f.sha256 for f in weights)

    # Never twice: a second merge of an overlapping window reads the cache; only the new newest
    # revision's tokenizer file is new (its config.json has the same bytes, so it is linked, not fetched).
    before = len(hub.downloads())
    assert_exact(ckptavg.average(ckptavg.discover(URI).window(2, at=3000), progress=False), oracle(states, [2000, 3000]))
    assert [h.path.rsplit("/", 1)[-1] for h in hub.downloads()[before:]] == ["tokenizer_config.json"]
    paths = [h.path for h in hub.downloads()]
    assert len(paths) == len(set(paths))


def test_merge_cli_default_output_in_cwd(hub, states, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("merge", URI, "--window", 2, "--at", 4000, "--quiet")
    assert r.exit_code == 0, r.output
    out = tmp_path / "pythia-tiny-uniform2-step4000"
    assert f"wrote {out}" in r.stdout
    assert_exact(load_file(out / "model.safetensors"), oracle(states, [3000, 4000]))
    r = run("merge", URI, "--window", 3, "--dry-run")
    assert r.exit_code == 0 and "steps 4000..6000" in r.stdout


def test_duplicates_are_refused_before_any_download_unless_allowed(hub, states, tmp_path):
    traj = ckptavg.discover(URI)
    with pytest.raises(CkptavgError, match=r"^hf://org/pythia-tiny@step5000: weight files are byte-identical "
                                           r"\(same LFS sha256\) to branch step6000.*pass --allow-duplicates"):
        ckptavg.average(traj.window(2, at=6000), tmp_path / "x")
    with pytest.raises(CkptavgError, match="step5000"):  # a duplicate counts even if its twin is not selected
        ckptavg.average(traj.window(2, at=5000))
    assert not hub.probes() and [h.path.rsplit("/", 1)[-1] for h in hub.downloads()] == ["pytorch_model.bin.index.json"]
    assert not (tmp_path / "x").exists()

    with pytest.warns(hubmod.HubWarning, match="averaging anyway"):
        got = ckptavg.average(traj.window(2, at=6000), allow_duplicates=True, progress=False)
    assert_exact(got, oracle(states, [5000, 5000]))
    assert len(hub.downloads("model.safetensors")) == 1  # the shared blob is fetched once, linked twice

    r = run("merge", URI, "--steps", "4000,6000", "-o", tmp_path / "c", "--quiet")
    assert r.exit_code == 1 and "--allow-duplicates" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("merge", URI, "--steps", "4000,6000", "-o", tmp_path / "c", "--quiet", "--allow-duplicates")
    assert r.exit_code == 0, r.output
    assert "warning: hf://org/pythia-tiny@step6000: weight files are byte-identical" in r.stderr
    assert_exact(load_file(tmp_path / "c" / "model.safetensors"), oracle(states, [4000, 5000]))

    # series reads the same trajectories through the same flags
    with pytest.raises(ckptavg.DuplicateError):
        next(ckptavg.iter_series(traj, Selection(window=2, steps=(6000,))))
    r = run("series", URI, "--window", "2", "--steps", "6000", "-o", tmp_path / "s", "--quiet")
    assert r.exit_code == 1 and "--allow-duplicates" in r.stderr and not (tmp_path / "s" / "step6000").exists()
    r = run("series", URI, "--window", "2", "--steps", "6000", "-o", tmp_path / "s", "--quiet", "--allow-duplicates")
    assert r.exit_code == 0, r.output
    assert_exact(load_file(tmp_path / "s" / "step6000" / "model.safetensors"), oracle(states, [5000, 5000]))


@pytest.mark.parametrize("uri, msg", [
    ("hf://org/bad@step3", r"^hf://org/bad@step3/model\.safetensors\.index\.json: tensor 'gpt_neox\.embed_in\.weight' is "
                           r"listed in model-00002-of-00002\.safetensors but stored in model-00001-of-00002\.safetensors$"),
    ("hf://org/reshaped", r"^step 10 \(hf://org/reshaped@step10\): tensor '.+' has shape \[\d+, \d+\], step 20 has \[\d+\]$"),
], ids=["index-disagrees-with-headers", "shapes-differ"])
def test_safetensors_headers_are_checked_before_the_big_downloads(hub, uri, msg):
    traj = ckptavg.discover(uri)
    with pytest.raises(CkptavgError, match=msg):
        ckptavg.average(traj)
    assert hub.probes()  # headers were read with range requests …
    assert not [h for h in hub.downloads() if h.path.endswith(".safetensors")]  # … and no weights downloaded


# Faults ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("faults", [
    [("500", {"file": "pytorch_model.bin", "branch": "step1000"}), ("500", {"api": "refs"}), ("500", {"api": "tree"})],
    [("drop", {"file": "pytorch_model.bin", "branch": "step2000"})],
    [("corrupt", {"file": "pytorch_model-00001-of-00002.bin"}), ("corrupt", {"file": "model.safetensors"})],
], ids=["500-first-try", "dropped-mid-file", "corrupt-once"])
def test_transient_faults_are_retried_and_the_merge_is_exact(hub, states, faults, tmp_path, monkeypatch):
    # huggingface_hub writes what it received in chunks of this size and resumes after the last one;
    # the default (10 MB) is bigger than these files, so the resumed request would start at 0.
    set_client(monkeypatch, DOWNLOAD_CHUNK_SIZE=8192)
    for kind, where in faults:
        hub.fault(kind, repo=REPO, **where)
    out = ckptavg.average(ckptavg.discover(URI).window(4, at=4000), tmp_path / "o", progress=False)
    assert_exact(load_file(out / "model.safetensors"), oracle(states, [1000, 2000, 3000, 4000]))
    hits = [h for h in hub.log if h.fault]
    assert sorted({h.fault for h in hits}) == sorted({k for k, _ in faults})
    if faults[0][0] == "drop":  # resumed where the connection broke, with a Range request
        resumed = [h for h in hub.downloads("pytorch_model.bin") if h.range and h.range.endswith("-")]
        assert resumed and resumed[0].status == 206
    if faults[0][0] == "corrupt":  # the bad copies were thrown away and fetched again
        assert len(hub.downloads("pytorch_model-00001-of-00002.bin")) == 2


@pytest.mark.parametrize("kind, msg", [
    ("corrupt", r"corrupt download \(bytes hash to [0-9a-f]{12}…, the Hub lists [0-9a-f]{12}…\); the copy was removed"),
    ("500", r"500"),
], ids=["always-corrupt", "always-500"])
def test_persistent_faults_fail_clearly_and_leave_no_file(hub, kind, msg, tmp_path):
    hub.fault(kind, file="pytorch_model.bin", repo=REPO, branch="step2000", times=-1)
    sel = ckptavg.discover(URI).window(2, at=2000)
    with pytest.raises(CkptavgError, match=rf"^hf://org/pythia-tiny@step2000/pytorch_model\.bin: download failed 4 times, last: .*{msg}"):
        ckptavg.average(sel, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    bad = sel.at(2000).source.weights[0].sha256
    blobs = repo_cache(hub) / "blobs"
    assert not (blobs / bad).exists() and not list(blobs.glob("*.incomplete"))
    snap = repo_cache(hub) / "snapshots" / sel.at(2000).source.commit / "pytorch_model.bin"
    assert not snap.exists() and not snap.is_symlink()


@pytest.mark.slow  # real read timeouts (1 s each) in a fresh process
@pytest.mark.parametrize("stalls", [2, 6], ids=["client-resumes", "one-retry"])
def test_a_stalled_download_says_one_line_per_retry_at_most(hub, states, tmp_path, stalls):
    """The server sends headers and 16 bytes, then nothing. huggingface_hub times out and resumes on
    its own up to 5 times, each with a two-line warning (52 lines of them before this was fixed);
    ckptavg's own attempt fails after 6 stalls and is retried with one line."""
    hub.fault("stall", file="pytorch_model.bin", repo=REPO, branch="step2000", times=stalls)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_ENDPOINT": hub.url,
            "HF_HUB_OFFLINE": "0", "HF_HUB_DOWNLOAD_TIMEOUT": "1"}
    args = ["merge", URI, "--window", 2, "--at", 2000, "-o", tmp_path / "o", "-q"]
    r = subprocess.run([sys.executable, "-m", "ckptavg", *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert len([h for h in hub.log if h.fault == "stall"]) == stalls
    assert_exact(load_file(tmp_path / "o" / "model.safetensors"), oracle(states, [1000, 2000]))
    want = [] if stalls < 6 else ["warning: hf://org/pythia-tiny@step2000/pytorch_model.bin: timed out; retry 1 of 3"]
    assert r.stderr.splitlines() == want


# Offline and eviction ----------------------------------------------------------------------------

def test_offline_works_from_the_cache_the_online_run_filled(hub, states, tmp_path, monkeypatch):
    online = ckptavg.average(ckptavg.discover(URI).window(4, at=4000), tmp_path / "online", progress=False)
    hub.stop()  # nothing to talk to any more
    offline(monkeypatch)
    traj = ckptavg.discover(URI)
    assert traj.steps == [1000, 2000, 3000, 4000]  # what the cache holds, from its refs
    out = ckptavg.average(traj.window(4), tmp_path / "offline", progress=False)
    assert_exact(load_file(out / "model.safetensors"), load_file(online / "model.safetensors"))
    assert (out / "tokenizer_config.json").read_text() == (online / "tokenizer_config.json").read_text()
    with pytest.raises(CkptavgError, match=r"the cache holds no branch 'step5000'"):
        ckptavg.discover(f"{URI}@step5000")
    with pytest.raises(CkptavgError, match=r"^hf://org/olmo-tiny: HF_HUB_OFFLINE=1 and the Hugging Face cache .* holds no revision"):
        ckptavg.discover("hf://org/olmo-tiny")


@pytest.mark.slow
def test_cli_in_fresh_processes_online_then_offline(hub, states, tmp_path):
    """The environment variables a user sets: HF_ENDPOINT and HF_HOME online, then HF_HUB_OFFLINE=1
    with the endpoint gone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

    def ckptavg_cli(*args: object, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ckptavg", *map(str, args)], env=env | extra, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    r = ckptavg_cli("merge", URI, "--window", 2, "--at", 4000, "-o", "online", "-q",
                    HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    assert r.returncode == 0, r.stderr
    hub.stop()
    r = ckptavg_cli("list", URI, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert "pythia-tiny: 2 checkpoints" in r.stdout and "@step4000" in r.stdout
    r = ckptavg_cli("merge", URI, "--window", 2, "-o", "offline", "-q", HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    want = oracle(states, [3000, 4000])
    assert_exact(load_file(tmp_path / "online" / "model.safetensors"), want)
    assert_exact(load_file(tmp_path / "offline" / "model.safetensors"), want)


def test_evict_frees_consumed_weights_and_keeps_what_others_use(hub, states, tmp_path, monkeypatch):
    traj = ckptavg.discover(URI)
    r = run("merge", URI, "--window", 4, "--at", 4000, "-o", tmp_path / "a", "-q")
    assert r.exit_code == 0, r.output
    freed = hubmod.evict(traj.window(2, at=4000))
    assert freed == traj.at(3000).size + traj.at(4000).size
    cache = repo_cache(hub)
    for c in traj.window(2, at=4000):
        assert not any((cache / "blobs" / f.sha256).exists() for f in c.source.weights)
    assert (cache / "refs" / "step4000").is_file()
    assert (cache / "snapshots" / traj.at(4000).source.commit / "config.json").is_file()

    offline(monkeypatch)
    with pytest.warns(hubmod.HubWarning, match=r"2 step branches have no complete weights in the cache, skipped: step3000, step4000"):
        assert ckptavg.discover(URI).steps == [1000, 2000]
    offline(monkeypatch, False)

    # Duplicates share one blob: evicting one name keeps the bytes the other still links to.
    with pytest.warns(hubmod.HubWarning):
        ckptavg.average(traj.window(2, at=6000), allow_duplicates=True, progress=False)
    hubmod.evict([traj.at(5000)])
    sha = traj.at(6000).source.weights[0].sha256
    assert (cache / "blobs" / sha).is_file()

    r = run("merge", URI, "--window", 2, "--at", 4000, "-o", tmp_path / "b", "-q", "--evict", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["evicted_bytes"] == freed  # fetched again for this merge, then evicted again
    assert_exact(load_file(tmp_path / "b" / "model.safetensors"), oracle(states, [3000, 4000]))


def test_importing_the_hub_module_and_cli_stays_cheap():
    code = ("import sys, ckptavg.hub, ckptavg.cli; "
            "heavy = {'huggingface_hub', 'httpx2', 'httpx', 'requests', 'numpy', 'torch'} & set(sys.modules); assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_step_pattern_is_for_hub_trajectories_only(make_run):
    root, _ = make_run("safetensors", steps=(1, 2))
    with pytest.raises(CkptavgError, match="--step-pattern applies to hf:// trajectories only"):
        ckptavg.discover(root, step_pattern=r"^step(\d+)$")


def test_series_over_hub_revisions_downloads_only_what_windows_need(hub, states, tmp_path):
    from ckptavg.series import series

    res = series(ckptavg.discover(URI), tmp_path / "s", Selection(window=2, start=3000, stop=4000), progress=False)
    assert [r.step for r in res] == [3000, 4000]
    for r in res:
        assert_exact(load_file(r.path / "model.safetensors"), oracle(states, [r.step - 1000, r.step]))
        assert (r.path / "config.json").is_file()
    assert sorted(p.name for p in (repo_cache(hub) / "refs").iterdir()) == ["step2000", "step3000", "step4000"]


def test_cached_blobs_are_hashed_once_and_again_if_touched(hub, states, tmp_path, monkeypatch):
    calls = []
    real = hubmod.cache._verify
    monkeypatch.setattr(hubmod.cache, "_verify", lambda path, f: calls.append(f.name) or real(path, f))
    sel = ckptavg.discover(URI).window(1, at=4000)
    ckptavg.average(sel, progress=False)
    first = len(calls)
    assert "model.safetensors" in calls
    ckptavg.average(ckptavg.discover(URI).window(1, at=4000), progress=False)
    assert len(calls) == first  # verified before, untouched since: not hashed again
    blob = next(p for p in (repo_cache(hub) / "blobs").iterdir() if p.name == sel[0].source.weights[0].sha256)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1  # same size, other bytes: the stamp no longer matches, the copy is re-fetched
    blob.write_bytes(bytes(data))
    assert_exact(ckptavg.average(ckptavg.discover(URI).window(1, at=4000), progress=False), oracle(states, [4000]))
    assert calls.count("model.safetensors") >= 2
