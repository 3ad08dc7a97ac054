"""Zero-shot scoring: hand a model to lm-evaluation-harness, and a quick held-out loss without it.

The model comes from one of three targets, all built into the same transformers model object
(:mod:`.model`):

- a merged (or any HF) directory: loaded from disk with ``from_pretrained(dir)``;
- one checkpoint of a run (``step=S``) or a merge spec (``selection=Selection(window=5, at=S)``,
  any method), on a local or ``hf://`` run: averaged **in memory** by :func:`ckptavg.average`
  (``out=None``) and loaded with ``from_pretrained(None, config=…, state_dict=…)``, never written
  to disk; the same weights score the same either way.

:func:`score` (:mod:`.scoring`) wraps it in lm-eval's ``HFLM(pretrained=model, tokenizer=…)`` for
``lm_eval.simple_evaluate`` on the tasks :mod:`.tasks` resolves, and/or runs :func:`held_out_loss`
(:mod:`.heldout`). It returns data; tables for people are built in :mod:`ckptavg.cli.present`.

torch, transformers and lm_eval are imported inside the functions: ``ckptavg --help`` pays for
none of them, and a user without the ``eval`` extra gets one line saying what to install.
"""

from __future__ import annotations

from .heldout import held_out_loss
from .model import DTYPES, load_model
from .scoring import score, to_json
from .tasks import EXTRA_HINT, TASKS_DIR, packaged_task, packaged_tasks

__all__ = ["DTYPES", "EXTRA_HINT", "TASKS_DIR", "held_out_loss", "load_model", "packaged_task", "packaged_tasks",
           "score", "to_json"]
