"""The one training loop, for every stage.

Builds, in order: distributed runtime, data (tokenizer, datasets), the stage's model
(this rank's pipeline chunks of it), freezing, Megatron-Core DDP, optimizer and LR
schedule, metrics log, checkpoint resume. Then `train()` loops: load this rank's packed
rows, run them through Megatron-Core's schedule (no pipelining, 1F1B or interleaved
1F1B, with gradient accumulation over the rows), reduce gradients, clip, step, log,
evaluate, save.

Losses are token-weighted over the whole global batch: the caption loss is the sum of
per-token losses over every rank and micro-batch divided by the global count of
answer tokens, so a packed row, one sample alone or DP=2 all give the same number.
"""
from __future__ import annotations

import logging
import math
import resource
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from viq_megatron.config import Config, ConfigError
from viq_megatron.data.conversations import SampleError, read_conversations
from viq_megatron.data.embedded import write_embedded_dataset
from viq_megatron.data.multimodal import PackedBatch, PackedConversationDataset, PackedTokenDataset
from viq_megatron.data.text import HFTokenizer, SentencePieceTokenizer
from viq_megatron.models.flops import peak_flops
from viq_megatron.models.hf_llm import CheckpointError
from viq_megatron.models.lora import is_adapter
from viq_megatron.models.provider import llm_arch, params_dtype
from viq_megatron.runtime.distributed import initialize, is_main_process, setup_logging
from viq_megatron.runtime.errors import InputError, check_writable, writing
from viq_megatron.training.checkpoint import (latest_checkpoint, left_out, load_checkpoint, load_shared_weights,
                                               save_checkpoint)
from viq_megatron.training.logs import MetricsLog
from viq_megatron.training.stages import STAGES
from viq_megatron.training.torch_adam_resume import materialize_adam_state

log = logging.getLogger("viq_megatron.train")


class AddLossGradient(torch.autograd.Function):
    """Identity on a pipeline stage's output whose backward also seeds `loss` with gradient 1:
    a stage before the last adds its own loss terms (the schedule backpropagates from the
    output only). Megatron-Core does the same for MoE auxiliary losses."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(loss)


def _read_split(cfg: Config, which: str, embedded_files: tuple[Path, Path] | None, counters: dict) -> list:
    path = getattr(cfg.data, which)
    if path == "embedded":
        path = embedded_files[0 if which == "train" else 1]
    samples = []
    for item in read_conversations(path, cfg.data.root or None, cfg.data.allow_outside_root):
        if isinstance(item, SampleError):
            log.warning("skipped sample %s", item)
            counters["malformed"] += 1
        else:
            samples.append(item)
    return samples


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        env = initialize(cfg.parallel, cfg.seed)
        setup_logging(env.rank)
        self.output_dir = Path(cfg.train.output_dir)
        if is_main_process():
            check_writable(self.output_dir / "metrics.jsonl")  # before any work
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()

        # Data: offline token files for the discrete stage, conversations with images otherwise.
        self.counters = {"malformed": 0}
        if cfg.train.stage == "discrete":
            self.train_data = PackedTokenDataset(cfg.data.train, cfg.data.seq_length, cfg.seed)
            self.val_data = PackedTokenDataset(cfg.data.val, cfg.data.seq_length, cfg.seed, shuffle=False)
        else:
            self._conversation_data(cfg)


        # Model (this rank's pipeline chunks), freezing, DDP, optimizer.
        self.stage = STAGES[cfg.train.stage](cfg)
        chunks = self.stage.chunks
        for chunk in chunks:
            for name, param in chunk.named_parameters():  # LoRA adapters train inside frozen modules
                if any(name == p or name.startswith(p + ".") for p in cfg.train.freeze) and not is_adapter(name):
                    param.requires_grad_(False)
        parameters, trainable = self._global_sum(
            [sum(p.numel() for c in chunks for p in c.parameters()),
             sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)], pipeline=True)
        if trainable == 0:
            raise ConfigError(f"train.freeze: {cfg.train.freeze} leaves nothing to train")
        parallel = cfg.parallel
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=parallel.distributed_optimizer,
            overlap_grad_reduce=parallel.overlap_grad_reduce)
        # Megatron-LM's convention: gradient buckets in the first chunk only.
        self.model = [DistributedDataParallel(config=chunk.config, module=chunk, ddp_config=ddp_config,
                                              disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
        dtype = params_dtype(cfg.model.params_dtype)
        opt = cfg.train.optimizer
        self.optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
                                    adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps,
                                    clip_grad=opt.clip_grad, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                                    use_distributed_optimizer=parallel.distributed_optimizer),
            self.model)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=opt.lr, min_lr=opt.min_lr, lr_warmup_steps=opt.warmup_steps,
            lr_decay_steps=cfg.train.steps, lr_decay_style="cosine", start_wd=opt.weight_decay,
            end_wd=opt.weight_decay, wd_incr_steps=cfg.train.steps, wd_incr_style="constant")
        self._configure_schedule()
        self.metrics = MetricsLog(self.output_dir)
        self.step = 0
        self.nonfinite_steps = self.nonfinite_in_a_row = 0
        # Slurm sends SIGUSR1 before the time limit (#SBATCH --signal), and SIGTERM on preemption:
        # finish the step, save, exit cleanly.
        self.stop_requested = False
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._request_stop)
        if is_main_process():
            log.info("stage %s: %.1fM trainable of %.1fM parameters (summed over pipeline stages, per "
                     "tensor-parallel rank); %d train / %d val samples (%d rows/epoch), %d skipped, %d malformed",
                     cfg.train.stage, trainable / 1e6, parameters / 1e6, len(self.train_data.samples),
                     len(self.val_data.samples), self.train_data.rows_per_epoch(),
                     len(self.train_data.skipped) + len(self.val_data.skipped), self.counters["malformed"])
        if cfg.train.resume and (last := latest_checkpoint(self.checkpoint_dir)) is not None:
            self.load(last)
        elif cfg.train.init_from:
            self.init_from(Path(cfg.train.init_from))

    def _configure_schedule(self) -> None:
        """What Megatron-Core's schedules read from the model config (as Megatron-LM sets it)."""
        config = self.model[0].config  # shared by the LLM's chunks
        config.grad_scale_func = self.optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads  # DP reduction, tied embeddings across stages
        # Megatron-LM's defaults: the interleaved schedule overlaps its point-to-point traffic with
        # compute; batched send/receive pairs otherwise. Gloo mixes up batched pairs that go both
        # ways at once (the interleaved steady state), so on CPU every transfer is on its own.
        config.overlap_p2p_comm = len(self.model) > 1
        config.batch_p2p_comm = not config.overlap_p2p_comm and dist.get_backend() == "nccl"
        if self.cfg.parallel.overlap_grad_reduce:
            no_sync = [chunk.no_sync for chunk in self.model]
            start_sync = [chunk.start_grad_sync for chunk in self.model]
            config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            config.grad_sync_func = start_sync[0] if len(start_sync) == 1 else start_sync

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True

    def _stop_agreed(self) -> bool:
        """True on every rank once any rank was signalled (they must stop at the same step)."""
        return self._global_sum([float(self.stop_requested)])[0] > 0 if dist.is_initialized() else self.stop_requested

    # ------------------------------------------------------------------ set-up pieces
    def _conversation_data(self, cfg: Config) -> None:
        embedded = None
        if "embedded" in (cfg.data.train, cfg.data.val):
            folder = self.output_dir / "embedded_data"
            if is_main_process():
                with writing(folder):
                    write_embedded_dataset(folder, cfg.data.embedded, cfg.seed)
            dist.barrier()
            embedded = (folder / "train.jsonl", folder / "val.jsonl")
        train_samples = _read_split(cfg, "train", embedded, self.counters)
        if not train_samples:  # rather than SentencePiece's or the packer's error about nothing
            raise InputError(f"{embedded[0] if cfg.data.train == 'embedded' else cfg.data.train}: no usable training "
                             f"sample ({self.counters['malformed']} malformed, see the warnings above)")
        val_samples = _read_split(cfg, "val", embedded, self.counters)
        tokenizer = self._build_tokenizer(train_samples)
        teacher_side = cfg.data.teacher_image_size if cfg.train.stage == "stage1" else None  # only stage 1's teacher
        common = dict(tokenizer=tokenizer, rules=cfg.data.image, patch=cfg.model.encoder.patch_size,
                      seq_length=cfg.data.seq_length, teacher_side=teacher_side, seed=cfg.seed)
        self.train_data = PackedConversationDataset(train_samples, augment=cfg.data.augment, **common)
        self.val_data = PackedConversationDataset(val_samples, shuffle=False, **common)

    def _build_tokenizer(self, train_samples):
        llm = self.cfg.model.llm
        if llm.tokenizer.kind == "checkpoint":
            source = Path(llm.checkpoint) / "tokenizer"
            tokenizer = HFTokenizer(source)
        else:
            source = self.output_dir / "tokenizer.model"
            if is_main_process():
                if llm.tokenizer.sentencepiece_model:  # the run keeps a copy, as evaluation looks for it there
                    source.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(llm.tokenizer.sentencepiece_model, source)
                else:
                    SentencePieceTokenizer.train((t.text for s in train_samples for t in s.turns),
                                                 llm.tokenizer.sentencepiece_vocab_size, source.with_suffix(""))
            dist.barrier()
            tokenizer = SentencePieceTokenizer(source)
        vocab_size = llm_arch(self.cfg).vocab_size
        if tokenizer.vocab_size > vocab_size:  # ids past the embedding table would index out of range
            raise ConfigError(f"{llm.tokenizer.sentencepiece_model or source}: its {tokenizer.vocab_size} tokens do not "
                              f"fit the LLM's vocabulary of "
                              f"{vocab_size} (model.llm)")
        return tokenizer

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def _checkpointed_state(self, is_loading: bool = False) -> dict:
        # Tensors are keyed by global names (layer numbers across pipeline stages included), so
        # any tensor, pipeline or data-parallel layout can load what another saved.
        states = [{k: v for k, v in chunk.module.sharded_state_dict().items() if not left_out(self.cfg, k)}
                  for chunk in self.model]
        model_state = dict(zip(self._chunk_keys(), states))
        # A sharded optimizer state is saved so that any data-parallel size can load it.
        metadata = {"distrib_optim_sharding_type": "fully_reshardable"} if self.cfg.parallel.distributed_optimizer \
            else None
        return {**model_state,
                "optimizer": self.optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)}

    def _chunk_keys(self) -> list[str]:
        return ["model"] if len(self.model) == 1 else [f"model{i}" for i in range(len(self.model))]

    def save(self) -> None:
        trainer_state = {"step": self.step, "scheduler": self.scheduler.state_dict()}
        path = save_checkpoint(self.checkpoint_dir, self.step, self._checkpointed_state(), trainer_state,
                               self.cfg.train.keep_last)
        log.info("saved %s", path)

    def init_from(self, path: Path) -> None:
        """Loads the weights this model shares with an earlier stage's checkpoint."""
        # A new projector (for another LLM than the checkpoint's) starts from its initialisation.
        exclude = ("visual.projector.",) if self.cfg.model.projector == "new" else ()
        loaded, wanted = load_shared_weights([chunk.module for chunk in self.model], path, exclude=exclude)
        loaded, wanted = self._global_sum([loaded, wanted], pipeline=True)
        if loaded == 0:
            raise CheckpointError(f"{path}: shares no weights with stage {self.cfg.train.stage} (train.init_from)")
        log.info("initialised %d tensors from %s (%d others not in it)", loaded, path, wanted - loaded)
        self.stage.on_init_from()

    def load(self, path: Path) -> None:
        if self.cfg.parallel.distributed_optimizer:
            materialize_adam_state(self.optimizer)
        state, trainer_state = load_checkpoint(path, self._checkpointed_state(is_loading=True))
        for chunk, key in zip(self.model, self._chunk_keys()):
            chunk.module.load_state_dict(state[key], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.step = trainer_state["step"]
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ the loop
    def _rows(self, step: int) -> list[int]:
        """Global row indices this rank reads at `step` (a pure function of the step)."""
        per_step = self.dp_size * self.cfg.train.micro_batches
        first = step * per_step + self.dp_rank * self.cfg.train.micro_batches
        return list(range(first, first + self.cfg.train.micro_batches))

    def _global_sum(self, values: list[float], pipeline: bool = False) -> list[float]:
        """Sums over data-parallel ranks (every pipeline stage reads the same rows), and with
        `pipeline` over pipeline stages too (values that one stage computes)."""
        # NCCL reduces device tensors only.
        tensor = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
        if pipeline and parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(tensor, group=parallel_state.get_pipeline_model_parallel_group())
        return tensor.tolist()

    def _losses(self, batches: list[PackedBatch], train: bool) -> dict[str, float]:
        """Forward (and backward when training) over this rank's batches through Megatron-Core's
        schedule; global-mean losses."""
        names = list(self.stage.weights)
        local_counts = [sum(self.stage.counts(b).get(n, 0.0) for b in batches) for n in names]
        counts = dict(zip(names, self._global_sum(local_counts)))
        sums, seen = dict.fromkeys(names, 0.0), set()

        def forward_step(data_iterator, chunk):
            batch = next(data_iterator)
            module = chunk.module  # DDP hooks sit on the parameters
            output, values = self.stage.losses(module, batch)
            for name, value in values.items():
                sums[name] += value.item()
                seen.add(name)
            # The objective is a global sum already: undo DDP's average over data-parallel ranks
            # and the schedule's division by the micro-batch count.
            objective = self.dp_size * sum(self.stage.weights[n] * v / max(counts[n], 1.0) for n, v in values.items())
            if module.post_process:
                return output, lambda _: (objective * len(batches), {})
            if train and torch.is_tensor(objective) and objective.requires_grad:
                output = AddLossGradient.apply(output, objective)  # e.g. distillation on the first stage
            return output, None

        if batches:  # a small validation set can leave a data-parallel rank without a row
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=[iter(batches) for _ in self.model], model=self.model,
                num_microbatches=len(batches), seq_length=self.cfg.data.seq_length, micro_batch_size=1,
                forward_only=not train)
        totals = self._global_sum(list(sums.values()) + [float(n in seen) for n in names], pipeline=True)
        reported = totals[len(names):]  # a loss some rank computed
        return {name: total / max(counts[name], 1.0)
                for name, total, any_rank in zip(names, totals, reported) if any_rank}

    def train_step(self) -> dict[str, float]:
        extra = self.stage.on_step(self.step)
        start = time.perf_counter()
        batches = [self.train_data[row] for row in self._rows(self.step)]
        data_time = time.perf_counter() - start
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        visual_model = self.model[0].module  # the visual input runs with the first chunk
        visual_model.visual_seconds = 0.0
        losses = self._losses(batches, train=True)
        compute_done = time.perf_counter()
        finite = all(math.isfinite(v) for v in losses.values())  # global values: every rank agrees
        if finite:  # the schedule reduced the gradients already (finalize_model_grads)
            update_ok, grad_norm, _ = self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            update_ok, grad_norm = False, 0.0
            self.nonfinite_steps += 1
            self.nonfinite_in_a_row += 1
            log.warning("step %d: non-finite loss %s, update skipped (%d in a row)", self.step + 1, losses,
                        self.nonfinite_in_a_row)
            if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
                raise FloatingPointError(f"{self.nonfinite_in_a_row} steps in a row with a non-finite loss "
                                         f"(train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); "
                                         f"stopping at step {self.step + 1}")
        self.scheduler.step(increment=1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step += 1
        end = time.perf_counter()
        seconds = end - start
        samples, tokens, flops = self._global_sum([sum(len(b.sources) for b in batches),
                                                   sum(len(b.tokens) for b in batches),
                                                   sum(self.stage.flops(b) for b in batches)])
        flops_per_device = flops / dist.get_world_size() / seconds
        peak = peak_flops(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        visual_time = getattr(visual_model, "visual_seconds", 0.0)
        primary = next(iter(losses))
        return {"loss": losses[primary], **{k: v for k, v in losses.items() if k != primary},
                "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm or 0.0),
                "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
                "tflops_per_device": flops_per_device / 1e12, **({"mfu": flops_per_device / peak} if peak else {}),
                "step_time_s": seconds, "data_time_s": data_time, "visual_time_s": visual_time,
                "llm_time_s": compute_done - start - data_time - visual_time, "optimizer_time_s": end - compute_done,
                "peak_memory_gib": peak_memory_gib(), "skipped": float(update_ok is False),
                "nonfinite_steps": float(self.nonfinite_steps), **extra}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        for chunk in self.model:
            chunk.eval()
        rows = range(min(self.cfg.train.eval_batches * self.dp_size, self.val_data.rows_per_epoch()))
        mine = [self.val_data[r] for r in rows if r % self.dp_size == self.dp_rank]
        losses = self._losses(mine, train=False)
        primary = next(iter(losses))
        perplexity = {"perplexity": math.exp(min(losses["caption"], 50.0))} if "caption" in losses else {}
        return {"loss": losses[primary], **{k: v for k, v in losses.items() if k != primary}, **perplexity}

    def train(self) -> dict[str, float]:
        cfg = self.cfg.train
        last_eval = {}
        if cfg.eval_every > 0 and (self.step == 0 or self.step >= cfg.steps):
            if self.step >= cfg.steps:
                log.info("already trained to step %d of %d", self.step, cfg.steps)
            last_eval = self.evaluate()
            self.metrics.write(self.step, "val", last_eval)
        while self.step < cfg.steps:
            metrics = self.train_step()
            if "codebook_usage" in metrics:
                self.metrics.write(self.step, "codebook", {k: metrics.pop(k) for k in list(metrics)
                                                           if k.startswith(("codebook", "codes", "level"))})
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.metrics.write(self.step, "train", {**metrics, "skipped_samples": float(
                    len(self.train_data.skipped)), "malformed_samples": float(self.counters["malformed"])})
            if cfg.eval_every > 0 and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                last_eval = self.evaluate()
                self.metrics.write(self.step, "val", last_eval)
            saved = cfg.save_every > 0 and (self.step % cfg.save_every == 0 or self.step == cfg.steps)
            if saved:
                self.save()
            if self._stop_agreed():
                if not saved:
                    self.save()
                log.info("stop requested by a signal: saved at step %d, exiting", self.step)
                break
        if self.step >= cfg.steps and is_main_process():
            (self.output_dir / "finished").write_text(f"{self.step}\n")  # the launcher requeues until then
        self.metrics.close()
        return last_eval
