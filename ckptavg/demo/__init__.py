"""``ckptavg demo``: the LAWA effect, reproduced on a CPU in a few minutes, bit for bit on every run.

1. **Train** a tiny Pythia-architecture model (GPT-NeoX, 0.92M parameters) on Critter, the
   synthetic language of :mod:`ckptavg.demo.synthlang`, at a deliberately high constant learning
   rate with one injected loss spike, then a short cool-down; checkpoints in Pythia's layout
   (:mod:`ckptavg.demo.train`). A finished run is reused, keyed by its recipe.
2. **Score** it as sweeps (:mod:`ckptavg.demo.run`, :mod:`ckptavg.sweep`): held-out Critter loss
   of the raw checkpoint at every step and of LAWA (the latest k, uniform) and an EMA, averaged in
   memory, from step 40 on (and WSM, WMA over LAWA's window); zero-shot accuracy on a
   multiple-choice task with lm-eval at a few steps. Then the LAWA merge at the last step, and a
   plot (:mod:`ckptavg.sweep.plot`).
3. ``ckptavg study`` (:mod:`ckptavg.demo.study`): the same over seeds and learning rates, against
   the LAWA and WSM papers' claims.

Importing this package is cheap: torch, transformers, lm-eval and matplotlib load when used.

    >>> result = run_demo("example")                                  # doctest: +SKIP
    >>> result.gains("high-lr")                                       # doctest: +SKIP
"""

from __future__ import annotations

from .run import (
    HELD_OUT_DIR,
    SWEEP_DIR,
    ZERO_SHOT_DIR,
    DemoConfig,
    DemoResult,
    curve_names,
    demo_recipes,
    run_demo,
    save_plot,
    zero_shot_steps,
)
from .train import (
    ARITHMETIC,
    DEMO,
    RUN_NAME,
    STAMP,
    TASK_NAME,
    DemoData,
    TrainConfig,
    build_run,
    pin_arithmetic,
    write_data,
)

__all__ = ["ARITHMETIC", "DEMO", "HELD_OUT_DIR", "RUN_NAME", "STAMP", "SWEEP_DIR", "TASK_NAME", "ZERO_SHOT_DIR", "DemoConfig",
           "DemoData", "DemoResult", "TrainConfig", "build_run", "curve_names", "demo_recipes", "run_demo",
           "pin_arithmetic", "save_plot", "write_data", "zero_shot_steps"]
