"""A quick held-out loss without lm-eval: token-level NLL and perplexity of a text file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Default window: the model's context, capped so that long-context models stay quick to score.
MAX_DEFAULT_SEQ_LEN = 2048


def read_documents(path: str | os.PathLike[str]) -> list[str]:
    """The documents of a held-out file.

    Args:
        path: a ``.jsonl`` file (one object with a string ``"text"`` per line; blank lines are
            skipped) or any other UTF-8 file (its whole text is one document).

    Returns:
        The documents, in file order.

    Raises:
        UsageError: the file is not UTF-8, or a JSONL line is not an object with a string ``"text"``
            (naming the line).
        OSError: the file cannot be read.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{p}: not UTF-8 text") from None
    if p.suffix != ".jsonl":
        return [text]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise UsageError(f"{p}:{lineno}: not valid JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UsageError(f"{p}:{lineno}: expected an object with a string \"text\" field")
        docs.append(obj["text"])
    return docs


def _context_length(config: Any) -> int:
    # Architectures name their context differently; the first positive one is the real one.
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 1:
            return min(v, MAX_DEFAULT_SEQ_LEN)
    return MAX_DEFAULT_SEQ_LEN


def held_out_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | os.PathLike[str],
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Token-level mean negative log-likelihood (nats) and perplexity of a text file.

    Definition: the documents (a ``.jsonl`` file: each line's ``"text"``; any other file: its
    whole text, one document) are tokenized without special tokens and concatenated, with the
    tokenizer's EOS token between consecutive documents. The stream is cut into non-overlapping
    windows of ``seq_len`` tokens (the last may be shorter; a 1-token remainder is dropped). In
    each window, every token but the first is predicted from the tokens before it *in that
    window*; ``loss`` is the sum of those NLLs over all windows divided by their count
    (``predicted_tokens``), so a single window gives exactly ``model(ids, labels=ids).loss``.
    ``perplexity = exp(loss)``. Logits are upcast to float32 before the softmax.

    Args:
        model: a causal LM, e.g. from :func:`ckptavg.eval.load_model`.
        tokenizer: its tokenizer.
        path: the ``.txt`` or ``.jsonl`` file.
        seq_len: window length [default: the model's context, at most 2048].
        batch_size: full windows per forward pass (at least 1).

    Returns:
        ``{"file", "documents", "tokens", "windows", "seq_len", "predicted_tokens", "loss", "perplexity"}``.

    Raises:
        UsageError: a ``seq_len`` below 2 or ``batch_size`` below 1, a file that is not UTF-8, a bad JSONL line, fewer
            than two tokens in all.
        OSError: the file cannot be read.

    Example:
        >>> held_out_loss(model, tok, "valid.jsonl", seq_len=512)["perplexity"]  # doctest: +SKIP
    """
    if seq_len is not None and seq_len < 2:  # one token predicts nothing: every window would be empty
        raise UsageError(f"seq_len must be at least 2, got {seq_len}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    import torch
    import torch.nn.functional as F

    p = Path(path)
    docs = read_documents(p)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
    n_ctx = seq_len or _context_length(model.config)
    windows = [ids[i : i + n_ctx] for i in range(0, len(ids), n_ctx)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise UsageError(f"{p}: fewer than 2 tokens; nothing to score")
    # Full windows batch together; the short tail goes alone, so no padding ever enters the loss.
    full = [w for w in windows if len(w) == n_ctx]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[w] for w in windows if len(w) < n_ctx]
    nll, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            x = torch.tensor(batch, device=model.device)  # (B, T)
            logits = model(input_ids=x).logits[:, :-1].float()  # (B, T-1, V)
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            count += x.shape[0] * (x.shape[1] - 1)
    loss = nll / count
    return {"file": str(p), "documents": len(docs), "tokens": len(ids), "windows": len(windows), "seq_len": n_ctx,
            "predicted_tokens": count, "loss": loss, "perplexity": math.exp(loss)}


__all__ = ["MAX_DEFAULT_SEQ_LEN", "held_out_loss", "read_documents"]
