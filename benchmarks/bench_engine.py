"""The engine at the sizes users have: ckptavg at 1, 2, 4 … N threads against the read floor, a
naive torch average and mergekit, side by side in one run (issue 14).

Builds (once, cached under --work) K checkpoints of a Llama-shaped model of --params parameters in
bf16, sharded like HF's save_pretrained (``model-0000i-of-0000n.safetensors`` + index), or with
``--layout bin`` a Pythia-style (GPT-NeoX names) fp16 ``pytorch_model.bin`` per step. Then times,
round-robin over --repeats, each contender in its own process under ``/usr/bin/time -v`` (wall,
peak RSS from the OS), the page cache warmed (or, with --cold, the inputs evicted with
``posix_fadvise(DONTNEED)``) before every run:

- ``cat``            reading every input once (the floor for merge)
- ``ckptavg tN``     ``ckptavg merge --window K --threads N --no-fsync``
- ``naive torch``    load one checkpoint at a time (safetensors / torch.load), fp32 sum, save
- ``mergekit``       ``mergekit-yaml`` linear, fp32 accumulation (if --mergekit points to it)
- with --series: ``ckptavg series --window W --no-fsync`` and its floor (read inputs + write outputs)

    python benchmarks/bench_engine.py                      # 5 × 1B bf16, threads 1, 2, … N
    python benchmarks/bench_engine.py --params 2.8e9 --threads 1,4,16
    python benchmarks/bench_engine.py --layout bin --params 1e9

Prints one markdown table (ratios to naive torch and to the floor) and writes it as JSON to
<work>/bench_engine-<layout>-<params>B.json. Outputs are checked: every thread count bit-identical,
and equal to the naive average.
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import GNU_TIME, build_tokenizer, parse_gnu_time  # noqa: E402

# --- knobs -----------------------------------------------------------------------------------
VOCAB = 32000              # Llama/TinyLlama vocabulary: embeddings are ~13% of a 1B model, as in real ones
MLP_RATIO = 2.75           # intermediate / hidden, Llama-2's 11008/4096 ≈ 2.69, TinyLlama's 5632/2048 = 2.75
SHARD_BYTES = 1 << 30      # 1 GiB shards: a 1B bf16 model gets 2-3 files, like HF's save_pretrained with 1GB..2GB
SEED = 0                   # fixed data: every build writes identical files
NOISE_ULPS = 8             # checkpoint j = base + up to ±8 bf16 ulps of noise: all differ, values stay sane
STEP_EVERY = 1000          # step1000 … step{K*1000}
CHUNK_READ = 8 << 20       # 8 MiB blocks for warming and cat: memory-bandwidth speed
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]

NAIVE = textwrap.dedent('''\
    """Naive average: one whole checkpoint in memory at a time, an fp32 sum of every tensor, save."""
    import json, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file

    out, dirs = Path(sys.argv[1]), [Path(d) for d in sys.argv[2:]]
    acc, dtypes = {}, {}
    for d in dirs:
        files = sorted(d.glob("*.safetensors")) or [d / "pytorch_model.bin"]
        for f in files:
            sd = load_file(f) if f.suffix == ".safetensors" else torch.load(f, weights_only=True)
            for k, v in sd.items():
                dtypes[k] = v.dtype
                if k in acc:
                    acc[k] += v
                else:
                    acc[k] = v.to(torch.float32)
            del sd
    out.mkdir(parents=True)
    avg = {k: (v / len(dirs)).to(dtypes[k]) for k, v in acc.items()}
    del acc
    if (dirs[0] / "pytorch_model.bin").is_file():
        torch.save(avg, out / "pytorch_model.bin")
    else:
        save_file(avg, out / "model.safetensors", metadata={"format": "pt"})
''')


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def shape(params: float) -> dict:
    """A Llama shape with about ``params`` parameters: hidden size by scale, layers to fill."""
    hidden = 1024 if params < 4e8 else 2048 if params < 1.8e9 else 2560 if params < 5e9 else 4096
    inter = int(round(hidden * MLP_RATIO / 256)) * 256
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * VOCAB * hidden) / per_layer))
    return {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 128, "num_key_value_heads": hidden // 128, "vocab_size": VOCAB}


def tensors(layout: str, cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    if layout == "bin":  # GPT-NeoX / Pythia names
        out = [("gpt_neox.embed_in.weight", (VOCAB, h))]
        for i in range(n):
            p = f"gpt_neox.layers.{i}."
            out += [(p + "input_layernorm.weight", (h,)), (p + "input_layernorm.bias", (h,)),
                    (p + "attention.query_key_value.weight", (3 * h, h)), (p + "attention.query_key_value.bias", (3 * h,)),
                    (p + "attention.dense.weight", (h, h)), (p + "attention.dense.bias", (h,)),
                    (p + "mlp.dense_h_to_4h.weight", (4 * h, h)), (p + "mlp.dense_4h_to_h.weight", (h, 4 * h))]
        return out + [("gpt_neox.final_layer_norm.weight", (h,)), ("embed_out.weight", (VOCAB, h))]
    out = [("model.embed_tokens.weight", (VOCAB, h))]
    for i in range(n):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,))]
        out += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        out += [(p + "post_attention_layernorm.weight", (h,)), (p + "mlp.gate_proj.weight", (inter, h)),
                (p + "mlp.up_proj.weight", (inter, h)), (p + "mlp.down_proj.weight", (h, inter))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (VOCAB, h))]


def build(work: Path, layout: str, params: float, k: int) -> tuple[Path, dict]:
    """K checkpoints under work/run-<layout>-<params>; rebuilt only when the knobs change."""
    cfg = shape(params)
    run = work / f"run-{layout}-{params / 1e9:g}B"  # no '+' (1e+09): mergekit reads 'a+b' as model + LoRA
    sig = {"cfg": cfg, "k": k, "layout": layout, "seed": SEED, "noise": NOISE_ULPS, "shard": SHARD_BYTES, "v": 2}
    stamp = run / ".bench-build.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == sig:
        return run, cfg
    import numpy as np
    import torch
    from safetensors.torch import save_file

    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    names = tensors(layout, cfg)
    total = sum(int(np.prod(s)) for _, s in names)
    log(f"building {k} × {total / 1e9:.2f}B-parameter {layout} checkpoints under {run} (once) …")
    tok = build_tokenizer() if layout == "safetensors" else None
    torch_dtype = torch.bfloat16 if layout == "safetensors" else torch.float16
    for j in range(1, k + 1):
        d = run / f"step{j * STEP_EVERY}"
        d.mkdir()
        t0 = time.perf_counter()
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for t, (name, shp) in enumerate(names):
            rng = np.random.default_rng([SEED, t])
            base = rng.standard_normal(int(np.prod(shp)), dtype=np.float32) * 0.02
            if name.endswith("norm.weight") or "layernorm.weight" in name:
                base += 1.0
            if layout == "safetensors":
                raw = (base.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bit patterns
            else:
                raw = base.astype(np.float16).view(np.uint16)
            noise = np.random.default_rng([SEED, t, j]).integers(-NOISE_ULPS, NOISE_ULPS + 1, raw.size, dtype=np.int16)
            mag = np.clip((raw & 0x7FFF).astype(np.int32) + noise, 0x0080, 0x7F00)  # stays finite and normal
            raw = (raw & 0x8000) | mag.astype(np.uint16)
            tensor = torch.from_numpy(raw.view(np.int16)).view(torch_dtype).reshape(shp)
            if layout == "safetensors" and size + raw.nbytes > SHARD_BYTES and shards[-1]:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += raw.nbytes
        if layout == "bin":
            torch.save(shards[0], d / "pytorch_model.bin")
            arch = "GPTNeoXForCausalLM"
        else:
            n = len(shards)
            index = {"metadata": {"total_size": 2 * total}, "weight_map": {}}
            for i, sd in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{n:05d}.safetensors"
                save_file(sd, str(d / fname), metadata={"format": "pt"})
                index["weight_map"].update(dict.fromkeys(sd, fname))
            (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            arch = "LlamaForCausalLM"
            assert tok is not None
            tok.save_pretrained(d)
        del shards
        model_type = "llama" if arch.startswith("Llama") else "gpt_neox"
        config = {"architectures": [arch], "model_type": model_type, "torch_dtype": str(torch_dtype).split(".")[1],
                  "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
                  "max_position_embeddings": 2048, **cfg}
        if model_type == "gpt_neox":
            config.update(intermediate_size=4 * cfg["hidden_size"], rotary_pct=0.25, use_parallel_residual=True,
                          layer_norm_eps=1e-5)
        (d / "config.json").write_text(json.dumps(config, indent=2))
        log(f"  {d.name}: {sum(f.stat().st_size for f in d.iterdir()) / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    stamp.write_text(json.dumps(sig))
    return run, cfg


def weight_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin"))


def prepare(inputs: list[Path], cold: bool, clean: Path | None) -> None:
    if clean is not None and clean.exists():
        shutil.rmtree(clean)
    os.sync()
    for f in inputs:
        fd = os.open(f, os.O_RDONLY)
        try:
            if cold:  # clean pages are dropped without root: the next read comes from the disk
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                buf = bytearray(CHUNK_READ)
                with open(fd, "rb", buffering=0, closefd=False) as fh:
                    while fh.readinto(buf):
                        pass
        finally:
            os.close(fd)


def timed(cmd: list[str], tfile: Path) -> tuple[float, float, float]:
    """(wall s, peak RSS MB, CPU s = user + sys): CPU time is what a loaded, shared machine distorts least."""
    proc = subprocess.run([GNU_TIME, "-v", "-o", str(tfile), *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-2000:]}")
    text = tfile.read_text()
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", text).group(1)) for k in ("User", "System"))  # type: ignore[union-attr]
    return (*parse_gnu_time(text), cpu)


def identical(a: Path, b: Path) -> bool:
    """Same tensors, bit for bit (the two outputs may shard differently)."""
    from safetensors import safe_open

    def load(d: Path) -> dict:
        got = {}
        for f in weight_files(d):
            if f.suffix == ".bin":
                import torch
                got.update(torch.load(f, weights_only=True))
                continue
            with safe_open(str(f), "pt") as st:
                got.update({n: st.get_tensor(n) for n in st.keys()})
        return got

    x, y = load(a), load(b)
    return x.keys() == y.keys() and all(x[n].dtype == y[n].dtype and x[n].view(-1).view(dtype=_int(x[n])).equal(
        y[n].view(-1).view(dtype=_int(y[n]))) for n in x)


def _int(t):  # noqa: ANN001, ANN202
    import torch
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=1e9, help="model size in parameters (default 1e9)")
    ap.add_argument("--k", type=int, default=5, help="checkpoints averaged (default 5)")
    ap.add_argument("--layout", choices=["safetensors", "bin"], default="safetensors",
                    help="bf16 sharded safetensors (Llama names) or fp16 pytorch_model.bin (Pythia names)")
    cpus = len(os.sched_getaffinity(0))
    default_threads = sorted({1, *(2 ** i for i in range(1, 8) if 2 ** i < cpus), cpus})
    ap.add_argument("--threads", default=",".join(map(str, default_threads)), help="thread counts for ckptavg")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=REPO / "bench-work" / "engine")
    ap.add_argument("--cold", action="store_true", help="evict the inputs from the page cache before each run")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--mergekit", default=str(REPO / "bench-work" / "venv-mk" / "bin" / "mergekit-yaml"),
                    help="mergekit-yaml to run (skipped when absent)")
    ap.add_argument("--series", type=int, default=0, metavar="W", help="also time `series --window W` and its floor")
    ap.add_argument("--fsync", action="store_true", help="also time ckptavg at N threads with fsync (the default)")
    ap.add_argument("--base", metavar="REV", help="also time the merge of git revision REV at the highest thread count")
    args = ap.parse_args()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    run, cfg = build(work, args.layout, args.params, args.k)
    dirs = sorted((p for p in run.iterdir() if p.is_dir()), key=lambda p: int(p.name[4:]))[-args.k:]
    inputs = [f for d in dirs for f in weight_files(d)]
    in_bytes = sum(f.stat().st_size for f in inputs)
    ckptavg = str(REPO / ".venv" / "bin" / "ckptavg")
    py = str(REPO / ".venv" / "bin" / "python")
    outs = work / "outs"
    if outs.exists():  # the checks below compare only what this run wrote
        shutil.rmtree(outs)
    outs.mkdir()
    (work / "naive.py").write_text(NAIVE)

    specs: list[dict] = [{"name": "cat (read floor)", "cmd": ["cat", *map(str, inputs)], "clean": None}]
    threads = [int(t) for t in args.threads.split(",")]
    for t in threads:
        specs.append({"name": f"ckptavg t{t}", "out": outs / f"t{t}", "cmd": [
            ckptavg, "merge", str(run), "--window", str(args.k), "--threads", str(t), "--no-fsync", "--quiet",
            "-o", str(outs / f"t{t}")]})
    if args.base:  # the same command with another revision's code, from a git worktree
        tree = work / f"base-{args.base}"
        if not tree.exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.base], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t = threads[-1]
        specs.append({"name": f"ckptavg t{t} @{args.base}", "out": outs / "base", "cmd": [
            # run from the worktree: `-m` puts the working directory first, ahead of the editable install
            "sh", "-c", f'cd "{tree}" && exec "$0" "$@"', py, "-m", "ckptavg", "merge", str(run), "--window", str(args.k), "--threads",
            str(t), "--no-fsync", "--quiet", "-o", str(outs / "base")]})
    if args.fsync:
        t = threads[-1]
        specs.append({"name": f"ckptavg t{t} fsync", "out": outs / "fsync", "cmd": [
            ckptavg, "merge", str(run), "--window", str(args.k), "--threads", str(t), "--quiet", "-o", str(outs / "fsync")]})
    if not args.no_naive:
        specs.append({"name": "naive torch", "out": outs / "naive", "cmd": [
            py, str(work / "naive.py"), str(outs / "naive"), *map(str, dirs)]})
    if args.mergekit and Path(args.mergekit).is_file() and args.layout == "safetensors":
        conf = work / "mergekit.yml"
        conf.write_text("merge_method: linear\ndtype: float32\nout_dtype: bfloat16\nmodels:\n" + "".join(
            f"  - model: {d}\n    parameters:\n      weight: 1.0\n" for d in dirs))
        specs.append({"name": "mergekit", "out": outs / "mergekit", "cmd": [
            args.mergekit, str(conf), str(outs / "mergekit"), "--lazy-unpickle", "--out-shard-size", "1B",
            "--no-copy-tokenizer"]})
    if args.series:
        model_bytes = in_bytes // args.k
        n_out = args.k - args.series + 1
        specs.append({"name": f"series floor (read + write {n_out})", "out": outs / "floor", "cmd": [
            "sh", "-c", f"cat {' '.join(map(str, inputs))} >/dev/null && mkdir -p {outs / 'floor'} && "
            + " && ".join(f"head -c {model_bytes} /dev/zero > {outs / 'floor'}/{i}" for i in range(n_out))]})
        specs.append({"name": f"ckptavg series w{args.series} t{threads[-1]}", "out": outs / "series", "cmd": [
            ckptavg, "series", str(run), "--window", str(args.series), "--no-fsync", "--quiet",
            "-o", str(outs / "series")]})

    log(f"{len(inputs)} input files, {in_bytes / 1e9:.2f} GB; {'cold' if args.cold else 'warm'} page cache; "
        f"{args.repeats} rounds")
    walls: dict[str, list[float]] = {s["name"]: [] for s in specs}
    cpus_s: dict[str, list[float]] = {s["name"]: [] for s in specs}
    rss: dict[str, float] = {s["name"]: 0.0 for s in specs}
    failed: dict[str, str] = {}
    for r in range(args.repeats):
        for s in specs:
            if s["name"] in failed:
                continue
            prepare(inputs, args.cold, s.get("out"))
            try:
                w, m, c = timed(s["cmd"], work / "time.txt")
            except RuntimeError as e:
                failed[s["name"]] = str(e).splitlines()[0]
                log(f"  {s['name']} failed: {e}")
                continue
            walls[s["name"]].append(w)
            cpus_s[s["name"]].append(c)
            rss[s["name"]] = max(rss[s["name"]], m)
            log(f"  round {r + 1}: {s['name']:<28} {w:7.2f} s {c:7.2f} s CPU {m:8.0f} MB")

    checks = []
    t_outs = [outs / f"t{t}" for t in threads if (outs / f"t{t}").exists()]
    if len(t_outs) > 1:
        checks.append(f"ckptavg at {', '.join(p.name for p in t_outs)} threads: "
                      f"{'bit-identical' if all(identical(t_outs[0], p) for p in t_outs[1:]) else 'DIFFER'}")
    if t_outs and (outs / "naive").exists():
        checks.append(f"ckptavg vs naive torch: {'bit-identical' if identical(t_outs[0], outs / 'naive') else 'differ'}")

    med = {n: statistics.median(w) for n, w in walls.items() if w}
    naive = med.get("naive torch")
    floor = med.get("cat (read floor)")
    print(f"\n{args.k} × {args.params / 1e9:.3g}B {args.layout} ({in_bytes / 1e9:.1f} GB), "
          f"{'cold' if args.cold else 'warm'} cache, {cpus} CPUs, median of {args.repeats}\n")
    print("| contender | wall (s) | × naive torch | × cat floor | CPU (s) | peak RSS (MB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for name, w in med.items():
        row = {"contender": name, "wall_s": round(w, 2), "walls_s": walls[name], "peak_rss_mb": round(rss[name]),
               "cpu_s": round(statistics.median(cpus_s[name]), 2),
               "x_naive": round(w / naive, 2) if naive else None, "x_floor": round(w / floor, 2) if floor else None}
        rows.append(row)
        print(f"| {name} | {w:.2f} | {row['x_naive'] or '—'} | {row['x_floor'] or '—'} | {row['cpu_s']} | {row['peak_rss_mb']} |")
    for c in checks:
        print(f"\n{c}")
    for n, e in failed.items():
        print(f"\n{n} failed: {e}")
    (work / f"bench_engine-{args.layout}-{args.params / 1e9:g}B.json").write_text(json.dumps(
        {"k": args.k, "params": args.params, "layout": args.layout, "cold": args.cold, "cpus": cpus,
         "input_bytes": in_bytes, "rows": rows, "checks": checks, "failed": failed}, indent=2))
    return 1 if failed or any("DIFFER" in c for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
