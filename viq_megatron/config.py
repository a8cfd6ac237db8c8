"""One config tree for every job: dataclasses loaded from YAML, validated, overridable.

    cfg = load_config("examples/encoder_tiny_cpu.yaml", ["parallel.tensor_model_parallel_size=2"])

An unknown key, a wrong type or a bad value is a `ConfigError` whose one line names
the file (or "command line") and the dotted key.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from viq_megatron.runtime.errors import InputError, first_line, read_text


class ConfigError(InputError):
    """A one-line configuration error naming its source and key."""


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class EncoderConfig:
    """Native-resolution ViT; the defaults are SigLIP2-SO400M/16."""

    patch_size: int = 16
    hidden_size: int = 1152
    num_layers: int = 27
    num_attention_heads: int = 16
    ffn_hidden_size: int = 4304
    # Side of the learned absolute position grid; it is resized to each image's grid.
    position_embedding_size: int = 16
    layernorm_epsilon: float = 1e-6
    # A converted SigLIP / SigLIP2 tower (tools/convert_vision_checkpoint.py) to start from; its
    # encoder.json must agree with the sizes above (the converter prints them).
    init_from: str = ""
    # Std of the normal weight init when trained from scratch (Megatron's default).
    init_method_std: float = 0.02

    # How a run starts, not what the encoder is: neither is written to encoder.json.
    STARTING_FIELDS = ("init_from", "init_method_std")

    def __post_init__(self) -> None:
        for name in (
            "init_method_std",
            "patch_size",
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "ffn_hidden_size",
            "position_embedding_size",
        ):
            require(getattr(self, name) > 0, name, "must be positive")
        require(
            self.hidden_size % self.num_attention_heads == 0,
            "hidden_size",
            f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}",
        )


@dataclass
class LLMArch:
    """A Llama / Qwen2-family decoder. Written by tools/convert_hf_checkpoint.py next to the weights."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    qkv_bias: bool = False  # Qwen2
    tie_word_embeddings: bool = True
    max_sequence_length: int = 4096
    model_type: Literal["llama", "qwen2"] = "llama"
    # Std of the normal weight init (Megatron's default). Only a model trained from scratch feels
    # it: a small one at 0.02 starts with near-uniform attention and is slow to leave it.
    init_method_std: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "init_method_std",
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_query_groups",
            "ffn_hidden_size",
            "vocab_size",
            "max_sequence_length",
        ):
            require(getattr(self, name) > 0, name, "must be positive")
        require(
            self.hidden_size % self.num_attention_heads == 0,
            "hidden_size",
            f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}",
        )
        require(
            self.num_attention_heads % self.num_query_groups == 0,
            "num_query_groups",
            f"{self.num_query_groups} does not divide num_attention_heads={self.num_attention_heads}",
        )


@dataclass
class TokenizerConfig:
    # checkpoint: the LLM checkpoint's own Hugging Face tokenizer (and chat template);
    # sentencepiece: trained on the training texts at start-up (tiny test LLMs).
    kind: Literal["checkpoint", "sentencepiece"] = "checkpoint"
    sentencepiece_vocab_size: int = 512
    # sentencepiece: an existing model file (runs that must share one tokenizer, e.g. a token-file
    # dataset and its image-file twin); empty: trained on the training texts at start-up.
    sentencepiece_model: str = ""


@dataclass
class LoRAConfig:
    """Low-rank adapters on the LLM's linears: trainable while the LLM itself stays frozen."""

    rank: int = 0  # 0: no adapters
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])


@dataclass
class LLMConfig:
    # A directory written by tools/convert_hf_checkpoint.py; its weights, architecture
    # and tokenizer are used. Empty: a randomly initialised LLM of `arch` (tests).
    checkpoint: str = ""
    arch: LLMArch | None = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        require(
            bool(self.checkpoint) != (self.arch is not None),
            "checkpoint",
            "set exactly one of model.llm.checkpoint (pretrained) and model.llm.arch (random init)",
        )
        require(
            self.tokenizer.kind == "sentencepiece" or bool(self.checkpoint),
            "tokenizer.kind",
            "'checkpoint' needs model.llm.checkpoint; use 'sentencepiece' for a randomly initialised LLM",
        )
        require(
            self.arch is None or self.tokenizer.sentencepiece_vocab_size <= self.arch.vocab_size,
            "tokenizer.sentencepiece_vocab_size",
            f"{self.tokenizer.sentencepiece_vocab_size} pieces do not fit "
            f"model.llm.arch.vocab_size={self.arch.vocab_size if self.arch else 0}",
        )


@dataclass
class HeadConfig:
    """The ViQ quantization head between encoder and projector (stage 2)."""

    pre_layers: int = 3  # transformer blocks at the encoder's width
    subtoken_size: int = 256  # width of each of a patch's 2x2 sub-tokens (= head dim of the head-wise blocks)
    subtoken_layers: int = 3  # head-wise blocks: the 4 sub-tokens of a patch are its 4 attention heads
    subtoken_ffn_size: int = 2048
    rope: bool = True  # 2D RoPE over the patch grid in the head-wise blocks
    rope_base: float = 100.0
    post_blocks: int = 2  # per-token residual MLP blocks after the merge
    quantizer: Literal["identity", "linf", "fsq", "progressive"] = "fsq"
    codebook: Literal["2k", "4k", "8k", "16k", "64k"] = "16k"  # FSQ preset (levels)
    progressive_steps: int = 0  # progressive: steps over which linf blends into fsq

    def __post_init__(self) -> None:
        require(self.subtoken_size % 4 == 0, "subtoken_size", "must be divisible by 4 (2D RoPE)")
        require(
            self.quantizer != "progressive" or self.progressive_steps > 0,
            "progressive_steps",
            "must be > 0 for the progressive quantizer",
        )


@dataclass
class DecoderConfig:
    """Pixel decoder: dequantized sub-token features (one per 8x8 pixels) -> pixels."""

    hidden_size: int = 512
    num_layers: int = 8
    num_attention_heads: int = 8
    ffn_hidden_size: int = 2048
    layernorm_epsilon: float = 1e-6
    rope_base: float = 100.0
    l1_weight: float = 1.0
    ssim_weight: float = 0.5


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    head: HeadConfig | None = None
    decoder: DecoderConfig | None = None
    llm: LLMConfig | None = None
    # Discrete training: a ViQTokenizer directory whose head + projector embed the offline codes.
    viq_tokenizer: str = ""
    # load: the projector comes with the visual weights (train.init_from, or the ViQ tokenizer's for
    # discrete training); new: a freshly initialised one, for an LLM other than the one those
    # weights were trained with (another width, or trained from scratch).
    projector: Literal["load", "new"] = "load"
    # auto: Transformer Engine layers when TE imports (CUDA), Megatron-Core local layers otherwise.
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    # auto: bfloat16 on CUDA, float32 on CPU.
    params_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # FP8 training on Hopper with Transformer Engine layers: delayed or current (per-tensor)
    # scaling; the quantizer's own arithmetic stays in fp32. Needs TE. transformer_impl and fp8
    # reach the encoder, the LLM and the head's pre-blocks; the head's sub-token blocks and the
    # pixel decoder always run local layers in params_dtype (their 2D RoPE lives in our core
    # attention), which is logged once when TE layers are chosen.
    fp8: Literal["off", "delayed", "current"] = "off"
    # Megatron-Core's non-TE fused kernels in the LLM (cross-entropy without fp32 copies of the
    # logits, SwiGLU), compiled by torch.compile: auto uses them on CUDA in bfloat16 (on CPU the
    # compile costs more than a short run saves). They need bfloat16 parameters.
    fusions: Literal["auto", "on", "off"] = "auto"


@dataclass
class ImageConfig:
    """Native-resolution rules: keep the aspect ratio, fit a pixel budget, snap to the patch grid."""

    min_pixels: int = 64 * 64
    max_pixels: int = 1024 * 1024
    # Larger sources are refused before decoding (decompression bombs, absurd strips).
    max_source_pixels: int = 178_956_970
    max_aspect_ratio: float = 200.0
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self) -> None:
        require(self.min_pixels > 0, "min_pixels", "must be positive")
        require(
            self.max_pixels >= self.min_pixels, "max_pixels", f"{self.max_pixels} is below min_pixels={self.min_pixels}"
        )
        require(self.max_source_pixels >= self.max_pixels, "max_source_pixels", "must be at least max_pixels")
        require(self.max_aspect_ratio >= 1, "max_aspect_ratio", "must be >= 1")
        require(len(self.mean) == 3 and len(self.std) == 3, "mean", "mean and std need 3 values (RGB)")
        require(all(s > 0 for s in self.std), "std", "must be positive")


@dataclass
class EmbeddedDataConfig:
    """The generated default dataset: rendered captioned scenes plus the shipped photos."""

    train_scenes: int = 512
    val_scenes: int = 64
    # Each shipped training photo is listed this many times (with data.augment, each time another view).
    photo_repeats: int = 1
    # What a training scene's answer is: its caption and question/answer pairs ("caption"), or the
    # dense grounded caption alone (encoder pretraining, "grounded"; scenes.grounded_caption).
    scene_text: Literal["caption", "grounded"] = "caption"

    def __post_init__(self) -> None:
        require(self.train_scenes >= 0 and self.val_scenes >= 0, "train_scenes", "scene counts must be >= 0")
        require(self.photo_repeats >= 1, "photo_repeats", "must be >= 1")


@dataclass
class AugmentConfig:
    """Random views of the training images, for pixel losses (the decoder stage): a view never
    changes an image's patch grid, and is the same for the same (seed, row). Not for captioning
    data: a mirrored image contradicts a caption that says left or right."""

    # A random crop covering this share of the image's area (aspect ratio kept), drawn back at
    # the image's size: [1, 1] is no crop.
    crop_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    flip: bool = False  # mirror left-right, half of the time

    def __post_init__(self) -> None:
        require(
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "crop_scale",
            f"{self.crop_scale} is not [low, high] with 0 < low <= high <= 1",
        )

    @property
    def active(self) -> bool:
        return self.flip or self.crop_scale != [1.0, 1.0]


@dataclass
class DataConfig:
    # encode job: image files or folders; empty means the photos shipped inside installed packages.
    images: list[str] = field(default_factory=list)
    image: ImageConfig = field(default_factory=ImageConfig)
    # Patch tokens per packed encoder sequence (encode job).
    tokens_per_pack: int = 4096
    # Training: LLaVA-style JSON/JSONL files, or "embedded" for the generated default dataset.
    train: str = "embedded"
    val: str = "embedded"
    # Image paths resolve under this folder (default: the JSON file's folder).
    root: str = ""
    allow_outside_root: bool = False
    embedded: EmbeddedDataConfig = field(default_factory=EmbeddedDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training images only
    # LLM tokens per packed training sequence.
    seq_length: int = 1024
    # Square side of the frozen teacher's fixed-resolution input (self-distillation).
    teacher_image_size: int = 224
    # Training rows are built in this many DataLoader worker processes while the device computes
    # (0: in the training process), each keeping `prefetch` rows ready.
    num_workers: int = 2
    prefetch: int = 2

    def __post_init__(self) -> None:
        for name in ("tokens_per_pack", "seq_length", "teacher_image_size", "prefetch"):
            require(getattr(self, name) >= 1, name, "must be >= 1")
        require(self.num_workers >= 0, "num_workers", "must be >= 0")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1  # LLM layers split into stages; the visual input runs on the first
    # > 1: the interleaved 1F1B schedule with this many LLM chunks per pipeline rank (a smaller
    # pipeline bubble for more point-to-point traffic).
    virtual_pipeline_model_parallel_size: int = 1
    # Optimizer state sharded over data-parallel ranks (Megatron-Core's distributed optimizer).
    distributed_optimizer: bool = False
    # Gradient reduction overlapped with the backward pass, bucket by bucket.
    overlap_grad_reduce: bool = False

    def __post_init__(self) -> None:
        require(self.tensor_model_parallel_size >= 1, "tensor_model_parallel_size", "must be >= 1")
        require(self.pipeline_model_parallel_size >= 1, "pipeline_model_parallel_size", "must be >= 1")
        require(self.virtual_pipeline_model_parallel_size >= 1, "virtual_pipeline_model_parallel_size", "must be >= 1")
        require(
            self.virtual_pipeline_model_parallel_size == 1 or self.pipeline_model_parallel_size > 1,
            "virtual_pipeline_model_parallel_size",
            "needs pipeline_model_parallel_size > 1",
        )


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        for name in ("lr", "min_lr", "weight_decay", "clip_grad", "warmup_steps"):
            require(getattr(self, name) >= 0, name, "must be >= 0")
        require(self.min_lr <= self.lr, "min_lr", f"{self.min_lr} is above lr={self.lr}")
        require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1", "Adam's betas must be in [0, 1)")
        require(self.adam_eps > 0, "adam_eps", "must be positive")


@dataclass
class TrainConfig:
    # A stage of training/stages/: encoder_pretrain (a starting encoder where no SigLIP2 fits),
    # stage1, stage2, decoder (the tokenizer); continuous / discrete /
    # cached: multimodal LLM training on images through the encoder, on offline codes, or on
    # offline encoder features (the last two: data.train/val are token-file prefixes). What each
    # needs of this config is checked by the stage.
    stage: str = "stage1"
    # A checkpoint (directory, or a run's output_dir) of an earlier stage: the weights it
    # shares with this stage's model are loaded before training.
    init_from: str = ""
    steps: int = 100
    # Packed sequences per data-parallel rank per step (gradient accumulation).
    micro_batches: int = 1
    # Module prefixes whose weights stay fixed, e.g. ["llm"] (stage 1's default).
    freeze: list[str] = field(default_factory=lambda: ["llm"])
    distill_weight: float = 1.0
    distill_loss: Literal["cosine", "mse"] = "cosine"
    # Stage 2: MSE of the head's output against the encoder's tokens (0 = off).
    reconstruct_weight: float = 0.0
    # Stage 2: weight of the pixel decoder's drawing of the quantized features (model.decoder; L1
    # and SSIM weighted as the decoder stage weighs them). The decoder trains with the head, so
    # the codes keep the picture, not only what the caption loss asks of them (0 = off).
    pixel_weight: float = 0.0
    # Stage 2: log codebook usage, perplexity and level histograms every N steps.
    codebook_every: int = 10
    log_every: int = 1
    eval_every: int = 20
    eval_batches: int = 4
    save_every: int = 50
    # Keep only the newest N whole checkpoints (0: keep all).
    keep_last: int = 0
    output_dir: str = "runs/stage1"
    # Continue from the newest checkpoint in output_dir when there is one.
    resume: bool = True
    # A step whose loss is NaN/inf is skipped (no update) and counted; this many in a row stop the job.
    max_nonfinite_steps: int = 5
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "eval_batches", "codebook_every", "max_nonfinite_steps"):
            require(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("eval_every", "save_every", "distill_weight", "reconstruct_weight", "pixel_weight"):
            require(getattr(self, name) >= 0, name, "must be >= 0 (0: off)")
        require(self.output_dir.strip() != "", "output_dir", "must name a folder")
        require(self.keep_last >= 0, "keep_last", "must be >= 0 (0 keeps every checkpoint)")
        require(self.micro_batches >= 1, "micro_batches", "must be >= 1")
        require(
            self.optimizer.warmup_steps < self.steps,
            "optimizer.warmup_steps",
            f"{self.optimizer.warmup_steps} must be below train.steps={self.steps}",
        )


@dataclass
class BenchmarkConfig:
    warmup_passes: int = 1
    timed_passes: int = 3


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 1234

    def __post_init__(self) -> None:
        require(0 <= self.seed < 2**32, "seed", f"{self.seed} is not in [0, 2**32)")
        patch = self.model.encoder.patch_size
        require(
            self.model.head is None or patch % 2 == 0,
            "model.encoder.patch_size",
            f"{patch} cannot be cut into the head's 2x2 sub-tokens (needs an even size)",
        )
        require(
            self.model.decoder is None or patch == 16,
            "model.encoder.patch_size",
            f"{patch}: the pixel decoder draws 8x8 pixels per code, 2x2 codes per patch: needs 16",
        )
        largest_image = self.data.image.max_pixels // (patch * patch)
        require(
            self.data.tokens_per_pack >= largest_image,
            "data.tokens_per_pack",
            f"{self.data.tokens_per_pack} cannot hold the largest image "
            f"({largest_image} patches at data.image.max_pixels={self.data.image.max_pixels})",
        )
        require(
            self.model.llm is None or self.model.llm.lora.rank == 0 or self.parallel.tensor_model_parallel_size == 1,
            "model.llm.lora.rank",
            "LoRA adapters are not tensor-parallel yet: use tensor_model_parallel_size 1",
        )
        fused_norm_targets = {"linear_qkv", "linear_fc1"} & set(self.model.llm.lora.targets) if self.model.llm else ()
        require(
            self.model.transformer_impl != "transformer_engine"
            or not fused_norm_targets
            or self.model.llm.lora.rank == 0,
            "model.llm.lora.targets",
            f"{sorted(fused_norm_targets)} fuse their layer norm under Transformer Engine (an adapter there would "
            "not merge into the weight): target linear_proj/linear_fc2 only, or use transformer_impl local",
        )
        require(
            self.model.fusions != "on" or self.model.params_dtype == "bfloat16",
            "model.fusions",
            "on needs model.params_dtype bfloat16 (the fused cross-entropy returns bf16 logit gradients)",
        )
        require(
            self.model.encoder.num_attention_heads % self.parallel.tensor_model_parallel_size == 0,
            "parallel.tensor_model_parallel_size",
            f"{self.parallel.tensor_model_parallel_size} does not divide "
            f"model.encoder.num_attention_heads={self.model.encoder.num_attention_heads}",
        )

    # What a use beyond training needs of a valid config (a stage's own needs: training/stages/).
    def check_tokenizer(self) -> None:
        """A ViQ tokenizer: an encoder and an FSQ head (whose codes it writes)."""
        require(self.model.head is not None, "model.head", "missing (a ViQ tokenizer needs its quantization head)")
        require(
            self.model.head.quantizer == "fsq",
            "model.head.quantizer",
            f"{self.model.head.quantizer!r} has no codes; export an fsq head",
        )


# ---------------------------------------------------------------- loading


def parse_command_line(
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
    required: bool = True,
    default_config: str | None = None,
) -> tuple[argparse.Namespace, Config]:
    """Adds `--config` and `key.sub=value` overrides to a job's parser; a config error
    ends the process with its one line and exit status 2."""
    parser.add_argument(
        "--config",
        default=default_config,
        required=required and default_config is None,
        help="YAML config" + (f" (default {default_config})" if default_config else ""),
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    try:
        return args, load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (safe loading) + `key.sub=value` overrides -> validated `Config`."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = read_text(path, "config")
        except InputError as e:
            raise ConfigError(str(e)) from None
        data = parse_yaml(text, source) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
    overridden = [_apply_override(data, item) for item in overrides or []]
    try:
        return _build(Config, data, "")
    except ConfigError as e:
        key = str(e).split(":", 1)[0]
        blame = "command line" if any(key.startswith(k) for k in overridden) else source
        raise ConfigError(f"{blame}: {e}") from None


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    """A validated Config from a plain dict (e.g. a saved JSON), errors naming `source`."""
    try:
        return _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice is an error (the second would silently win),
    and `1e-3` is a float as in YAML 1.2 (YAML 1.1 wants a dot: `1.0e-3`)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"{key}: given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_yaml(text: str, source: str) -> Any:
    """Safe YAML with the rules of _StrictLoader; errors as one ConfigError line naming `source`."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML ({first_line(e)})") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply to read") from None


def _apply_override(data: dict[str, Any], item: str) -> str:
    """Sets `key.sub=value` (value parsed as YAML) in the raw dict; returns the key."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"command line: '{item}' is not key=value")
    cls: Any = Config
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            raise ConfigError(f"command line: {'.'.join(parts[: i + 1])}: unknown key")
        cls = typing.get_type_hints(cls)[part]
        if typing.get_origin(cls) in (typing.Union, types.UnionType):  # Optional[section]
            cls = next(a for a in typing.get_args(cls) if a is not type(None))
        if i < len(parts) - 1:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: {'.'.join(parts[: i + 1])}: is not a section")
    try:
        node[parts[-1]] = parse_yaml(raw, "command line") if raw else ""
    except ConfigError:
        node[parts[-1]] = raw
    return key


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<top>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise ConfigError(f"{prefix}{f.name}: missing (required)")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp}")
