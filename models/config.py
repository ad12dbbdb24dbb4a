"""Configuration of the model adapter and its sampler (Euler ODE, or Flow-GRPO's SDE)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from diffrl.config import require


@dataclass
class ModelConfig:
    path: str = "assets/shapes-base"
    """Local folder of a diffusers SD3-family pipeline (model_index.json + component folders), or a
    Hugging Face hub id (org/name, e.g. stabilityai/stable-diffusion-3.5-medium; downloaded to the
    hub cache, or read from it alone when HF_HUB_OFFLINE=1). A hub id that cannot be had fails at
    start-up, saying how to download it and give the folder instead. The default is the shipped
    shapes-world base model."""
    dtype: str = "float32"
    """Compute dtype of the denoiser: float32, bfloat16 or float16 (bf16 on GPUs)."""
    device: str = "auto"
    """Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    max_sequence_length: int = 256
    """T5 tokens per prompt (prompts are padded or truncated to this many) for pipelines with a T5
    encoder (text_encoder_3, e.g. SD3/SD3.5): 256 is diffusers' StableDiffusion3Pipeline default; the
    public Flow-GRPO/DiffusionNFT SD3.5 code uses 128 (the sd35m recipes). Pipelines without a T5
    encoder (the shapes world, the tiny test models) get no T5 tokens whatever this says.
    0 = drop T5 (not loaded; CLIP tokens only)."""
    resolution: int = 0
    """Image side in pixels (square images). 0 = the model's default: the transformer's sample_size x
    the VAE's scale factor (1024 for SD3.5-M). Must be a multiple of the VAE scale x the denoiser's
    patch size (SD3.5: 8 x 2 = 16), checked when the model loads."""

    def validate(self) -> None:
        require(bool(self.path), "path", "a local path or hub id")
        require(self.dtype in ("float32", "bfloat16", "float16"), "dtype", "float32|bfloat16|float16",
                self.dtype)
        require(self.device == "auto" or self.device.startswith(("cpu", "cuda")), "device",
                "auto|cpu|cuda[:N]", self.device)
        require(0 <= self.max_sequence_length <= 512, "max_sequence_length",
                "an int in [0, 512] (0 = drop T5)", self.max_sequence_length)
        require(self.resolution >= 0, "resolution", "image side in pixels >= 0 (0 = the model's default)",
                self.resolution)


@dataclass
class SamplingConfig:
    num_steps: int = 10
    """Euler steps of the deterministic ODE sampler."""
    guidance_scale: float = 1.0
    """Classifier-free guidance scale w; 1.0 = no CFG (one forward per step)."""
    shift: float = 1.0
    """Timestep shift of the sigma schedule (SD3: 3.0); 1.0 = linear in sigma."""
    batch_size: int = 64
    """Images denoised together in one forward."""
    sde_noise_level: float = 0.0
    """0 = the deterministic Euler ODE sampler. > 0: Flow-GRPO's SDE sampler with this noise level a
    (diffusion g_σ = a·sqrt(σ/(1 − σ)); 0.7 in Flow-GRPO), stochastic but reproducible from each
    sample's seeds (models/sde.py); it has the ODE's marginals and per-step Gaussian transitions whose
    log-probabilities GRPO trains on."""
    step_kind: str = "auto"
    """The sampler's step: euler (deterministic), flow_sde (Flow-GRPO's SDE, noise level
    sde_noise_level), eta (DDIM's η-step in flow form, η = eta: the few-step students' stochastic
    sampler), or auto = flow_sde when sde_noise_level > 0, else euler."""
    eta: float = 1.0
    """η of the eta step: the share of fresh noise (DDIM's η; 1 = SDPO's sd-turbo sampler, 0 = Euler)."""
    sigmas: list[float] = field(default_factory=list)
    """Explicit noise levels σ_0 = 1 > ... > σ_S = 0 (num_steps + 1 of them), e.g. a distilled student's
    own grid (its student.json); empty = derived: the uniform grid shifted by shift (euler, eta) or
    diffusers' SD3 scheduler grid (flow_sde, as Flow-GRPO)."""

    def kind(self) -> str:
        """The step kind with auto resolved."""
        if self.step_kind == "auto":
            return "flow_sde" if self.sde_noise_level > 0 else "euler"
        return self.step_kind

    def noise_level(self) -> float:
        """The stochastic step's parameter: a (flow_sde), η (eta) or 0 (euler)."""
        return {"flow_sde": self.sde_noise_level, "eta": self.eta}.get(self.kind(), 0.0)

    def grid(self, num_train_timesteps: int = 1000):
        """The levels ``[num_steps + 1]`` float64 the sampler steps through."""
        import torch

        from diffrl.models.sde import sde_grid, sde_sigmas

        if self.sigmas:
            return torch.tensor(self.sigmas, dtype=torch.float64)
        if self.kind() == "flow_sde":
            return sde_grid(self.num_steps, self.shift, "scheduler", num_train_timesteps)
        return sde_sigmas(self.num_steps, self.shift)

    def validate(self) -> None:
        from diffrl.models.sde import STEP_KINDS

        require(self.num_steps >= 1, "num_steps", "an int >= 1", self.num_steps)
        require(self.sde_noise_level >= 0, "sde_noise_level", "a float >= 0 (0 = ODE)", self.sde_noise_level)
        require(self.guidance_scale >= 0, "guidance_scale", "a float >= 0", self.guidance_scale)
        require(self.shift > 0, "shift", "a float > 0", self.shift)
        require(self.batch_size >= 1, "batch_size", "an int >= 1", self.batch_size)
        require(self.step_kind in ("auto", *STEP_KINDS), "step_kind", f"auto or one of {STEP_KINDS}", self.step_kind)
        require(self.kind() != "flow_sde" or self.sde_noise_level > 0, "sde_noise_level",
                "> 0 for step_kind=flow_sde", self.sde_noise_level)
        require(self.eta >= 0, "eta", "a float >= 0", self.eta)
        if self.sigmas:
            s = [float(x) for x in self.sigmas]
            ok = (len(s) == self.num_steps + 1 and s[0] == 1.0 and s[-1] == 0.0
                  and all(a > b for a, b in itertools.pairwise(s)))
            require(ok, "sigmas", f"num_steps + 1 = {self.num_steps + 1} levels from 1.0 down to 0.0, strictly "
                    "decreasing", self.sigmas)
