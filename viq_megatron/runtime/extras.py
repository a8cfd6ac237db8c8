"""Optional GPU extras (Transformer Engine, NVIDIA apex), probed once before megatron-core loads.

megatron-core probes them with `try: import ... except ImportError`, so a partial TE
install (wrapper without CUDA libraries) breaks `import megatron.core`, and PyPI's
unrelated `apex` silently switches its LayerNorm. `prepare_gpu_extras` imports each
installed one for real and, when it is not usable, makes it look absent by putting None in
`sys.modules`. One that is not installed is left alone: `sys.modules` changes only to hide a
broken install. The package's `__init__` calls it (every `viq_megatron.*` import passes
there before any of its modules imports megatron.core); later calls return the first answer.

`quiet_megatron_warnings` is separate and never runs at import: a program (training,
evaluation, encoding, the tools' command lines) calls it before it imports megatron-core, and
a library user (`import viq_megatron`) keeps Python's warning filters as they were.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings

import torch

# The module whose successful import proves the extra usable.
_PROBES = {
    "transformer_engine": "transformer_engine.pytorch",
    "apex": "apex.normalization",  # NVIDIA apex; PyPI's apex has no such module
}

_found: dict[str, bool] | None = None  # prepare_gpu_extras' answer, once it has run


def _usable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - a broken extra fails in many ways (OSError, RuntimeError, ...)
        return False


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ValueError, AttributeError):  # None in sys.modules: hidden already
        return False


def _hide(package: str) -> None:
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]
    sys.modules[package] = None  # type: ignore[assignment]  # `import package` now raises ImportError


def _probe() -> dict[str, bool]:
    if "megatron.core" in sys.modules:
        warnings.warn(
            "megatron.core was imported before viq_megatron: a broken TE or apex may already have been picked up by it",
            stacklevel=3,
        )
    cuda = torch.cuda.is_available()
    found = {}
    for package, probe in _PROBES.items():
        installed = _installed(package)
        found[package] = installed and cuda and _usable(probe)
        if installed and not found[package]:
            _hide(package)
    return found


def prepare_gpu_extras() -> dict[str, bool]:
    """{'transformer_engine': bool, 'apex': bool}, probed on the first call, which hides the
    unusable ones from megatron-core: it must come before megatron.core is imported. Later
    calls change nothing and return the same dict."""
    global _found
    if _found is None:
        _found = _probe()
    return _found


def quiet_megatron_warnings() -> None:
    """Silences megatron-core warnings that say nothing a user can act on here (process-wide:
    for programs, not libraries). Some are raised while megatron-core is imported, so call it
    before that. Calling it again adds nothing (`filterwarnings` replaces an identical filter)."""
    if not torch.cuda.is_available():
        warnings.filterwarnings("ignore", message="When using async grad allreduce it is recommended")
    if not any(prepare_gpu_extras().values()):
        # megatron-core repeats this at several imports; we say it once where layers are chosen.
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        warnings.filterwarnings("ignore", message="Apex is not installed")
    # megatron-core 0.19's own TransformerConfig default triggers this deprecation on every model.
    warnings.filterwarnings("ignore", message="full scope is deprecated")
