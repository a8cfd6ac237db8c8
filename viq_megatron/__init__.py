"""ViQ: text-aligned visual quantized representations at any resolution, on Megatron-Core."""
# Must run before anything imports megatron.core: it hides unusable GPU extras.
from viq_megatron.runtime.extras import GPU_EXTRAS  # noqa: F401


def __getattr__(name: str):
    # Lazy: `import viq_megatron` stays light; ViQTokenizer pulls in megatron-core.
    if name == "ViQTokenizer":
        from viq_megatron.tokenizer import ViQTokenizer

        return ViQTokenizer
    raise AttributeError(f"module 'viq_megatron' has no attribute {name!r}")
