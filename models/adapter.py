"""One adapter over text-to-image flow pipelines: real SD3/SD3.5 (StableDiffusion3Pipeline, loaded from
a local path or a hub id) and the shapes-world base model (a FlowUNetPipeline: a small UNet in pixel
space with SD3's CLIP text-encoder pair). Both encode prompts the SD3 way (token embeddings + pooled).

Rectified-flow notation (docs/algorithms.md): x_σ = (1 − σ)·x0 + σ·ε, velocity target u = ε − x0, and the
network v(x_σ, σ, c). Sampling integrates dx/dσ = v from σ = 1 (noise) to σ = 0 with Euler steps.

Everything that trains or samples goes through :class:`FlowModel`: prompt encoding (with the empty
prompt for CFG), velocity, CFG, decoding, the deterministic per-sample-seeded ODE sampler and
Flow-GRPO's SDE sampler with its per-step log-probabilities (``sample_sde``, models/sde.py). The
denoiser can be swapped per call (``transformer=``) so θ, p_old, p_samp and the frozen anchor p_φ
share one set of text encoders.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffrl.config import ConfigError
from diffrl.models.config import ModelConfig
from diffrl.models.sde import sde_grid
from diffrl.utils import DTYPES, resolve_device

# Components a StableDiffusion3Pipeline may leave out; passed as None when the folder lacks them.
OPTIONAL_COMPONENTS = ("vae", "text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
HUB_TIMEOUT_S = 10.0
"""How long ``check_model_source`` waits for the hub's answer about a hub id (connect and read)."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class PromptEmbeds:
    """Text conditioning of an SD3-family denoiser."""

    hidden: torch.Tensor  # [B, L, D] token embeddings (CLIP-L ‖ CLIP-G, padded, then T5)
    pooled: torch.Tensor  # [B, P] pooled CLIP embeddings

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def repeat_interleave(self, k: int) -> PromptEmbeds:
        return PromptEmbeds(self.hidden.repeat_interleave(k, 0), self.pooled.repeat_interleave(k, 0))

    def __getitem__(self, index) -> PromptEmbeds:
        return PromptEmbeds(self.hidden[index], self.pooled[index])

    @staticmethod
    def cat(parts: Sequence[PromptEmbeds]) -> PromptEmbeds:
        return PromptEmbeds(torch.cat([p.hidden for p in parts]), torch.cat([p.pooled for p in parts]))


REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_model_path(path: str) -> str:
    """A relative path that is not under the working directory is looked up in the repository (so the
    shipped assets/shapes-base is found from anywhere)."""
    if not Path(path).is_absolute() and not Path(path).exists() and (REPO_ROOT / path).exists():
        return str(REPO_ROOT / path)
    return path


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, the way huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:120]}" if text else type(err).__name__


def _hub_reason(err: BaseException, offline: bool) -> str:
    """One short line on why model_index.json of a hub id could not be had."""
    from huggingface_hub import errors

    if isinstance(err, errors.GatedRepoError):
        return "a gated repository: accept its licence on huggingface.co and log in (hf auth login or $HF_TOKEN)"
    if isinstance(err, errors.RepositoryNotFoundError):
        return "no such repository, or a private one and you are not logged in"
    if isinstance(err, errors.RevisionNotFoundError):
        return "no such revision"
    if isinstance(err, errors.RemoteEntryNotFoundError):
        return "it has no model_index.json, so it is not a diffusers pipeline"
    if isinstance(err, errors.HfHubHTTPError):
        return f"the hub answered {_first_line(err)}"
    if offline:
        return "HF_HUB_OFFLINE is set and the local hub cache lacks it"
    return f"the hub is unreachable, {_first_line(err)}; the local hub cache lacks it"


def _hub_model_index(repo_id: str, offline: bool, timeout_s: float) -> None:
    """Raise unless the hub (one HEAD request, no retries) or, offline or when the hub does not answer,
    the local hub cache has ``repo_id``'s model_index.json."""
    from huggingface_hub import errors, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    if offline:
        if not cached:
            raise errors.LocalEntryNotFoundError(f"{repo_id}/model_index.json is not in the local cache")
        return
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "model_index.json"), timeout=timeout_s)
    except errors.HfHubHTTPError:
        raise  # the hub answered: no such repository, gated, ...
    except Exception:
        if not cached:  # no answer; diffusers falls back to the cache then, and so does this check
            raise


def check_model_source(path: str, timeout_s: float | None = None) -> str:
    """Where ``model.path`` can be loaded from: an existing local pipeline folder (returned resolved,
    see :func:`resolve_model_path`), or a hub id whose model_index.json huggingface_hub can give, from
    the hub or its local cache (only the cache when HF_HUB_OFFLINE is set). Anything else raises
    :class:`~diffrl.config.ConfigError` for ``model.path`` with one line that says how to give a local
    folder instead. Waits at most ``timeout_s`` (default :data:`HUB_TIMEOUT_S`) for the hub, whatever
    the network does (a hub that never answers is reported as unreachable)."""
    resolved = resolve_model_path(path)
    folder = Path(resolved)
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise ConfigError("model.path", f"{path!r} is not a diffusers pipeline folder (no model_index.json)")
        return resolved
    if not _HUB_ID.fullmatch(path):
        raise ConfigError("model.path", f"{path!r}: no such folder (nor an org/name hub id)")
    from huggingface_hub import constants as hub_constants

    timeout_s = HUB_TIMEOUT_S if timeout_s is None else timeout_s
    offline = _hub_offline() or hub_constants.HF_HUB_OFFLINE  # (huggingface_hub reads it once, at import)
    outcome: dict = {}

    def fetch() -> None:
        try:
            _hub_model_index(path, offline, timeout_s)
        except Exception as err:  # noqa: BLE001 -- reported as one line below
            outcome["error"] = err

    # a daemon thread: DNS lookups are outside httpx's timeouts, and a stuck one must not hold the exit
    worker = threading.Thread(target=fetch, name="hub-check", daemon=True)
    worker.start()
    worker.join(timeout_s + 5.0)
    if worker.is_alive():
        reason = f"no answer from the hub in {timeout_s + 5.0:.0f} s"
    elif "error" in outcome:
        reason = _hub_reason(outcome["error"], offline)
    else:
        return path
    raise ConfigError("model.path", f"cannot load {path!r}: not a local folder, and not from the Hugging Face hub "
                      f"({reason}); download it (hf download {path} --local-dir DIR) and give model.path=DIR")


def load_pipeline(path: str, dtype: torch.dtype = torch.float32, with_t5: bool = True):
    """The pipeline in a local diffusers folder (a FlowUNetPipeline or a StableDiffusion3Pipeline whose
    optional components absent from model_index.json become None), or an SD3 hub id
    (:func:`check_model_source` first: an unreachable one fails with one line). ``with_t5=False``
    leaves an SD3 pipeline's T5 encoder unloaded."""
    from diffusers import StableDiffusion3Pipeline

    from diffrl.models.flow_pipeline import FlowUNetPipeline

    path = check_model_source(path)
    folder = Path(path)
    kwargs: dict = {"dtype": dtype, "use_safetensors": True}  # never unpickle weights (docs/security.md)
    if folder.is_dir():
        index = json.loads((folder / "model_index.json").read_text())
        if index.get("_class_name") == FlowUNetPipeline.__name__:
            return FlowUNetPipeline.from_pretrained(str(path), **kwargs)
        for name in OPTIONAL_COMPONENTS:
            entry = index.get(name)
            if entry is None or entry == [None, None] or not (folder / name).exists():
                kwargs[name] = None
    if not with_t5:
        kwargs["text_encoder_3"] = kwargs["tokenizer_3"] = None
    return StableDiffusion3Pipeline.from_pretrained(str(path), **kwargs)


@functools.cache
def _takes_pooled_projections(cls: type) -> bool:
    """SD3-style denoisers take ``pooled_projections``; UNets take ``class_labels`` (once per class)."""
    return "pooled_projections" in inspect.signature(cls.forward).parameters


def denoise(net: nn.Module, x: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor,
            pooled: torch.Tensor) -> torch.Tensor:
    """One forward of an SD3 transformer or a text-conditioned UNet: the velocity [B, C, H, W]."""
    base = getattr(net, "module", net)  # a DeepSpeed engine or DDP wraps the denoiser
    if _takes_pooled_projections(type(base)):  # SD3Transformer2DModel
        return net(hidden_states=x, timestep=timestep, encoder_hidden_states=hidden, pooled_projections=pooled,
                   return_dict=False)[0]
    return net(x, timestep, encoder_hidden_states=hidden, class_labels=pooled, return_dict=False)[0]


@dataclass
class SampledTrajectory:
    """What ``FlowModel.sample_trajectory`` returns, per sample (CPU, float32 unless noted)."""

    x0: torch.Tensor  # [B, C, H, W] the final sample x_{σ_S} (= states[:, -1])
    states: torch.Tensor  # [B, S + 1, C, H, W] x_{σ_0} (the initial noise), ..., x_{σ_S}
    log_probs: torch.Tensor  # [B, S] log p(x_{σ_{j+1}} | x_{σ_j}), per-dimension mean (0 for noiseless steps)
    x0_preds: torch.Tensor  # [B, S, C, H, W] x̂0_j = x_j − σ_j·v_j
    sigmas: torch.Tensor  # [S + 1] float64, 1 -> 0

    @property
    def latents(self) -> torch.Tensor:
        """The states (the name GRPO's code used)."""
        return self.states


SDETrajectory = SampledTrajectory


class FlowModel:
    """The adapter: text encoding, velocity, CFG, decoding and the Euler ODE sampler."""

    def __init__(self, pipe, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_sequence_length: int = 256, prompt_cache_size: int = 4096, resolution: int = 0):
        self.pipe = pipe
        self.device = torch.device(device)
        self.dtype = dtype
        if max_sequence_length == 0 and getattr(pipe, "text_encoder_3", None) is not None:
            pipe.text_encoder_3 = pipe.tokenizer_3 = None  # 0 = drop T5 (CLIP tokens only)
        # T5 tokens per prompt: none for a pipeline without a T5 encoder (SD3 would pad zeros instead)
        self.max_sequence_length = max_sequence_length if getattr(pipe, "text_encoder_3", None) is not None else 0
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval().to(self.device)
        self.denoiser_name = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
        self.transformer.to(self.device, dtype)
        self.resolution = self._check_resolution(resolution)
        self._prompt_cache: OrderedDict[str, PromptEmbeds] = OrderedDict()
        self._prompt_cache_size = prompt_cache_size

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path: str, device: str = "auto", dtype: str = "float32",
                        max_sequence_length: int = 256, resolution: int = 0) -> FlowModel:
        torch_dtype = DTYPES[dtype]
        pipe = load_pipeline(path, dtype=torch.float32, with_t5=max_sequence_length > 0)
        return cls(pipe, resolve_device(device), torch_dtype, max_sequence_length, resolution=resolution)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> FlowModel:
        return cls.from_pretrained(cfg.path, cfg.device, cfg.dtype, cfg.max_sequence_length, cfg.resolution)

    def _check_resolution(self, resolution: int) -> int:
        """The image side to use: ``resolution`` pixels (0 = the model's default), which must be a
        multiple of the VAE scale x the denoiser's patch size (or a UNet's downsampling) and within
        an SD3 transformer's position embeddings; a :class:`ConfigError` for model.resolution otherwise."""
        cfg = self.transformer.config
        default = int(cfg.sample_size) * self.vae_scale_factor
        if resolution == 0:
            return default
        if getattr(cfg, "patch_size", None):
            unit, what = int(cfg.patch_size), "patch size"
        else:  # a UNet halves the resolution at each block but the last
            unit, what = 2 ** (len(getattr(cfg, "block_out_channels", (0,))) - 1), "UNet downsampling"
        multiple = self.vae_scale_factor * unit
        if resolution <= 0 or resolution % multiple:
            raise ConfigError("model.resolution", f"expected a multiple of {multiple} (VAE scale "
                              f"{self.vae_scale_factor} x {what} {unit}) for {type(self.transformer).__name__}, "
                              f"got {resolution}")
        max_patches = getattr(cfg, "pos_embed_max_size", None)
        if max_patches and resolution // multiple > max_patches:
            raise ConfigError("model.resolution", f"expected at most {max_patches * multiple} (the transformer's "
                              f"position embeddings cover {max_patches} patches a side), got {resolution}")
        return resolution

    def save_pretrained(self, path: str | Path, transformer: nn.Module | None = None) -> None:
        """Save the pipeline in diffusers format, optionally with another denoiser in it."""
        original = self.transformer
        if transformer is not None:
            setattr(self.pipe, self.denoiser_name, transformer)
        try:
            self.pipe.save_pretrained(str(path))
        finally:
            setattr(self.pipe, self.denoiser_name, original)

    # ----------------------------------------------------------------- properties
    @property
    def transformer(self) -> nn.Module:
        """The denoiser (an SD3 transformer or a UNet); the name follows SD3."""
        return getattr(self.pipe, self.denoiser_name)

    @property
    def vae(self):
        return getattr(self.pipe, "vae", None)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (1 for a pixel-space model)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """[C, H, W] of x0 at ``image_size`` (model.resolution): side = image_size / VAE scale."""
        side = self.image_size // self.vae_scale_factor
        return (self.transformer.config.in_channels, side, side)

    @property
    def image_size(self) -> int:
        """Image side in pixels: model.resolution, or the transformer's sample_size x the VAE scale."""
        return self.resolution

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    # ----------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Embeddings of each prompt (cached per text: the encoders are frozen)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            hidden, _, pooled, _ = self.pipe.encode_prompt(
                prompt=list(missing), prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            )
            for i, prompt in enumerate(missing):
                self._prompt_cache[prompt] = PromptEmbeds(hidden[i : i + 1].to(self.dtype),
                                                          pooled[i : i + 1].to(self.dtype))
        for prompt in prompts:
            self._prompt_cache.move_to_end(prompt)
        out = PromptEmbeds.cat([self._prompt_cache[p] for p in prompts])
        while len(self._prompt_cache) > self._prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        return out

    def empty_embeds(self, batch: int) -> PromptEmbeds:
        """The unconditional (empty prompt) embedding used for CFG, repeated ``batch`` times."""
        return self.encode_prompts([""]).repeat_interleave(batch)

    # ----------------------------------------------------------------- denoiser
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds,
                 transformer: nn.Module | None = None) -> torch.Tensor:
        """v(x_σ, σ, c). x: [B, C, H, W], sigma: [B] in [0, 1]."""
        net = transformer if transformer is not None else self.transformer
        timestep = sigma.to(self.device, torch.float32) * self.num_train_timesteps  # [B]
        return denoise(net, x.to(self.device, self.dtype), timestep, cond.hidden.to(self.device, self.dtype),
                       cond.pooled.to(self.device, self.dtype))  # [B, C, H, W]

    def guided_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, scale: float,
                        transformer: nn.Module | None = None, uncond: PromptEmbeds | None = None,
                        detach_uncond: bool = False) -> torch.Tensor:
        """CFG: v^w = v(·, ∅) + w·(v(·, c) − v(·, ∅)); one batched forward for both halves.
        ``detach_uncond``: v(·, ∅) enters without gradient, so the gradient flows only through the
        conditional branch (times w), as Flow-GRPO trains (scripts/train_sd3.py, ``compute_log_prob``:
        ``noise_pred_uncond.detach()``); the value is the same."""
        if scale == 1.0:
            return self.velocity(x, sigma, cond, transformer)
        batch = x.shape[0]
        uncond = uncond if uncond is not None else self.empty_embeds(batch)
        both = self.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]),
                             PromptEmbeds.cat([uncond, cond]), transformer)  # [2B, C, H, W]
        v_uncond, v_cond = both.chunk(2)
        if detach_uncond:
            v_uncond = v_uncond.detach()
        return v_uncond + scale * (v_cond - v_uncond)

    # ----------------------------------------------------------------- sampling
    def sigmas(self, num_steps: int, shift: float = 1.0) -> torch.Tensor:
        """σ schedule [num_steps + 1] from 1 to 0, shifted like SD3: σ' = s·σ / (1 + (s − 1)·σ)."""
        sigma = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
        return sigma.float()

    def initial_noise(self, seeds: Sequence[int], shape: tuple[int, int, int] | None = None) -> torch.Tensor:
        """ε for each seed, drawn on the CPU so a seed gives the same noise on every device."""
        shape = shape or self.latent_shape
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device)  # [B, C, H, W]

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], num_steps: int = 10,
               guidance_scale: float = 1.0, shift: float = 1.0, transformer: nn.Module | None = None,
               batch_size: int = 64) -> torch.Tensor:
        """Deterministic Euler ODE sampling; one sample per (prompt, seed) pair. Returns x0 [B, C, H, W]
        (float32 on the model's device)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        sigmas = self.sigmas(num_steps, shift).to(self.device)  # [S + 1]
        outs = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            x = self.initial_noise(seeds[start : start + batch_size])  # [b, C, H, W]
            cond = self.encode_prompts(chunk)
            uncond = self.empty_embeds(len(chunk)) if guidance_scale != 1.0 else None
            for i in range(num_steps):
                sigma = sigmas[i].expand(len(chunk))  # [b]
                v = self.guided_velocity(x, sigma, cond, guidance_scale, transformer, uncond)
                x = x + (sigmas[i + 1] - sigmas[i]) * v.float()
            outs.append(x)
        return torch.cat(outs)

    @torch.no_grad()
    def sample_sde(self, prompts: Sequence[str], seeds: Sequence[int], num_steps: int = 10,
                   guidance_scale: float = 1.0, shift: float = 1.0, noise_level: float = 0.7,
                   transformer: nn.Module | None = None, batch_size: int = 64,
                   grid: str = "scheduler") -> SampledTrajectory:
        """Flow-GRPO's SDE sampler (models/sde.py) on ``sde_grid(num_steps, shift, grid)`` (by default
        diffusers' SD3 scheduler grid that Flow-GRPO samples on): :meth:`sample_trajectory` with the
        flow-SDE step and one random stream per seed (the step noise follows the initial noise)."""
        if noise_level <= 0:
            raise ValueError(f"noise_level: expected > 0 for SDE sampling, got {noise_level!r}")
        sigmas = sde_grid(num_steps, shift, grid, self.num_train_timesteps)  # [S + 1] float64
        return self.sample_trajectory(prompts, seeds, None, sigmas, "flow_sde", noise_level, guidance_scale,
                                      transformer, batch_size)

    @torch.no_grad()
    def sample_trajectory(self, prompts: Sequence[str], noise_seeds: Sequence[int], step_seeds: Sequence[int] | None,
                          sigmas: torch.Tensor, step_kind: str = "euler", noise_level: float = 0.0,
                          guidance_scale: float = 1.0, transformer: nn.Module | None = None,
                          batch_size: int = 64) -> SampledTrajectory:
        """Sample on the levels ``sigmas`` ``[S + 1]`` (1 -> 0) with steps of ``step_kind`` (models/sde.py
        ``STEP_KINDS``: euler, flow_sde with a = ``noise_level``, eta with η = ``noise_level``), recording
        every state, the predicted clean states and the per-step log-probabilities.

        A sample's initial noise comes from a CPU generator seeded with its noise seed (the same ε as
        :meth:`sample` draws), its step noise z_0, z_1, ... in order from a second generator seeded with
        its step seed (``step_seeds=None``: from the noise seed's generator, after the initial noise), so a
        (prompt, noise seed, step seed) triple gives the same trajectory in any batch
        and on any device up to the denoiser's arithmetic (bit for bit in the same batch); two samples
        with one noise seed and two step seeds share x_0 and differ afterwards (SDPO's pairs). The flow
        SDE uses the first level below 1 in g_σ's denominator at σ = 1 (``sigma_max``)."""
        from diffrl.models.sde import STEP_KINDS, take_step

        if not (len(prompts) == len(noise_seeds) == len(noise_seeds if step_seeds is None else step_seeds)):
            raise ValueError(f"{len(prompts)} prompts, {len(noise_seeds)} noise seeds, {len(step_seeds)} step seeds")
        if step_kind not in STEP_KINDS:
            raise ValueError(f"step_kind: expected one of {STEP_KINDS}, got {step_kind!r}")
        if step_kind != "euler" and noise_level <= 0:
            raise ValueError(f"noise_level: expected > 0 for {step_kind} steps, got {noise_level!r}")
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()  # [S + 1]
        sigma_max = float(sigmas[1]) if len(sigmas) > 1 else None  # as GRPOConfig.sigma_max()
        shape = self.latent_shape
        parts: dict[str, list[torch.Tensor]] = {"states": [], "log_probs": [], "x0_preds": []}
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            noise_gens = [torch.Generator().manual_seed(int(s)) for s in noise_seeds[start : start + batch_size]]
            x = torch.stack([torch.randn(shape, generator=g) for g in noise_gens]).to(self.device)  # [b, C, H, W]
            gens = noise_gens if step_seeds is None else [
                torch.Generator().manual_seed(int(s)) for s in step_seeds[start : start + batch_size]]
            cond = self.encode_prompts(chunk)
            uncond = self.empty_embeds(len(chunk)) if guidance_scale != 1.0 else None
            states, lps, preds = [x.cpu()], [], []
            for i in range(len(sigmas) - 1):
                sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
                v = self.guided_velocity(x, torch.full((len(chunk),), sigma, device=self.device), cond,
                                         guidance_scale, transformer, uncond).float()  # [b, C, H, W]
                preds.append((x - sigma * v).cpu())  # x̂0_j
                if step_kind == "euler":
                    z = torch.zeros_like(x)
                else:
                    z = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device)  # [b, C, H, W]
                x, lp = take_step(step_kind, x, v, z, sigma, sigma_next, noise_level, sigma_max)  # [b, ...], [b]
                states.append(x.cpu())
                lps.append(lp.cpu())
            parts["states"].append(torch.stack(states, dim=1))  # [b, S + 1, C, H, W]
            parts["log_probs"].append(torch.stack(lps, dim=1))  # [b, S]
            parts["x0_preds"].append(torch.stack(preds, dim=1))  # [b, S, C, H, W]
        states = torch.cat(parts["states"])
        return SampledTrajectory(x0=states[:, -1], states=states, log_probs=torch.cat(parts["log_probs"]),
                                 x0_preds=torch.cat(parts["x0_preds"]), sigmas=sigmas)

    # ----------------------------------------------------------------- pixels
    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 (latents, or pixels in [-1, 1] for a VAE-less model) -> images [B, 3, H, W] in [0, 1]."""
        return self.decode_differentiable(x0)

    def decode_differentiable(self, x0: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` inside the autograd graph (DIDR differentiates a reward of the image with
        respect to the latent, through the VAE decoder)."""
        if self.vae is None:
            images = x0.float()
        else:
            cfg = self.vae.config
            latents = x0.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
            images = self.vae.decode(latents, return_dict=False)[0].float()
        return ((images + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> x0 (the inverse of :meth:`decode` up to the VAE)."""
        pixels = images.to(self.device, torch.float32) * 2 - 1
        if self.vae is None:
            return pixels
        cfg = self.vae.config
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        return ((latents - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).float()

    @staticmethod
    def to_uint8(images: torch.Tensor) -> np.ndarray:
        """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3]."""
        return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], **sample_kwargs) -> np.ndarray:
        """Prompts and seeds -> uint8 images [B, H, W, 3]."""
        return self.to_uint8(self.decode(self.sample(prompts, seeds, **sample_kwargs)))
