"""Compare this checkout's ``merge`` and ``series`` with another revision's, side by side.

A refactor or an engine change must leave speed and memory where they were: this builds (or
reuses) the inputs of ``bench_merge.py`` and ``bench_series.py``, checks out REV into a git
worktree, and runs the same commands with both codes, alternating A/B so machine noise hits both
alike. Wall is the median over repeats, peak RSS the maximum, both from ``/usr/bin/time -v``.

    python benchmarks/bench_ab.py --base 51d3e37 [--this REV] [--repeats 5] [--this-flag=--no-fsync]

Prints one table: per command, base and this checkout, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

# --- knobs -----------------------------------------------------------------------------------
REPEATS = 5           # per command and side; A/B alternate, so a noisy minute slows both
MERGE_K = 5           # bench_merge's main comparison: 5 x 536 MB fp32
SERIES_K = 5          # bench_series' window over its 20 x 141 MB run
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_merge  # noqa: E402  (builds the inputs; knobs live there)
import bench_series  # noqa: E402


def _time(cmd: list[str], env: dict[str, str], tfile: Path) -> tuple[float, float]:
    # cwd = the side's tree: `python -m` puts the working directory first on sys.path, ahead of
    # PYTHONPATH's effect on an editable install's finder — from elsewhere both sides ran this checkout.
    subprocess.run(["/usr/bin/time", "-v", "-o", str(tfile), *cmd], env=env, check=True, cwd=env["PYTHONPATH"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return bench_merge.parse_gnu_time(tfile.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("--work", type=Path, default=REPO / "bench-work")
    ap.add_argument("--this", help="git revision to measure instead of the working tree")
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--this-flag", action="append", default=[],
                    help="extra flag for this side only, e.g. --no-fsync against a base that did not fsync")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    merge_run = bench_merge.build_run(work)
    series_run = bench_series.build_run(work)
    trees = []

    def checkout(name: str, rev: str) -> Path:
        tree = work / f"ab-{name}"
        if tree.exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
            shutil.rmtree(tree, ignore_errors=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
        trees.append(tree)
        return tree

    sides = {"base": checkout("base", args.base), "this": checkout("this", args.this) if args.this else REPO}
    commands = {
        f"merge --window {MERGE_K} (5 x 536 MB fp32)": lambda out: [
            sys.executable, "-m", "ckptavg", "merge", str(merge_run), "--window", str(MERGE_K), "-o", str(out), "-q"],
        f"series --window {SERIES_K} (20 x 141 MB)": lambda out: [
            sys.executable, "-m", "ckptavg", "series", str(series_run), "--window", str(SERIES_K), "-o", str(out), "-q"],
    }
    rows = []
    try:
        for name, cmd in commands.items():
            got: dict[str, list[tuple[float, float]]] = {s: [] for s in sides}
            inputs = sorted(p for run in (merge_run, series_run) for p in run.rglob("*.safetensors"))
            bench_merge.warm_cache(inputs)
            for _ in range(args.repeats):
                for side, root in sides.items():
                    out = work / f"ab-out-{side}"
                    shutil.rmtree(out, ignore_errors=True)
                    env = dict(os.environ, PYTHONPATH=str(root))
                    extra = args.this_flag if side == "this" else []
                    got[side].append(_time(cmd(out) + extra, env, work / "ab-time.txt"))
                    shutil.rmtree(out, ignore_errors=True)
            wall = {s: statistics.median(w for w, _ in v) for s, v in got.items()}
            rss = {s: max(r for _, r in v) for s, v in got.items()}
            rows.append((name, wall["base"], wall["this"], wall["this"] / wall["base"], rss["base"], rss["this"]))
    finally:
        for tree in trees:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    flags = f" {' '.join(args.this_flag)}" if args.this_flag else ""
    print(f"base = {args.base}, this = {args.this or 'working tree'}{flags}; median wall of {args.repeats}, max peak RSS")
    print(f"{'command':<40} {'base s':>7} {'this s':>7} {'ratio':>6} {'base MB':>8} {'this MB':>8}")
    for name, wb, wt, ratio, rb, rt in rows:
        print(f"{name:<40} {wb:>7.2f} {wt:>7.2f} {ratio:>6.2f} {rb:>8.0f} {rt:>8.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
