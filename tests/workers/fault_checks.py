"""Fault drill for tests/test_faults.py: jobs killed with SIGKILL at named points, then rerun.

    python tests/workers/fault_checks.py WORK RESULT.json

Every job runs in a forked child, so the imports are paid once; a kill point is armed in the
child only, by wrapping the function that reaches it. Each case: the killed run, the damage the
case adds (a deleted pointer, a truncated shard), the rerun, and whether the rerun's final
weights and optimizer state (training) or token files (preprocess) are bit-identical to an
uninterrupted run's.
"""

import json
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import make_image, tiny_train_config  # noqa: E402

import viq_megatron  # noqa: E402,F401

HEAD = "model.head={subtoken_size: 32, pre_layers: 1, subtoken_layers: 1, subtoken_ffn_size: 64, post_blocks: 1}"
STEPS = 4  # tiny_train_config's; saved at 2 and 4


def forked(job, *args) -> int:
    """job(*args) in a forked child: its exit status, or -signal when it was killed. The child
    leads its own process group, which is killed afterwards: a SIGKILL leaves the checkpoint
    writer's helper processes behind, as it would on a node without a job scheduler to reap them.
    The parent runs no torch operation before its last fork (a forked thread pool deadlocks)."""
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        code = 1
        try:
            code = job(*args) or 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported by the parent's assertions
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def kill_at(owner, name: str, hit, after: bool = False) -> None:
    """SIGKILL this process just before (or just after) a call of owner.name for which hit(*args) holds."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        reached = hit(*args, **kwargs)
        if reached and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if reached:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


def nth_call(n: int):
    calls = [0]

    def hit(*args, **kwargs):
        calls[0] += 1
        return calls[0] == n

    return hit


# ---------------------------------------------------------------- training


def train(out: Path, arm=None) -> None:
    from viq_megatron.training.trainer import Trainer

    if arm:
        arm()
    trainer = Trainer(tiny_train_config(out, "train.save_every=2"))
    (out / "started_at_step").write_text(str(trainer.step))
    trainer.train()


def saving_step4(*args, **kwargs) -> bool:
    return "step_000004" in str(args[1] if len(args) > 1 else kwargs.get("checkpoint_dir", ""))


def training_points() -> dict:
    from viq_megatron.training import checkpoint

    def pointer_to_step4(src, dst, *a, **k):
        return Path(src).name == "latest.tmp" and Path(src).read_text() == "step_000004"

    return {
        # Step 4's shards are on disk; trainer.pt and the completion mark are not. The pointer is
        # deleted as well: the rerun must find step 2 from the folders alone.
        "save: shards written, pointer deleted": lambda: kill_at(
            checkpoint.dist_checkpointing, "save", saving_step4, after=True
        ),
        "save: marked, not renamed": lambda: kill_at(
            checkpoint.os, "replace", lambda src, dst, *a, **k: str(src).endswith("step_000004.tmp")
        ),
        "save: renamed, pointer stale": lambda: kill_at(checkpoint.os, "replace", pointer_to_step4),
    }


def final_state(out: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    step = out / "checkpoints" / f"step_{STEPS:06d}"
    dcp_to_torch_save(step, out / "final.pt")
    return {
        "checkpoint": torch.load(out / "final.pt", weights_only=False),
        "trainer": torch.load(step / "trainer.pt", weights_only=True),
    }


def _leaves(tree):
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]


def identical(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


def training_drill(work: Path) -> dict:
    reference = work / "train_reference"
    results = {"reference_rc": forked(train, reference)}
    cases = {}
    for name, arm in training_points().items():
        out = work / f"train_{len(cases)}"
        case = {"killed_rc": forked(train, out, arm)}
        if "pointer deleted" in name:
            (out / "checkpoints/latest").unlink()
        cases[name] = (out, case)
    # A whole newest checkpoint with a truncated shard: the rerun falls back to step 2.
    out = work / f"train_{len(cases)}"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("final.pt"))
    shard = next((out / "checkpoints" / f"step_{STEPS:06d}").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cases["shard truncated"] = (out, {"killed_rc": None})
    for out, case in cases.values():
        case["rerun_rc"] = forked(train, out)
        case["rerun_started_at_step"] = int((out / "started_at_step").read_text())
    return results, reference, cases


def compare_training(results: dict, reference: Path, cases: dict) -> dict:
    expected = final_state(reference)
    results["tensors_compared"] = sum(isinstance(v, torch.Tensor) for v in _leaves(expected))
    for name, (out, case) in cases.items():
        case["identical"] = case["rerun_rc"] == 0 and identical(final_state(out), expected)
        results[name] = case
    return results


# ---------------------------------------------------------------- preprocess


def make_tools(work: Path) -> None:
    from viq_megatron.data.text import SentencePieceTokenizer
    from viq_megatron.tokenizer import ViQTokenizer

    torch.manual_seed(0)
    ViQTokenizer(tiny_train_config(work / "unused", HEAD), 64).save(work / "tok")
    SentencePieceTokenizer.train(["Describe the image.", "A photo.", "Two squares."] * 4, 300, work / "sp")
    images = work / "images"
    images.mkdir()
    for i in range(6):
        make_image(images / f"{i}.png", size=(32 + 16 * (i % 3), 48), seed=i)
        (images / f"{i}.txt").write_text(f"Image number {i}.")
    (images / "broken.png").write_text("not an image")  # reported in OUT.report.jsonl


def run_preprocess(work: Path, out: Path, arm=None) -> int:
    from viq_megatron.cli.preprocess import main

    if arm:
        arm()
    return main(
        [
            "--input",
            str(work / "images"),
            "--tokenizer",
            str(work / "tok"),
            "--text-tokenizer",
            str(work / "sp.model"),
            "--out",
            str(out),
            "--shard-size",
            "2",
        ]
    )


def preprocess_points(out: Path) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from viq_megatron import preprocess
    from viq_megatron.data import token_dataset

    return {  # 7 inputs in shards of 2: shards 0-3
        "shard: half written": lambda: kill_at(token_dataset.TokenDatasetWriter, "add", nth_call(3)),
        "shard: written, not marked": lambda: kill_at(
            preprocess.os, "replace", lambda src, dst, *a, **k: Path(dst).name == "shard_000001.json"
        ),
        "merge: appending shards": lambda: kill_at(
            IndexedDatasetBuilder, "add_index", lambda self, path, *a, **k: str(path).endswith("shard_000002")
        ),
        "merge: .bin in place, .idx not": lambda: kill_at(
            token_dataset.os, "replace", lambda src, dst, *a, **k: str(dst) == f"{out}.idx"
        ),
    }


OUTPUTS = (".bin", ".idx", ".report.jsonl")


def preprocess_drill(work: Path) -> dict:
    results = {"tools_rc": forked(make_tools, work)}
    reference = work / "pre_reference/tokens"
    results["reference_rc"] = forked(run_preprocess, work, reference)
    expected = {suffix: Path(f"{reference}{suffix}").read_bytes() for suffix in OUTPUTS}
    cases = {}
    for name in preprocess_points(reference):
        out = work / f"pre_{len(cases)}/tokens"
        cases[name] = (out, {"killed_rc": forked(run_preprocess, work, out, preprocess_points(out)[name])})
    out = work / f"pre_{len(cases)}/tokens"
    shutil.copytree(reference.parent, out.parent)
    shard = out.parent / "tokens.shards/shard_000001.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cases["shard truncated"] = (out, {"killed_rc": None})
    for name, (out, case) in cases.items():
        case["rerun_rc"] = forked(run_preprocess, work, out)
        case["identical"] = all(Path(f"{out}{suffix}").read_bytes() == expected[suffix] for suffix in OUTPUTS)
        results[name] = case
    return results


def main() -> None:
    work, result_file = Path(sys.argv[1]), Path(sys.argv[2])
    start = time.perf_counter()
    training = training_drill(work)
    results = {
        "preprocess": preprocess_drill(work),
        "training": compare_training(*training),
        "total_s": time.perf_counter() - start,
    }
    result_file.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
