"""Pipeline-parallel training checks under torchrun; writes train losses as JSON to argv[2].

    reference (1 process): TP1 x PP1 runs of stage 1 and of discrete training; each saves its
        initial weights (step 0) before training
    pipelined (4 processes): the same runs at TP2 x PP2 (1F1B) and, for discrete training, at
        TP2 x PP2 with 2 virtual stages (interleaved 1F1B), initialised from the reference's
        step-0 weights (so resharded from TP1 x PP1 by dist_checkpointing)

argv[3]: work folder; argv[4:]: overrides for the discrete runs (token files, tokenizer).
"""

import json
import sys
from pathlib import Path

import torch

import viq_megatron  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_train_config  # noqa: E402

# 4 LLM layers: 2 per pipeline stage, or 1 per virtual stage.
COMMON = ["model.llm.arch.num_layers=4", "train.steps=3", "train.micro_batches=4"]


def train_losses(output_dir: Path) -> list[float]:
    lines = [json.loads(l) for l in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [l["loss"] for l in lines if l["split"] == "train"]


def run(output_dir: Path, overrides: list[str], init_from: Path | None = None) -> list[float]:
    from viq_megatron.training.trainer import Trainer

    extra = [f"train.init_from={init_from}"] if init_from else []
    trainer = Trainer(tiny_train_config(output_dir, *COMMON, *overrides, *extra))
    if init_from is None:
        trainer.save()  # step 0: the weights the other layouts start from
    trainer.train()
    return train_losses(output_dir)


if __name__ == "__main__":
    mode, out, work, discrete = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
    if mode == "reference":
        result = {"stage1": run(work / "stage1_ref", []), "discrete": run(work / "discrete_ref", discrete)}
    else:
        tp2pp2 = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]
        result = {
            "stage1": run(work / "stage1_pp", tp2pp2, work / "stage1_ref"),
            "discrete": run(work / "discrete_pp", [*discrete, *tp2pp2], work / "discrete_ref"),
            "discrete_interleaved": run(
                work / "discrete_vpp",
                [*discrete, *tp2pp2, "parallel.virtual_pipeline_model_parallel_size=2"],
                work / "discrete_ref",
            ),
        }
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps(result))
