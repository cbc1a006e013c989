"""Routing metadata for grouped expert GEMMs, built on the device without host syncs.

The token slots (token t, choice j) -> slot s = t * k + j are sorted by expert once; every grouped GEMM
then reads "rows [offsets[e], offsets[e+1]) belong to expert e" and gathers token rows through
``token_of_row``. Everything here is plain torch ops (scatter_add, cumsum, stable sort, searchsorted) so it
runs on any device and never calls ``.item()``; the grid size of the Triton kernels is an upper bound
(``max_tiles``) and surplus programs exit early.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Slots sorted by expert.

    ``perm[i]``: slot index (t * k + j) of sorted row i; ``token_of_row[i] = perm[i] // k``;
    ``expert_of_row[i]``: its expert; ``counts[e]``: rows of expert e; ``offsets``: E + 1 prefix sums
    (int64, so row * width products never overflow int32); ``weights[i]``: routing weight of row i.
    """

    perm: torch.Tensor
    token_of_row: torch.Tensor
    expert_of_row: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    num_tokens: int
    top_k: int
    num_experts: int
    _bounds: list[int] | None = None
    _inverse: torch.Tensor | None = None

    def bounds(self) -> list[int]:
        """``offsets`` as a host list (one sync; only the torch path uses it)."""
        if self._bounds is None:
            self._bounds = self.offsets.tolist()
        return self._bounds

    def inverse_perm(self) -> torch.Tensor:
        """Sorted row of each slot (``inverse_perm[perm[i]] = i``)."""
        if self._inverse is None:
            self._inverse = torch.empty_like(self.perm)
            self._inverse[self.perm] = torch.arange(self.perm.numel(), device=self.perm.device)
        return self._inverse


def sort_by_expert(expert_index: torch.Tensor, num_experts: int) -> Routing:
    """Group the ``[T, k]`` expert choices by expert (stable: within an expert rows keep slot order)."""
    num_tokens, top_k = expert_index.shape
    flat = expert_index.reshape(-1).long()
    expert_of_row, perm = torch.sort(flat, stable=True)
    # scatter_add rather than bincount: bincount reads max() on the host to size its output (a sync).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return Routing(
        perm=perm,
        token_of_row=perm // top_k,
        expert_of_row=expert_of_row,
        counts=counts,
        offsets=offsets,
        num_tokens=num_tokens,
        top_k=top_k,
        num_experts=num_experts,
    )


def tile_table(routing: Routing, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Map program ids to (expert, first row) tiles of ``block_m`` rows that never straddle experts.

    Returns ``(tile_expert, tile_row_start, max_tiles)``; tiles past the real count get expert -1.
    ``max_tiles = ceil(S / block_m) + E`` bounds the real count, so no host sync is needed.
    """
    counts = routing.counts
    num_experts = routing.num_experts
    slots = routing.num_tokens * routing.top_k
    max_tiles = -(-slots // block_m) + num_experts
    tiles_per_expert = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles_per_expert, 0)
    tile_begin = tile_end - tiles_per_expert
    tile_ids = torch.arange(max_tiles, device=counts.device)
    expert = torch.searchsorted(tile_end, tile_ids, right=True)
    valid = expert < num_experts
    expert_c = expert.clamp(max=num_experts - 1)
    row_start = routing.offsets[expert_c] + (tile_ids - tile_begin[expert_c]) * block_m
    tile_expert = torch.where(valid, expert_c, torch.full_like(expert_c, -1))
    return tile_expert.to(torch.int32), row_start.to(torch.int64), max_tiles


def sort_by_expert_reference(expert_index: torch.Tensor, num_experts: int):
    """Loop-based reference of :func:`sort_by_expert` (tests only): ``(perm, counts)`` as lists."""
    flat = expert_index.reshape(-1).tolist()
    perm = [s for e in range(num_experts) for s, x in enumerate(flat) if x == e]
    counts = [sum(1 for x in flat if x == e) for e in range(num_experts)]
    return perm, counts


def tile_table_reference(counts: list[int], block_m: int):
    """Loop-based reference of :func:`tile_table`: list of (expert, row_start) for real tiles."""
    tiles, start = [], 0
    for e, c in enumerate(counts):
        for r in range(0, c, block_m):
            tiles.append((e, start + r))
        start += c
    return tiles
