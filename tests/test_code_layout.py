"""data/code_layout.py: codes in raster order on the fine grid <-> patch-major [patches, 4]."""

import os
import subprocess
import sys

import torch
from conftest import ROOT

from viq_megatron.data.code_layout import patch_major, raster_order


def test_patch_major_takes_each_patch_2x2_codes_row_by_row():
    # A 2 x 3 patch grid: a 4 x 6 fine grid whose code is 10 * row + column.
    fine = torch.tensor([[10 * r + c for c in range(6)] for r in range(4)])
    codes = patch_major(fine.reshape(-1), 2, 3)
    assert codes.dtype == torch.int64 and codes.shape == (6, 4)
    assert codes[0].tolist() == [0, 1, 10, 11] and codes[2].tolist() == [4, 5, 14, 15]
    assert codes[3].tolist() == [20, 21, 30, 31] and codes[5].tolist() == [24, 25, 34, 35]
    # raster_order reads patch-major codes back in raster order: the inverse permutation.
    assert torch.equal(codes.reshape(-1)[raster_order(2, 3)], fine.reshape(-1))
    assert sorted(raster_order(5, 7).tolist()) == list(range(5 * 7 * 4))


def test_the_data_side_needs_no_model_module():
    """The data readers use the layout without importing megatron-core or the models, which
    keep their old names for it."""
    script = (
        "import sys; import viq_megatron.data.code_layout; "
        "print(sorted(m for m in sys.modules if m.startswith(('megatron', 'viq_megatron.models'))))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
    from viq_megatron.models import pixel_decoder

    assert pixel_decoder.patch_major is patch_major and pixel_decoder.raster_order is raster_order
