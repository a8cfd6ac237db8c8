"""A checkpoint cannot run code. torch's checkpoint reader unpickles `.metadata` with plain
pickle and non-tensor shard items with weights_only=False; a crafted one is refused, with one
line naming the file, on every path that opens a checkpoint (resume, train.init_from,
evaluate) before torch reads anything. Each payload is first shown to be live."""
import io
import pickle

import pytest
import torch

from conftest import tiny_train_config


class CreatesFile:
    """Unpickling it creates `path` (what a crafted checkpoint could do instead)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def saved(tmp_path, megatron_world):
    from viq_megatron.config import LLMArch
    from viq_megatron.models.llm import build_llm
    from viq_megatron.training.checkpoint import save_checkpoint, verify_checkpoint

    torch.manual_seed(0)
    arch = LLMArch(hidden_size=64, num_layers=1, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                   vocab_size=256)
    llm = build_llm(arch, 1, torch.float32, "local")
    run = tmp_path / "run"
    step = save_checkpoint(run / "checkpoints", 1, llm.sharded_state_dict(prefix="llm."), {"step": 1})
    verify_checkpoint(step)  # a genuine checkpoint passes
    return llm, run, step


def refused_everywhere(llm, run, step, tmp_path, names: str) -> None:
    from viq_megatron.evaluate import load_model
    from viq_megatron.models.hf_llm import CheckpointError
    from viq_megatron.training.checkpoint import load_checkpoint, load_shared_weights

    attempts = {
        "resume": lambda: load_checkpoint(step, llm.sharded_state_dict(prefix="llm.")),
        "init_from": lambda: load_shared_weights([llm], run, prefix="llm."),
        "evaluate": lambda: load_model(tiny_train_config(tmp_path / "eval", "train.stage=continuous"), run),
    }
    for path, attempt in attempts.items():
        with pytest.raises(CheckpointError) as refused:
            attempt()
        message = str(refused.value)
        assert "\n" not in message and names in message and "refused" in message, (path, message)


def test_crafted_metadata_is_refused_before_it_runs(saved, tmp_path):
    llm, run, step = saved
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(CreatesFile(live)))
    assert live.exists()  # the payload works under plain pickle, as torch would read it
    marker = tmp_path / "created_by_checkpoint"
    (step / ".metadata").write_bytes(pickle.dumps(CreatesFile(marker)))
    refused_everywhere(llm, run, step, tmp_path, str(step / ".metadata"))
    assert not marker.exists()


def test_crafted_shard_item_is_refused_before_it_runs(saved, tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    llm, run, step = saved
    live, marker = tmp_path / "live", tmp_path / "created_by_checkpoint"
    payload = io.BytesIO()
    torch.save(CreatesFile(live), payload)
    torch.load(io.BytesIO(payload.getvalue()), weights_only=False)
    assert live.exists()  # the payload works as torch's planner loads non-tensor items
    payload = io.BytesIO()
    torch.save(CreatesFile(marker), payload)
    (step / "__crafted.distcp").write_bytes(payload.getvalue())
    metadata = pickle.loads((step / ".metadata").read_bytes())  # genuine: its classes only
    item = next(index for index in metadata.storage_data
                if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata))
    metadata.storage_data[item] = _StorageInfo("__crafted.distcp", 0, len(payload.getvalue()))
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    refused_everywhere(llm, run, step, tmp_path, "__crafted.distcp")
    assert not marker.exists()
