"""Benchmark headers with very many tensors: discovery and merge of a run whose checkpoints each
hold N one-element tensors (the shape of a 10^6-tensor MoE or per-expert checkpoint, minus the
bytes), each in its own subprocess: wall time of discovery and of the merge, and peak RSS.

    python benchmarks/bench_headers.py [--work bench-work] [--sizes 100000,1000000]

Prints one table. On the 2-core box (other jobs running, so rough), discovery + merge of two
checkpoints: 10^5 tensors 2.8 s + 42 s, 270 MB before issue 12's fixes, 1.6 s + 11 s, 114 MB after;
10^6 tensors 25 s + 418 s, 2.30 GB before, 24 s + 110 s, 750 MB after. Before: four 1 MiB
accumulators allocated per tensor (``dict.setdefault``'s default is always built), each header
parsed into a dict of a million dicts, and parsed again by every reader. What is left is mostly
the engine's thread hand-offs, a few per tensor however small it is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

# --- knobs -----------------------------------------------------------------------------------
SIZES = (100_000,)   # tensors per checkpoint; add 1_000_000 for the case (~4 min here)
STEPS = (1, 2)       # two checkpoints: the least that makes a merge an average
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]

MEASURE = textwrap.dedent("""
    import json, resource, sys, time
    import ckptavg
    t0 = time.perf_counter()
    traj = ckptavg.discover(sys.argv[1])
    t1 = time.perf_counter()
    ckptavg.average(traj, sys.argv[2], progress=False, fsync=False)
    t2 = time.perf_counter()
    print(json.dumps({"discover_s": t1 - t0, "merge_s": t2 - t1,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def write_run(root: Path, n: int) -> None:
    """``root/step{S}/model.safetensors`` with ``n`` F32 tensors of one element each."""
    import numpy as np

    for s in STEPS:
        d = root / f"step{s}"
        d.mkdir(parents=True, exist_ok=True)
        parts = [f'"layers.{i}.weight":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
                 for i in range(n)]
        raw = ("{" + ",".join(parts) + "}").encode()
        raw += b" " * (-len(raw) % 8)
        with open(d / "model.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw + np.full(n, float(s), np.float32).tobytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "bench-work")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        run, out = args.work / f"headers-{n}", args.work / f"headers-{n}-avg"
        if not (run / f"step{STEPS[-1]}" / "model.safetensors").exists():
            write_run(run, n)
        shutil.rmtree(out, ignore_errors=True)
        r = subprocess.run([sys.executable, "-c", MEASURE, str(run), str(out)], capture_output=True, text=True,
                           check=True, cwd=REPO)
        rows.append({"tensors": n, **json.loads(r.stdout.strip().splitlines()[-1])})
        shutil.rmtree(out, ignore_errors=True)
    print(f"{'tensors':>10}  {'discover s':>10}  {'merge s':>8}  {'peak MB':>8}")
    for row in rows:
        print(f"{row['tensors']:>10}  {row['discover_s']:>10.1f}  {row['merge_s']:>8.1f}  {row['peak_mb']:>8.0f}")


if __name__ == "__main__":
    main()
