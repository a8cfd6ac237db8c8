"""ViQ: text-aligned visual quantized representations at any resolution, on Megatron-Core."""
# Must run before anything imports megatron.core: it hides unusable GPU extras.
from viq_megatron.runtime.extras import GPU_EXTRAS  # noqa: F401
