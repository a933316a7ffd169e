"""LoRP, Locality-Aware Redundancy Pruning (arXiv 2605.27786): which decoder blocks to remove, training-free.

LoRP measures how the similarity of block inputs decays with depth (the Representation Locality Score,
RLS = −log2 of the mean off-diagonal similarity), spectral-clusters the blocks into K "phases" with K chosen
from the RLS, then spreads the removal budget over the clusters: first the most redundant block of each
cluster in depth order (coverage), then repeatedly from the cluster whose remaining blocks are most similar to
one another. Baselines: ShortGPT (remove the blocks whose input and output are most alike, block influence
BI_l = 1 − mean_t cos(h_l, h_{l+1})), LLM-Streamline (the n consecutive blocks whose input and output are most
alike, the selection Ghosted Layers' headline results use) and removing the last n blocks before the protected
last one.

Deliberate departures and choices:

- The official RLS → K thresholds (RLS ≥ 1.0: K = 2; ≥ 0.7: 3; else 4) are kept as defaults; they were
  calibrated on 7–14B models. ``num_clusters`` overrides them. K is capped at N − 1 (spectral clustering
  needs more points than clusters).
- Protected blocks default to the first and the last (LoRP's and LLM-Streamline's official choice; the official
  Streamline code starts its windows at block 1 and ends them before the last block). ShortGPT defaults to its
  official candidates, which also exclude the second-to-last block (:data:`SHORTGPT_PROTECT`).
- The similarity is the mean over all calibration tokens (the official code averages per-batch means, equal for
  equal-length batches).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.prune.depth import (
    Batch,
    BoundarySimilarity,
    BoundaryStates,
    boundary_similarity,
    check_budget,
    decoder_layers,
    layer_similarity,
    similarity_of,
)

PROTECT = (0, -1)


def representation_locality_score(similarity: torch.Tensor) -> float:
    """RLS = −log2(mean_{i<j} S_ij) of a block-similarity matrix (high: similarity decays fast with depth)."""
    s = torch.as_tensor(similarity, dtype=torch.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] < 2:
        raise ConfigError(f"representation_locality_score needs a square matrix of at least 2x2, got {tuple(s.shape)}")
    i, j = torch.triu_indices(s.shape[0], s.shape[0], offset=1)
    mean = s[i, j].mean().item()
    if not mean > 0:
        raise ConfigError(f"representation_locality_score needs a positive mean similarity, got {mean:.4g}")
    return -math.log2(mean)


def clusters_for_rls(rls: float) -> int:
    """The official K: 2 when RLS ≥ 1.0, 3 when 0.7 ≤ RLS < 1.0, else 4."""
    return 2 if rls >= 1.0 else 3 if rls >= 0.7 else 4


@dataclass
class LorpSelection:
    """The blocks LoRP removes and how it chose them."""

    indices: list[int]  # sorted
    similarity: torch.Tensor  # (N, N)
    rls: float
    num_clusters: int
    labels: list[int]  # cluster of each block, clusters numbered by the depth of their first block


def _clusters(similarity: torch.Tensor, k: int, seed: int) -> list[int]:
    from sklearn.cluster import SpectralClustering

    affinity = ((similarity.double() + 1.0) / 2.0).numpy()
    np.fill_diagonal(affinity, 1.0)
    raw = SpectralClustering(k, affinity="precomputed", assign_labels="kmeans", random_state=seed).fit_predict(
        affinity
    )
    first_seen = {}
    for label in raw:  # relabel by the depth of each cluster's first member
        first_seen.setdefault(int(label), len(first_seen))
    return [first_seen[int(label)] for label in raw]


def _mean_pairwise(similarity: torch.Tensor, members: list[int]) -> float:
    sub = similarity[members][:, members]
    n = len(members)
    return (sub.sum().item() - sub.diagonal().sum().item()) / (n * (n - 1))


def allocate(labels: Sequence[int], similarity: torch.Tensor, num_remove: int, protect: Iterable[int]) -> list[int]:
    """LoRP's two-stage budget allocation over clusters (eqs. 8-11); returns the removed blocks, sorted."""
    n = len(labels)
    protected = {p % n for p in protect}
    clusters = [[i for i in range(n) if labels[i] == c] for c in range(max(labels) + 1)]
    candidates = []
    for members in clusters:  # eq. 8: mean similarity to the other members, descending; fixed once
        score = {i: sum(similarity[i, j].item() for j in members if j != i) / max(len(members) - 1, 1)
                 for i in members}  # fmt: skip
        candidates.append(sorted((i for i in members if i not in protected), key=lambda i: (-score[i], i)))
    removed: list[int] = []
    for queue in candidates:  # stage 1: coverage, clusters in depth order
        if len(removed) == num_remove:
            break
        if queue:
            removed.append(queue.pop(0))
    while len(removed) < num_remove:  # stage 2: the cluster whose remaining members are most redundant
        remaining = [[i for i in members if i not in removed] for members in clusters]
        eligible = [c for c, queue in enumerate(candidates) if queue and len(remaining[c]) >= 2]
        if eligible:
            pick = max(eligible, key=lambda c: (_mean_pairwise(similarity, remaining[c]), -c))
        else:
            pick = next(c for c, queue in enumerate(candidates) if queue)
        removed.append(candidates[pick].pop(0))
    return sorted(removed)


def lorp_from_similarity(
    similarity: torch.Tensor,
    num_remove: int,
    num_clusters: int | None = None,
    protect: Sequence[int] = PROTECT,
    seed: int = 0,
) -> LorpSelection:
    """LoRP on a precomputed similarity matrix S (N, N)."""
    s = torch.as_tensor(similarity, dtype=torch.float64)
    n = s.shape[0]
    check_budget(num_remove, n, protect)
    rls = representation_locality_score(s)
    if num_clusters is not None and (not isinstance(num_clusters, int) or not 1 <= num_clusters < n):
        raise ConfigError(f"num_clusters={num_clusters!r} is invalid; it must be an integer in [1, {n - 1}]")
    k = num_clusters or min(clusters_for_rls(rls), n - 1)
    labels = _clusters(s, k, seed) if k > 1 else [0] * n
    return LorpSelection(allocate(labels, s, num_remove, protect), s, rls, k, labels)


def select_layers_lorp(
    model: nn.Module,
    calibration: Iterable[Batch] | BoundaryStates | BoundarySimilarity,
    num_remove: int,
    num_clusters: int | None = None,
    protect: Sequence[int] = PROTECT,
    seed: int = 0,
) -> LorpSelection:
    """LoRP's selection of ``num_remove`` decoder blocks from calibration batches (streamed), captured states or
    their :class:`~leantrain.prune.depth.BoundarySimilarity`."""
    check_budget(num_remove, len(decoder_layers(model)), protect)
    sim = similarity_of(model, calibration)
    return lorp_from_similarity(layer_similarity(sim), num_remove, num_clusters, protect, seed)


def block_influence(states: BoundaryStates | BoundarySimilarity) -> torch.Tensor:
    """ShortGPT's BI_l = 1 − mean_t cos(h_l(t), h_{l+1}(t)) for every block l, shape (N,)."""
    cosine = (states if isinstance(states, BoundarySimilarity) else boundary_similarity(states)).cosine
    return 1 - torch.diagonal(cosine, offset=1)


# The official ShortGPT code scores blocks 0..N-3 (``bi_score[:-1]`` of the N-1 captured in/out pairs) and sets
# block 0's score so that it is never chosen: blocks 0, N-2 and N-1 are never removed.
SHORTGPT_PROTECT = (0, -2, -1)


def select_layers_shortgpt(
    model: nn.Module,
    calibration: Iterable[Batch] | BoundaryStates | BoundarySimilarity,
    num_remove: int,
    protect: Sequence[int] = SHORTGPT_PROTECT,
) -> list[int]:
    """ShortGPT: the ``num_remove`` unprotected blocks with the lowest block influence, sorted (by default the
    official candidates: neither the first block nor the last two)."""
    n = len(decoder_layers(model))
    check_budget(num_remove, n, protect)
    protected = {p % n for p in protect}
    bi = block_influence(similarity_of(model, calibration))
    order = sorted((i for i in range(n) if i not in protected), key=lambda i: (bi[i].item(), i))
    return sorted(order[:num_remove])


def select_layers_streamline(
    model: nn.Module,
    calibration: Iterable[Batch] | BoundaryStates | BoundarySimilarity,
    num_remove: int,
    protect: Sequence[int] = PROTECT,
) -> tuple[list[int], float]:
    """LLM-Streamline's selection: the ``num_remove`` consecutive unprotected blocks whose input and output hidden
    states are most alike (largest mean_t cos(h_i, h_{i+n})); returns (blocks, that cosine). Ties: the earliest."""
    n = len(decoder_layers(model))
    check_budget(num_remove, n, protect)
    cosine = similarity_of(model, calibration).cosine
    protected = {p % n for p in protect}
    best, best_cos = None, -math.inf
    for start in range(n - num_remove + 1):
        if protected & set(range(start, start + num_remove)):
            continue
        cos = cosine[start, start + num_remove].item()
        if cos > best_cos:
            best, best_cos = start, cos
    if best is None:
        raise ConfigError(f"no {num_remove} consecutive blocks of {n} avoid the protected blocks {sorted(protected)}")
    return list(range(best, best + num_remove)), best_cos


def select_layers_last_n(model: nn.Module, num_remove: int, protect: Sequence[int] = PROTECT) -> list[int]:
    """The ``num_remove`` deepest unprotected blocks (with the default protection: the ones before the last)."""
    n = len(decoder_layers(model))
    check_budget(num_remove, n, protect)
    protected = {p % n for p in protect}
    return sorted([i for i in range(n) if i not in protected][len(range(n)) - len(protected) - num_remove :])
