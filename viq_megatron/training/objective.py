"""A stage's objective in Megatron-Core's loss contract.

Megatron-Core's schedules call each micro-batch's `loss_func(output)`, which returns
(loss, num_tokens, report). With `calculate_per_token_loss` they add the gradients of the
losses over micro-batches and data-parallel ranks (no averaging), and `finalize_model_grads`
divides them by the global sum of num_tokens. Our objectives have several terms, each a
sum normalised by its own global count (answer tokens, images, pixel values):

    objective = sum_n weight_n * S_n / C_n          (S_n, C_n summed over the global batch)

A micro-batch returns loss = sum_n weight_n * s_n * C_u / C_n and num_tokens = c_u, where u,
the unit, is the first term with a non-zero global count (the caption's answer tokens when
there are any): Megatron's division by C_u then leaves exactly the objective. The counts are
known before the forward pass, so the normalisation is global, not per micro-batch.
"""

from __future__ import annotations

import torch


class Objective:
    """Built from the global counts, a tensor on the device: choosing the unit and the scales
    happens there too, so nothing waits for the all-reduce that summed the counts."""

    def __init__(self, weights: dict[str, float], global_counts: torch.Tensor):
        self.names = list(weights)
        self.weight_values = [weights[n] for n in self.names]
        self.weights = torch.tensor(self.weight_values, dtype=torch.float64, device=global_counts.device)
        self.counts = global_counts  # [terms] in the order of `weights`
        counted = global_counts > 0
        self.unit = torch.argmax(counted.to(torch.int8))  # the first counted term (0 when none is)
        unit_count = torch.where(counted.any(), global_counts[self.unit], 1.0)
        # Terms with no weight (reported only) or nothing to count stay out of the loss.
        self.scales = torch.where(
            counted & (self.weights != 0), self.weights * unit_count / global_counts.clamp(min=1), 0.0
        ).float()

    def loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """A micro-batch's (or a pipeline stage's) part of the objective, in units of the unit count."""
        return sum(
            self.scales[self.names.index(n)] * v
            for n, v in terms.items()
            if self.weight_values[self.names.index(n)] != 0
        )

    def num_tokens(self, local_counts: dict[str, float]) -> torch.Tensor:
        """This micro-batch's share of the unit count (Megatron's clamp keeps an empty batch finite)."""
        counts = torch.tensor([local_counts.get(n, 0.0) for n in self.names], dtype=torch.float64)
        return counts.to(self.unit.device, non_blocking=True)[self.unit].to(torch.int)

    def means(self, global_sums: dict[str, float], global_counts: list[float]) -> dict[str, float]:
        """Each term's global mean, and the objective first as `loss` (host numbers, for the log)."""
        means = {n: s / max(global_counts[self.names.index(n)], 1.0) for n, s in global_sums.items()}
        return {"loss": sum(self.weight_values[self.names.index(n)] * m for n, m in means.items()), **means}
