"""The figures and the rule of ``ckptavg inspect``: pure data, no I/O.

:func:`layer_group` names a tensor's group from its module names; :class:`Report` holds what
:func:`ckptavg.stability.inspect` measured and reads back from its JSON (:meth:`Report.from_dict`);
:func:`detect` applies the anomaly rule described in :mod:`ckptavg.stability`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError

WINDOW = 8  # checkpoints of history behind each judgement: enough for a median, short enough to follow a schedule
THRESHOLD = 6.0  # robust z; a normal series passes 6 about once in 10⁹
GROWTH = 1.5  # norm_growth: the weight norm up by ≥ 50 % over WINDOW consecutive rises
MAD_FLOOR = 0.05  # the scale is at least 5 % of the median (see the module docstring)

# Layer groups by module name, first match wins: GPT-NeoX/Pythia, Llama/Mistral/Qwen, GPT-2/nanoGPT, OLMo.
GROUPS: tuple[tuple[str, str], ...] = (
    ("norm", r"(?:^|\.)(?:[^.]*norm[^.]*|ln_[^.]*)\.[^.]+$"),
    ("qkv", r"(?:^|\.)(?:query_key_value|[qkv]_proj|qkv_proj|c_attn|att_proj|Wqkv)\.[^.]+$"),
    ("attn_out", r"(?:^|\.)(?:attention\.dense|o_proj|attn\.c_proj|attn_out|self_attn\.out_proj)\.[^.]+$"),
    ("mlp_in", r"(?:^|\.)(?:dense_h_to_4h|gate_proj|up_proj|gate_up_proj|c_fc|ff_proj|fc1)\.[^.]+$"),
    ("mlp_out", r"(?:^|\.)(?:dense_4h_to_h|down_proj|mlp\.c_proj|blocks\.\d+\.ff_out|fc2)\.[^.]+$"),
    ("embed", r"(?:^|\.)(?:embed_in|embed_out|embed_tokens|lm_head|wte|wpe|ff_out|embed_positions)\.[^.]+$"),
)
GROUP_NAMES = (*(g for g, _ in GROUPS), "other")
_GROUP_RES = tuple((g, re.compile(p)) for g, p in GROUPS)


def layer_group(name: str) -> str:
    """The layer group of tensor ``name`` (:data:`GROUPS`), ``other`` when none matches.

    Example:
        >>> layer_group("model.layers.3.self_attn.k_proj.weight"), layer_group("transformer.h.0.mlp.c_proj.bias")
        ('qkv', 'mlp_out')
    """
    for group, pattern in _GROUP_RES:
        if pattern.search(name):
            return group
    return "other"


@dataclass(frozen=True)
class Norms:
    """One tensor's (or group's, or the model's) figures at one checkpoint; None where undefined."""

    weight_norm: float | None
    update_norm: float | None = None
    relative_update: float | None = None  # per step

    def to_dict(self) -> dict[str, float | None]:
        return {"weight_norm": self.weight_norm, "update_norm": self.update_norm, "relative_update": self.relative_update}


@dataclass(frozen=True)
class CheckpointStats:
    """The figures of one checkpoint: the whole model, each tensor, each layer group, and how many
    NaN/Inf each tensor holding any has."""

    step: int
    model: Norms
    tensors: Mapping[str, Norms]
    groups: Mapping[str, Norms]
    non_finite: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Anomaly:
    """``kind`` (``update_spike``, ``non_finite``, ``norm_growth``) at ``step`` in ``tensor`` (None:
    the whole model), with its ``score`` (robust z, NaN/Inf count, growth ratio)."""

    step: int
    tensor: str | None
    kind: str
    score: float


@dataclass(frozen=True)
class Report:
    """What :func:`inspect` found: per-checkpoint figures and the anomalies, with the rule's settings."""

    trajectory: str
    checkpoints: tuple[CheckpointStats, ...]
    anomalies: tuple[Anomaly, ...]
    window: int = WINDOW
    threshold: float = THRESHOLD
    growth: float = GROWTH

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def flagged(self) -> dict[int, str]:
        """The steps ``--exclude-anomalies`` leaves out → why: NaN/Inf in any tensor, or an update
        spike of the whole model. A single tensor's spike alone does not condemn a checkpoint (a
        32-element bias wobbles more than a model does); it is reported, and the model-level z says
        whether it mattered."""
        by_step: dict[int, list[Anomaly]] = {}
        for a in self.anomalies:
            if a.kind == "non_finite" or (a.kind == "update_spike" and a.tensor is None):
                by_step.setdefault(a.step, []).append(a)
        return {s: _reason(found) for s, found in sorted(by_step.items())}

    def to_dict(self) -> dict[str, Any]:
        """``{"trajectory", "rule", "checkpoints": [{"step", "weight_norm", "update_norm",
        "relative_update", "tensors": {name: {"group", …}}, "groups": {group: {…}}}],
        "anomalies": [{"step", "tensor", "kind", "score"}]}``; NaN/Inf figures are null."""
        rule = {"window": self.window, "threshold": self.threshold, "growth": self.growth, "mad_floor": MAD_FLOOR}
        cps = [{"step": c.step, **c.model.to_dict(),
                "tensors": {n: {"group": layer_group(n), **t.to_dict(), **({"non_finite": c.non_finite[n]}
                                                                          if n in c.non_finite else {})}
                            for n, t in c.tensors.items()},
                "groups": {g: t.to_dict() for g, t in c.groups.items()}} for c in self.checkpoints]
        anomalies = [{"step": a.step, "tensor": a.tensor, "kind": a.kind, "score": _finite(a.score)} for a in self.anomalies]
        return {"trajectory": self.trajectory, "rule": rule, "checkpoints": cps, "anomalies": anomalies}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "the report") -> Report:
        """A report back from :meth:`to_dict`'s JSON (``ckptavg inspect --json``).

        Raises:
            UsageError: not such a report, naming ``where``.
        """
        def norms(d: Mapping[str, Any]) -> Norms:
            return Norms(d.get("weight_norm"), d.get("update_norm"), d.get("relative_update"))

        try:
            rule = data["rule"]
            cps = tuple(CheckpointStats(
                int(c["step"]), norms(c), {n: norms(t) for n, t in c["tensors"].items()},
                {g: norms(t) for g, t in c["groups"].items()},
                {n: int(t["non_finite"]) for n, t in c["tensors"].items() if t.get("non_finite")})
                for c in data["checkpoints"])
            anomalies = tuple(Anomaly(int(a["step"]), a["tensor"], str(a["kind"]),
                                      math.nan if a["score"] is None else float(a["score"])) for a in data["anomalies"])
            return cls(str(data.get("trajectory", "")), cps, anomalies, int(rule["window"]), float(rule["threshold"]),
                       float(rule["growth"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UsageError(f"{where}: not a report of ckptavg inspect --json (bad or missing {e}); "
                             "write one with ckptavg inspect RUN --json > FILE") from None


def _reason(found: Sequence[Anomaly]) -> str:
    a = found[0]
    what = "the whole model" if a.tensor is None else f"tensor {a.tensor!r}"
    score = f"{a.score:.0f} NaN/Inf values" if a.kind == "non_finite" else f"score {a.score:.1f}"
    more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
    return f"{a.kind} in {what}, {score}{more}"


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# The rule ------------------------------------------------------------------------------------------
def check_rule(window: int, threshold: float, growth: float) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise UsageError(f"--anomaly-window must be a whole number of at least 2, got {window!r}")
    if not threshold > 0:
        raise UsageError(f"--threshold must be positive, got {threshold!r}")
    if not growth > 1:
        raise UsageError(f"growth must be above 1, got {growth!r}")


def robust_z(x: float, history: Sequence[float]) -> float:
    """(x − median) / max(1.4826·MAD, MAD_FLOOR·|median|) of ``history`` (inf when both are 0 and x
    exceeds the median).

    Example:
        >>> robust_z(2.0, [1.0, 1.1, 0.9, 1.0, 1.05])
        20.0
    """
    med = _median(history)
    mad = _median([abs(h - med) for h in history])
    scale = max(1.4826 * mad, MAD_FLOOR * abs(med))
    if scale == 0:
        return math.inf if x > med else 0.0
    return (x - med) / scale


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def detect(checkpoints: Sequence[CheckpointStats], window: int = WINDOW, threshold: float = THRESHOLD,
           growth: float = GROWTH) -> list[Anomaly]:
    """The anomalies of a run's figures, in step order (within a step: the whole model, the layer
    groups, then tensors in file order; non_finite, update_spike, norm_growth). Update spikes are
    judged for the whole model and each tensor, norm growth for the whole model and each layer
    group (``tensor`` ``"group:qkv"`` …: a zero-initialised bias grows for long, a group's norm
    rises steadily only when something is wrong). See :mod:`ckptavg.stability`.

    Example:
        >>> [(a.step, a.kind) for a in detect(report.checkpoints)]             # doctest: +SKIP
    """
    check_rule(window, threshold, growth)
    first = checkpoints[0] if checkpoints else None
    groups = [f"group:{g}" for g in GROUP_NAMES if first is not None and g in first.groups]
    names: list[str | None] = [None, *groups, *(first.tensors if first is not None else {})]
    found: list[Anomaly] = []
    for name in names:
        group = name is not None and name.startswith("group:") and name not in (first.tensors if first else {})
        series = [c.model if name is None else c.groups.get(name[6:], Norms(None)) if group
                  else c.tensors.get(name, Norms(None)) for c in checkpoints]
        growing = False
        for i, c in enumerate(checkpoints):
            if name is not None and name in c.non_finite and not group:
                found.append(Anomaly(c.step, name, "non_finite", float(c.non_finite[name])))
            x = series[i].relative_update
            history = [s.relative_update for s in series[:i] if s.relative_update is not None][-window:]
            if not group and x is not None and len(history) == window:
                z = robust_z(x, history)
                if z > threshold:
                    found.append(Anomaly(c.step, name, "update_spike", z))
            if name is not None and not group:
                continue
            norms = [s.weight_norm for s in series[max(0, i - window): i + 1]]
            now = (i >= 2 * window and all(a is not None and b is not None and b > a for a, b in zip(norms, norms[1:]))
                   and norms[0] is not None and norms[0] > 0 and norms[-1] is not None and norms[-1] / norms[0] >= growth)
            if now and not growing:
                assert norms[0] is not None and norms[-1] is not None
                found.append(Anomaly(c.step, name, "norm_growth", norms[-1] / norms[0]))
            growing = now
    kinds = ("non_finite", "update_spike", "norm_growth")
    order = {n: i for i, n in enumerate(names)}
    return sorted(found, key=lambda a: (a.step, order[a.tensor], kinds.index(a.kind)))
