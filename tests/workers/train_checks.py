"""Training checks under torchrun; writes results as JSON to argv[2]; the tests assert on them.

single (1 process): a straight run and a stopped-and-resumed run
dp1 (1 process): 3 steps of 2 micro-batches, stage 1 and OTHER_STAGES
parallel (2 processes): DP=2 with 1 micro-batch each (stage 1 plain, and with the
    distributed optimizer straight and resumed; OTHER_STAGES); TP=2 LLM logits from
    converted checkpoints
"""

import json
import sys
from pathlib import Path

import torch

import viq_megatron  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from conftest import TINY_TRAIN, tiny_train_config  # noqa: E402


def train_losses(output_dir: Path) -> list[float]:
    lines = [json.loads(l) for l in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [l["loss"] for l in lines if l["split"] == "train"]


def run(output_dir: Path, *overrides: str) -> list[float]:
    from viq_megatron.training.trainer import Trainer

    Trainer(tiny_train_config(output_dir, *overrides)).train()
    return train_losses(output_dir)


def single(work: Path) -> dict:
    from viq_megatron.training.trainer import Trainer

    # LoRA on the frozen LLM: the adapters train, are checkpointed and resumed; rows come from
    # DataLoader workers.
    lora = ("model.llm.lora.rank=4", "train.freeze=[llm]", "data.num_workers=2")
    straight = run(work / "straight", *lora)
    stopped = Trainer(tiny_train_config(work / "resumed", *lora))
    while stopped.step < 2:
        stopped.metrics.write(stopped.step + 1, "train", stopped.train_step(), console=False)
    stopped.save()
    stopped.metrics.close()
    resumed = Trainer(tiny_train_config(work / "resumed", *lora))
    resumed_from = resumed.step
    resumed.train()
    return {
        "straight": straight,
        "resumed": train_losses(work / "resumed"),
        "resumed_from": resumed_from,
        "rows_per_epoch": resumed.train_data.rows_per_epoch(),
        "num_workers": resumed.cfg.data.num_workers,
        **faults(work),
        **stage2_chain(work),
        **host_reads(work),
    }


def host_reads(work: Path) -> dict:
    """Reads of computed tensors (.item(), .tolist(), .cpu(), float(), int(), bool(), .numpy():
    on a GPU each waits for the device) during training steps. The rows' own tensors are host
    data and do not count, nor do the rows' metadata accessors in data/ (host arithmetic on
    them). Per step: in the forward/backward schedule, and when a logged step's metrics are read."""
    import sys

    from viq_megatron.training.trainer import Trainer

    trainer = Trainer(
        tiny_train_config(
            work / "reads",
            "train.steps=4",
            "train.log_every=2",
            "train.stage=stage2",
            HEAD,
            DECODER,
            "train.pixel_weight=0.5",
            "train.freeze=[llm]",
        )
    )
    host, counts, active = set(), {"n": 0}, {"on": False}

    def storage(t):
        return t.untyped_storage().data_ptr()

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if (
                active["on"]
                and storage(self) not in host
                and "/viq_megatron/data/" not in sys._getframe(1).f_code.co_filename
            ):
                counts["n"] += 1
            return original(self, *args, **kwargs)

        return original, read

    originals = {}
    for name in ("item", "tolist", "cpu", "__float__", "__int__", "__bool__", "numpy"):
        originals[name], patched = counting(name)
        setattr(torch.Tensor, name, patched)
    next_batches, losses, step = trainer._next_batches, trainer._losses, trainer._step
    schedule, logged = [], []

    def registered_batches():
        batches = next_batches()
        for b in batches:
            for images in (b.images, b.teacher_images):
                if images is not None:
                    host.update(storage(t) for t in (images.patches, images.grids, images.cu_seqlens))
            host.update(
                storage(t)
                for t in (b.tokens, b.labels, b.loss_mask, b.position_ids, b.cu_seqlens, b.visual_positions)
                if t is not None
            )
        return batches

    def counted_losses(*args, **kwargs):
        before, active["on"] = counts["n"], True
        try:
            return losses(*args, **kwargs)
        finally:
            active["on"] = False
            schedule.append(counts["n"] - before)

    def counted_step():
        read, extra = step()

        def counted_read():
            before, active["on"] = counts["n"], True
            try:
                return read()
            finally:
                active["on"] = False
                logged.append(counts["n"] - before)

        return counted_read, extra

    trainer._next_batches, trainer._losses, trainer._step = registered_batches, counted_losses, counted_step
    try:
        trainer.train()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return {"schedule_reads": schedule, "logged_step_reads": logged}


def faults(work: Path) -> dict:
    """A NaN loss is skipped and counted; K in a row stop the job; a checkpoint write that dies
    halfway leaves the previous checkpoint as the latest, loadable."""
    import math

    from megatron.core import dist_checkpointing

    from viq_megatron.training import checkpoint
    from viq_megatron.training.trainer import Trainer

    trainer = Trainer(tiny_train_config(work / "nan", "train.max_nonfinite_steps=2"))
    real_terms = trainer.stage.loss_terms

    def nan_at(steps):
        def loss_terms(batch, output):
            terms = real_terms(batch, output)
            return {**terms, "caption": terms["caption"] * float("nan")} if trainer.step + 1 in steps else terms

        return loss_terms

    def weights():
        return {n: p.detach().clone() for n, p in trainer.model[0].module.named_parameters() if p.requires_grad}

    trainer.stage.loss_terms = nan_at({2})
    logged = [trainer.train_step()]
    before_nan = weights()
    logged.append(trainer.train_step())  # step 2: NaN
    after_nan = weights()
    trainer.save()  # a good checkpoint at step 2
    trainer.stage.loss_terms = nan_at({4, 5})
    trainer.train_step()  # step 3: finite, resets the run of non-finite steps
    after_finite = weights()
    nan_step_left_weights = all(torch.equal(before_nan[n], after_nan[n]) for n in before_nan) and not all(
        torch.equal(after_nan[n], after_finite[n]) for n in after_nan
    )
    trainer.train_step()  # step 4: one non-finite step
    try:
        trainer.train_step()
        stopped = ""
    except FloatingPointError as e:
        stopped = str(e)

    def dying_save(state, path, *args, **kwargs):
        (Path(path) / "partial.distcp").write_bytes(b"half")
        raise OSError("killed while writing")

    original_save, checkpoint.dist_checkpointing.save = dist_checkpointing.save, dying_save
    try:
        trainer.save()
        save_failed = False
    except OSError:
        save_failed = True
    finally:
        checkpoint.dist_checkpointing.save = original_save
    reloaded = Trainer(tiny_train_config(work / "nan", "train.max_nonfinite_steps=2"))
    return {
        "nan_skipped": logged[1]["skipped"],
        "nan_counted": logged[1]["nonfinite_steps"],
        "nan_loss_logged": math.isnan(logged[1]["loss"]),
        "nan_step_left_weights": nan_step_left_weights,
        "stopped_message": stopped,
        "save_failed": save_failed,
        "reloaded_step": reloaded.step,
        "latest": (work / "nan/checkpoints/latest").read_text().strip(),
    }


HEAD = "model.head={subtoken_size: 32, pre_layers: 1, subtoken_layers: 1, subtoken_ffn_size: 64, post_blocks: 1}"
DECODER = "model.decoder={hidden_size: 32, num_layers: 1, num_attention_heads: 2, ffn_hidden_size: 64}"

# Every term of every objective: caption, distillation, token reconstruction and pixel losses
# (stage 2, the first pipeline stage's terms), and the decoder stage's pixel losses alone.
OTHER_STAGES = {
    "stage2": (
        "train.stage=stage2",
        HEAD,
        DECODER,
        "train.pixel_weight=0.5",
        "train.reconstruct_weight=0.5",
        "train.freeze=[llm]",
    ),
    "decoder": ("train.stage=decoder", HEAD, DECODER),
}


def stage2_chain(work: Path) -> dict:
    """stage 1 -> 2-1 (linf) -> 2-2 (fsq) -> decoder -> exported tokenizer, two steps each."""
    import os
    import subprocess

    from viq_megatron.tokenizer import ViQTokenizer
    from viq_megatron.training.checkpoint import load_shared_weights
    from viq_megatron.training.stages import STAGES

    common = [
        HEAD,
        DECODER,
        "train.steps=2",
        "train.save_every=2",
        "train.codebook_every=1",
        "train.freeze=[llm, visual.encoder]",
    ]
    run(
        work / "s2_1", *common, "train.stage=stage2", "model.head.quantizer=linf", f"train.init_from={work / 'resumed'}"
    )  # saved at step 2
    fsq = run(
        work / "s2_2", *common, "train.stage=stage2", "model.head.quantizer=fsq", f"train.init_from={work / 's2_1'}"
    )
    # train.freeze names the head only: the decoder stage itself keeps the encoder out of the optimizer.
    run(
        work / "dec",
        *common,
        "train.stage=decoder",
        "model.head.quantizer=fsq",
        "train.freeze=[visual.head]",
        f"train.init_from={work / 's2_2'}",
    )
    codebook = [
        json.loads(l)
        for l in (work / "s2_2/metrics.jsonl").read_text().splitlines()
        if json.loads(l)["split"] == "codebook"
    ]
    decoder = [json.loads(l) for l in (work / "dec/metrics.jsonl").read_text().splitlines()]
    overrides = [*TINY_TRAIN, HEAD, DECODER, "model.head.quantizer=fsq", f"train.output_dir={work / 'x'}"]
    # The export tool in a process of its own, as a user runs it (it starts its own runtime).
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_", "ROLE_", "MASTER_", "TORCHELASTIC")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}  # not this torchrun's job
    tool = Path(__file__).resolve().parents[2] / "tools/export_tokenizer.py"
    exported_ok = subprocess.run(
        [
            sys.executable,
            str(tool),
            "--checkpoint",
            str(work / "s2_2"),
            "--decoder-checkpoint",
            str(work / "dec"),
            "--out",
            str(work / "tok"),
            *overrides,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert exported_ok.returncode == 0, exported_ok.stderr[-3000:]
    exported = ViQTokenizer.load(work / "tok").state_dict()

    def run_model(run_dir: Path, *stage: str):
        """The run's model as its own stage builds it, its checkpoint loaded (not through the export)."""
        cfg = tiny_train_config(work / "x", *common, *stage)
        model = STAGES[cfg.train.stage](cfg).chunks[0]
        load_shared_weights([model], run_dir)
        return model

    def tensors(module, prefix: str) -> dict:
        return {prefix + k: v for k, v in module.state_dict().items() if torch.is_tensor(v)}

    stage2 = run_model(work / "s2_2", "train.stage=stage2", "model.head.quantizer=fsq")
    decoder_run = run_model(
        work / "dec", "train.stage=decoder", "model.head.quantizer=fsq", "train.freeze=[visual.head]"
    )
    expected = {**tensors(stage2.visual, "visual."), **tensors(decoder_run.decoder, "decoder.")}
    frozen_visual = tensors(decoder_run.visual, "visual.")

    # The encoder probe's 2-1 row: the L-inf head of s2_1 read with the exported tokenizer's sizes.
    from types import SimpleNamespace

    from PIL import Image

    from viq_megatron.benchmarks.encoder_probe import head_features
    from viq_megatron.data.images import load_native_image
    from viq_megatron.data.packing import PackedImages

    images = [Image.new("RGB", (48, 32), (200, 30, 30)), Image.effect_noise((64, 64), 60).convert("RGB")]
    linf = run_model(work / "s2_1", "train.stage=stage2", "model.head.quantizer=linf").visual.eval()
    rules = tiny_train_config(work / "x").data.image
    packed = PackedImages.from_images([load_native_image(im, rules, 16) for im in images])
    with torch.no_grad():
        probed = head_features(work / "tok", work / "s2_1", "linf")(images)
        direct = packed.split(linf(SimpleNamespace(images=packed)).features)  # what the stage feeds its projector
        later = packed.split(stage2.visual.eval()(SimpleNamespace(images=packed)).features)
    return {
        "linf_probe_features_match": all(torch.allclose(a, b.float(), atol=1e-5) for a, b in zip(probed, direct)),
        "linf_probe_features_not_2_2s": not all(torch.allclose(a, b.float(), atol=1e-5) for a, b in zip(probed, later)),
        "fsq_losses": fsq,
        "codebook": codebook[-1] if codebook else {},
        "decoder_losses": [l["loss"] for l in decoder if l["split"] == "train"],
        # The exported tokenizer holds exactly the 2-2 run's visual weights and the decoder run's decoder.
        "tokenizer_names_match": sorted(exported) == sorted(expected),
        "tokenizer_differs": sorted(k for k in expected if k in exported and not torch.equal(exported[k], expected[k])),
        # The decoder stage trains with the visual part frozen: it ends bit-identical to 2-2's.
        "frozen_visual_differs": sorted(k for k, v in frozen_visual.items() if not torch.equal(v, expected[k])),
    }


def parallel(work: Path, checkpoints: list[str]) -> dict:
    from megatron.core import parallel_state

    from viq_megatron.config import ParallelConfig
    from viq_megatron.models.hf_llm import load_llm_weights, read_arch
    from viq_megatron.models.llm import build_llm
    from viq_megatron.runtime.distributed import initialize

    sharded = ["train.micro_batches=1", "parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=true"]
    result = {
        "dp2": run(work / "dp2", "train.micro_batches=1", "train.steps=3"),
        **{
            f"dp2_{name}": run(work / f"dp2_{name}", *overrides, "train.micro_batches=1", "train.steps=3")
            for name, overrides in OTHER_STAGES.items()
        },
        "dp2_distributed_optimizer": run(work / "dp2_dist", *sharded, "train.steps=3", "train.save_every=3"),
    }
    # Stopped after step 2 and resumed: the sharded optimizer state comes back from the checkpoint.
    run(work / "dp2_dist_resumed", *sharded, "train.steps=2", "train.save_every=2")
    result["dp2_distributed_optimizer_resumed"] = run(work / "dp2_dist_resumed", *sharded, "train.steps=3")
    initialize(ParallelConfig(tensor_model_parallel_size=2), seed=0)
    for checkpoint in checkpoints:
        expected = torch.load(Path(checkpoint) / "reference_logits.pt", weights_only=True)
        model = build_llm(read_arch(checkpoint), 2, torch.float32, "local").eval()
        load_llm_weights(model, checkpoint)
        ids = expected["ids"]
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                position_ids=torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1),
                attention_mask=None,
                runtime_gather_output=True,
            )
        result[checkpoint] = (logits - expected["logits"]).abs().max().item()
    parallel_state.destroy_model_parallel()
    return result


if __name__ == "__main__":
    mode, out, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "single":
        result = single(work)
    elif mode == "dp1":
        result = {
            "dp1": run(work / "dp1", "train.micro_batches=2", "train.steps=3"),
            **{
                f"dp1_{name}": run(work / f"dp1_{name}", *overrides, "train.micro_batches=2", "train.steps=3")
                for name, overrides in OTHER_STAGES.items()
            },
        }
    else:
        result = parallel(work, sys.argv[4:])
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps(result))
