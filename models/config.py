"""Configuration of the model adapter and its sampler (Euler ODE, or Flow-GRPO's SDE)."""

from __future__ import annotations

from dataclasses import dataclass

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
    sample's seed (models/sde.py); it has the ODE's marginals and per-step Gaussian transitions whose
    log-probabilities GRPO trains on."""

    def validate(self) -> None:
        require(self.num_steps >= 1, "num_steps", "an int >= 1", self.num_steps)
        require(self.sde_noise_level >= 0, "sde_noise_level", "a float >= 0 (0 = ODE)", self.sde_noise_level)
        require(self.guidance_scale >= 0, "guidance_scale", "a float >= 0", self.guidance_scale)
        require(self.shift > 0, "shift", "a float > 0", self.shift)
        require(self.batch_size >= 1, "batch_size", "an int >= 1", self.batch_size)
