"""SigLIP import checks under torchrun (2 processes): TP=2 encoder and pooling head vs the
transformers reference, then stage 1 started from the import (`model.encoder.init_from`).

argv: the native- and fixed-resolution folders (ours/, reference.pt), the result JSON, a work folder.
"""

import json
import sys
from pathlib import Path

import torch

import viq_megatron  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_config, tiny_train_config  # noqa: E402
from test_siglip import encoder_overrides  # noqa: E402


def imported_weights_equal(module, weights: dict, prefix: str) -> bool:
    from viq_megatron.models.sharding import full_state_dict

    full = full_state_dict(module)
    return all(torch.equal(full[k[len(prefix) :]], v) for k, v in weights.items() if k.startswith(prefix))


if __name__ == "__main__":
    from safetensors.torch import load_file

    from viq_megatron.data.packing import PackedImages
    from viq_megatron.models.provider import build_encoder, build_pooling_head
    from viq_megatron.runtime.distributed import initialize, shutdown
    from viq_megatron.training.trainer import Trainer

    native, fixed, out, work = (Path(a) for a in sys.argv[1:5])
    initialize(tiny_config("parallel.tensor_model_parallel_size=2").parallel, seed=0)
    result = {}
    for resolution, folder in (("native", native), ("fixed", fixed)):
        ref = torch.load(folder / "reference.pt", weights_only=True)
        cfg = tiny_config(*encoder_overrides(folder / "ours", 4), "parallel.tensor_model_parallel_size=2")
        encoder, _ = build_encoder(cfg)
        pooling = build_pooling_head(cfg)
        lengths = [h * w for h, w in ref["grids"].tolist()]
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        with torch.no_grad():
            tokens = encoder.eval()(PackedImages(ref["patches"], ref["grids"], cu, ["a", "b"]))
            pooled = pooling(tokens, cu)
        result[f"{resolution}_tp2_hidden"] = (tokens - ref["hidden"]).abs().max().item()
        result[f"{resolution}_tp2_pooled"] = (pooled - ref["pooled"]).abs().max().item()

    weights = load_file(str(native / "ours/model.safetensors"))
    trainer = Trainer(
        tiny_train_config(
            work / "stage1",
            *encoder_overrides(native / "ours", 4),
            "parallel.tensor_model_parallel_size=2",
            "train.steps=2",
        )
    )
    visual = trainer.stage.chunks[0].visual
    result.update(
        student_starts_imported=imported_weights_equal(visual.encoder, weights, "encoder."),
        teacher_is_imported=imported_weights_equal(visual.teacher, weights, "encoder."),
        has_pooling=visual.pooling is not None,
    )
    trainer.train()
    lines = [json.loads(l) for l in (work / "stage1/metrics.jsonl").read_text().splitlines()]
    result["losses"] = [l["loss"] for l in lines if l["split"] == "train"]
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps(result))
    shutdown()  # process groups closed before the interpreter exits (their threads otherwise race it)
