"""A LoRA run written by real PEFT + ``transformers.Trainer``: ``checkpoint-N/`` children holding
``adapter_model.safetensors`` + ``adapter_config.json`` (and optimizer/RNG/trainer state), the final
adapter on top from ``trainer.save_model()``. The oracle is PEFT's own loading:
``PeftModel.from_pretrained(base, checkpoint)`` then ``get_peft_model_state_dict``, averaged in fp64;
outputs are loaded back with ``PeftModel.from_pretrained`` (adapter) or ``from_pretrained`` (merged)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckptavg import discover
from ckptavg.cli import cli

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'ckptavg[tools]')")

SAVE_STEPS = 2
MAX_STEPS = 10  # checkpoint-2 … checkpoint-10
STEPS = list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
TARGETS = ["query_key_value", "dense_4h_to_h"]
ALPHA, RANK = 8, 4


class _Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int, length: int = 16) -> None:
        self.ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """(run folder, base model folder): the base saved first, so adapter_config.json names it."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Trainer, TrainingArguments

    root = tmp_path_factory.mktemp("peft")
    base_dir, run = root / "base", root / "run"
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, eos_token_id=0, bos_token_id=0)
    GPTNeoXForCausalLM(config).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base = GPTNeoXForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    args = TrainingArguments(output_dir=str(run), max_steps=MAX_STEPS, save_steps=SAVE_STEPS,
                             per_device_train_batch_size=4, learning_rate=3e-2,  # large: checkpoints differ clearly
                             report_to="none", use_cpu=True, logging_steps=100, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(64))
    trainer.train()
    trainer.save_model(str(run))
    assert (run / "adapter_model.safetensors").is_file()
    return run, base_dir


def _base(base_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import GPTNeoXForCausalLM

    return GPTNeoXForCausalLM.from_pretrained(base_dir)


def _adapter_state(folder: Path, base_dir: Path) -> dict[str, torch.Tensor]:
    """PEFT's view of an adapter folder: what get_peft_model_state_dict gives after loading it."""
    from peft import PeftModel, get_peft_model_state_dict

    model = PeftModel.from_pretrained(_base(base_dir), folder)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _expected(run: Path, base_dir: Path, weights: dict[int, float]) -> dict[str, torch.Tensor]:
    sds = {s: _adapter_state(run / f"checkpoint-{s}", base_dir) for s in weights}
    total = sum(weights.values())
    return {n: sum(sds[s][n].double() * (w / total) for s, w in weights.items()).float() for n in sds[max(sds)]}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model.eval()(ids).logits


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _assert_adapter(out: Path, run: Path, base_dir: Path, want: dict[str, torch.Tensor]) -> None:
    """``out`` loads with PeftModel.from_pretrained; its adapter tensors and its forward pass are the oracle's."""
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict
    from peft.config import PeftConfig

    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "ckptavg.json"]
    assert json.loads((out / "adapter_config.json").read_text()) == \
        json.loads((run / f"checkpoint-{MAX_STEPS}" / "adapter_config.json").read_text())
    got = _adapter_state(out, base_dir)
    assert set(got) == set(want) and len(want) == 4 * len(TARGETS)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=1e-6, atol=1e-7, msg=name)
    loaded = PeftModel.from_pretrained(_base(base_dir), out)
    oracle = get_peft_model(_base(base_dir), PeftConfig.from_pretrained(str(out)))
    set_peft_model_state_dict(oracle, want)
    torch.testing.assert_close(_logits(loaded, IDS), _logits(oracle, IDS), rtol=1e-5, atol=1e-6)


def test_list(lora_run: tuple[Path, Path]) -> None:
    run, _ = lora_run
    traj = discover(run)
    assert traj.steps == STEPS
    assert all(Path(c.files[0]).name == "adapter_model.safetensors" for c in traj)
    assert [n.split(":")[0] for n in traj.ignored] == [str(run / "adapter_model.safetensors")]
    result = CliRunner().invoke(cli, ["list", str(run), "--json"])
    assert result.exit_code == 0, result.output
    assert [c["step"] for c in json.loads(result.stdout)["checkpoints"]] == STEPS


def test_merge_window_writes_an_adapter(lora_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, base_dir = lora_run
    out = tmp_path / "lawa3"
    result = CliRunner().invoke(cli, ["merge", str(run), "--window", "3", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    _assert_adapter(out, run, base_dir, _expected(run, base_dir, dict.fromkeys(STEPS[-3:], 1.0)))
    record = json.loads((out / "ckptavg.json").read_text())
    assert record["peft"]["mode"] == "adapter" and "merged-delta" in record["peft"]["why"]


def test_merge_ema_half_life(lora_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, base_dir = lora_run
    out, h = tmp_path / "ema", 4.0
    result = CliRunner().invoke(cli, ["merge", str(run), "--method", "ema", "--half-life", str(h), "-o", str(out),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    _assert_adapter(out, run, base_dir, _expected(run, base_dir, {s: 0.5 ** ((MAX_STEPS - s) / h) for s in STEPS}))


def test_series_window(lora_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, base_dir = lora_run
    out = tmp_path / "series"
    result = CliRunner().invoke(cli, ["series", str(run), "--window", "2", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    for s in STEPS[1:]:
        _assert_adapter(out / f"step{s}", run, base_dir, _expected(run, base_dir, {s - SAVE_STEPS: 1.0, s: 1.0}))


def _merged_oracle(run: Path, base_dir: Path, steps: list[int]) -> dict[str, torch.Tensor]:
    """base + mean over steps of (alpha/r)·B·A, in fp64, from PEFT's own loading of each checkpoint."""
    from safetensors.torch import load_file

    base = load_file(base_dir / "model.safetensors")
    sds = [_adapter_state(run / f"checkpoint-{s}", base_dir) for s in steps]
    out = {}
    for name, t in base.items():
        module = name.removesuffix(".weight")
        a = f"base_model.model.{module}.lora_A.weight"
        if a in sds[0]:
            b = a.replace("lora_A", "lora_B")
            delta = sum((ALPHA / RANK) * sd[b].double() @ sd[a].double() for sd in sds) / len(sds)
            out[name] = (t.double() + delta).to(t.dtype)
        else:
            out[name] = t
    return out


def test_merged_delta_is_base_plus_the_mean_update(lora_run: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

    run, base_dir = lora_run
    out = tmp_path / "exact"
    result = CliRunner().invoke(cli, ["merge", str(run), "--window", "3", "--peft", "merged-delta", "-o", str(out),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    want = _merged_oracle(run, base_dir, STEPS[-3:])
    got = load_file(out / "model.safetensors")
    assert set(got) == set(want)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=1e-6, atol=1e-6, msg=name)
    model = AutoModelForCausalLM.from_pretrained(out)
    oracle = GPTNeoXForCausalLM.from_pretrained(None, config=model.config, state_dict=want)
    torch.testing.assert_close(_logits(model, IDS), _logits(oracle, IDS), rtol=1e-5, atol=1e-5)
    record = json.loads((out / "ckptavg.json").read_text())
    assert record["peft"]["mode"] == "merged-delta" and record["peft"]["scaling"] == [ALPHA / RANK]
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer.json").is_file()

    # and the two modes differ: mean(B)·mean(A) ≠ mean(B·A)
    lawa = tmp_path / "lawa3"
    assert CliRunner().invoke(cli, ["merge", str(run), "--window", "3", "-o", str(lawa), "-q"]).exit_code == 0
    from peft import PeftModel

    approx = PeftModel.from_pretrained(_base(base_dir), lawa).merge_and_unload().state_dict()
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    assert (approx[name].double() - want[name].double()).abs().max() > 1e-5


def test_merged_delta_with_base_flag_and_refusals(lora_run: tuple[Path, Path], tmp_path: Path,
                                                  make_run) -> None:  # type: ignore[no-untyped-def]
    run, base_dir = lora_run
    out = tmp_path / "exact"
    r = CliRunner().invoke(cli, ["merge", str(run), "--steps", "8,10", "--peft", "merged-delta", "--base",
                                 str(base_dir), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    got = load_file(out / "model.safetensors")
    for name, t in _merged_oracle(run, base_dir, [8, 10]).items():
        torch.testing.assert_close(got[name], t, rtol=1e-6, atol=1e-6, msg=name)
    plain, _ = make_run("safetensors", steps=(1, 2))
    r = CliRunner().invoke(cli, ["merge", str(plain), "--peft", "merged-delta", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "needs PEFT adapter checkpoints" in r.output
    assert not (tmp_path / "x").exists()


def test_eval_scores_base_plus_adapter(lora_run: tuple[Path, Path], tmp_path: Path, held_out: dict[str, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from ckptavg.eval.heldout import held_out_loss

    run, base_dir = lora_run
    out = tmp_path / "lawa3"
    assert CliRunner().invoke(cli, ["merge", str(run), "--window", "3", "-o", str(out), "-q"]).exit_code == 0
    oracle = PeftModel.from_pretrained(_base(base_dir), out).merge_and_unload().eval()
    want = held_out_loss(oracle, AutoTokenizer.from_pretrained(base_dir), held_out["txt"])["loss"]
    for target in ([str(out)], [str(run), "--window", "3"]):  # the adapter folder, and the same average in memory
        r = CliRunner().invoke(cli, ["eval", *target, "--text", str(held_out["txt"]), "--json", "-q"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["held_out"]["loss"] == pytest.approx(want, rel=1e-5)
