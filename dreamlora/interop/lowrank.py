"""Truncated SVD for resize and extract: the best rank-r approximation of a layer's update, and what it keeps.

By Eckart-Young the first r singular triplets give the rank-r matrix nearest the update in Frobenius norm; the
retained energy sum(s_i^2, i < r) / sum(s_i^2) is the share of the update's squared norm kept, and
sqrt(1 - energy) the relative error ||dW - dW_r|| / ||dW||. The factors are split evenly (up = U sqrt(S),
down = sqrt(S) Vh) so neither holds all the scale, which keeps fp16 files away from overflow and underflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    up: torch.Tensor  # (out, r), float64
    down: torch.Tensor  # (r, in * kh * kw), float64
    energy: float  # share of the squared Frobenius norm kept, in [0, 1]
    full_rank: int  # rank of the update before truncation (singular values above round-off)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def relative_error(self) -> float:
        return math.sqrt(max(0.0, 1.0 - self.energy))


def singular_factors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of a 2-D matrix, in float64 (round-off would otherwise blur 'exact at full rank')."""
    return torch.linalg.svd(matrix.double(), full_matrices=False)


def product_factors(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of up @ down without forming it: QR of both factors, then the SVD of an r x r core.

    up (out, r) = Qa Ra and down^T (in, r) = Qb Rb, so up @ down = Qa (Ra Rb^T) Qb^T and the core's SVD gives
    the product's. For a rank-r LoRA this costs O((out + in) r^2) instead of an SVD of the whole (out, in) update.
    """
    qa, ra = torch.linalg.qr(up.double())
    qb, rb = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    return qa @ u, s, vh @ qb.T


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, *, rank: int | None = None,
             energy: float | None = None) -> LowRank:
    """Keep `rank` singular triplets, or the fewest that keep `energy` of the squared norm (at least one).

    Raises:
        ValueError: neither or both of rank and energy given, or out of range.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    squares = s.double() ** 2
    total = float(squares.sum())
    # Singular values below the float64 round-off of the largest are zero in truth (a rank-4 LoRA has 4 of them).
    tolerance = float(s.max()) * max(u.shape[0], vh.shape[1]) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    full_rank = int((s > tolerance).sum())
    if energy is not None:
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        cumulative = torch.cumsum(squares, 0) / total if total > 0 else torch.ones_like(squares)
        # the first k whose cumulative share reaches the goal (a hair of slack for round-off at energy = 1)
        keep = int((cumulative < energy - 1e-12).sum()) + 1
        keep = min(keep, max(full_rank, 1))
    else:
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        keep = min(rank, s.numel(), max(full_rank, 1))  # values that are zero in truth carry nothing
    root = s[:keep].double().sqrt()
    kept = float(squares[:keep].sum()) / total if total > 0 else 1.0
    return LowRank(up=u[:, :keep].double() * root, down=root[:, None] * vh[:keep].double(), energy=min(kept, 1.0),
                   full_rank=full_rank)
