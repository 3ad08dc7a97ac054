"""What a user installs: the wheel ``python -m build`` makes, and that wheel installed into an
environment that already trains models with transformers 4.57 (which pins huggingface_hub < 1.0).

Slow: these build a wheel and fresh virtual environments. The second one installs torch 2.13.0 (the
CPU wheel on this machine's disk) and transformers 4.57.6 from PyPI, so it needs the package index;
pip's own cache makes a second run cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hubserver import HubServer, Repo
from safetensors.torch import load_file

from conftest import HELD_OUT

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # any other version from PyPI is a multi-GB CUDA build
USER_STACK = ["transformers==4.57.6"]  # resolves huggingface_hub 0.36.x, tokenizers 0.22.x
SHIPPED = ["ckptavg/py.typed", "ckptavg/tasks/ckptavg_basics/ckptavg_basics.yaml",
           "ckptavg/tasks/ckptavg_basics/ckptavg_basics.jsonl"]


def sh(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert r.returncode == 0, f"{' '.join(map(str, args))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def new_venv(path: Path) -> Path:
    sh(sys.executable, "-m", "venv", path)
    return path / "bin"


def versions(bin_dir: Path) -> dict[str, str]:
    r = sh(bin_dir / "python", "-m", "pip", "list", "--format=json", "--disable-pip-version-check")
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(r.stdout)}


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build`` (sdist, then the wheel from the sdist) on a copy of the tree, so the
    build leaves nothing in the checkout."""
    src = tmp_path_factory.mktemp("src") / "ckptavg"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "example", "bench-work", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
        ".hypothesis"))
    out = tmp_path_factory.mktemp("dist")
    sh(sys.executable, "-m", "build", "--outdir", out, src)
    (whl,) = out.glob("ckptavg-*.whl")
    return whl


def test_the_wheel_ships_the_task_and_types_and_runs_in_a_fresh_venv(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in SHIPPED if n not in names] == []
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Dist: huggingface_hub>=0.20" in meta and "Requires-Dist: torch>=2.1" in meta

    # The wheel alone in a new venv; its dependencies come from this test's environment through a
    # .pth file (a path listed there is searched, its own .pth files, e.g. an editable ckptavg, are not).
    bin_dir = new_venv(tmp_path / "env")
    sh(bin_dir / "pip", "install", "--no-deps", "--disable-pip-version-check", "-q", wheel)
    site = next((tmp_path / "env" / "lib").glob("python3*/site-packages"))
    (site / "parent-env.pth").write_text("".join(p + "\n" for p in sys.path if p.endswith("site-packages")))
    r = sh(bin_dir / "python", "-c", "import ckptavg, pathlib; from ckptavg.eval.tasks import packaged_tasks; "
           "print(ckptavg.__file__); print(packaged_tasks()); print((pathlib.Path(ckptavg.__file__).parent / 'py.typed').is_file())",
           cwd=tmp_path)
    where, tasks, typed = r.stdout.splitlines()
    assert Path(where).is_relative_to(site) and tasks == "['ckptavg_basics']" and typed == "True"
    r = sh(bin_dir / "ckptavg", "--help", cwd=tmp_path)
    assert "merge" in r.stdout and "eval" in r.stdout and r.stderr == ""


# Run with the user environment's Python: its own transformers writes the checkpoints, as in a
# user's run (a tokenizer saved by transformers 5 names a class 4.x does not have).
WRITE_RUN = """
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

out, text = Path(sys.argv[1]), sys.argv[2:]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=96, special_tokens=["<|endoftext|>", "<unk>"],
                                                  show_progress=False))
tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")
config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64, eos_token_id=0, bos_token_id=0)
for i, step in enumerate((100, 200, 300)):
    torch.manual_seed(i)
    GPTNeoXForCausalLM(config).save_pretrained(out / f"step{step}")
    tok.save_pretrained(out / f"step{step}")
"""


def test_a_transformers_4_57_env_keeps_its_stack_and_runs_ckptavg(wheel, held_out, tmp_path):
    """pip install ckptavg into torch 2.13 + transformers 4.57.6 (+ its huggingface_hub 0.36) changes
    none of the packages already there; there, on checkpoints that environment's transformers wrote,
    hf:// list/merge work offline from the cache an online merge filled, and eval --text scores the
    merged folder as ckptavg in this (newest) environment does."""
    bin_dir = new_venv(tmp_path / "user")
    pip = [bin_dir / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    sh(*pip, TORCH)
    sh(*pip, *USER_STACK)
    before = versions(bin_dir)
    assert before["transformers"] == "4.57.6" and before["huggingface-hub"].startswith("0.")
    sh(*pip, wheel)
    after = versions(bin_dir)
    assert {k: after.get(k) for k in before} == before  # nothing upgraded, downgraded or removed
    assert set(after) - set(before) <= {"ckptavg", "click"}, set(after) - set(before)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}

    def ckptavg(*args: object, **extra: str) -> subprocess.CompletedProcess[str]:
        return sh(bin_dir / "ckptavg", *args, cwd=tmp_path, env=env | extra)

    run = tmp_path / "run"
    sh(bin_dir / "python", "-c", WRITE_RUN, run, *HELD_OUT, env=env)
    repo = Repo("org/tiny-user")
    for step in (100, 200, 300):
        repo.commit(f"step{step}", {f.name: f.read_bytes() for f in (run / f"step{step}").iterdir()})
    with HubServer([repo]) as server:
        ckptavg("merge", "hf://org/tiny-user", "--window", 2, "--at", 200, "-o", "online", "-q",
                HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0")
    offline = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
    r = ckptavg("list", "hf://org/tiny-user", **offline)
    assert "tiny-user: 2 checkpoints" in r.stdout and "@step200" in r.stdout and r.stderr == ""
    r = ckptavg("merge", "hf://org/tiny-user", "--window", 2, "-o", "offline", "-q", **offline)
    assert r.stderr == ""
    a, b = (load_file(run / f"step{s}" / "model.safetensors") for s in (100, 200))
    want = {k: (a[k] + b[k]) / 2 for k in b}
    for name in ("online", "offline"):
        got = load_file(tmp_path / name / "model.safetensors")
        assert set(got) == set(want) and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want), name

    from ckptavg.eval import score

    r = ckptavg("eval", "offline", "--text", held_out["txt"], "--seq-len", 16, "--json", **offline)
    assert "fatal" not in r.stderr and "Traceback" not in r.stderr
    theirs = json.loads(r.stdout)["held_out"]
    ours = score(tmp_path / "offline", text=held_out["txt"], seq_len=16)["held_out"]
    assert theirs["tokens"] == ours["tokens"] and theirs["loss"] == pytest.approx(ours["loss"], rel=1e-5)
