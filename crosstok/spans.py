"""Chain-rule probabilities of aligned blocks.

A block of tokens x_a .. x_{b-1} has probability p(x_a .. x_{b-1} | prefix) =
prod_i p(x_i | prefix, x_a .. x_{i-1}), so its logprob is the sum of its tokens' conditional
logprobs (the ones a teacher-forced pass gives at each position). Both sides of a block cover
the same text, so the teacher's and the student's block logprobs are two models' probabilities
of the same string given the same context: comparable even where no token maps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def block_logprobs(token_logprobs: Tensor, ranges) -> Tensor:
    """Sum of token logprobs per block: (T,) float, ranges (B, 2) [start, end) -> (B,) float32.

    The ranges must tile 0..T in order (an `Alignment`'s teacher or student side). Upcast to
    float32 before summing; differentiable (an index_add), so the student side can carry
    gradients.
    """
    ranges = np.asarray(ranges, dtype=np.int64)
    lengths = ranges[:, 1] - ranges[:, 0]
    t = token_logprobs.shape[0]
    if token_logprobs.dim() != 1 or ranges.shape[0] and (ranges[0, 0] != 0 or ranges[-1, 1] != t):
        raise ValueError(f"ranges must tile the {t} tokens of a (T,) tensor")
    if (lengths <= 0).any() or (ranges[1:, 0] != ranges[:-1, 1]).any():
        raise ValueError("ranges must be non-empty and consecutive")
    index = torch.from_numpy(np.repeat(np.arange(ranges.shape[0]), lengths)).to(
        token_logprobs.device
    )
    out = torch.zeros(ranges.shape[0], dtype=torch.float32, device=token_logprobs.device)
    return out.index_add(0, index, token_logprobs.float())
