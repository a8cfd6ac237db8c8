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
Megatron-Core's schedules do that normalisation (calculate_per_token_loss; see
training/objective.py); the logged `loss` is the objective the optimizer minimises.
"""

from __future__ import annotations

import logging
import math
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from viq_megatron.config import Config, ConfigError
from viq_megatron.data.loader import row_loader
from viq_megatron.data.multimodal import PackedBatch
from viq_megatron.data.training_data import build_training_data
from viq_megatron.models.files import read_tokenizer_config
from viq_megatron.models.flops import peak_flops
from viq_megatron.models.hf_llm import CheckpointError
from viq_megatron.models.lora import is_adapter
from viq_megatron.models.provider import device, llm_arch, params_dtype
from viq_megatron.runtime.distributed import initialize, is_main_process, setup_logging
from viq_megatron.runtime.errors import check_writable
from viq_megatron.runtime.timing import PhaseTimer
from viq_megatron.training.checkpoint import (
    latest_checkpoint,
    left_out,
    load_checkpoint,
    load_shared_weights,
    save_checkpoint,
)
from viq_megatron.training.logs import MetricsLog
from viq_megatron.training.objective import Objective
from viq_megatron.training.stages import Stage, stage_for
from viq_megatron.training.torch_adam_resume import prepare_resume

log = logging.getLogger("viq_megatron.train")


@dataclass
class LossTotals:
    """A step's loss sums, on the device: [sum per term, 1 where some rank computed it, count per
    term], all global."""

    objective: Objective
    tensor: torch.Tensor

    def means(self, values: list[float]) -> dict[str, float]:
        """The objective (`loss`) and each term's global mean, from `tensor`'s values."""
        names = self.objective.names
        n = len(names)
        return self.objective.means(
            {name: values[i] for i, name in enumerate(names) if values[n + i] > 0}, values[2 * n : 3 * n]
        )


class StepLosses:
    """One step's forward_step for Megatron-Core's schedule, and the local sum of each loss term
    it saw: `sums` holds [sum per term, 1 where this rank computed it], on the device."""

    def __init__(self, stage: Stage, objective: Objective, train: bool):
        self.stage, self.objective, self.train = stage, objective, train
        self.names = objective.names
        self.sums = torch.zeros(2 * len(self.names), dtype=torch.float64, device=device())

    def record(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        report = {n: v.detach() for n, v in terms.items()}
        for name, value in report.items():
            i = self.names.index(name)
            self.sums[i] += value.double()
            self.sums[len(self.names) + i] = 1.0
        return report

    def loss_func(self, batch: PackedBatch, output) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Megatron-Core's loss contract, on the last pipeline stage."""
        terms = self.stage.loss_terms(batch, output)
        return self.objective.loss(terms), self.objective.num_tokens(self.stage.counts(batch)), self.record(terms)

    def forward_step(self, data_iterator, chunk):
        batch = next(data_iterator)
        output = chunk(batch)
        if chunk.module.post_process:
            return output, partial(self.loss_func, batch)
        terms = self.stage.loss_terms(batch, output)  # e.g. distillation, on the first stage
        self.record(terms)
        hidden = output.hidden_states
        loss = self.objective.loss(terms)
        if self.train and torch.is_tensor(loss) and loss.requires_grad:  # it rides on the output's backward
            hidden = AddLossGradient.apply(hidden, loss)
        return hidden, None


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


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    """Built in order: runtime, data, the stage's model, DDP, optimizer and LR schedule, metrics log,
    stop signals, then resume or train.init_from. `train()` loops."""

    def __init__(self, cfg: Config, build_stage: Callable[[Config], Stage] | None = None):
        """`build_stage`: builds the model and losses instead of train.stage's class, reading the
        same data (the benchmarks' LLM-only ideal)."""
        self.cfg = cfg
        setup_logging(initialize(cfg.parallel, cfg.seed).rank)
        self.output_dir = Path(cfg.train.output_dir)
        if is_main_process():
            check_writable(self.output_dir / "metrics.jsonl")  # before any work
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        stage = stage_for(cfg)
        self._build_data(stage)
        self.stage = (build_stage or stage)(cfg)
        self.model = self._wrap_model(self.stage.chunks)
        self.optimizer, self.scheduler = self._build_optimizer()
        self._configure_schedule()
        self.metrics = MetricsLog(self.output_dir)
        self.step = 0
        self.nonfinite_steps = self.nonfinite_in_a_row = 0
        self._loader, self._loader_step = None, None
        # Slurm sends SIGUSR1 before the time limit (#SBATCH --signal), and SIGTERM on preemption:
        # finish the step, save, exit cleanly.
        self.stop_requested = False
        self.cpu_group = dist.new_group(backend="gloo")
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._request_stop)
        if cfg.train.resume and (last := latest_checkpoint(self.checkpoint_dir)) is not None:
            self.load(last)
        elif cfg.train.init_from:
            self.init_from(Path(cfg.train.init_from))

    # ------------------------------------------------------------------ set-up pieces
    def _build_data(self, stage: type[Stage]) -> None:
        """The datasets (offline token files, or conversations with images: as the stage reads them)."""
        cfg = self.cfg
        width = (
            read_tokenizer_config(cfg.model.viq_tokenizer)[0].model.encoder.hidden_size
            if stage.data == "features"
            else None
        )
        data = build_training_data(
            cfg, stage.data, self.output_dir, llm_arch(cfg).vocab_size, stage.teacher_images, width
        )
        self.train_data, self.val_data = data.train, data.val
        self.counters = {"malformed": data.malformed, "skipped_rows": 0}

    def _wrap_model(self, chunks: list) -> list[DistributedDataParallel]:
        """Freezes what the stage and train.freeze name (frozen parameters never reach the
        optimizer), then wraps each chunk in Megatron-Core DDP."""
        cfg = self.cfg
        frozen = (*self.stage.frozen, *cfg.train.freeze)
        for chunk in chunks:
            for name, param in chunk.named_parameters():  # LoRA adapters train inside frozen modules
                if any(name == p or name.startswith(p + ".") for p in frozen) and not is_adapter(name):
                    param.requires_grad_(False)
            # Megatron-Core normalises the objective over the global batch (objective.py).
            chunk.config.calculate_per_token_loss = True
        parameters, trainable = self._global_sum(
            [
                sum(p.numel() for c in chunks for p in c.parameters()),
                sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad),
            ],
            pipeline=True,
        )
        if trainable == 0:
            raise ConfigError(f"train.freeze: {cfg.train.freeze} leaves nothing to train")
        if is_main_process():
            log.info(
                "stage %s: %.1fM trainable of %.1fM parameters (summed over pipeline stages, per "
                "tensor-parallel rank); %d train / %d val samples (%d rows/epoch), %d skipped, %d malformed",
                cfg.train.stage,
                trainable / 1e6,
                parameters / 1e6,
                len(self.train_data.samples),
                len(self.val_data.samples),
                self.train_data.rows_per_epoch(),
                len(self.train_data.skipped) + len(self.val_data.skipped),
                self.counters["malformed"],
            )
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        )
        # Megatron-LM's convention: gradient buckets in the first chunk only.
        return [
            DistributedDataParallel(config=chunk.config, module=chunk, ddp_config=ddp_config, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]

    def _build_optimizer(self) -> tuple:
        """Megatron-Core's optimizer (Adam) and its LR schedule: warm-up, then cosine decay."""
        cfg, opt = self.cfg, self.cfg.train.optimizer
        dtype = params_dtype(cfg.model.params_dtype)
        optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(
                optimizer="adam",
                lr=opt.lr,
                min_lr=opt.min_lr,
                weight_decay=opt.weight_decay,
                adam_beta1=opt.adam_beta1,
                adam_beta2=opt.adam_beta2,
                adam_eps=opt.adam_eps,
                clip_grad=opt.clip_grad,
                bf16=dtype == torch.bfloat16,
                params_dtype=dtype,
                use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            ),
            self.model,
        )
        scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0,
            max_lr=opt.lr,
            min_lr=opt.min_lr,
            lr_warmup_steps=opt.warmup_steps,
            lr_decay_steps=cfg.train.steps,
            lr_decay_style="cosine",
            start_wd=opt.weight_decay,
            end_wd=opt.weight_decay,
            wd_incr_steps=cfg.train.steps,
            wd_incr_style="constant",
        )
        return optimizer, scheduler

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
        """True on every rank once any rank was signalled (they must stop at the same step). Over
        a CPU (gloo) group: asking every step costs the device nothing."""
        flag = torch.tensor([float(self.stop_requested)])
        dist.all_reduce(flag, group=self.cpu_group)
        return flag.item() > 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def _checkpointed_state(self, is_loading: bool = False) -> dict:
        # Tensors are keyed by global names (layer numbers across pipeline stages included), so
        # any tensor, pipeline or data-parallel layout can load what another saved.
        states = [
            {k: v for k, v in chunk.module.sharded_state_dict().items() if not left_out(self.cfg, k)}
            for chunk in self.model
        ]
        model_state = dict(zip(self._chunk_keys(), states))
        # A sharded optimizer state is saved so that any data-parallel size can load it.
        metadata = (
            {"distrib_optim_sharding_type": "fully_reshardable"} if self.cfg.parallel.distributed_optimizer else None
        )
        return {
            **model_state,
            "optimizer": self.optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata),
        }

    def _chunk_keys(self) -> list[str]:
        return ["model"] if len(self.model) == 1 else [f"model{i}" for i in range(len(self.model))]

    def save(self) -> None:
        trainer_state = {"step": self.step, "scheduler": self.scheduler.state_dict()}
        path = save_checkpoint(
            self.checkpoint_dir, self.step, self._checkpointed_state(), trainer_state, self.cfg.train.keep_last
        )
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
        self.stage.after_init_from()

    def load(self, path: Path) -> None:
        if self.cfg.parallel.distributed_optimizer:
            prepare_resume(self.optimizer)
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

    def _next_batches(self) -> list[PackedBatch]:
        """This step's rows, from the DataLoader that has been building them ahead."""
        if self._loader_step != self.step:  # first step, or a jump (resume): start the workers there
            self._loader = row_loader(
                self.train_data, self._rows, self.step, self.cfg.data.num_workers, self.cfg.data.prefetch
            )
        self._loader_step = self.step + 1
        return [next(self._loader) for _ in range(self.cfg.train.micro_batches)]

    def _reduce(self, tensor: torch.Tensor, pipeline: bool = False) -> torch.Tensor:
        """Sums over data-parallel ranks (every pipeline stage reads the same rows), and with
        `pipeline` over pipeline stages too (values that one stage computes); on the device,
        without waiting for the result."""
        dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
        if pipeline and parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(tensor, group=parallel_state.get_pipeline_model_parallel_group())
        return tensor

    def _global_sum(self, values: list[float], pipeline: bool = False) -> list[float]:
        """`_reduce` of host numbers, read back (a host synchronisation: set-up and logging only)."""
        return self._reduce(torch.tensor(values, dtype=torch.float64, device=device()), pipeline).tolist()

    def _losses(self, batches: list[PackedBatch], train: bool) -> LossTotals:
        """Forward (and backward when training) over this rank's batches through Megatron-Core's
        schedule. Nothing here waits for the device."""
        names = list(self.stage.weights)
        local_counts = torch.tensor(
            [sum(self.stage.counts(b).get(n, 0.0) for b in batches) for n in names], dtype=torch.float64
        ).to(device())
        step = StepLosses(self.stage, Objective(self.stage.weights, self._reduce(local_counts)), train)
        if batches:  # a small validation set can leave a data-parallel rank without a row
            get_forward_backward_func()(
                forward_step_func=step.forward_step,
                data_iterator=[iter(batches) for _ in self.model],
                model=self.model,
                num_microbatches=len(batches),
                seq_length=self.cfg.data.seq_length,
                micro_batch_size=1,
                forward_only=not train,
            )
        return LossTotals(step.objective, torch.cat([self._reduce(step.sums, pipeline=True), step.objective.counts]))

    def _optimizer_step(self) -> float | None:
        """Megatron-Core's optimizer step, with the gradient norm read once (the step's one host
        synchronisation): it clips, and a non-finite norm (a NaN/inf loss or gradient) skips the
        update on every rank (the norm is global). The norm, or None when skipped."""
        if self.optimizer.prepare_grads():  # fp16 loss scaling found inf
            return None
        grad_norm = self.optimizer.get_grad_norm()
        if not math.isfinite(grad_norm):
            return None
        clip = self.cfg.train.optimizer.clip_grad
        for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if clip > 0 and optimizer.get_parameters():
                clip_grad_by_total_norm_fp32(optimizer.get_parameters(), clip, grad_norm)
        self.optimizer.step_with_ready_grads()
        return grad_norm

    def _step(self) -> tuple[Callable[[], dict[str, float]], dict]:
        """One training step: (the function that reads its metrics, which waits for the device:
        call it on logged steps only; the stage's extra metrics, e.g. codebook statistics)."""
        extra = self.stage.on_step(self.step)
        start = time.perf_counter()
        batches = self._next_batches()
        data_time = time.perf_counter() - start  # the wait for rows the workers built
        timer = PhaseTimer()
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
            chunk.module.phase_timer = timer
        self.optimizer.zero_grad()
        with timer.span("forward_backward"):
            losses = self._losses(batches, train=True)
        with timer.span("optimizer"):
            grad_norm = self._optimizer_step()
        if grad_norm is None:
            self.nonfinite_steps += 1
            self.nonfinite_in_a_row += 1
            log.warning(
                "step %d: non-finite gradient norm (a NaN/inf loss or gradient), update skipped (%d in a row)",
                self.step + 1,
                self.nonfinite_in_a_row,
            )
            if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{self.nonfinite_in_a_row} steps in a row with a non-finite loss or gradient "
                    f"(train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); "
                    f"stopping at step {self.step + 1}"
                )
        else:
            self.nonfinite_in_a_row = 0
        self.scheduler.step(increment=1)
        self.step += 1
        host_time = time.perf_counter() - start
        self.counters["skipped_rows"] += sum(len(b.skipped) for b in batches)
        local = [
            sum(len(b.sources) for b in batches),
            sum(len(b.tokens) for b in batches),
            sum(self.stage.flops(b) for b in batches),
        ]
        throughput = self._reduce(torch.tensor(local, dtype=torch.float64).to(device()))
        lr, nonfinite_steps = self.optimizer.param_groups[0]["lr"], self.nonfinite_steps

        def read() -> dict[str, float]:
            values = torch.cat([losses.tensor, throughput]).tolist()  # the one wait of a logged step
            phases = timer.read()
            seconds = max(host_time, sum(phases.get(p, 0.0) for p in ("forward_backward", "optimizer")) + data_time)
            samples, tokens, flops = values[-3:]
            flops_per_device = flops / dist.get_world_size() / seconds
            peak = peak_flops(device())
            visual = phases.get("visual", 0.0)
            return {
                **losses.means(values[:-3]),
                "lr": lr,
                "grad_norm": grad_norm if grad_norm is not None else float("nan"),
                "samples_per_s": samples / seconds,
                "tokens_per_s": tokens / seconds,
                "tflops_per_device": flops_per_device / 1e12,
                **({"mfu": flops_per_device / peak} if peak else {}),
                "step_time_s": seconds,
                "data_time_s": data_time,
                "visual_time_s": visual,
                "llm_time_s": phases["forward_backward"] - visual,
                "optimizer_time_s": phases["optimizer"],
                "peak_memory_gib": peak_memory_gib(),
                "skipped": float(grad_norm is None),
                "nonfinite_steps": float(nonfinite_steps),
            }

        return read, extra

    def train_step(self) -> dict[str, float]:
        """One training step and its metrics."""
        read, extra = self._step()
        return {**read(), **extra}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        for chunk in self.model:
            chunk.eval()
        rows = range(min(self.cfg.train.eval_batches * self.dp_size, self.val_data.rows_per_epoch()))
        mine = [self.val_data[r] for r in rows if r % self.dp_size == self.dp_rank]
        totals = self._losses(mine, train=False)
        losses = totals.means(totals.tensor.tolist())
        perplexity = {"perplexity": math.exp(min(losses["caption"], 50.0))} if "caption" in losses else {}
        return {**losses, **perplexity}

    def train(self) -> dict[str, float]:
        cfg = self.cfg.train
        last_eval = {}
        if cfg.eval_every > 0 and (self.step == 0 or self.step >= cfg.steps):
            if self.step >= cfg.steps:
                log.info("already trained to step %d of %d", self.step, cfg.steps)
            last_eval = self.evaluate()
            self.metrics.write(self.step, "val", last_eval)
        while self.step < cfg.steps:
            read_metrics, extra = self._step()
            if "codebook_usage" in extra:
                self.metrics.write(
                    self.step,
                    "codebook",
                    {k: extra.pop(k) for k in list(extra) if k.startswith(("codebook", "codes", "level"))},
                )
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.metrics.write(
                    self.step,
                    "train",
                    {
                        **read_metrics(),
                        **extra,
                        "skipped_samples": float(len(self.train_data.skipped) + self.counters["skipped_rows"]),
                        "malformed_samples": float(self.counters["malformed"]),
                    },
                )
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
        self.close()
        return last_eval

    def close(self) -> None:
        """Stops the DataLoader workers and closes the logs (after `train`, or a caller's own steps)."""
        self._loader = self._loader_step = None  # its workers finish
        self.metrics.close()
