"""Peak RSS of ``ckptavg merge`` on a DeepSpeed ZeRO-3 run and on a DCP run, for k = 1, 2, 4, 8 inputs.

Builds (once, cached under --work) two runs of the same ~67M-parameter fp32 model (268 MB of
weights): one trained a few steps with DeepSpeed ZeRO-3 over 2 data-parallel CPU ranks (bf16, AdamW:
each checkpoint holds the fp32 master partitions plus two Adam moments, ~800 MB), and one saved with
``torch.distributed.checkpoint`` (model only, 268 MB). REAL checkpoints are written, then hard-linked
under new step names up to MAX_K (links cost no disk; ckptavg reads each link as its own input).
Each merge runs in its own process under ``/usr/bin/time -v``; peak RSS is the OS's figure.

    python benchmarks/bench_formats.py [--work bench-work/formats] [--only zero3|dcp]

Prints one table and writes it as JSON to <work>/bench_formats.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

# --- knobs -----------------------------------------------------------------------------------
LAYERS, WIDTH = 16, 2048   # 16 square Linear layers: 67M parameters, 268 MB in fp32, 16 MB per weight
REAL = 4                   # checkpoints actually trained and saved (disk: ~3.2 GB for ZeRO-3, ~1.1 GB for DCP)
KS = (1, 2, 4, 8)          # inputs per merge; beyond REAL the inputs are hard links of real checkpoints
DP = 2                     # ZeRO-3 data-parallel ranks: 2 partitions per parameter, the non-degenerate case
REPEATS = 2                # runs per row: peak RSS is the largest seen, wall the smallest
# Freed blocks of 16 MB (a whole tensor, as torch's DCP reader used to load per input) stay in glibc's
# heaps once its mmap threshold has grown to 32 MB, and peak RSS counts them. Rows with this setting
# show the live memory: MALLOC_MMAP_THRESHOLD_ fixes the threshold (now that DCP chunks are pread,
# both DCP rows should agree).
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
GNU_TIME = "/usr/bin/time"

TRAIN_ZERO3 = textwrap.dedent('''\
    import os, sys
    import torch
    import torch.multiprocessing as mp

    def run(rank, out, layers, width, real, dp):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29631", RANK=str(rank), WORLD_SIZE=str(dp),
                          LOCAL_RANK=str(rank))
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo")
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
        cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
               "zero_allow_untested_optimizer": True, "bf16": {"enabled": True}, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                          config=cfg)
        for step in range(1, real + 1):
            engine.backward(engine(torch.randn(2, width).bfloat16()).float().pow(2).mean())
            engine.step()
            engine.save_checkpoint(out, tag=f"global_step{step}")

    if __name__ == "__main__":
        mp.spawn(run, args=(sys.argv[1], *map(int, sys.argv[2:])), nprocs=int(sys.argv[-1]))
''')

SAVE_DCP = textwrap.dedent('''\
    import sys
    import torch
    import torch.distributed.checkpoint as dcp

    out, layers, width, real = sys.argv[1], *map(int, sys.argv[2:])
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    for step in range(1, real + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)
        dcp.save(model.state_dict(), checkpoint_id=f"{out}/step-{step}", no_dist=True)
''')


def _link_up(run: Path, pattern: str, real: int, max_k: int) -> None:
    """Hard-link real checkpoints under new step numbers until the run has ``max_k`` of them."""
    for step in range(real + 1, max_k + 1):
        src, dst = run / pattern.format((step - 1) % real + 1), run / pattern.format(step)
        if not dst.exists():
            shutil.copytree(src, dst, copy_function=os.link)


def build(work: Path) -> dict[str, Path]:
    runs = {"DeepSpeed ZeRO-3": work / "zero3", "DCP": work / "dcp"}
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    if not (runs["DeepSpeed ZeRO-3"] / f"global_step{REAL}").exists():
        script = work / "train_zero3.py"
        script.write_text(TRAIN_ZERO3)
        subprocess.run([sys.executable, str(script), str(runs["DeepSpeed ZeRO-3"]), str(LAYERS), str(WIDTH),
                        str(REAL), str(DP)], env=env, check=True, stdout=subprocess.DEVNULL)
    if not (runs["DCP"] / f"step-{REAL}").exists():
        script = work / "save_dcp.py"
        script.write_text(SAVE_DCP)
        subprocess.run([sys.executable, str(script), str(runs["DCP"]), str(LAYERS), str(WIDTH), str(REAL)],
                       env=env, check=True)
    _link_up(runs["DeepSpeed ZeRO-3"], "global_step{}", REAL, max(KS))
    _link_up(runs["DCP"], "step-{}", REAL, max(KS))
    return runs


def measure(run: Path, k: int, out: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one ``ckptavg merge --window k``, from GNU time."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [GNU_TIME, "-v", sys.executable, "-m", "ckptavg", "merge", str(run), "--window", str(k), "-o", str(out),
           "--no-fsync", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO, env={**os.environ, **(env or {})})
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024  # type: ignore[union-attr]
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)  # type: ignore[union-attr]
    secs = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    shutil.rmtree(out, ignore_errors=True)
    return secs, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "bench-work" / "formats")
    ap.add_argument("--only", choices=["zero3", "dcp"], help="measure one input format (both runs are built)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    runs = build(args.work)
    rows = []
    cases = [(fmt, run, None) for fmt, run in runs.items()] + [("DCP, fixed mmap", runs["DCP"], FIXED_MMAP)]
    if args.only:
        cases = [c for c in cases if c[0].startswith("DCP") == (args.only == "dcp")]
    for fmt, run, env in cases:
        one = sum(f.stat().st_size for f in (sorted(run.glob("*1"))[0]).rglob("*") if f.is_file())
        for k in KS:
            seen = [measure(run, k, args.work / "out", env) for _ in range(REPEATS)]
            rows.append({"format": fmt, "k": k, "checkpoint_mb": round(one / 1e6), "wall_s": min(s for s, _ in seen),
                         "peak_rss_mb": max(r for _, r in seen)})
    print(f"model: {LAYERS} x Linear({WIDTH}, {WIDTH}) = {LAYERS * WIDTH * WIDTH / 1e6:.0f}M parameters, "
          f"{LAYERS * WIDTH * WIDTH * 4 / 1e6:.0f} MB in fp32")
    print(f"| {'input':<18} | {'k':>2} | {'one checkpoint (MB)':>19} | {'wall (s)':>8} | {'peak RSS (MB)':>13} |")
    print(f"| {'-' * 18} | {'-' * 2}: | {'-' * 19}: | {'-' * 8}: | {'-' * 13}: |")
    for r in rows:
        print(f"| {r['format']:<18} | {r['k']:>2} | {r['checkpoint_mb']:>19} | {r['wall_s']:>8.2f} | "
              f"{r['peak_rss_mb']:>13.0f} |")
    (args.work / f"bench_formats{'_' + args.only if args.only else ''}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
