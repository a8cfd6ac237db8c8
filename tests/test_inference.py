"""Inference (viq_megatron/inference.py) against the training forward pass."""

from dataclasses import replace

import torch
import torch.nn.functional as F
from conftest import tiny_train_config


def test_inference_logits_are_the_training_forwards(tmp_path, megatron_world):
    """A question is laid out as its training sample up to the answer; the logits generation
    decodes from are, bit for bit, the output layer's in the training forward over the same
    packed row (visual input computed once and passed in); and the training loss is the
    cross-entropy of those logits."""
    from viq_megatron.data.multimodal import encode_sample, pack_samples
    from viq_megatron.data.text import stop_ids
    from viq_megatron.data.training_data import build_training_data
    from viq_megatron.evaluate import read_questions
    from viq_megatron.inference import generate, next_token_logits
    from viq_megatron.training.stages import STAGES

    cfg = tiny_train_config(tmp_path, "train.stage=continuous", "train.freeze=[]")
    data = build_training_data(cfg, "conversations", tmp_path, vocab_size=cfg.model.llm.arch.vocab_size)
    tokenizer, rules, patch = data.val.tokenizer, cfg.data.image, cfg.model.encoder.patch_size
    torch.manual_seed(0)
    model = STAGES["continuous"](cfg).chunks[0].eval()
    questions = read_questions(tmp_path / "embedded_data/val.jsonl")[:3]
    prompts = [q.layout(tokenizer, rules, patch) for q in questions]
    for question, prompt in zip(questions, prompts):
        full = encode_sample(data.val.samples[question.index], tokenizer, rules, patch, None)
        assert full.token_ids[: len(prompt)] == prompt.token_ids, question.sample.source
        assert full.loss_flags[len(prompt)] and not any(full.loss_flags[: len(prompt)]), "the answer starts there"

    batch = pack_samples(prompts)
    captured = []  # a copy: the cross-entropy overwrites the logits in place
    hook = model.llm.output_layer.register_forward_hook(lambda module, args, out: captured.append(out[0].clone()))
    with torch.no_grad():
        token_losses = model(batch).token_losses
        visual = model.visual(batch)
        decoded = next_token_logits(model, replace(batch, labels=None), visual)
        logits = model(replace(batch, labels=None)).logits
    hook.remove()
    last = batch.cu_seqlens[1:].long() - 1
    assert torch.equal(decoded, captured[0][:, 0][last].float())
    assert torch.equal(logits, captured[0][:, 0])
    expected = F.cross_entropy(logits.float(), batch.labels, reduction="none")
    assert torch.allclose(token_losses, expected, atol=1e-5), (token_losses - expected).abs().max()
    answers = generate(model, prompts, stop_ids(tokenizer), max_new_tokens=1)
    stop = stop_ids(tokenizer)
    assert [a[:1] for a in answers] == [[] if t in stop else [t] for t in decoded.argmax(-1).tolist()]
