"""Benchmark ``ckptavg series`` against 16 separate ``ckptavg merge`` runs and the I/O floor.

Builds (once, cached under --work) a run of N checkpoints ``step1000 .. step20000`` of a ~35M
parameter Llama-shaped fp32 model (~140 MB of safetensors each), then measures, side by side and
round-robin, each contender in its own subprocess: wall time and peak RSS (``/usr/bin/time -v``),
bytes read (``rchar`` of /proc/self/io, printed by an atexit hook of a tiny wrapper around
``ckptavg.cli.main``). The page cache is warmed identically before every timed run and previous
outputs are deleted first (untimed).

    python benchmarks/bench_series.py [--work bench-work] [--repeats 2]

Prints one table and writes it as JSON to <work>/bench_series.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_merge  # noqa: E402  (reused: warm_cache, timed, log, GNU_TIME)

# --- knobs -----------------------------------------------------------------------------------
# Small Llama shape (~35M params, ~140 MB fp32 each, untied embeddings): 20 real copies fit in
# ~2.8 GB of disk and stay in the page cache of a small box, so we measure ckptavg, not the disk.
MODEL = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
             intermediate_size=1024, vocab_size=32000, tie_word_embeddings=False)
N = 20                     # checkpoints in the run: the benchmark (N = 20, k = 5 -> 16 targets)
STEP_EVERY = 1000          # step spacing: dirs step1000 ... step20000
WINDOW = 5                 # LAWA window of the main comparison (issue 3)
SEED = 0                   # fixed init and noise: every build produces identical files
NOISE = 1e-3               # per-step random-walk noise: tiny next to init weights, but every checkpoint differs
REPEATS = 2                # timed runs per contender, round-robin; median wall (each run is several seconds)
SCALING_K = (2, 5, 10)     # issue 3: series time must not grow from k = 2 to k = 10
SCALING_FLAG = "--partial"  # scaling runs: every checkpoint is a target for every k, so each k reads the same
                            # inputs and writes the same outputs and only k differs (with --from S, k=10 would
                            # read more inputs than k=2 because its windows reach further back)
WRITE_BLOCK = 4 << 20      # floor writer buffer: 4 MiB, the size of one ckptavg chunk (1M fp32 elements)
TARGET_RATIO = 1.3         # issue 3: series <= 1.3x (one read of every input + writing the outputs)
KEEP_STEP = 12000          # the target kept at the end and checked: mid-run, after several window slides
CHECK_TENSORS = ("model.embed_tokens.weight", "model.layers.2.self_attn.q_proj.weight",
                 "model.layers.5.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight")
                           # sanity check: first, middle, last tensors and a 1-D norm
RTOL = 1e-6                # series sums in fp64, merge in fp32: they agree to a few ulp
ATOL = 1e-6                # assert_close needs both; values near 0 differ by a few ulp of ~1 (< 1e-6)
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
log = bench_merge.log

# Runs ckptavg's CLI in-process and, at exit, copies /proc/self/io (rchar = bytes read by every
# read/pread of the process, all threads) to the file given as first argument.
WRAPPER = ("import atexit, sys; io_file = sys.argv.pop(1); "
           "atexit.register(lambda: open(io_file, 'w').write(open('/proc/self/io').read())); "
           "sys.argv[0] = 'ckptavg'; from ckptavg.cli import main; main()")

WRITER = textwrap.dedent('''\
    """Write floor: n files of `size` zero bytes in `block`-sized writes, no fsync."""
    import os, sys
    out, n, size, block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    os.makedirs(out, exist_ok=True)
    buf = memoryview(bytes(block))
    for i in range(n):
        with open(os.path.join(out, f"f{i}.bin"), "wb", buffering=0) as f:
            left = size
            while left:
                left -= f.write(buf[:min(block, left)])
''')


# --- building the run ------------------------------------------------------------------------

def build_signature() -> dict:
    return {"model": MODEL, "n": N, "every": STEP_EVERY, "seed": SEED, "noise": NOISE}


def step_dirs(run: Path) -> list[Path]:
    return [run / f"step{STEP_EVERY * i}" for i in range(1, N + 1)]


def build_run(work: Path) -> Path:
    run = work / "series-run"
    stamp = run / ".bench-build.json"
    sig = build_signature()
    if stamp.is_file() and json.loads(stamp.read_text()) == sig and all(
            (d / "model.safetensors").is_file() and (d / "config.json").is_file() for d in step_dirs(run)):
        return run
    log(f"building {N} checkpoints of a Llama-shaped model under {run} (once) ...")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**MODEL, bos_token_id=1, eos_token_id=2)).to(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for d in step_dirs(run):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=NOISE)
            model.save_pretrained(d)
            log(f"  {d.name}: {n_params / 1e6:.1f}M params, {(d / 'model.safetensors').stat().st_size / 1e6:.0f} MB")
    stamp.write_text(json.dumps(sig))
    return run


# --- measuring -------------------------------------------------------------------------------

def cpu_seconds(time_file: Path) -> float:
    """user + system CPU seconds from ``/usr/bin/time -v`` output: unlike wall time, barely moved
    by other load on the machine."""
    text = time_file.read_text()
    return sum(float(re.search(rf"{what} time \(seconds\): ([\d.]+)", text).group(1)) for what in ("User", "System"))


def rchar(io_file: Path) -> int:
    for line in io_file.read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError(f"no rchar in {io_file}")


def ckptavg_cmd(io_file: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", WRAPPER, str(io_file), *args]


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def rm(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def measure(specs: list[dict], work: Path, inputs: list[Path], repeats: int) -> list[dict]:
    """Run every spec ``repeats`` times, round-robin. A spec is {name, cmds, out, keep?}: ``cmds`` run
    one after another (walls summed, RSS maxed, rchar summed); before each timed run every output is
    gone and the page cache is warmed with all inputs. After a run (untimed) ``keep`` (a dir under
    ``out``) is moved to <work>/series-keep/<name> and ``out`` is deleted, so that at most one
    contender's outputs are on disk at a time."""
    keep_root = work / "series-keep"
    keep_root.mkdir(exist_ok=True)
    io_file = work / "io.txt"
    res = {s["name"]: {"walls": [], "cpus": [], "rss": [], "rchar": [], "out_bytes": None} for s in specs}
    for r in range(repeats):
        for s in specs:
            rm(s["out"])
            bench_merge.warm_cache(inputs)
            wall = rss = cpu = 0.0
            read = 0
            for cmd in s["cmds"]:
                rm(io_file)
                w, m = bench_merge.timed(cmd, work / "time.txt")
                wall, rss, cpu = wall + w, max(rss, m), cpu + cpu_seconds(work / "time.txt")
                if WRAPPER in cmd:  # a ckptavg run: its atexit hook wrote /proc/self/io
                    read += rchar(io_file)
            row = res[s["name"]]
            row["walls"].append(wall)
            row["cpus"].append(cpu)
            row["rss"].append(rss)
            row["rchar"].append(read)
            if s["out"].exists():
                row["out_bytes"] = sum(f.stat().st_size for f in s["out"].rglob("*") if f.is_file())
            if s.get("keep"):
                dest = keep_root / slug(s["name"])
                rm(dest)
                os.rename(s["out"] / s["keep"], dest)
            rm(s["out"])
            log(f"  {s['name']:<28} run {r + 1}/{repeats}: {wall:7.2f} s (cpu {cpu:5.2f} s)  {rss:7.0f} MB  read {read / 1e9:6.2f} GB")
    rows = []
    for s in specs:
        row = res[s["name"]]
        rows.append({"contender": s["name"], "targets": s.get("targets"), "wall_s": statistics.median(row["walls"]),
                     "walls_s": row["walls"], "cpu_s": statistics.median(row["cpus"]), "peak_rss_mb": max(row["rss"]),
                     "bytes_read": row["rchar"][-1] if s.get("counts_read", True) else None,
                     "output_bytes": row["out_bytes"], "cmds_per_run": len(s["cmds"])})
    return rows


def sanity_check(series_out: Path, merge_out: Path, newest_input: Path) -> list[str]:
    import torch
    from safetensors import safe_open

    def load(d: Path) -> dict:
        with safe_open(str(d / "model.safetensors") if d.is_dir() else str(d), "pt") as st:
            return {n: st.get_tensor(n) for n in CHECK_TENSORS}

    a, b, newest = load(series_out), load(merge_out), load(newest_input)
    moved = min((a[n] - newest[n]).abs().max().item() for n in CHECK_TENSORS)
    lines = [f"sanity step{KEEP_STEP}: series average vs newest input step{KEEP_STEP}: min over checked tensors of "
             f"max|d| = {moved:.1e}" + (" (differs, as it should)" if moved > 0 else " SUSPICIOUS: no change")]
    diffs, ok = [], True
    for n in CHECK_TENSORS:
        try:
            torch.testing.assert_close(a[n], b[n], rtol=RTOL, atol=ATOL)
            diffs.append(f"{n.removeprefix('model.')}: max|d|={(a[n] - b[n]).abs().max().item():.1e}")
        except AssertionError:
            ok = False
            diffs.append(f"{n.removeprefix('model.')}: MISMATCH max|d|={(a[n] - b[n]).abs().max().item():.1e}")
    lines.append(f"sanity series step{KEEP_STEP} vs merge --at {KEEP_STEP}: {'OK' if ok else 'FAILED'} "
                 f"(assert_close rtol={RTOL:g} atol={ATOL:g}; {'; '.join(diffs)})")
    return lines


# --- main ------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "bench-work",
                    help="work dir for checkpoints and outputs [default: <repo>/bench-work]")
    ap.add_argument("--repeats", type=int, default=REPEATS)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not os.access(bench_merge.GNU_TIME, os.X_OK):
        print(f"error: {bench_merge.GNU_TIME} (GNU time) is missing: apt-get install -y time", file=sys.stderr)
        return 2

    run = build_run(work)
    dirs = step_dirs(run)
    inputs = [d / "model.safetensors" for d in dirs]
    input_bytes = sum(f.stat().st_size for f in inputs)
    out_size = inputs[-1].stat().st_size  # every output holds the same tensors as an input
    targets = [STEP_EVERY * i for i in range(WINDOW, N + 1)]
    writer_py = work / "series_write_floor.py"
    writer_py.write_text(WRITER)
    io_file = work / "io.txt"
    outs = {n: work / f"series-out-{n}" for n in ("series", "merges", "floor", *(f"k{k}" for k in SCALING_K))}
    keep = f"step{KEEP_STEP}"

    specs = [
        {"name": f"series k={WINDOW}", "targets": len(targets), "out": outs["series"], "keep": keep,
         "cmds": [ckptavg_cmd(io_file, "series", str(run), "--window", str(WINDOW), "-o", str(outs["series"]), "-q")]},
        {"name": f"{len(targets)} x merge k={WINDOW}", "targets": len(targets), "out": outs["merges"], "keep": keep,
         "cmds": [ckptavg_cmd(io_file, "merge", str(run), "--window", str(WINDOW), "--at", str(s),
                              "-o", str(outs["merges"] / f"step{s}"), "-q") for s in targets]},
        {"name": "floor: read inputs (cat)", "targets": None, "out": outs["floor"], "counts_read": False,
         "cmds": [["cat", *map(str, inputs)]]},
        {"name": "floor: write outputs", "targets": len(targets), "out": outs["floor"], "counts_read": False,
         "cmds": [[sys.executable, str(writer_py), str(outs["floor"]), str(len(targets)), str(out_size),
                   str(WRITE_BLOCK)]]},
    ]
    for k in SCALING_K:
        specs.append({"name": f"series k={k} {SCALING_FLAG}", "targets": N,
                      "out": outs[f"k{k}"], "keep": keep,
                      "cmds": [ckptavg_cmd(io_file, "series", str(run), "--window", str(k), SCALING_FLAG,
                                           "-o", str(outs[f"k{k}"]), "-q")]})
    specs.append({"name": "startup: merge --dry-run", "targets": 0, "out": work / "series-out-dry",
                  "cmds": [ckptavg_cmd(io_file, "merge", str(run), "--window", str(WINDOW), "--dry-run",
                                       "-o", str(work / "series-out-dry"))]})

    log(f"N={N} checkpoints, {input_bytes / 1e9:.2f} GB of inputs; {len(targets)} targets of k={WINDOW}; "
        f"{args.repeats} runs each (round-robin), warm page cache")
    load_before = os.getloadavg()[0]  # other work on this small box inflates walls (not cpu)
    rows = measure(specs, work, inputs, args.repeats)
    load_after = os.getloadavg()[0]
    by = {r["contender"]: r for r in rows}
    by["floor: read inputs (cat)"]["bytes_read"] = input_bytes  # cat reads every input once, by construction
    floor = by["floor: read inputs (cat)"]["wall_s"] + by["floor: write outputs"]["wall_s"]
    rows.insert(4, {"contender": "floor: read + write", "targets": len(targets), "wall_s": floor, "walls_s": None,
                    "cpu_s": by["floor: read inputs (cat)"]["cpu_s"] + by["floor: write outputs"]["cpu_s"],
                    "peak_rss_mb": None, "bytes_read": input_bytes, "output_bytes": len(targets) * out_size})

    keep_root = work / "series-keep"
    s, m = by[f"series k={WINDOW}"], by[f"{len(targets)} x merge k={WINDOW}"]
    checks = sanity_check(keep_root / slug(s["contender"]), keep_root / slug(m["contender"]),
                          inputs[KEEP_STEP // STEP_EVERY - 1])

    k_lo, k_hi = by[f"series k={SCALING_K[0]} {SCALING_FLAG}"], by[f"series k={SCALING_K[-1]} {SCALING_FLAG}"]
    ratios = {
        "series_over_floor": s["wall_s"] / floor,
        "merges_over_series": m["wall_s"] / s["wall_s"],
        f"series_k{SCALING_K[-1]}_over_k{SCALING_K[0]}": k_hi["wall_s"] / k_lo["wall_s"],
        "series_read_over_input": s["bytes_read"] / input_bytes,
        "merges_read_over_input": m["bytes_read"] / input_bytes,
        "merges_read_over_series_read": m["bytes_read"] / s["bytes_read"],
    }

    head = (f"{'contender':<28} {'targets':>7} {'wall median (s)':>15} {'cpu (s)':>7} {'peak RSS (MB)':>13} "
            f"{'read (GB)':>9} {'read/input':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "-"
        read = f"{r['bytes_read'] / 1e9:.2f}" if r["bytes_read"] is not None else "-"
        rel = f"{r['bytes_read'] / input_bytes:.2f}x" if r["bytes_read"] is not None else "-"
        tg = "" if r["targets"] is None else r["targets"]
        print(f"{r['contender']:<28} {tg:>7} {r['wall_s']:>15.2f} {r['cpu_s']:>7.2f} {rss:>13} {read:>9} {rel:>10}")
    print(f"inputs: {N} x {out_size / 1e6:.0f} MB = {input_bytes / 1e9:.2f} GB; wall of '{m['contender']}' "
          f"and its read are sums over {len(targets)} processes, RSS the max")
    verdict = "meets" if ratios["series_over_floor"] <= TARGET_RATIO else "MISSES"
    print(f"series / floor          = {ratios['series_over_floor']:.2f}x  ({verdict} the <= {TARGET_RATIO}x target)")
    print(f"{len(targets)} merges / series     = {ratios['merges_over_series']:.2f}x")
    print(f"series k={SCALING_K[-1]} / k={SCALING_K[0]}     = "
          f"{ratios[f'series_k{SCALING_K[-1]}_over_k{SCALING_K[0]}']:.2f}x  (same {k_lo['targets']} targets, {SCALING_FLAG}; read "
          f"{k_hi['bytes_read'] / 1e9:.2f} vs {k_lo['bytes_read'] / 1e9:.2f} GB)")
    print(f"bytes read: series {ratios['series_read_over_input']:.2f}x input, {len(targets)} merges "
          f"{ratios['merges_read_over_input']:.2f}x input ({ratios['merges_read_over_series_read']:.2f}x series)")
    busy = max(load_before, load_after - 1.0)  # a run of ours keeps ~1 core busy by itself
    if busy > 0.5:
        print(f"note: other processes were running (1-min load {load_before:.1f} before, {load_after:.1f} after): "
              "walls are noisy, the cpu column is steadier")
    for line in checks:
        print(line)

    result = {"model": MODEL, "n": N, "window": WINDOW, "targets": targets, "repeats": args.repeats,
              "input_bytes": input_bytes, "output_file_bytes": out_size, "rows": rows, "ratios": ratios,
              "target_ratio": TARGET_RATIO, "sanity": checks, "loadavg_before_after": [load_before, load_after], "kept": sorted(str(p) for p in keep_root.iterdir()),
              "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    (work / "bench_series.json").write_text(json.dumps(result, indent=2) + "\n")
    rm(io_file)
    log(f"wrote {work / 'bench_series.json'}; kept one target of each ckptavg contender under {keep_root}")
    return 0 if all("FAILED" not in c and "SUSPICIOUS" not in c for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
