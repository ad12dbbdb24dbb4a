"""Pretraining of a built-in world's base model (shapes or text): rectified flow on rendered images, with prompt dropout
so classifier-free guidance works. ``diffrl pretrain`` runs it; the result is a diffusers folder.

Loss: E_{x0, c, ε, σ} ‖v(x_σ, σ, c̃) − (ε − x0)‖², x_σ = (1 − σ)·x0 + σ·ε, σ ~ logit-normal (SD3),
c̃ = "" with probability ``prompt_dropout``. The text encoders are trained jointly from scratch; the
saved weights are an EMA of the trained ones.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffrl.config import require
from diffrl.models.adapter import FlowModel, denoise
from diffrl.models.tiny_sd3 import TinySD3Arch, TinyUNetArch, build_tiny_sd3, build_tiny_unet
from diffrl.models.worlds import WORLDS, get_world


@dataclass
class PretrainConfig:
    output: str = "assets/shapes-base"
    """Folder the trained pipeline is written to (diffusers format)."""
    world: str = "shapes"
    """The built-in world whose training prompts and renders are learned: shapes or text."""
    init: str = ""
    """A saved pipeline (diffusers folder, e.g. an earlier OUTPUT or snapshot) to continue training
    from, with a fresh warm-up and schedule; empty = random weights built from unet/sd3."""
    snapshot_every: int = 0
    """Also save the EMA weights every N steps to OUTPUT-stepN (0 = only the final model); a base
    with headroom can be picked from them."""
    denoiser: str = "unet"
    """Denoiser kind: unet (a small cross-attention UNet: the right inductive bias for 32x32 scenes on
    a CPU budget) or sd3 (an SD3 joint-attention transformer)."""
    unet: TinyUNetArch = field(default_factory=TinyUNetArch)
    """Sizes of the UNet pipeline (denoiser=unet)."""
    sd3: TinySD3Arch = field(default_factory=TinySD3Arch)
    """Sizes of the SD3 pipeline (denoiser=sd3)."""
    max_steps: int = 1000
    """Optimizer steps at most (training also stops at time_budget_s)."""
    time_budget_s: float = 780.0
    """Wall-clock budget of the training loop in seconds (the whole command stays under 15 min)."""
    batch_size: int = 64
    """Rendered images per optimizer step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay over the time budget)."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    prompt_dropout: float = 0.1
    """Probability of training on the empty prompt (makes CFG possible)."""
    logit_normal_std: float = 1.0
    """σ = sigmoid(n), n ~ N(0, std²) (SD3's logit-normal noise-level sampling)."""
    ema_decay: float = 0.999
    """Decay of the EMA of the weights that is saved."""
    grad_clip: float = 1.0
    """Gradient-norm clipping."""
    seed: int = 0
    """Seed of initialisation, prompt/seed sampling and noise."""
    num_threads: int = 0
    """Torch CPU threads; 0 = all cores."""

    def validate(self) -> None:
        require(self.world in WORLDS, "world", "|".join(WORLDS), self.world)
        size = self.unet.image_size if self.denoiser == "unet" else self.sd3.image_size
        require(size == get_world(self.world).IMAGE_SIZE, f"{self.denoiser}.image_size",
                f"the {self.world} world's image size {get_world(self.world).IMAGE_SIZE}", size)
        require(not self.init or Path(self.init, "model_index.json").is_file(), "init",
                "a diffusers pipeline folder (with model_index.json)", self.init)
        require(self.snapshot_every >= 0, "snapshot_every", "an int >= 0 (0 = none)", self.snapshot_every)
        require(self.denoiser in ("unet", "sd3"), "denoiser", "unet|sd3", self.denoiser)
        require(self.max_steps >= 1, "max_steps", "an int >= 1", self.max_steps)
        require(self.time_budget_s > 0, "time_budget_s", "seconds > 0", self.time_budget_s)
        require(self.batch_size >= 1, "batch_size", "an int >= 1", self.batch_size)
        require(self.lr > 0, "lr", "a float > 0", self.lr)
        require(0 <= self.prompt_dropout < 1, "prompt_dropout", "a probability in [0, 1)")
        require(0 <= self.ema_decay < 1, "ema_decay", "a float in [0, 1)", self.ema_decay)


def lr_factor(step: int, elapsed: float, cfg) -> float:
    """Linear warm-up over ``cfg.warmup_steps``, then cosine decay to 5 % over whichever of
    ``cfg.time_budget_s`` and ``cfg.max_steps`` binds first (pretrain and distill)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, max(elapsed / cfg.time_budget_s, step / cfg.max_steps))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(cfg: PretrainConfig, progress: bool = True) -> dict:
    """Train the base model from scratch and save it to ``cfg.output``. Returns training stats."""
    cfg.validate()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output)
    work = out.parent / (out.name + ".building")
    if cfg.init:
        from diffrl.models.adapter import load_pipeline

        pipe = load_pipeline(cfg.init, with_t5=False)
        denoiser_name = "unet" if hasattr(pipe, "unet") else "transformer"
    elif cfg.denoiser == "unet":
        pipe, denoiser_name = build_tiny_unet(cfg.unet, work, seed=cfg.seed), "unet"
    else:
        pipe, denoiser_name = build_tiny_sd3(cfg.sd3, work, seed=cfg.seed), "transformer"
    modules = torch.nn.ModuleList([getattr(pipe, denoiser_name), pipe.text_encoder, pipe.text_encoder_2]).train()
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    opt = torch.optim.AdamW(modules.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    world = get_world(cfg.world)
    prompts = world.split_prompts("train")
    timesteps = pipe.scheduler.config.num_train_timesteps

    start, step, losses = time.time(), 0, []
    bar = tqdm(total=int(cfg.time_budget_s), desc="pretrain", unit="s", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s {postfix}")
    while step < cfg.max_steps and (elapsed := time.time() - start) < cfg.time_budget_s:
        batch_prompts = [prompts[i] for i in rng.integers(len(prompts), size=cfg.batch_size)]
        seeds = rng.integers(2**31, size=cfg.batch_size)
        images = world.render_batch(batch_prompts, seeds)  # [B, H, W, 3] uint8
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # [B, 3, H, W]
        text = [p if u >= cfg.prompt_dropout else "" for p, u in zip(batch_prompts, rng.random(cfg.batch_size))]
        hidden, _, pooled, _ = pipe.encode_prompt(text, None, None, device="cpu",
                                                  do_classifier_free_guidance=False, max_sequence_length=0)
        eps = torch.randn(x0.shape, generator=gen)  # [B, 3, H, W]
        sigma = torch.sigmoid(torch.randn(cfg.batch_size, generator=gen) * cfg.logit_normal_std)  # [B]
        s = sigma.view(-1, 1, 1, 1)
        x_sigma = (1 - s) * x0 + s * eps  # [B, 3, H, W]
        v = denoise(modules[0], x_sigma, sigma * timesteps, hidden, pooled)  # [B, 3, H, W]
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, elapsed, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), modules.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        step += 1
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            _save(pipe, denoiser_name, ema, out.parent / f"{out.name}-step{step}")
        if step % 20 == 0:
            bar.n = min(int(time.time() - start), int(cfg.time_budget_s))
            bar.set_postfix(step=step, loss=f"{np.mean(losses[-20:]):.4f}", it_s=f"{step / (time.time() - start):.1f}")
    bar.close()

    _save(pipe, denoiser_name, ema, out)
    _remove_tree(work)
    return {"steps": step, "seconds": time.time() - start, "final_loss": float(np.mean(losses[-100:])),
            "images_seen": step * cfg.batch_size}


def _save(pipe, denoiser_name: str, ema: torch.nn.ModuleList, out: Path) -> None:
    """Save ``pipe`` with the EMA weights in it (the training modules are put back afterwards)."""
    trained = (getattr(pipe, denoiser_name), pipe.text_encoder, pipe.text_encoder_2)
    setattr(pipe, denoiser_name, ema[0])
    pipe.text_encoder, pipe.text_encoder_2 = ema[1], ema[2]
    try:
        out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(str(out))
    finally:
        setattr(pipe, denoiser_name, trained[0])
        pipe.text_encoder, pipe.text_encoder_2 = trained[1], trained[2]


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def load_base(path: str = "assets/shapes-base", device: str = "auto") -> FlowModel:
    return FlowModel.from_pretrained(path, device=device)
