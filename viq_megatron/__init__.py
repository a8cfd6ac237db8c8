"""ViQ: text-aligned visual quantized representations at any resolution, on Megatron-Core."""

from viq_megatron.runtime.extras import prepare_gpu_extras

# The one thing done at import, on purpose: every `viq_megatron.*` import passes here before
# any of its modules imports megatron.core, which must not pick up an unusable TE or apex.
GPU_EXTRAS = prepare_gpu_extras()


def __getattr__(name: str):
    # Lazy: `import viq_megatron` stays light; ViQTokenizer pulls in megatron-core.
    if name == "ViQTokenizer":
        from viq_megatron.tokenizer import ViQTokenizer

        return ViQTokenizer
    raise AttributeError(f"module 'viq_megatron' has no attribute {name!r}")
