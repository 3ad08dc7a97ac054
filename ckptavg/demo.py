"""``ckptavg demo``: a small GPT-NeoX run written in Pythia's layout, then averaged.

The run's weights are a random walk around a fixed point (what late training looks like to an
averager: noise around a slowly moving mean), so the average lands closer to that point than any
single checkpoint — the effect LAWA relies on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

STEPS = (1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000)
WINDOW = 5


def write_example_run(run: Path, seed: int = 0) -> tuple[Path, object]:
    """Write ``run/step{N}/`` HF checkpoints of a tiny GPT-NeoX; returns (run, fixed-point state dict)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=128)
    model = GPTNeoXForCausalLM(config)
    centre = {k: v.clone() for k, v in model.state_dict().items()}
    for step in STEPS:
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    p.copy_(centre[k] + 0.05 * torch.randn_like(p))
        model.save_pretrained(run / f"step{step}")
    return run, centre


def run_demo(out: Path, progress: bool = True) -> Iterator[str]:
    import torch

    from .discovery import discover
    from .engine import average

    run = out / "pythia-tiny"
    if not run.exists():
        _, centre = write_example_run(run)
    else:
        centre = None
    traj = discover(run)
    yield f"run {run}: {len(traj)} checkpoints, steps {traj.steps[0]}..{traj.steps[-1]}"
    sel = traj.window(WINDOW)
    target = out / f"pythia-tiny-uniform{WINDOW}-step{sel.steps[-1]}"
    average(sel, target, force=True, progress=progress)
    yield f"wrote {target} (uniform average of steps {', '.join(map(str, sel.steps))})"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target)
    ids = torch.arange(32).reshape(1, 32)
    with torch.no_grad():
        logits = model(ids).logits
    yield f"loaded it with transformers: logits {tuple(logits.shape)}, finite={bool(torch.isfinite(logits).all())}"
    if centre is not None:
        from safetensors.torch import load_file

        merged = load_file(target / "model.safetensors")
        raw = load_file(run / f"step{sel.steps[-1]}" / "model.safetensors")
        k = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
        d_raw = (raw[k] - centre[k]).norm().item()
        d_avg = (merged[k] - centre[k]).norm().item()
        yield f"distance to the run's centre ({k}): last checkpoint {d_raw:.3f}, average {d_avg:.3f}"
