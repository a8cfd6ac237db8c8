"""Checkpoints: nothing lost, nobody in.

- The newest whole checkpoint is found from the step folders: a deleted `latest` hides
  nothing, a damaged newest folder falls back to the one before with a warning, a failed
  re-save never costs the folder it would replace, `keep_last` prunes only whole ones, and a
  changed model shape is one line naming the tensor.
- A checkpoint cannot run code. torch's checkpoint reader unpickles `.metadata` with plain
  pickle and non-tensor shard items with weights_only=False; a crafted one is refused, with one
  line naming the file, on every path that opens a checkpoint (resume, train.init_from,
  evaluate) before torch reads anything. Each payload is first shown to be live.
"""

import io
import logging
import pickle
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config


class CreatesFile:
    """Unpickling it creates `path` (what a crafted checkpoint could do instead)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def tiny_llm(ffn_hidden_size: int = 128):
    from viq_megatron.config import LLMArch
    from viq_megatron.models.llm import build_llm

    torch.manual_seed(0)
    return build_llm(
        LLMArch(
            hidden_size=64,
            num_layers=1,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=ffn_hidden_size,
            vocab_size=256,
        ),
        1,
        torch.float32,
        "local",
    )


def save(llm, root, step: int, keep_last: int = 0):
    from viq_megatron.training.checkpoint import save_checkpoint

    return save_checkpoint(root, step, llm.sharded_state_dict(prefix="llm."), {"step": step}, keep_last)


@pytest.fixture
def saved(tmp_path, megatron_world):
    from viq_megatron.training.checkpoint import verify_checkpoint

    llm = tiny_llm()
    run = tmp_path / "run"
    step = save(llm, run / "checkpoints", 1)
    verify_checkpoint(step)  # a genuine checkpoint passes
    return llm, run, step


def shard(step):
    return next(step.glob("*.distcp"))


def unmark(step, named_by_pointer: bool) -> None:
    (step / "complete").unlink()
    (step.parent / "latest").write_text(step.name if named_by_pointer else "step_000001")


# What happens to the newest of two checkpoints, and whether it is still the one found.
DAMAGE = {
    "pointer deleted": (lambda step: (step.parent / "latest").unlink(), True),
    "saved before markers existed (the pointer names it)": (lambda step: unmark(step, True), True),
    "never marked complete": (lambda step: unmark(step, False), False),
    "shard truncated": (lambda step: shard(step).write_bytes(shard(step).read_bytes()[:100]), False),
    "shard missing": (lambda step: shard(step).unlink(), False),
    "metadata garbage": (lambda step: (step / ".metadata").write_bytes(b"not a pickle"), False),
    "metadata missing": (lambda step: (step / ".metadata").unlink(), False),
    "trainer.pt missing": (lambda step: (step / "trainer.pt").unlink(), False),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_newest_whole_checkpoint_is_found_from_the_folders(saved, damage, caplog):
    from viq_megatron.training.checkpoint import latest_checkpoint

    llm, run, first = saved
    second = save(llm, run / "checkpoints", 2)
    assert latest_checkpoint(run / "checkpoints") == second
    apply, still_whole = DAMAGE[damage]
    apply(second)
    with caplog.at_level(logging.WARNING):
        found = latest_checkpoint(run / "checkpoints")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if still_whole:  # the pointer neither hides nor is needed
        assert found == second and not warnings
    else:  # the damaged newest is skipped for the one before, with one line saying why
        assert found == first
        (warning,) = warnings
        assert str(second) in warning and "\n" not in warning


@pytest.mark.parametrize("killed", ["while writing", "while renaming into place"])
def test_failed_resave_keeps_the_folder_it_would_replace(saved, monkeypatch, killed):
    """Saving a step that exists again (a resumed run passing it): killed at any point, the
    old folder's content is still what resuming finds; the next save of that step completes."""
    from viq_megatron.training import checkpoint

    llm, run, step = saved
    before = sorted((p.name, p.read_bytes()) for p in step.iterdir())
    real_save, real_replace = checkpoint.dist_checkpointing.save, checkpoint.os.replace

    def dies_writing(*args, **kwargs):
        raise RuntimeError("killed")

    def dies_renaming(src, dst):
        if str(src).endswith(".tmp") and Path(dst).name == step.name:
            raise RuntimeError("killed")
        return real_replace(src, dst)

    if killed == "while writing":
        monkeypatch.setattr(checkpoint.dist_checkpointing, "save", dies_writing)
    else:
        monkeypatch.setattr(checkpoint.os, "replace", dies_renaming)
    with pytest.raises((RuntimeError, OSError)):  # a failed write is reported as an OSError naming the folder
        save(llm, run / "checkpoints", 1)
    found = checkpoint.latest_checkpoint(run / "checkpoints")
    assert sorted((p.name, p.read_bytes()) for p in found.iterdir()) == before
    monkeypatch.setattr(checkpoint.dist_checkpointing, "save", real_save)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert save(llm, run / "checkpoints", 1) == step
    assert checkpoint.latest_checkpoint(run / "checkpoints") == step
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", step.name]


def test_keep_last_removes_only_older_whole_checkpoints(saved):
    llm, run, _ = saved
    root = run / "checkpoints"
    save(llm, root, 2)
    (root / "step_000002" / "complete").unlink()  # damaged: neither counted nor removed
    for step in (3, 4):
        save(llm, root, step, keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000002", "step_000003", "step_000004"]


def test_changed_model_shape_is_one_line_naming_the_tensor(saved):
    from viq_megatron.models.hf_llm import CheckpointError
    from viq_megatron.training.checkpoint import load_checkpoint, load_shared_weights

    _, run, step = saved
    wider = tiny_llm(ffn_hidden_size=96)
    for attempt in (
        lambda: load_checkpoint(step, wider.sharded_state_dict(prefix="llm.")),
        lambda: load_shared_weights([wider], run, prefix="llm."),
    ):
        with pytest.raises(CheckpointError) as refused:
            attempt()
        message = str(refused.value)
        assert "\n" not in message and "linear_fc" in message and "96" in message and "128" in message, message


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
    item = next(
        index
        for index in metadata.storage_data
        if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata)
    )
    metadata.storage_data[item] = _StorageInfo("__crafted.distcp", 0, len(payload.getvalue()))
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    refused_everywhere(llm, run, step, tmp_path, "__crafted.distcp")
    assert not marker.exists()
