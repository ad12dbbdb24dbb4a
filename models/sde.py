"""Flow-GRPO's SDE sampling step (arXiv 2505.05470) as pure tensor functions, shared by the sampler
(``FlowModel.sample_sde`` draws and records it) and the GRPO learner (``learner/algorithms/grpo.py``
re-exports these functions and recomputes the step's log-density under θ), so both sides evaluate
one formula and an on-policy ratio is exactly 1. The derivation is in grpo.py's docstring.

Notation as in docs/algorithms.md: σ ∈ [0, 1] the noise level, x_σ = (1 − σ)·x0 + σ·ε, v(x, σ) ≈ E[ε − x0 |
x_σ = x]. One step σ -> σ' < σ, Δ = σ' − σ:

    x_{σ'} = μ + s·z,  μ = x + [v + g_σ²/(2σ)·(x + (1 − σ)·v)]·Δ,  s = g_σ·sqrt(−Δ),
    g_σ = a·sqrt(σ/(1 − σ)),  z ~ N(0, I)

The levels σ_0 = 1 > ... > σ_S = 0 come from ``sde_grid``: by default diffusers' SD3 scheduler grid
(``scheduler_sigmas``), the one Flow-GRPO samples on; ``grid="uniform"`` is the ODE sampler's
``sde_sigmas``.

Besides the flow SDE the file holds DDIM's η-step in flow form (``eta_step_mean_std``) and the
dispatch over the step kinds a sampler records in a trajectory (``STEP_KINDS``, ``step_mean_std``).
"""

from __future__ import annotations

import math

import torch

from diffrl.config import require

Tensor = torch.Tensor

LOG_PROB_REDUCTIONS = ("mean", "sum")

STEP_KINDS = ("euler", "flow_sde", "eta")
"""The steps a sampler can take (proto ``StepKind`` EULER, FLOW_SDE, ETA): the deterministic Euler step,
Flow-GRPO's SDE step (``noise_level`` = a) and DDIM's η-step in flow form (``noise_level`` = η)."""


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bf16 inputs, the input's own dtype for float32/float64."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _bcast(s: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or per-sample ``[N]`` value, shaped ``[N, 1, ..., 1]`` to broadcast against ``like``."""
    s = torch.as_tensor(s, dtype=like.dtype, device=like.device)
    if s.ndim == 0:
        return s  # []
    return s.reshape(-1, *([1] * (like.ndim - 1)))  # [N, 1, ..., 1]


def sde_sigmas(num_steps: int, shift: float = 1.0) -> Tensor:
    """The Euler sampler's (uniform) levels ``[num_steps + 1]`` float64 from 1 (pure noise) to 0: σ_k =
    shift·τ/(1 + (shift − 1)·τ), τ = 1 − k/num_steps; step k evaluates the velocity at σ_k and moves
    to σ_{k+1} (``diffrl.learner.noise_levels.sampling_sigmas`` is this function). The SDE sampler uses
    it with ``grid="uniform"``; its default is ``scheduler_sigmas``."""
    require(num_steps >= 1, "num_steps", ">= 1", num_steps)
    tau = 1.0 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps  # [S + 1]
    return shift * tau / (1.0 + (shift - 1.0) * tau)  # [S + 1]


SDE_GRIDS = ("scheduler", "uniform")
"""The SDE sampler's σ grids: ``scheduler`` (diffusers' FlowMatchEulerDiscreteScheduler, the grid Flow-GRPO
samples and trains on; ``scheduler_sigmas``), ``uniform`` (τ_k = 1 − k/S shifted; ``sde_sigmas``)."""


def scheduler_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """The σ grid ``[num_steps + 1]`` float64 of diffusers' ``FlowMatchEulerDiscreteScheduler(
    num_train_timesteps, shift=shift).set_timesteps(num_steps)`` (static shift; SD3/SD3.5's scheduler
    config has shift 3.0), the grid Flow-GRPO samples and trains on (flow_grpo/diffusers_patch/
    sd3_pipeline_with_logprob.py calls ``retrieve_timesteps``; sd3_sde_with_logprob.py reads
    ``scheduler.sigmas``):

        τ_min = shift(1/N),  τ_k = linspace(1, τ_min, S)_k,  σ_k = shift(τ_k) (k < S),  σ_S = 0

    with shift(τ) = s·τ/(1 + (s − 1)·τ) and N = ``num_train_timesteps``: the scheduler's smallest training
    level τ_min is itself shifted, then shifted again, so the last non-zero level is shift(shift(1/N))
    (0.0089 at s = 3, N = 1000; 0.001 at s = 1) instead of shift(1/S) on the uniform grid, and the
    other levels sit correspondingly lower. Computed in float64 (diffusers: float32, within 1e-7)."""
    require(num_steps >= 1, "num_steps", ">= 1", num_steps)
    require(num_train_timesteps >= 1, "num_train_timesteps", ">= 1", num_train_timesteps)

    def shifted(t: Tensor) -> Tensor:
        return shift * t / (1.0 + (shift - 1.0) * t)

    tau_min = shifted(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64))  # the scheduler's sigma_min
    tau = torch.linspace(1.0, float(tau_min), num_steps, dtype=torch.float64)  # [S]
    return torch.cat([shifted(tau), torch.zeros(1, dtype=torch.float64)])  # [S + 1]


def sde_grid(num_steps: int, shift: float = 1.0, grid: str = "scheduler", num_train_timesteps: int = 1000
             ) -> Tensor:
    """The SDE sampler's levels ``[num_steps + 1]`` float64, 1 -> 0, on ``grid`` (one of ``SDE_GRIDS``):
    ``scheduler_sigmas`` or ``sde_sigmas``. The sampler (``FlowModel.sample_sde``) and the GRPO learner
    (``GRPOConfig.sigmas``) both take their levels from here."""
    require(grid in SDE_GRIDS, "grid", f"one of {SDE_GRIDS}", grid)
    if grid == "scheduler":
        return scheduler_sigmas(num_steps, shift, num_train_timesteps)
    return sde_sigmas(num_steps, shift)


def sde_std(sigma: Tensor | float, noise_level: float, sigma_max: float | None = None) -> Tensor:
    """Diffusion coefficient g_σ = a·sqrt(σ/(1 − σ')), σ' = σ except where σ ≥ 1, where σ' =
    ``sigma_max`` (Flow-GRPO: the sampler's first level below 1). With ``sigma_max=None`` σ must be
    < 1. Scalar or ``[N]`` -> same shape (float64 for Python floats)."""
    s = torch.as_tensor(sigma, dtype=torch.float64) if not isinstance(sigma, Tensor) else sigma
    den_sigma = s if sigma_max is None else torch.where(s >= 1.0, torch.full_like(s, sigma_max), s)
    return noise_level * torch.sqrt(s / (1.0 - den_sigma))


def sde_step_mean_std(
    x_t: Tensor,
    v: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: float,
    sigma_max: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean and std of the Euler–Maruyama step σ -> σ_next (< σ) of the Flow-GRPO SDE.

    μ = x + [v + g²/(2σ)·(x + (1 − σ)·v)]·Δ,  s = g·sqrt(−Δ),  Δ = σ_next − σ,  g = sde_std(σ).

    Args:
        x_t: ``[N, ...]`` current sample x_σ.  v: ``[N, ...]`` velocity at (x_σ, σ).
        sigma, sigma_next: scalars or ``[N]``.
    Returns:
        ``(mean [N, ...], std [N, 1, ..., 1] or [])`` in float32 (float64 if the inputs are).
    """
    dt_ = _compute_dtype(v)
    x = x_t.to(dt_)  # [N, ...]
    v = v.to(dt_)  # [N, ...]
    s = _bcast(torch.as_tensor(sigma, dtype=torch.float64), x)  # [N, 1, ...] or []
    s_next = _bcast(torch.as_tensor(sigma_next, dtype=torch.float64), x)  # [N, 1, ...] or []
    delta = s_next - s  # [N, 1, ...] Δ < 0
    g = sde_std(s, noise_level, sigma_max).to(dt_)  # [N, 1, ...] g_σ
    mean = x + (v + g**2 / (2.0 * s) * (x + (1.0 - s) * v)) * delta  # [N, ...] μ
    std = g * torch.sqrt(-delta)  # [N, 1, ...] s
    return mean, std


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduce: str = "mean") -> Tensor:
    """Per-sample log N(x; μ, s²·I): the elementwise log-density −(x − μ)²/(2s²) − log s − ½log 2π,
    then averaged ("mean", Flow-GRPO's choice: a per-dimension log-prob) or summed ("sum", the joint
    log-density) over the non-batch dims. ``x``, ``mean`` ``[N, ...]``; ``std`` broadcastable ->
    ``[N]``."""
    require(reduce in LOG_PROB_REDUCTIONS, "reduce", f"one of {LOG_PROB_REDUCTIONS}", reduce)
    std = std.to(mean.dtype).expand_as(mean)  # [N, ...]
    lp = (
        -((x.detach().to(mean.dtype) - mean) ** 2) / (2.0 * std**2)
        - torch.log(std)
        - 0.5 * math.log(2 * math.pi)
    )  # [N, ...]
    flat = lp.reshape(lp.shape[0], -1)  # [N, D]
    return flat.mean(dim=1) if reduce == "mean" else flat.sum(dim=1)  # [N]


def sde_step_with_noise(
    x_t: Tensor,
    v: Tensor,
    noise: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: float,
    sigma_max: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One SDE sampling step with given standard-normal ``noise`` z ``[N, ...]``: ``(x_next [N, ...],
    log_prob [N])`` with x_next = μ + s·z and its per-dimension mean log-density (the sampler's
    record; the learner recomputes it with ``grpo.sde_step_log_prob``)."""
    mean, std = sde_step_mean_std(x_t, v, sigma, sigma_next, noise_level, sigma_max)
    x_next = mean + std * noise.to(mean.dtype)  # [N, ...]
    return x_next, gaussian_log_prob(x_next, mean, std, "mean")


def eta_step_std(sigma: Tensor | float, sigma_next: Tensor | float, eta: float) -> Tensor:
    """Std s of DDIM's η-step σ -> σ' in flow form (x_σ = (1 − σ)·x0 + σ·ε):

        s = η·σ'·sqrt(1 − λ/λ'),  λ = ((1 − σ)/σ)² the signal-to-noise ratio,

    which is DDIM's σ_t(η) = η·sqrt((1 − ᾱ')/(1 − ᾱ))·sqrt(1 − ᾱ/ᾱ') (Song et al. 2021, eq. 16) written
    for any scaling of signal and noise (the ratio s/σ' depends on the SNRs only). s = η·σ' from σ = 1,
    and s = 0 into σ' = 0 (the last step is deterministic). Scalars or ``[N]`` -> float64 tensor."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float64)
    snr = ((1.0 - s) / s) ** 2  # λ
    snr_next = ((1.0 - s_next) / s_next.clamp_min(1e-300)) ** 2  # λ' (inf-free at σ' = 0: s_next is 0 there)
    frac = (1.0 - snr / snr_next.clamp_min(1e-300)).clamp(0.0, 1.0)
    return torch.where(s_next > 0, eta * s_next * torch.sqrt(frac), torch.zeros_like(s_next))


def eta_step_mean_std(x_t: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, eta: float
                      ) -> tuple[Tensor, Tensor]:
    """Mean and std of DDIM's η-step σ -> σ' (< σ) from velocity ``v``:

        x̂0 = x − σ·v,  ε̂ = x + (1 − σ)·v,  μ = (1 − σ')·x̂0 + sqrt(σ'² − s²)·ε̂,  s = ``eta_step_std``

    (η = 0 is the Euler step exactly). ``x_t``, ``v`` ``[N, ...]``; sigmas scalar or ``[N]``. Returns
    ``(mean [N, ...], std [N, 1, ...] or [])`` in float32 (float64 for float64 inputs)."""
    dt_ = _compute_dtype(v)
    x, v = x_t.to(dt_), v.to(dt_)
    s = _bcast(torch.as_tensor(sigma, dtype=torch.float64), x)
    s_next = _bcast(torch.as_tensor(sigma_next, dtype=torch.float64), x)
    std = _bcast(eta_step_std(sigma, sigma_next, eta), x)  # [N, 1, ...] or []
    x0_hat = x - s.to(dt_) * v
    eps_hat = x + (1.0 - s).to(dt_) * v
    mean = (1.0 - s_next).to(dt_) * x0_hat + torch.sqrt((s_next**2 - std**2).clamp_min(0.0)).to(dt_) * eps_hat
    return mean, std.to(dt_)


def step_mean_std(kind: str, x_t: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float,
                  noise_level: float, sigma_max: float | None = None) -> tuple[Tensor, Tensor]:
    """Mean and std of one step of ``kind`` (one of ``STEP_KINDS``): Euler (std 0), the flow SDE
    (``sde_step_mean_std``, noise level a) or the η-step (``eta_step_mean_std``, η)."""
    require(kind in STEP_KINDS, "step_kind", f"one of {STEP_KINDS}", kind)
    if kind == "flow_sde":
        return sde_step_mean_std(x_t, v, sigma, sigma_next, noise_level, sigma_max)
    if kind == "eta":
        return eta_step_mean_std(x_t, v, sigma, sigma_next, noise_level)
    dt_ = _compute_dtype(v)
    delta = _bcast(torch.as_tensor(sigma_next, dtype=torch.float64) - torch.as_tensor(sigma, dtype=torch.float64),
                   x_t).to(dt_)
    return x_t.to(dt_) + delta * v.to(dt_), torch.zeros((), dtype=dt_)


def take_step(kind: str, x_t: Tensor, v: Tensor, noise: Tensor, sigma: Tensor | float, sigma_next: Tensor | float,
              noise_level: float, sigma_max: float | None = None) -> tuple[Tensor, Tensor]:
    """One step of ``kind`` with standard-normal ``noise`` ``[N, ...]``: ``(x_next [N, ...], log_prob [N])``,
    x_next = μ + s·z and its per-dimension mean log-density, 0 where the step has no noise (s = 0)."""
    mean, std = step_mean_std(kind, x_t, v, sigma, sigma_next, noise_level, sigma_max)
    std_b = std.expand(mean.shape[0], *([1] * (mean.ndim - 1))) if std.ndim else std.expand(mean.shape[0])
    std_b = std_b.reshape(mean.shape[0], *([1] * (mean.ndim - 1)))  # [N, 1, ...]
    x_next = mean + std_b * noise.to(mean.dtype)  # [N, ...]
    noisy = std_b.reshape(-1) > 0  # [N]
    lp = torch.zeros(mean.shape[0], dtype=mean.dtype, device=mean.device)  # [N]
    if bool(noisy.any()):
        lp[noisy] = gaussian_log_prob(x_next[noisy], mean[noisy], std_b[noisy], "mean")
    return x_next, lp
