"""Local trajectories: layouts, step parsing, selection, and problems reported before reading."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckptavg
from ckptavg.errors import CkptavgError
from ckptavg.local import parse_step
from ckptavg.selection import Selection
from conftest import HEAD, integer_state, tiny_config, write_checkpoint


@pytest.mark.parametrize(
    "name, step",
    [("step1000", 1000), ("checkpoint-500", 500), ("global_step2000", 2000), ("iter_0001000", 1000),
     ("ckpt_3000.pt", 3000), ("model_500.safetensors", 500), ("checkpoint_7.pt", 7), ("step-42.bin", 42),
     ("step100-tokens419M", 100), ("epoch3", 3), ("final", None), ("model-00001-of-00002.safetensors", None)],
    ids=lambda x: str(x),
)
def test_parse_step(name, step):
    assert parse_step(name)[0] == step


@pytest.mark.parametrize("dirname", ["step{}", "checkpoint-{}", "global_step{}", "iter_{:07d}", "run{}"],
                         ids=["step", "hf-trainer", "deepspeed", "megatron", "free-form"])
def test_directory_layouts(tmp_path, base_state_dict, dirname):
    from safetensors.torch import save_file

    for i, s in enumerate((300, 100, 200)):
        d = tmp_path / "run" / dirname.format(s)
        d.mkdir(parents=True)
        save_file(integer_state(base_state_dict, i), d / "model.safetensors")
    (tmp_path / "run" / "logs").mkdir()  # unrelated folders are ignored
    (tmp_path / "run" / "README.md").write_text("notes")
    traj = ckptavg.discover(tmp_path / "run")
    assert traj.steps == [100, 200, 300]
    assert all(c.format == "safetensors" for c in traj)


def test_hf_trainer_checkpoint_without_number_uses_trainer_state(tmp_path, base_state_dict):
    from safetensors.torch import save_file

    for name, step in (("checkpoint-100", 100), ("checkpoint-best", 250)):
        d = tmp_path / "run" / name
        d.mkdir(parents=True)
        save_file(integer_state(base_state_dict, step), d / "model.safetensors")
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        torch.save({}, d / "optimizer.pt")  # trainer state is not a second weight file
    assert ckptavg.discover(tmp_path / "run").steps == [100, 250]


def test_megatron_iter_dirs_with_rank_subfolder(tmp_path, base_state_dict):
    for s in (1000, 2000):
        d = tmp_path / "run" / f"iter_{s:07d}" / "mp_rank_00"
        d.mkdir(parents=True)
        torch.save({"model": integer_state(base_state_dict, s), "iteration": s}, d / "model_optim_rng.pt")
    traj = ckptavg.discover(tmp_path / "run")
    assert traj.steps == [1000, 2000] and traj[0].format == "torch"


def test_single_checkpoint_dir_and_file(tmp_path, base_state_dict):
    d = write_checkpoint(tmp_path / "r", 5, integer_state(base_state_dict, 0), "safetensors")
    assert ckptavg.discover(d).steps == [5]
    f = write_checkpoint(tmp_path / "r2", 7, integer_state(base_state_dict, 0), "pt-file")
    traj = ckptavg.discover(f)
    assert traj.steps == [7] and len(traj[0].tensors) == len(base_state_dict)


def test_headers_only_tensor_metadata(make_run):
    root, states = make_run("safetensors-sharded", steps=(1, 2))
    c = ckptavg.discover(root)[0]
    assert len(c.files) == 2 and c.index is not None
    assert {n: t.shape for n, t in c.tensors.items()} == {n: tuple(v.shape) for n, v in states[1].items()}


def test_selection_operations(make_run):
    root, _ = make_run("safetensors", steps=(0, 1, 2, 4, 8, 1000, 2000, 3000))
    t = ckptavg.discover(root)
    assert t.last(3).steps == [1000, 2000, 3000]
    assert t.window(2, at=1000).steps == [8, 1000]
    assert t.between(2, 1000).steps == [2, 4, 8, 1000]
    assert t.every(3).steps == [1, 8, 3000]
    assert t.select([4, 0]).steps == [0, 4]
    assert t[1:3].steps == [1, 2] and t[-1].step == 3000
    assert Selection(window=3, at=2000, start=1).apply(t).steps == [8, 1000, 2000]
    assert Selection(at=4).apply(t).steps == [0, 1, 2, 4]
    with pytest.raises(CkptavgError, match="no checkpoint at step 1500; nearest: 1000, 2000"):
        t.window(2, at=1500)
    with pytest.raises(CkptavgError, match="window 9 needs 9 checkpoints"):
        t.last(9)


def test_duplicate_steps_are_reported(tmp_path, base_state_dict):
    write_checkpoint(tmp_path / "run", 100, integer_state(base_state_dict, 0), "safetensors")
    os.rename(tmp_path / "run" / "step100", tmp_path / "run" / "checkpoint-100")
    write_checkpoint(tmp_path / "run", 100, integer_state(base_state_dict, 1), "safetensors")
    with pytest.raises(CkptavgError, match="duplicate step 100"):
        ckptavg.discover(tmp_path / "run")


def test_mixed_architectures_are_reported_before_reading(tmp_path, base_state_dict):
    write_checkpoint(tmp_path / "run", 1, integer_state(base_state_dict, 0), "safetensors")
    other = integer_state(base_state_dict, 1)
    other[HEAD] = torch.zeros(64, 32)
    write_checkpoint(tmp_path / "run", 2, other, "safetensors")
    with pytest.raises(CkptavgError, match=rf"step 1 .*'{HEAD}' has shape \[128, 32\], step 2 has \[64, 32\]"):
        ckptavg.discover(tmp_path / "run")
    del other[HEAD]
    (tmp_path / "run" / "step2" / "model.safetensors").unlink()
    write_checkpoint(tmp_path / "run2", 2, other, "safetensors")
    write_checkpoint(tmp_path / "run2", 1, integer_state(base_state_dict, 0), "safetensors")
    with pytest.raises(CkptavgError, match=rf"step 1 .*extra tensor '{HEAD}'"):
        ckptavg.discover(tmp_path / "run2")


def test_empty_folder_and_step_dir_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CkptavgError, match="no checkpoints found"):
        ckptavg.discover(tmp_path / "empty")
    (tmp_path / "run" / "step100").mkdir(parents=True)
    tiny_config().save_pretrained(tmp_path / "run" / "step100")
    with pytest.raises(CkptavgError, match="step100: looks like a checkpoint .* no weight files"):
        ckptavg.discover(tmp_path / "run")
    with pytest.raises(CkptavgError, match="no such file"):
        ckptavg.discover(tmp_path / "missing")


def test_a_single_file_beside_shards_is_read_as_from_pretrained_reads_it(tmp_path):
    """A stale model.safetensors left beside an index and its shards: ckptavg averages what
    transformers loads (the single file), never the other set of weights."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    sharded = GPTNeoXForCausalLM(tiny_config())
    torch.manual_seed(1)
    single = GPTNeoXForCausalLM(tiny_config())
    d = tmp_path / "run" / "checkpoint-10"
    sharded.save_pretrained(d, max_shard_size="20KB")
    single.save_pretrained(tmp_path / "single")
    (tmp_path / "single" / "model.safetensors").rename(d / "model.safetensors")
    assert (d / "model.safetensors.index.json").is_file()
    loaded = GPTNeoXForCausalLM.from_pretrained(d).state_dict()
    ours = ckptavg.average(d, progress=False)
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    assert torch.equal(ours[name], loaded[name]) and torch.equal(ours[name], single.state_dict()[name])
    assert [i["location"] for i in ours.manifest["inputs"]] == [str(d)]
