"""Benchmark ``ckptavg eval``: score an average built in memory vs. written to disk and loaded back.

Reuses bench_merge's trajectory (built once, cached under --work): K checkpoints of a
~134M-parameter Llama-shaped fp32 model, ~512 MB of safetensors each. Each contender runs in its
own subprocess under ``/usr/bin/time -v`` (wall clock, peak RSS), round-robin, with the page cache
warmed identically (every input read once, the previous output deleted) before the clock starts:

- in memory:        ``ckptavg eval RUN --window K``: average into RAM, from_pretrained(state_dict=…)
- write, then load: ``ckptavg merge RUN --window K -o DIR`` then ``ckptavg eval DIR``
- write, lm-eval:   the same merge, then lm-eval loads DIR itself (``HFLM(pretrained=DIR)``)

All three score the same task on the same weights; the script checks that their scores agree.

    python benchmarks/bench_eval.py [--work bench-work] [--repeats 3]

Prints one table and writes it as JSON to <work>/bench_eval.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_merge  # noqa: E402  (reused: build_run, step_dirs, warm_cache, timed, log, GNU_TIME)

# --- knobs -----------------------------------------------------------------------------------
K = bench_merge.K          # checkpoints averaged: bench_merge's run (5 x 512 MB), a typical LAWA window
TASK = "ckptavg_basics"    # the packaged task: no download, so the benchmark runs offline
LIMIT = 5                  # examples scored (x4 choices): exercises lm-eval; scoring costs the same in every row
BATCH = 8                  # lm-eval batch size: the contexts are short, 8 fit easily on 2 cores
REPEATS = 3                # runs per contender, round-robin: median wall damps noise; max RSS is the worst seen
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
log = bench_merge.log
MODES = {
    "memory": "in memory (ckptavg eval RUN --window K)",
    "disk": "write, then load (merge -o DIR; eval DIR)",
    "lm-eval": "write, then lm-eval loads DIR itself",
}


def child(mode: str, run: Path, out: Path, report: Path) -> None:
    """One contender, timed from inside as well: writes {write_s, load_s, tasks_s, results}."""
    # Imports cost the same in every row (~3 s here); paying them before the clock keeps 'load'
    # about the weights. wall_s (from /usr/bin/time) still includes them.
    import lm_eval  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from lm_eval.models.huggingface import HFLM  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import ckptavg
    from ckptavg.eval import packaged_task, score

    t0 = time.perf_counter()
    write_s = load_s = tasks_s = 0.0
    if mode == "memory":
        r = score(run, TASK, selection=ckptavg.Selection(window=K), limit=LIMIT, batch_size=BATCH, progress=False)
        load_s, tasks_s = r["ckptavg"]["seconds"]["load"], r["ckptavg"]["seconds"]["tasks"]
    else:
        ckptavg.average(ckptavg.discover(run).window(K), out, progress=False)
        write_s = time.perf_counter() - t0
        if mode == "disk":
            r = score(out, TASK, limit=LIMIT, batch_size=BATCH)
            load_s, tasks_s = r["ckptavg"]["seconds"]["load"], r["ckptavg"]["seconds"]["tasks"]
        else:
            import lm_eval
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager

            t1 = time.perf_counter()
            lm = HFLM(pretrained=str(out), device="cpu", batch_size=BATCH)
            load_s = time.perf_counter() - t1
            r = lm_eval.simple_evaluate(model=lm, tasks=[packaged_task(TASK)], limit=LIMIT, log_samples=False,
                                        task_manager=TaskManager(include_defaults=False))
            tasks_s = time.perf_counter() - t1 - load_s
    report.write_text(json.dumps({"write_s": write_s, "load_s": load_s, "tasks_s": tasks_s,
                                  "results": r["results"]}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "bench-work",
                    help="work dir for checkpoints and outputs [default: <repo>/bench-work]")
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--child", nargs=4, metavar=("MODE", "RUN", "OUT", "REPORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, run, out, report = args.child
        child(mode, Path(run), Path(out), Path(report))
        return 0
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    run = bench_merge.build_run(work)
    inputs = [d / "model.safetensors" for d in bench_merge.step_dirs(run, K)]
    out = work / "out-eval"
    gb = sum(f.stat().st_size for f in inputs) / 1e9
    log(f"k={K}, {gb:.2f} GB of inputs, {TASK} limit {LIMIT}, {args.repeats} runs each (round-robin), warm page cache")

    got: dict[str, dict[str, list]] = {m: {"wall": [], "rss": [], "write": [], "load": [], "tasks": []} for m in MODES}
    results: dict[str, dict] = {}
    for rep in range(args.repeats):
        for mode in MODES:
            report = work / f"eval-{mode}.json"

            def prepare() -> None:
                if out.exists():
                    shutil.rmtree(out)
                bench_merge.warm_cache(inputs)

            cmd = [sys.executable, __file__, "--child", mode, str(run), str(out), str(report)]
            wall, rss = bench_merge.timed(cmd, work / "time.txt", prepare)
            inner = json.loads(report.read_text())
            results[mode] = inner["results"]
            for key, value in (("wall", wall), ("rss", rss), ("write", inner["write_s"]), ("load", inner["load_s"]),
                               ("tasks", inner["tasks_s"])):
                got[mode][key].append(value)
            log(f"  {mode:<8} run {rep + 1}/{args.repeats}: {wall:6.2f} s wall, {rss:6.0f} MB peak RSS")
    if out.exists():
        shutil.rmtree(out)

    agree = all(results[m] == results["memory"] for m in MODES)
    rows = []
    for mode, label in MODES.items():
        g = got[mode]
        med = {k: statistics.median(v) for k, v in g.items() if k != "rss"}
        rows.append({"contender": label, "write_s": med["write"], "load_s": med["load"],
                     "ready_s": med["write"] + med["load"], "tasks_s": med["tasks"], "wall_s": med["wall"],
                     "peak_rss_mb": max(g["rss"]),
                     "disk_mb": 0 if mode == "memory" else inputs[0].stat().st_size / 1e6})
    head = (f"{'contender':<44} {'write s':>8} {'load s':>7} {'ready s':>8} {'score s':>8} {'wall s':>7} "
            f"{'peak RSS':>9} {'written':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['contender']:<44} {r['write_s']:>8.2f} {r['load_s']:>7.2f} {r['ready_s']:>8.2f} "
                     f"{r['tasks_s']:>8.2f} {r['wall_s']:>7.2f} {r['peak_rss_mb']:>6.0f} MB {r['disk_mb']:>5.0f} MB")
    lines.append(f"medians of {args.repeats} runs; k={K} x {inputs[0].stat().st_size / 1e6:.0f} MB fp32 inputs; "
                 f"'load' is in-memory averaging + model build for the first row; "
                 f"scores identical across rows: {'yes' if agree else 'NO'}")
    print("\n".join(lines))
    (work / "bench_eval.json").write_text(json.dumps({"rows": rows, "scores_agree": agree, "k": K, "task": TASK,
                                                      "limit": LIMIT, "repeats": args.repeats}, indent=2))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
