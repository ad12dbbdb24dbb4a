"""Training noise levels and the forward process: the SD3 time shift, stratified draws of σ on the
sampler's (shifted) grid or continuously, x_σ = (1 − σ)·x0 + σ·ε and the velocity target u = ε − x0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffrl.config import require

# One copy of the tensor helpers and of the Euler schedule, shared with the sampler (models/ cannot
# import learner/).
from diffrl.models.sde import _bcast
from diffrl.models.sde import sde_sigmas as sampling_sigmas

Tensor = torch.Tensor


def shift_sigma(sigma: Tensor | float, shift: float) -> Tensor:
    """SD3 time shift σ' = shift·σ/(1 + (shift − 1)·σ) (monotone, fixes 0 and 1)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def unshift_sigma(sigma: Tensor | float, shift: float) -> Tensor:
    """Inverse of ``shift_sigma``: σ = σ'/(shift − (shift − 1)·σ')."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return sigma / (shift - (shift - 1.0) * sigma)


def _strata(T: int, generator: torch.Generator | None) -> Tensor:
    """(j + U_j)/T for j = 0..T−1, U_j ~ U[0, 1): one draw in each of T equal strata of [0, 1). ``[T]`` float64."""
    u = torch.rand(T, generator=generator, dtype=torch.float64)  # [T] U_j
    return (torch.arange(T, dtype=torch.float64) + u) / T  # [T] in [j/T, (j+1)/T)


def _pick_stratified(run: Tensor, strata: Tensor) -> Tensor:
    """Level ⌊M·s_j⌋ of a run of M levels for each stratum draw s_j (non-decreasing index). ``[T]``."""
    idx = (strata * len(run)).floor().long().clamp(max=len(run) - 1)  # [T]
    return run[idx]  # [T]


def noise_levels(
    T: int,
    num_sampling_steps: int,
    shift: float,
    top_fraction: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """T training noise levels σ_1..σ_T (shared by the batch; fresh ε per sample and level).

    What exactly is chosen:
      * The range is the top ``top_fraction`` f of the noise-level axis: σ ∈ [1 − f, 1] (shifted σ,
        the value used in x_σ), i.e. the near-clean tail σ < 1 − f is skipped (f = 0.99 skips the
        last 1%).
      * ``num_sampling_steps = S ≥ 1`` (default use): σ is restricted to the sampler's own levels
        ``sampling_sigmas(S, shift)[:S]`` (1 − k/S, shifted), keeping those ≥ 1 − f: a contiguous
        run of M levels from σ = 1. Stratified over those M levels: draw j takes level index
        ⌊M·(j + U_j)/T⌋, U_j ~ U[0, 1), so each of the T strata covers an equal share of the run
        and every level is used ⌊T/M⌋ or ⌈T/M⌉ times (exactly T/M when M divides T).
      * ``num_sampling_steps = 0``: continuous version. With τ the sampler's unshifted time and
        τ_lo = unshift(1 − f): τ_j = 1 − (1 − τ_lo)·(j + U_j)/T (one draw per equal stratum of
        [τ_lo, 1]), σ_j = shift(τ_j); so σ_j ∈ [1 − f, 1] with the sampler's step density.
    Returned noisiest first (descending). ``generator`` makes the U_j reproducible.

    Returns:
        ``[T]`` float32 on the CPU.
    """
    require(T >= 1, "T", ">= 1", T)
    require(num_sampling_steps >= 0, "num_sampling_steps", ">= 0", num_sampling_steps)
    require(shift > 0, "shift", "> 0", shift)
    require(0.0 < top_fraction <= 1.0, "top_fraction", "in (0, 1]", top_fraction)
    strata = _strata(T, generator)  # [T]
    sigma_lo = 1.0 - top_fraction
    if num_sampling_steps >= 1:
        grid = sampling_sigmas(num_sampling_steps, shift)[:num_sampling_steps]  # [S] descending, > 0
        sigmas = _pick_stratified(grid[grid >= sigma_lo - 1e-12], strata)  # [T] from the prefix; grid[0] = 1 kept
    else:
        tau_lo = float(unshift_sigma(sigma_lo, shift))
        tau = 1.0 - (1.0 - tau_lo) * strata  # [T] in (τ_lo, 1]
        sigmas = shift_sigma(tau, shift)  # [T]
    return sigmas.to(torch.float32)  # [T]


def anchor_noise_levels(
    T_anchor: int,
    num_sampling_steps: int,
    shift: float,
    top_fraction: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """T_a anchor-only noise levels: the complement of ``noise_levels``' range, σ < 1 − f.

    At these levels only the KL anchor is applied (``crd_anchor_loss``), so the reward matching can be
    confined to the noisy end (``top_fraction`` < 1) while the near-clean levels stay held to the
    frozen model. Drawn the same stratified way as ``noise_levels``:
      * ``num_sampling_steps = S ≥ 1``: the sampler's levels below 1 − f (a contiguous run of M ≥ 1
        levels ending at the smallest, 1/S shifted); draw j takes level ⌊M·(j + U_j)/T_a⌋ of the run.
      * ``num_sampling_steps = 0``: τ_j = τ_lo·(1 − (j + U_j)/T_a) ∈ (0, τ_lo], σ_j = shift(τ_j), with
        τ_lo = unshift(1 − f).
    Returned noisiest first (descending).

    Returns:
        ``[T_a]`` float32 on the CPU.
    """
    require(T_anchor >= 1, "T_anchor", ">= 1", T_anchor)
    require(num_sampling_steps >= 0, "num_sampling_steps", ">= 0", num_sampling_steps)
    require(shift > 0, "shift", "> 0", shift)
    require(0.0 < top_fraction < 1.0, "top_fraction", "in (0, 1) with anchor-only levels (they lie below 1 − f)",
             top_fraction)
    strata = _strata(T_anchor, generator)  # [T_a]
    sigma_lo = 1.0 - top_fraction
    if num_sampling_steps >= 1:
        grid = sampling_sigmas(num_sampling_steps, shift)[:num_sampling_steps]  # [S] descending, > 0
        below = grid[grid < sigma_lo - 1e-12]  # [M] the contiguous tail of the grid
        require(len(below) >= 1, "top_fraction",
                 f"< {1.0 - float(grid[-1]):.4g} with anchor-only levels (none of the sampler's levels lies "
                 "below 1 − top_fraction)", top_fraction)
        sigmas = _pick_stratified(below, strata)  # [T_a]
    else:
        tau_lo = float(unshift_sigma(sigma_lo, shift))
        tau = tau_lo * (1.0 - strata)  # [T_a] in (0, τ_lo]
        sigmas = shift_sigma(tau, shift)  # [T_a]
    return sigmas.to(torch.float32)  # [T_a]


def interpolate(x0: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """Forward process x_σ = (1 − σ)·x0 + σ·ε; ``sigma`` a scalar or per-sample ``[N]``.
    Shapes: x0, eps ``[N, ...]`` -> ``[N, ...]``."""
    s = _bcast(sigma, x0)  # [N, 1, ...] or []
    return (1.0 - s) * x0 + s * eps  # [N, ...]


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """Flow-matching target u = ε − x0 (d x_σ / dσ). Shapes ``[N, ...]``."""
    return eps - x0  # [N, ...]


@dataclass
class NoisedChunk:
    """One micro-chunk of a batch's groups at one noise level: what a velocity-space loss takes."""

    x_t: Tensor
    """``[n, C, H, W]`` x_σ = (1 − σ)·x0 + σ·ε of the chunk's n = g·K samples (group-major)."""
    u: Tensor
    """``[n, C, H, W]`` the target velocity ε − x0."""
    sigma: Tensor
    """``[n]`` σ of each sample."""
    cond: Any
    """The prompt embeddings of the n samples (each group's repeated K times)."""


def noised_chunk(x0: Tensor, eps: Tensor, idx: Tensor, sigma: float, cond_groups, device) -> NoisedChunk:
    """The forward process for groups ``idx`` of a ``[G, K, C, H, W]`` batch ``x0`` with noise ``eps``
    (same shape), at level ``sigma``; ``cond_groups``: the batch's prompt embeddings, one per group."""
    K = x0.shape[1]
    x0_c = x0[idx].flatten(0, 1).to(device)  # [n, C, H, W]
    eps_c = eps[idx].flatten(0, 1).to(device)  # [n, C, H, W]
    sig = torch.full((x0_c.shape[0],), sigma, device=device)  # [n]
    return NoisedChunk(x_t=interpolate(x0_c, eps_c, sig), u=velocity_target(x0_c, eps_c), sigma=sig,
                       cond=cond_groups[idx.tolist()].repeat_interleave(K))


def per_sample_noise_levels(
    N: int,
    T: int,
    num_sampling_steps: int,
    shift: float,
    top_fraction: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """T distinct levels of the sampler's grid for each of N samples, in random order (DiffusionNFT).

    The grid is the sampler's own levels ``sampling_sigmas(S, shift)[:S]`` (1 − k/S, shifted), keeping
    those ≥ 1 − ``top_fraction`` (M levels; f = 1 keeps all S). Sample i takes the first T entries of
    a uniformly random permutation of the M levels, drawn independently per sample: column j is the
    level of the j-th backward pass. This is NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``, ``main``:
    ``perms_time = stack([randperm(num_timesteps) for each sample])`` applied to the sampler's
    ``timesteps``, of which the first ``num_train_timesteps = int(num_steps·timestep_fraction)`` are
    trained. (A permutation here is the argsort of M uniform draws per sample: one generator call.)

    Returns:
        ``[N, T]`` float32 on the CPU.
    """
    require(N >= 0, "N", ">= 0", N)
    require(num_sampling_steps >= 1, "num_sampling_steps", ">= 1 (levels are drawn from the sampler's grid)",
            num_sampling_steps)
    require(shift > 0, "shift", "> 0", shift)
    require(0.0 < top_fraction <= 1.0, "top_fraction", "in (0, 1]", top_fraction)
    grid = sampling_sigmas(num_sampling_steps, shift)[:num_sampling_steps]  # [S] descending, > 0
    grid = grid[grid >= 1.0 - top_fraction - 1e-12]  # [M]
    require(1 <= T <= len(grid), "T", f"in [1, {len(grid)}] (distinct levels of the grid per sample)", T)
    keys = torch.rand(N, len(grid), generator=generator, dtype=torch.float64)  # [N, M]
    perm = keys.argsort(dim=1)[:, :T]  # [N, T] a random T-subset of the M levels, random order
    return grid[perm].to(torch.float32)  # [N, T]


def noised_chunk_per_sample(x0: Tensor, eps: Tensor, idx: Tensor, sigma: Tensor, cond_groups, device) -> NoisedChunk:
    """``noised_chunk`` with a level per sample: ``sigma`` is ``[G, K]`` (the batch's), indexed like
    ``x0`` by the groups ``idx``; x0, eps ``[G, K, C, H, W]``."""
    K = x0.shape[1]
    x0_c = x0[idx].flatten(0, 1).to(device)  # [n, C, H, W]
    eps_c = eps[idx].flatten(0, 1).to(device)  # [n, C, H, W]
    sig = sigma[idx].reshape(-1).to(device=device, dtype=torch.float32)  # [n]
    return NoisedChunk(x_t=interpolate(x0_c, eps_c, sig), u=velocity_target(x0_c, eps_c), sigma=sig,
                       cond=cond_groups[idx.tolist()].repeat_interleave(K))
