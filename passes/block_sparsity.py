"""1xN block sparsity, the math of ``-p block-sparse`` (passes/pack_block_sparse.py states it).

Pure NumPy, float64 norms, the weight's dtype kept: L1 norms of the 1 x n
blocks (``block_norms``), the output-channel orders tried before pruning
(``filter_order``, the paper's; ``group_order``; ``rearrangement`` picks the
one keeping the most L1 mass), which blocks a sparsity prunes
(``block_mask``, all-zero blocks first and never re-pruned), and the packed
``values / indices / indptr`` layout of the kept blocks (``pack_blocks``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = [
    "BlockSparsity",
    "block_mask",
    "block_norms",
    "block_sparsify",
    "element_mask",
    "filter_order",
    "group_order",
    "kept_mass",
    "pack_blocks",
    "prune_count",
    "rearrangement",
]


def block_norms(weight: np.ndarray, n: int) -> np.ndarray:
    """``(C_out / n, C_in)`` L1 norms of the 1 x n blocks of ``weight`` (``C_out x C_in x ...``)."""
    weight = np.asarray(weight)
    out_channels, in_channels = weight.shape[:2]
    if out_channels % n:
        raise ValueError(f"{out_channels} output channels are not a multiple of n={n}")
    blocks = np.abs(weight.astype(np.float64)).reshape(out_channels // n, n, in_channels, -1)
    return blocks.sum(axis=(1, 3))


def filter_order(weight: np.ndarray) -> np.ndarray:
    """The paper's rearrangement: output channels by filter L1 norm, largest first (stable)."""
    weight = np.asarray(weight)
    norms = np.abs(weight.astype(np.float64)).reshape(weight.shape[0], -1).sum(axis=1)
    return np.argsort(-norms, kind="stable")


def _profiles(weight: np.ndarray) -> np.ndarray:
    """``(C_out, C_in)``: the L1 norm of each filter's slice at each input channel."""
    weight = np.abs(np.asarray(weight, dtype=np.float64))
    return weight.reshape(weight.shape[0], weight.shape[1], -1).sum(axis=2)


def group_order(weight: np.ndarray, n: int, sparsity: float) -> np.ndarray:
    """Output channels grouped ``n`` by ``n`` by the input channels they rely on.

    Greedy: the strongest filter not yet placed opens a group; the group's
    kept channels are the ``(1 - sparsity) * C_in`` largest entries of the sum
    of its members' profiles (``_profiles``); the filter not yet placed with
    the most L1 mass on those channels joins; repeat until the group holds
    ``n``. Filters sharing a block then share the input channels the block
    keeps, so pruning whole blocks drops less of each filter.
    """
    profiles = _profiles(weight)
    out_channels, in_channels = profiles.shape
    keep = min(in_channels, max(1, in_channels - prune_count(in_channels, sparsity)))
    free = np.ones(out_channels, dtype=bool)
    strength = profiles.sum(axis=1)
    order = []
    for seed in np.argsort(-strength, kind="stable"):
        if not free[seed]:
            continue
        free[seed] = False
        group, total = [seed], profiles[seed].copy()
        while len(group) < n:
            kept = np.zeros(in_channels)
            kept[np.argpartition(-total, keep - 1)[:keep]] = 1.0
            candidates = np.flatnonzero(free)
            best = candidates[np.argmax(profiles[candidates] @ kept)]
            free[best] = False
            group.append(best)
            total += profiles[best]
        order.extend(group)
    return np.asarray(order)


def kept_mass(weight: np.ndarray, perm: np.ndarray, n: int, sparsity: float) -> float:
    """The L1 mass of ``weight`` that the blocks kept after permuting by ``perm`` hold."""
    norms = block_norms(np.asarray(weight)[perm], n)
    return float(norms[block_mask(norms, sparsity)].sum())


def rearrangement(weight: np.ndarray, n: int, sparsity: float) -> np.ndarray:
    """The output channel order to prune ``weight`` in: of the identity, ``filter_order``
    (the paper's) and ``group_order``, the one whose kept blocks hold the most L1 mass
    (``kept_mass``; ties go to the earlier, the identity first). So a rearranged layer never
    keeps less of its weight than the same layer pruned in its own order."""
    identity = np.arange(np.shape(weight)[0])
    candidates = [identity, filter_order(weight), group_order(weight, n, sparsity)]
    masses = [kept_mass(weight, perm, n, sparsity) for perm in candidates]
    best = int(np.argmax(masses))  # the first of equal masses
    return candidates[best] if masses[best] > masses[0] * (1 + 1e-9) else identity


def prune_count(blocks: int, sparsity: float) -> int:
    """How many of ``blocks`` blocks ``sparsity`` prunes: ``floor(sparsity * blocks)``."""
    return int(math.floor(sparsity * blocks + 1e-9))


def block_mask(norms: np.ndarray, sparsity: float) -> np.ndarray:
    """Kept blocks (bool, shape of ``norms``): the ``prune_count`` smallest norms go, and every zero block.

    When the zero blocks alone reach the count (weights sparse from
    training), exactly the zero blocks go: nothing trained is re-pruned.
    """
    norms = np.asarray(norms, dtype=np.float64)
    keep = norms > 0
    count = prune_count(norms.size, sparsity)
    if count > np.count_nonzero(~keep):
        order = np.argsort(norms.reshape(-1), kind="stable")
        flat = keep.reshape(-1).copy()
        flat[order[:count]] = False
        keep = flat.reshape(norms.shape)
    return keep


def element_mask(keep: np.ndarray, n: int, weight_shape: tuple[int, ...]) -> np.ndarray:
    """The block mask ``(C_out/n, C_in)`` spread over a weight of ``weight_shape`` (bool)."""
    mask = np.repeat(np.asarray(keep, dtype=bool), n, axis=0)
    return np.broadcast_to(mask.reshape(mask.shape + (1,) * (len(weight_shape) - 2)), weight_shape)


def pack_blocks(weight: np.ndarray, keep: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values, indices, indptr)`` of the kept blocks, block-row by block-row, input channels ascending.

    ``values[k] = W[b*n:(b+1)*n, indices[k], ...]`` for ``indptr[b] <= k < indptr[b+1]``; the
    inverse is ``edgec.ops.block_sparse.format.unpack_blocks``.
    """
    weight = np.asarray(weight)
    out_channels, in_channels = weight.shape[:2]
    blocks = weight.reshape(out_channels // n, n, in_channels, *weight.shape[2:])
    rows, indices = np.nonzero(keep)
    values = np.moveaxis(blocks, 2, 1)[rows, indices]  # (nnz, n, ...)
    indptr = np.concatenate([[0], np.cumsum(np.count_nonzero(keep, axis=1))])
    return np.ascontiguousarray(values), indices.astype(np.int32), indptr.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class BlockSparsity:
    """One layer's decision: ``perm`` (output channel order, identity if not rearranged),
    ``keep`` ((C_out/n, C_in) kept blocks of the *permuted* weight) and whether the
    weight was already block-sparse (``trained``)."""

    perm: np.ndarray
    keep: np.ndarray
    trained: bool

    @property
    def sparsity(self) -> float:
        return 1.0 - float(np.count_nonzero(self.keep)) / self.keep.size

    def mask(self, n: int, weight_shape: tuple[int, ...]) -> np.ndarray:
        """The element mask in the *original* channel order (for the masked dense model)."""
        permuted = element_mask(self.keep, n, weight_shape)
        original = np.empty_like(permuted)
        original[self.perm] = permuted
        return original


def block_sparsify(weight: np.ndarray, n: int, sparsity: float, rearrange: bool) -> BlockSparsity:
    """Rearrange (unless the weight already has zero blocks) and prune ``weight`` as the module docstring says."""
    trained = bool(np.any(block_norms(weight, n) == 0))
    perm = rearrangement(weight, n, sparsity) if rearrange and not trained else np.arange(np.shape(weight)[0])
    keep = block_mask(block_norms(np.asarray(weight)[perm], n), sparsity)
    return BlockSparsity(perm, keep, trained)
