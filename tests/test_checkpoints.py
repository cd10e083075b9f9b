"""Checkpoint files hashed while written and while read (pipeline/common/tensorfiles.py, docs/design.md §5)."""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.common.tensorfiles import Damaged, join_tree, load_tensors, save_tensors, split_tree
from pipeline.training import checkpoints


def test_tensor_files_are_safetensors_and_their_digest_is_the_files(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "f32": torch.randn(2, 2, 2),
        "f64": torch.randn(1, dtype=torch.float64),
        "i64": torch.arange(4),
        "u8": torch.randint(0, 255, (9,), dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "strided": torch.randn(4, 6)[:, ::2],  # not contiguous
    }
    recorded = save_tensors(tensors, tmp_path / "a.safetensors")
    data = (tmp_path / "a.safetensors").read_bytes()
    assert recorded == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    for loaded in (load_file(str(tmp_path / "a.safetensors")), load_tensors(tmp_path / "a.safetensors", recorded)):
        assert loaded.keys() == tensors.keys()
        for name, t in tensors.items():
            assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_a_changed_tensor_file_is_refused(tmp_path, damage):
    path = tmp_path / "a.safetensors"
    recorded = save_tensors({"w": torch.randn(64)}, path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[100] ^= 1
    path.write_bytes(bytes(data[:-8] if damage == "truncate" else data + b"x" * (damage == "append")))
    with pytest.raises(Damaged, match="checksum" if damage == "flip" else "bytes, its manifest says"):
        load_tensors(path, recorded)


def test_nested_states_round_trip_without_pickle():
    state = {
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}}, "param_groups": [
            {"lr": 1e-3, "betas": (0.9, 0.95), "params": [0], "fused": None, "foreach": False}]},
        "rng": [{"torch": torch.get_rng_state(), "python": random.getstate()}],
        "inf": math.inf,
        "step": 7,
    }  # fmt: skip
    skeleton, tensors = split_tree(state)
    back = join_tree(json.loads(json.dumps(skeleton)), tensors)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # tuple and int keys kept
    assert back["rng"][0]["python"] == state["rng"][0]["python"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], torch.ones(2)) and back["inf"] == math.inf
    with pytest.raises(TypeError, match=r"object at t\.0 cannot be stored"):
        split_tree({"x": object()})


def _read_bytes() -> int:
    """Bytes this process has read through read() so far (Linux's /proc/self/io rchar)."""
    return int(
        next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1]
    )


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io")
def test_a_checkpoint_save_reads_nothing_back_and_a_resume_reads_each_byte_once(tiny_build, tmp_path):
    """The issue's contract, measured: the bytes read() returns while saving and while loading. The
    loader reads into the destination tensors (no mmap), so read() sees every byte it loads."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_build.model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_build.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    before = _read_bytes()
    checkpoints.save_checkpoint(tmp_path, 1, model, tokenizer, model.state_dict(), optimizer.state_dict(), scheduler,
                                checkpoints.rng_states(1))  # fmt: skip
    saving = _read_bytes() - before
    folder = tmp_path / "checkpoints" / "step-000001"
    big = sum((folder / n).stat().st_size for n in ("model.safetensors", "trainer_state.safetensors"))
    small = sum(p.stat().st_size for p in folder.iterdir()) - big
    assert big > 3 * small  # else the measurement below would say little
    assert saving <= 2 * small + 65536, (saving, big, small)  # only the small files are hashed after writing

    before = _read_bytes()
    weights, state = checkpoints.read_checkpoint(folder)
    loading = _read_bytes() - before
    needed = big + (folder / "trainer_state.json").stat().st_size
    assert needed <= loading <= needed + 65536, (loading, needed)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items() if k in weights)
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert AutoModelForCausalLM.from_pretrained(folder).config.architectures == [type(model).__name__]


def test_a_header_cannot_make_the_loader_allocate_more_than_the_file_holds(tmp_path):
    """Digest and size forged to match (someone who can write the manifest too): refused before any allocation."""
    blob = json.dumps({"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}).encode()
    data = len(blob).to_bytes(8, "little") + blob + b"\0" * 16
    (tmp_path / "a.safetensors").write_bytes(data)
    forged = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    with pytest.raises(Damaged, match="tensor 'w' is not where the header says"):
        load_tensors(tmp_path / "a.safetensors", forged)
