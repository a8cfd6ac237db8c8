"""Quantizers of the ViQ head, applied to each sub-token's d-dimensional bottleneck vector.

- identity: no bottleneck (a stage-2 sanity baseline);
- linf: stage 2-1's "fake" quantizer, z / ||z||_inf: onto the unit hypercube's surface,
  next to where FSQ's anchors lie, without discarding information;
- fsq: Finite Scalar Quantization (stage 2-2): each dimension of the L-inf-projected vector
  (the point on the hypercube's surface that 2-1 trains) scaled to its level count and
  rounded with a straight-through gradient; a code's index is the mixed-radix number of its
  per-dimension levels. (ours) FSQ usually bounds each dimension with tanh; on vectors that
  2-1 left at any scale (its projection ignores the norm) tanh saturates, most values land on
  the outer levels and a few hundred of the 15,360 codes get used. Bounded by the projection,
  2-2 rounds exactly the values 2-1 trained; every code with at least one outermost level
  (83% of the 16k codebook) is reachable;
- progressive: the bridge from 2-1 to 2-2, (1 - a) * linf(z) + a * fsq(z) with a ramped
  from 0 to 1, so the features move from the hypercube surface onto FSQ's grid gradually.

Outputs are in [-1, 1] per dimension for linf, fsq and progressive. All arithmetic runs
in fp32 whatever the model's dtype (rounding in bf16 would move codes).
"""

from __future__ import annotations

import math

import torch

FSQ_PRESETS: dict[str, list[int]] = {
    "2k": [8, 8, 4, 3, 3],
    "4k": [8, 8, 4, 4, 4],
    "8k": [8, 8, 8, 4, 4],
    "16k": [8, 8, 8, 6, 5],
    "64k": [8, 8, 8, 5, 5, 5],
}


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward; the identity's gradient backward."""
    return x + (torch.round(x) - x).detach()


def linf_project(z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """z / ||z||_inf over the last dimension: a point on the unit hypercube's surface."""
    return z / z.abs().amax(-1, keepdim=True).clamp_min(eps)


class FSQ(torch.nn.Module):
    def __init__(self, levels: list[int]):
        super().__init__()
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be >= 2 each, got {levels}")
        self.levels = list(levels)
        levels_t = torch.tensor(levels, dtype=torch.float64)
        self.register_buffer("_levels", levels_t.float(), persistent=False)
        self.register_buffer("_half_width", torch.floor(levels_t / 2).float(), persistent=False)
        # Even level counts are offset by half a step so that rounding yields L distinct values.
        half_l = (levels_t - 1) * (1 + 1e-3) / 2
        offset = torch.where(levels_t % 2 == 0, 0.5, 0.0)
        self.register_buffer("_half_l", half_l.float(), persistent=False)
        self.register_buffer("_offset", offset.float(), persistent=False)
        basis = [1]
        for level in levels[:-1]:
            basis.append(basis[-1] * level)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """The L-inf projection's values spread over each dimension's level grid, (-L/2, L/2)."""
        return linf_project(z.float()) * self._half_l - self._offset

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Quantized values scaled to [-1, 1]; rounding passes the identity's gradient in training.
        Outside autograd the output is exactly round(bound(z)) / half_width, the same floats
        `dequantize` computes from an index."""
        bounded = self.bound(z)
        rounded = round_ste(bounded) if torch.is_grad_enabled() and bounded.requires_grad else torch.round(bounded)
        return rounded / self._half_width

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        digits = torch.round(codes.float() * self._half_width + self._half_width).to(torch.int64)
        return (digits * self._basis).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices.to(torch.int64)[..., None] // self._basis) % self._levels.to(torch.int64)
        return (digits.float() - self._half_width) / self._half_width

    def level_digits(self, indices: torch.Tensor) -> torch.Tensor:
        """Per-dimension level (0..L-1) of each index: [..., d]."""
        return (indices.to(torch.int64)[..., None] // self._basis) % self._levels.to(torch.int64)


class Quantizer(torch.nn.Module):
    """The configured quantizer: 'identity', 'linf', 'fsq' or 'progressive' (linf -> fsq)."""

    def __init__(self, kind: str, levels: list[int]):
        super().__init__()
        self.kind = kind
        self.fsq = FSQ(levels)
        if kind == "progressive":
            # The weight of fsq, set by the training schedule: module state, so that checkpoints
            # (and the models inference rebuilds from them) hold it. float64, as a Python number
            # enters the arithmetic; read on the device, never by the host.
            self.register_buffer("fsq_weight", torch.tensor(1.0, dtype=torch.float64))

    @property
    def dim(self) -> int:
        return self.fsq.dim

    @property
    def blend(self) -> torch.Tensor:
        return self.fsq_weight

    @blend.setter
    def blend(self, value: float) -> None:
        self.fsq_weight.fill_(value)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            return z
        if self.kind == "linf":
            return linf_project(z.float())
        if self.kind == "fsq":
            return self.fsq(z)
        # At weight 1 this is fsq(z) exactly (0 * linf adds zeros).
        return (1 - self.fsq_weight) * linf_project(z.float()) + self.fsq_weight * self.fsq(z)
