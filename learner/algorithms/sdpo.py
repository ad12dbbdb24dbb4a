"""SDPO's dense rewards, returns, per-(prompt, step) advantages, step shuffle and pairwise loss, as pure
tensor functions (Zhang et al., "Aligning Few-Step Diffusion Models with Dense Reward Difference
Learning", arXiv 2411.11727; public code ZiyiZhang27/sdpo, scripts/train_sdpo.py and
sdpo_pytorch/diffusers_patch/pipeline_with_logprob_sdpo.py). Work in progress towards the SDPO
algorithm file (issue 20); nothing registers these yet.

Notation: a trajectory of S steps j = 0 (noisiest) .. S − 1, its predicted clean states x̂0_j, the
rewards R of three scored predictions (the first, the anchor a, the last), the dense rewards r_j, the
returns G_j, advantages A_j. Two trajectories τ1, τ2 of a pair share the initial noise.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def cosine_to(x0_preds: Tensor, ref: Tensor, center: bool = False) -> Tensor:
    """Cosine similarity of every x̂0_j to a reference prediction, over flattened latents.

    ``x0_preds [N, S, ...]``, ``ref [N, ...]`` -> ``[N, S]``. ``center``: subtract each image's mean
    first (ours, an option: on near-white 32×32 images the raw cosine is dominated by the background,
    so every pair of predictions looks alike; the public code uses raw latents)."""
    x = x0_preds.flatten(2).double()  # [N, S, D]
    r = ref.flatten(1).double().unsqueeze(1)  # [N, 1, D]
    if center:
        x = x - x.mean(dim=2, keepdim=True)
        r = r - r.mean(dim=2, keepdim=True)
    return torch.nn.functional.cosine_similarity(x, r.expand_as(x), dim=2)  # [N, S]


def anchor_steps(x0_preds: Tensor, center: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The public code's anchor rule: a = argmin_j [cos(x̂0_j, x̂0_0) + cos(x̂0_j, x̂0_{S−1})].

    ``x0_preds [N, S, ...]`` -> ``(anchor [N] int64, sim_first [N, S], sim_anchor [N, S], sim_last [N, S])``
    (pipeline_with_logprob_sdpo.py: ``sim_first``, ``sim_last``, ``anchor_steps``, ``sim_anchor``)."""
    sim_first = cosine_to(x0_preds, x0_preds[:, 0], center)  # [N, S]
    sim_last = cosine_to(x0_preds, x0_preds[:, -1], center)  # [N, S]
    anchor = (sim_first + sim_last).argmin(dim=1)  # [N]
    rows = torch.arange(len(anchor))
    sim_anchor = cosine_to(x0_preds, x0_preds[rows, anchor], center)  # [N, S]
    return anchor, sim_first, sim_anchor, sim_last


def dense_rewards(scored: Tensor, anchor: Tensor, sim_first: Tensor, sim_anchor: Tensor, sim_last: Tensor
                  ) -> Tensor:
    """Dense per-step rewards from three scored predictions (train_sdpo.py, "compute dense rewards"):

        r_j = (R_first·s^first_j + R_anchor·s^anchor_j + R_last·s^last_j) / (s^first_j + s^anchor_j + s^last_j)

    then the scored steps are overwritten with their true rewards: r_0 = R_first, r_{S−1} = R_last,
    r_a = R_anchor (in that order, so an anchor at 0 or S − 1 keeps the anchor's reward).
    ``scored [N, 3]`` (first, anchor, last), ``anchor [N]``, sims ``[N, S]`` -> ``[N, S]`` float64."""
    R = scored.double()
    num = R[:, 0:1] * sim_first + R[:, 1:2] * sim_anchor + R[:, 2:3] * sim_last  # [N, S]
    r = num / (sim_first + sim_anchor + sim_last)  # [N, S]
    r[:, 0], r[:, -1] = R[:, 0], R[:, 2]
    r[torch.arange(len(anchor)), anchor] = R[:, 1]
    return r


def discounted_returns(r: Tensor, gamma: float) -> Tensor:
    """G_j = r_j + γ·G_{j+1}, G_{S−1} = r_{S−1}, before any normalization (train_sdpo.py, ``sample.gamma``
    0.99; γ = 0 leaves r). ``[N, S]`` -> ``[N, S]``."""
    G = r.clone().double()
    for j in reversed(range(G.shape[1] - 1)):
        G[:, j] = G[:, j] + gamma * G[:, j + 1]
    return G


def step_advantages(returns: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-(prompt, step) advantages A_j = (G_j − mean_k G_j)/(std_k G_j + eps) over a group's K samples.

    ``returns [G, K, S]``, ``mask [G, K]`` (real samples) -> ``[G, K, S]`` (0 where masked). Deviation: the
    public code normalizes by a per-(prompt, step) buffer of the last 32 returns across epochs
    (stat_tracking.py, min_count 16, else batch statistics); a streaming learner sees each prompt's K
    samples together, so the group itself is the buffer (population std, as numpy's ``np.std``)."""
    m = mask.unsqueeze(-1).double()  # [G, K, 1]
    n = m.sum(dim=1, keepdim=True).clamp_min(1.0)  # [G, 1, 1]
    mean = (returns * m).sum(dim=1, keepdim=True) / n  # [G, 1, S]
    var = (((returns - mean) ** 2) * m).sum(dim=1, keepdim=True) / n  # [G, 1, S]
    return (returns - mean) / (var.sqrt() + eps) * m  # [G, K, S]


def step_permutations(num_pairs: int, num_steps: int, generator: torch.Generator) -> Tensor:
    """One random permutation of the step indices per pair: ``[P, S]`` int64 (train_sdpo.py,
    ``shuffle_timestep``: the same permutation for both trajectories of a pair)."""
    return torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(num_pairs)])


def permute_steps(x: Tensor, perms: Tensor) -> Tensor:
    """Apply each pair's permutation along dim 1: ``x [P, S, ...]``, ``perms [P, S]`` -> ``[P, S, ...]``
    with ``out[p, i] = x[p, perms[p, i]]`` (states, log-probs, advantages and weights alike)."""
    return x[torch.arange(x.shape[0]).unsqueeze(1), perms]


def temporal_weights(num_steps: int, lam: float = 0.99, log_scale: float = 1.0) -> Tensor:
    """w_j = λ^j / log_scale, j = 0 the noisiest step (train_sdpo.py: ``lam`` 0.99, ``log_scale`` 1). ``[S]``."""
    return torch.tensor(lam, dtype=torch.float64) ** torch.arange(num_steps, dtype=torch.float64) / log_scale


def sdpo_loss(logp1: Tensor, old1: Tensor, logp2: Tensor, old2: Tensor, adv1: Tensor, adv2: Tensor, w: Tensor,
              adv_clip: float = 5.0, clip_range: float = 1e-4) -> tuple[Tensor, Tensor]:
    """SDPO's pairwise loss at one step (train_sdpo.py, "compute advantage differences" ...):

        Δ = [log π_θ − log π_old](τ1) − [log π_θ − log π_old](τ2),  ΔA = clip(A1, ±c) − clip(A2, ±c)
        L = mean max((w·Δ − ΔA)², (w·Δ^clip − ΔA)²)

    with Δ^clip computed from log π_θ clamped to log π_old ± ``clip_range``. All inputs ``[P]`` (one
    entry per pair; ``w`` broadcastable). Returns ``(loss [], clamp_fraction [])``: the fraction of
    pairs where the clamped term is the larger one (the public code's ``clipfrac``)."""
    a_diff = adv1.clamp(-adv_clip, adv_clip) - adv2.clamp(-adv_clip, adv_clip)  # [P]
    log_diff = (logp1 - old1) - (logp2 - old2)  # [P]
    unclipped = (w * log_diff - a_diff) ** 2  # [P]
    c1 = torch.minimum(torch.maximum(logp1, old1 - clip_range), old1 + clip_range)  # [P]
    c2 = torch.minimum(torch.maximum(logp2, old2 - clip_range), old2 + clip_range)  # [P]
    clipped = (w * ((c1 - old1) - (c2 - old2)) - a_diff) ** 2  # [P]
    loss = torch.maximum(unclipped, clipped).mean()
    return loss, (clipped > unclipped).float().mean().detach()
