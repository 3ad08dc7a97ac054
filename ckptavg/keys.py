"""Wrapper prefixes on tensor names: ``module.`` (DDP, DeepSpeed), ``_orig_mod.`` (``torch.compile``),
``model.`` (a LightningModule's ``self.model``), alone or stacked (``module._orig_mod.``).

A checkpoint saved from a wrapped model carries the wrapper's prefix on every name. Averaging
keeps names as they are, so an output in the input's own format loads back the way the input did.
An HF folder is different: ``from_pretrained`` matches names against the model its ``config.json``
builds, and a prefixed name matches nothing (it would leave every weight random, with a warning).
So when the output is an HF folder and the newest input has a ``config.json``,
:func:`strip_plan` decides which prefix to strip:

- when transformers can build the model from the config (on the meta device: no memory, no
  weights), the prefix whose removal makes the most names the model's own — and none, when the
  names as they are already fit (Llama's real names start with ``model.``);
- otherwise by the names alone: ``module.`` and ``_orig_mod.`` are never a model's own names and
  are stripped; ``model.`` is kept, since it may be.

What was stripped, and how it was decided, is recorded in ``ckptavg.json`` (``keys``).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

WRAPPERS = ("module.", "_orig_mod.", "model.")
_NEVER_REAL = ("module.", "_orig_mod.")  # wrapper attribute names, not names a model gives its weights


def common_prefix(names: Collection[str]) -> str:
    """The stack of wrapper prefixes every name starts with (``""`` when none), e.g. ``module._orig_mod.``."""
    prefix = ""
    while names:
        nxt = next((w for w in WRAPPERS if all(n.startswith(prefix + w) and len(n) > len(prefix + w) for n in names)),
                   None)
        if nxt is None:
            break
        prefix += nxt
    return prefix


def _split(prefix: str) -> list[str]:
    out, rest = [], prefix
    while rest:
        w = next(w for w in WRAPPERS if rest.startswith(w))
        out.append(w)
        rest = rest[len(w):]
    return out


def _cuts(prefix: str) -> list[str]:
    """Each way to strip the leading wrappers of ``prefix``, longest first."""
    parts = _split(prefix)
    return ["".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _model_names(config_dir: Path) -> tuple[set[str], str] | None:
    """The state-dict names of the model ``config.json`` describes, built on the meta device, and its
    class name; None when transformers is missing or cannot build it (custom code is never run)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    except ImportError:
        return None
    try:
        config = AutoConfig.from_pretrained(str(config_dir), trust_remote_code=False)
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
            except ValueError:
                model = AutoModel.from_config(config, trust_remote_code=False)
    except Exception:  # noqa: BLE001 — an unknown model type, custom code, a config transformers rejects: no model
        return None
    return set(model.state_dict()), type(model).__name__


def strip_plan(names: Collection[str], config_dir: Path | None) -> tuple[str, dict[str, Any]] | None:
    """The prefix to strip from ``names`` when writing an HF folder, and the ``ckptavg.json`` record
    of it; None to keep the names (no prefix, no ``config.json``, or names that already fit).

    >>> strip_plan(["_orig_mod.w", "_orig_mod.b"], None) is None   # no config.json: not an HF model
    True
    """
    prefix = common_prefix(names)
    if not prefix or config_dir is None or not (config_dir / "config.json").is_file():
        return None
    built = _model_names(config_dir)
    if built is not None:
        expected, cls = built

        def fit(p: str) -> int:
            return sum(n[len(p):] in expected for n in names)

        best = max(_cuts(prefix), key=fit)
        if fit(best) <= fit("") or 2 * fit(best) < len(names):
            return None
        how = f"{cls} built from config.json: {fit(best)} of {len(names)} names are its own once stripped"
    else:
        best = next((c for c in _cuts(prefix) if all(w in _NEVER_REAL for w in _split(c))), "")
        if not best:
            return None
        how = "by name: module. and _orig_mod. are wrapper names (transformers could not build the model to check)"
    return best, {"stripped_prefix": best, "checked": how}


__all__ = ["WRAPPERS", "common_prefix", "strip_plan"]
