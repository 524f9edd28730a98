"""OFT's block-diagonal orthogonal matrix from its packed parameters, and its action on features.

Each block i of size b stores the b(b−1)/2 entries above the diagonal of a matrix U_i (row-major, the
order of `torch.triu_indices(b, b, 1)`, peft 0.21's layout); Q_i = U_i − U_iᵀ is skew-symmetric and

    exact Cayley:   R_i = (I − Q_i)(I + Q_i)⁻¹
    Cayley-Neumann: R_i = I + 2Q + 2Q² + … + 2Q^(n−2) + Q^(n−1)    (n = num_cayley_neumann_terms)

The series is peft 0.21's (the truncated Neumann series of (I + Q)(I − Q)⁻¹, the last term halved):
n = 1 gives I, n = 2 gives I + 2Q, n = 3 gives the same series as n = 4. Note that the exact form is the
transpose (= inverse) of the matrix the series approximates, as in peft; both are orthogonal, and the
cross-checks pin each to peft's. Zero parameters give R = I.

COFT (constrained OFT) keeps every Q_i within a Frobenius ball: ‖Q_i‖ ≤ ε/√k (k stored blocks); a larger
Q_i is scaled back onto the ball, in place of the parameter, before each use (as peft does).

R acts on the feature axis of an input split into k blocks, x ↦ x R (each block as a row vector times its
R_i): one batched matmul over the blocks, O(n·b) per token for n features, never the dense n × n matrix.
`bench/oft_step.py --batch 2` (forward + backward, 256 tokens, b = 32, 2 threads, a shared machine at load
~1.6; `bench/results-oft-step.json`), medians: 1.02 ms batched, 1.19 ms with peft's einsum of the same
product, 3.4 ms dense at n = 576; 2.34, 2.68 and 19.1 ms at n = 1536. At load 6 and 1024 tokens
(`results-oft-rotation.json`) the batched matmul and the einsum were equal within the noise. With
`block_share` one R_0 serves every block: one plain matmul.
"""

from __future__ import annotations

import torch


def neumann_coefficients(terms: int) -> list[float]:
    """The coefficients of Q¹, Q², … in peft 0.21's Cayley-Neumann series of `terms` terms."""
    if terms <= 1:
        return []
    if terms == 2:
        return [2.0]
    return [2.0] * max(terms - 2, 2) + [1.0]


def skew_symmetric(packed: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, block_size: int) -> torch.Tensor:
    """(k, b, b) skew-symmetric Q from the (k, b(b−1)/2) packed upper triangles."""
    upper = packed.new_zeros(packed.shape[0], block_size, block_size)
    upper[:, rows, columns] = packed
    return upper - upper.transpose(-2, -1)


def cayley(skew: torch.Tensor, use_neumann: bool, terms: int) -> torch.Tensor:
    """(k, b, b) orthogonal blocks R from skew-symmetric Q (module docstring)."""
    identity = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
    if not use_neumann:
        return torch.linalg.solve(identity + skew, identity - skew, left=False)
    rotation = identity.clone()
    power = skew
    for step, coefficient in enumerate(neumann_coefficients(terms)):
        if step:
            power = torch.bmm(power, skew)
        rotation = rotation + coefficient * power
    return rotation


def constrained(packed: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """COFT: the packed blocks with each Q_i scaled onto ‖Q_i‖_F ≤ eps/√k where it lies outside.
    ‖Q_i‖_F = √2 ‖packed_i‖ (each entry appears twice, once negated)."""
    radius = eps / packed.shape[0] ** 0.5
    norms = packed.norm(dim=1, keepdim=True) * 2**0.5
    scale = torch.where(norms <= radius, torch.ones_like(norms), radius / norms)
    return packed * scale


def rotate_features(x: torch.Tensor, blocks: torch.Tensor, features: int) -> torch.Tensor:
    """x R along the last axis: x (..., features) in blocks of b, `blocks` (k, b, b); k = 1 shares one block."""
    block_size = blocks.shape[-1]
    if blocks.shape[0] == 1:
        return (x.reshape(-1, block_size) @ blocks[0]).reshape(x.shape)
    split = x.reshape(-1, features // block_size, block_size).transpose(0, 1)
    return torch.bmm(split, blocks).transpose(0, 1).reshape(x.shape)


def block_diagonal(blocks: torch.Tensor, features: int) -> torch.Tensor:
    """The dense (features, features) R = diag(R_1, …, R_k) (a shared block repeated), for merging."""
    count = features // blocks.shape[-1]
    return torch.block_diag(*(blocks if blocks.shape[0] == count else blocks.expand(count, -1, -1)))
