"""Sharded safetensors checkpoints written piece by piece, committed atomically, loadable by transformers."""

from __future__ import annotations

import json
import os
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowertune_llm.weights import disk as disk_module
from flowertune_llm.weights.disk import InsufficientDiskSpaceError
from flowertune_llm.weights.groups import plan_groups
from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from flowertune_llm.weights.shards import (
    CheckpointLayout,
    ShardedCheckpointWriter,
    save_local_checkpoint,
)
from flowertune_llm.weights.tensors import Piece, specs_of

from conftest import assert_bit_equal, files_of, model_state, pieces_of


def _tiny_llama(dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=96,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype), config


def test_sharded_output_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model, config = _tiny_llama()
    state = model.state_dict()
    (tmp_path / "config").mkdir()
    config.save_pretrained(tmp_path / "config")
    target = tmp_path / "merged"
    groups = plan_groups(specs_of(state), 5000)  # the embedding and head (6 KB each) are split
    assert any(p.rows for g in groups for p in g)
    with ShardedCheckpointWriter(target, specs_of(state), max_shard_bytes=20_000) as writer:
        for group in groups:
            for key, tensor in pieces_of(state, group).items():
                writer.write(key, tensor.clone())
        writer.add_file("config.json", tmp_path / "config" / "config.json")
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state) and index["metadata"]["total_size"] == sum(
        t.nbytes for t in state.values()
    )
    shard_names = sorted(n for n in os.listdir(target) if n.endswith(".safetensors"))
    assert shard_names[0] == f"model-00001-of-{len(shard_names):05d}.safetensors" and len(shard_names) > 1
    loaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16)
    assert_bit_equal(dict(loaded.state_dict()), dict(state))
    assert oct((target).stat().st_mode & 0o777) == "0o755"


def test_single_shard_matches_safetensors_own_file(tmp_path):
    state = {"a": torch.randn(3, 4).bfloat16(), "b": torch.randn(5).bfloat16()}  # one width, names in order
    save_local_checkpoint(state, tmp_path / "ours")
    save_file(state, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    assert os.listdir(tmp_path / "ours") == ["model.safetensors"]
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


class Boom(RuntimeError):
    pass


def test_an_interrupted_write_leaves_nothing_behind(tmp_path):
    state = model_state(torch.bfloat16)
    with pytest.raises(Boom):
        with ShardedCheckpointWriter(tmp_path / "out", specs_of(state), max_shard_bytes=400) as writer:
            writer.write("model.embed_tokens.weight", state["model.embed_tokens.weight"])
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_checkpoint_and_a_good_one_replaces_it(tmp_path):
    old, new = model_state(torch.bfloat16, seed=1), model_state(torch.bfloat16, seed=2)
    save_local_checkpoint(old, tmp_path / "out", max_shard_bytes=400)
    before = files_of(tmp_path / "out")
    with pytest.raises(Boom):
        with ShardedCheckpointWriter(tmp_path / "out", specs_of(new), max_shard_bytes=400) as writer:
            writer.write("lm_head.weight", new["lm_head.weight"])
            raise Boom
    assert files_of(tmp_path / "out") == before and [p.name for p in tmp_path.iterdir()] == ["out"]
    save_local_checkpoint(new, tmp_path / "out", max_shard_bytes=400)
    with LocalCheckpoint(tmp_path / "out") as checkpoint:
        assert_bit_equal({n: checkpoint.tensor(n) for n in new}, new)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_incomplete_checkpoint_is_never_committed(tmp_path):
    state = {"emb": torch.randn(10, 4).bfloat16(), "norm": torch.randn(4).bfloat16()}
    with pytest.raises(ValueError, match=r"incomplete: 1 tensor\(s\) not written, e.g. emb\[6:10\]"):
        with ShardedCheckpointWriter(tmp_path / "out", specs_of(state)) as writer:
            writer.write("norm", state["norm"])
            writer.write(Piece("emb", (0, 6)), state["emb"][:6])
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_a_piece_of_the_wrong_shape_or_dtype(tmp_path):
    state = {"emb": torch.randn(10, 4).bfloat16()}
    with ShardedCheckpointWriter(tmp_path / "out", specs_of(state)) as writer:
        with pytest.raises(ValueError, match=r"emb\[0:5\] is bfloat16\[4, 4\], expected bfloat16\[5, 4\]"):
            writer.write("emb[0:5]", state["emb"][:4])
        with pytest.raises(ValueError, match="expected bfloat16"):
            writer.write("emb", state["emb"].float())
        with pytest.raises(ValueError, match="no such tensor"):
            writer.write("other", state["emb"])
        writer.write("emb[5:10]", state["emb"][5:])
        writer.write("emb[0:5]", state["emb"][:5])
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["emb"], state["emb"])


def test_a_partial_directory_left_by_a_killed_writer_is_removed(tmp_path):
    stale = tmp_path / ".out.partial-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    save_local_checkpoint({"a": torch.ones(2)}, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


Usage = namedtuple("Usage", "total used free")


def test_writer_checks_disk_space_before_creating_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_module.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 100, 100))
    state = model_state(torch.bfloat16)
    needed = CheckpointLayout.plan(specs_of(state)).total_bytes
    with pytest.raises(InsufficientDiskSpaceError, match=f"{needed:,} bytes"):
        with ShardedCheckpointWriter(tmp_path / "out", specs_of(state)):
            pytest.fail("the block must not run")
    assert list(tmp_path.iterdir()) == []


def test_layout_total_bytes_is_what_lands_on_disk(tmp_path):
    state = model_state(torch.float16)
    save_local_checkpoint(state, tmp_path / "out", max_shard_bytes=300)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert on_disk == CheckpointLayout.plan(specs_of(state), 300).total_bytes


def test_save_local_checkpoint_keeps_tied_weights_under_both_names(tmp_path):
    embedding = torch.randn(8, 4).bfloat16()
    state = {"model.embed_tokens.weight": embedding, "lm_head.weight": embedding}  # shared storage
    save_local_checkpoint(state, tmp_path / "ck")
    with LocalCheckpoint(tmp_path / "ck") as checkpoint:
        assert set(checkpoint.specs) == set(state)
        assert torch.equal(checkpoint.tensor("lm_head.weight"), embedding)
