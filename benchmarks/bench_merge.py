"""Benchmark ``ckptavg merge`` against a naive in-memory average, mergekit and a plain read.

Builds (once, cached under --work) a trajectory of K checkpoints of a ~134M-parameter
Llama-shaped fp32 model (~512 MB of safetensors each), then times, side by side, each contender
in its own subprocess under ``/usr/bin/time -v`` (wall clock and peak RSS), with the page cache
warmed identically before every run. A second part checks that ckptavg's peak RSS stays flat as
k grows (k = 2, 5, 20; the k = 20 run is made of hard links, so it costs no disk).

    python benchmarks/bench_merge.py [--work bench-work] [--repeats 3]   (or: make bench)

Prints one table and writes it as JSON to <work>/bench_merge.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

# --- knobs -----------------------------------------------------------------------------------
# Llama shape with ~134M parameters (untied embeddings): big enough that a full in-memory load
# costs real RAM (k x 512 MB) and that streaming vs. loading shows up, small enough that K copies
# fit in ~2.6 GB of disk and the whole benchmark runs in minutes on a 2-core CPU box.
MODEL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
             intermediate_size=2048, vocab_size=32000, tie_word_embeddings=False)
K = 5                      # checkpoints in the trajectory and in the main comparison: a typical LAWA window
STEP_EVERY = 1000          # step spacing of the fake run: gives dirs step1000 ... step5000
SEED = 0                   # fixed init and noise, so every build produces identical files
NOISE = 1e-3               # per-step random-walk noise: tiny next to init weights, but makes every checkpoint differ
TOKENIZER_VOCAB = 512      # tiny BPE: mergekit only copies tokenizer files, their vocab size is irrelevant here
REPEATS = 3                # runs per contender: median wall time damps noise; max RSS is the worst seen
SCALING_K = (2, 5, 20)     # ckptavg's peak RSS should not grow with k; 20 is a long EMA/LAWA window
READ_BLOCK = 8 << 20       # 8 MiB blocks for cache warming: large enough to run at memory bandwidth
MERGEKIT_SHARD = "5B"      # mergekit's --out-shard-size counts parameters; 5B > 134M keeps one output file
CHECK_TENSORS = ("model.embed_tokens.weight", "model.layers.5.self_attn.q_proj.weight",
                 "model.layers.11.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight")
                           # sanity check: first, middle, last tensors and a 1-D norm
ATOL = 1e-6                # fp32 means of values up to ~1 (norm weights), summed in another order, differ by a few ulp (< 1e-6)
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
GNU_TIME = "/usr/bin/time"
MERGEKIT_DEFAULT = "/tmp/venv-mk/bin/mergekit-yaml"
MERGEKIT_INSTALL = "python -m venv bench-work/venv-mk && bench-work/venv-mk/bin/pip install torch==2.13.0 mergekit"

NAIVE_SCRIPT = textwrap.dedent('''\
    """Naive average: load every state dict fully, stack, mean, save."""
    import sys
    import torch
    from safetensors.torch import load_file, save_file

    out, inputs = sys.argv[1], sys.argv[2:]
    sds = [load_file(p) for p in inputs]
    avg = {name: torch.stack([sd[name] for sd in sds]).mean(0) for name in sds[-1]}
    save_file(avg, out, metadata={"format": "pt"})
''')


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- building the trajectory -----------------------------------------------------------------

def build_signature() -> dict:
    return {"model": MODEL, "k": K, "every": STEP_EVERY, "seed": SEED, "noise": NOISE,
            "tokenizer_vocab": TOKENIZER_VOCAB}


def step_dirs(run: Path, k: int) -> list[Path]:
    return [run / f"step{STEP_EVERY * i}" for i in range(1, k + 1)]


def build_tokenizer():
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(SEED)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)]
    text = [" ".join(rng.choice(words) for _ in range(20)) for _ in range(2000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_run(work: Path) -> Path:
    run = work / "run"
    stamp = run / ".bench-build.json"
    sig = build_signature()
    if stamp.is_file() and json.loads(stamp.read_text()) == sig and all(
            (d / "model.safetensors").is_file() for d in step_dirs(run, K)):
        return run
    log(f"building {K} checkpoints of a Llama-shaped model under {run} (once) ...")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    torch.manual_seed(SEED)
    config = LlamaConfig(**MODEL, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).to(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    tokenizer = build_tokenizer()
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for d in step_dirs(run, K):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=NOISE)
            model.save_pretrained(d)
            tokenizer.save_pretrained(d)
            log(f"  {d.name}: {n_params / 1e6:.1f}M params, {(d / 'model.safetensors').stat().st_size / 1e6:.0f} MB")
    stamp.write_text(json.dumps(sig))
    return run


def build_linked_run(work: Path, run: Path, k: int) -> Path:
    """A run of k checkpoints made of hard links to the K real ones (no extra disk)."""
    linked = work / f"run-k{k}"
    stamp = linked / ".bench-build.json"
    sig = {"source": str(run.resolve()), "k": k, **build_signature()}
    if stamp.is_file() and json.loads(stamp.read_text()) == sig:
        return linked
    if linked.exists():
        shutil.rmtree(linked)
    linked.mkdir(parents=True)
    sources = step_dirs(run, K)
    for i, d in enumerate(step_dirs(linked, k)):
        src = sources[i % K]
        d.mkdir()
        for f in src.iterdir():
            os.link(f, d / f.name)
    stamp.write_text(json.dumps(sig))
    return linked


# --- measuring -------------------------------------------------------------------------------

def warm_cache(files: list[Path]) -> None:
    """Flush dirty pages from earlier outputs, then read every input once: same start for all."""
    os.sync()
    buf = bytearray(READ_BLOCK)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def parse_gnu_time(text: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) from ``/usr/bin/time -v`` output."""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if not rss or not wall:
        raise RuntimeError(f"cannot parse /usr/bin/time output:\n{text}")
    secs = 0.0
    for part in wall.group(1).split(":"):
        secs = secs * 60 + float(part)
    return secs, int(rss.group(1)) * 1024 / 1e6


def timed(cmd: list[str], tfile: Path, prepare=None) -> tuple[float, float]:
    if prepare:
        prepare()
    # stdout goes to /dev/null: the read-only floor is `cat files`, whose output must not be kept
    proc = subprocess.run([GNU_TIME, "-v", "-o", str(tfile), *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return parse_gnu_time(tfile.read_text())


def measure(specs: list[dict], work: Path, repeats: int) -> tuple[list[dict], dict[str, str]]:
    """Run every spec ``repeats`` times, round-robin (so drift on the machine hits all alike).

    A spec is {name, k, cmd, inputs, clean}: ``clean`` (the previous output) is deleted and the
    page cache warmed before the clock starts. Returns rows and {"name k=K": error}.
    """
    results = {id(s): ([], []) for s in specs}
    errors: dict[str, str] = {}
    for r in range(repeats):
        for spec in specs:
            key = f"{spec['name']} k={spec['k']}"
            if key in errors:
                continue

            def prepare(spec: dict = spec) -> None:
                clean = spec.get("clean")
                if clean is not None and clean.exists():
                    shutil.rmtree(clean) if clean.is_dir() else clean.unlink()
                warm_cache(spec["inputs"])
            try:
                wall, rss = timed(spec["cmd"], work / "time.txt", prepare)
            except RuntimeError as e:
                errors[key] = str(e)
                log(f"  {spec['name']} failed; its row is skipped:\n{e}")
                continue
            results[id(spec)][0].append(wall)
            results[id(spec)][1].append(rss)
            log(f"  {spec['name']:<10} k={spec['k']:<3} run {r + 1}/{repeats}: {wall:7.2f} s  {rss:8.0f} MB")
    rows = []
    for spec in specs:
        walls, rsss = results[id(spec)]
        if f"{spec['name']} k={spec['k']}" in errors or not walls:
            continue
        rows.append({"contender": spec["name"], "k": spec["k"], "wall_s": statistics.median(walls),
                     "walls_s": walls, "peak_rss_mb": max(rsss)})
    return rows, errors


def mergekit_config(dirs: list[Path]) -> str:
    lines = ["merge_method: linear", "dtype: float32", "out_dtype: float32", "models:"]
    for d in dirs:
        lines += [f"  - model: {d.resolve()}", "    parameters:", "      weight: 1.0"]
    return "\n".join(lines) + "\n"


def find_weights(out: Path) -> list[Path]:
    return sorted(out.glob("*.safetensors")) if out.is_dir() else [out]


def sanity_check(reference: Path, newest_input: Path, others: dict[str, Path]) -> list[str]:
    import torch
    from safetensors import safe_open

    def load(path: Path, names: tuple[str, ...]) -> dict:
        got = {}
        for f in find_weights(path):
            with safe_open(str(f), "pt") as st:
                for n in names:
                    if n in st.keys():
                        got[n] = st.get_tensor(n)
        return got

    ref = load(reference, CHECK_TENSORS)
    newest = load(newest_input, CHECK_TENSORS)
    # guard against a vacuous check: the average must differ from the newest checkpoint
    moved = min((ref[n] - newest[n]).abs().max().item() for n in CHECK_TENSORS)
    lines = [f"sanity naive average vs newest input: min over checked tensors of max|d| = {moved:.1e}"
             f"{' (average differs from the newest checkpoint, as it should)' if moved > 0 else ' SUSPICIOUS: no change'}"]
    for label, path in others.items():
        got = load(path, CHECK_TENSORS)
        diffs = []
        for n in CHECK_TENSORS:
            if n not in got:
                diffs.append(f"{n}: missing")
                continue
            a, b = ref[n], got[n].to(ref[n].dtype)
            ok = a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=ATOL)
            err = (a - b).abs().max().item() if a.shape == b.shape else float("nan")
            diffs.append(f"{n.split('.', 1)[1] if n.startswith('model.') else n}: max|d|={err:.1e}{'' if ok else ' MISMATCH'}")
        status = "OK" if all("MISMATCH" not in d and "missing" not in d for d in diffs) else "FAILED"
        lines.append(f"sanity {label} vs naive: {status} ({'; '.join(diffs)})")
    return lines


# --- main ------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "bench-work",
                    help="work dir for checkpoints and outputs [default: <repo>/bench-work]")
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--skip-mergekit", action="store_true")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    if not os.access(GNU_TIME, os.X_OK):
        print(f"error: {GNU_TIME} (GNU time) is missing; it measures wall time and peak RSS.\n"
              "install it with: apt-get install -y time   (as root, or with sudo)", file=sys.stderr)
        return 2

    bindir = Path(sys.executable).parent
    ckptavg = [str(bindir / "ckptavg")] if (bindir / "ckptavg").is_file() else [sys.executable, "-m", "ckptavg"]
    mergekit = os.environ.get("MERGEKIT_YAML", MERGEKIT_DEFAULT)
    if args.skip_mergekit:
        mergekit = None
    elif not os.access(mergekit, os.X_OK):
        print(f"mergekit-yaml not found at {mergekit} (set MERGEKIT_YAML); skipping the mergekit row.\n"
              f"install it with: {MERGEKIT_INSTALL}", file=sys.stderr)
        mergekit = None

    run = build_run(work)
    dirs = step_dirs(run, K)
    inputs = [d / "model.safetensors" for d in dirs]
    naive_py = work / "naive_average.py"
    naive_py.write_text(NAIVE_SCRIPT)
    outs = {n: work / f"out-{n}" for n in ("ckptavg", "naive", "mergekit")}

    log(f"main comparison: k={K}, {sum(f.stat().st_size for f in inputs) / 1e9:.2f} GB of inputs, "
        f"{args.repeats} runs each (round-robin), warm page cache")
    outs["naive"].mkdir(exist_ok=True)
    naive_out = outs["naive"] / "model.safetensors"
    specs = [
        {"name": "ckptavg", "k": K, "inputs": inputs, "clean": outs["ckptavg"],
         "cmd": [*ckptavg, "merge", str(run), "--window", str(K), "-o", str(outs["ckptavg"]), "--quiet", "--force"]},
        {"name": "naive", "k": K, "inputs": inputs, "clean": naive_out,
         "cmd": [sys.executable, str(naive_py), str(naive_out), *map(str, inputs)]},
    ]
    if mergekit:
        cfg = work / "mergekit.yml"
        cfg.write_text(mergekit_config(dirs))
        specs.append({"name": "mergekit", "k": K, "inputs": inputs, "clean": outs["mergekit"],
                      "cmd": [mergekit, str(cfg), str(outs["mergekit"]), "--no-cuda", "--out-shard-size",
                              MERGEKIT_SHARD, "--copy-tokenizer", "--quiet"]})
    specs.append({"name": "read-only", "k": K, "inputs": inputs, "cmd": ["cat", *map(str, inputs)]})
    rows, errors = measure(specs, work, args.repeats)
    if f"ckptavg k={K}" in errors:
        print(f"ckptavg merge failed:\n{errors[f'ckptavg k={K}']}", file=sys.stderr)
        return 1
    mergekit_ok = bool(mergekit) and f"mergekit k={K}" not in errors
    checks = sanity_check(naive_out, inputs[-1], {"ckptavg": outs["ckptavg"], **(
        {"mergekit": outs["mergekit"]} if mergekit_ok else {})})

    log("scaling: ckptavg peak RSS vs k (with the read-only floor for each k)")
    specs = []
    for k in SCALING_K:
        if k == K:
            continue
        src = run if k <= K else build_linked_run(work, run, k)
        kin = [d / "model.safetensors" for d in step_dirs(src, max(k, K))[-k:]]  # --window k: the newest k
        kout = work / f"out-ckptavg-k{k}"
        specs += [{"name": "ckptavg", "k": k, "inputs": kin, "clean": kout,
                   "cmd": [*ckptavg, "merge", str(src), "--window", str(k), "-o", str(kout), "--quiet", "--force"]},
                  {"name": "read-only", "k": k, "inputs": kin, "cmd": ["cat", *map(str, kin)]}]
    more, more_errors = measure(specs, work, args.repeats)
    rows += more
    errors.update(more_errors)

    # Start-up alone (interpreter + imports, no tensor data), to read the wall times above against.
    log("start-up cost (no tensor data read)")
    startup_specs = [
        {"name": "ckptavg", "k": K, "inputs": [],
         "cmd": [*ckptavg, "merge", str(run), "--window", str(K), "--dry-run", "-o", str(outs["ckptavg"])]},
        {"name": "naive", "k": K, "inputs": [], "cmd": [sys.executable, "-c", "import torch, safetensors.torch"]},
    ]
    if mergekit_ok:
        startup_specs.append({"name": "mergekit", "k": K, "inputs": [], "cmd": [mergekit, "--help"]})
    startup = {r["contender"]: r["wall_s"] for r in measure(startup_specs, work, args.repeats)[0]}

    base = {r["k"]: r["wall_s"] for r in rows if r["contender"] == "ckptavg"}
    for r in rows:
        r["ratio_to_ckptavg"] = r["wall_s"] / base[r["k"]] if r["k"] in base else None
    rows.sort(key=lambda r: (r["k"] != K, r["k"], r["contender"] != "ckptavg"))

    head = f"{'contender':<10} {'k':>3} {'wall median (s)':>16} {'ratio to ckptavg':>17} {'peak RSS (MB)':>14}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = f"{r['ratio_to_ckptavg']:.2f}x" if r["ratio_to_ckptavg"] is not None else "-"
        print(f"{r['contender']:<10} {r['k']:>3} {r['wall_s']:>16.2f} {ratio:>17} {r['peak_rss_mb']:>14.0f}")
    for line in checks:
        print(line)
    how = {"ckptavg": "merge --dry-run", "naive": "import torch", "mergekit": "--help"}
    print("start-up alone (no tensor data; included in the walls above): " + ", ".join(
        f"{name} {secs:.2f} s ({how[name]})" for name, secs in startup.items()))
    for name in errors:
        print(f"{name}: failed, row skipped (see stderr)")
    result = {"model": MODEL, "k": K, "repeats": args.repeats, "input_bytes_k": sum(f.stat().st_size for f in inputs),
              "rows": rows, "startup_s": startup, "sanity": checks, "errors": errors,
              "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    (work / "bench_merge.json").write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {work / 'bench_merge.json'}")
    return 0 if all(" FAILED " not in line and "SUSPICIOUS" not in line for line in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
