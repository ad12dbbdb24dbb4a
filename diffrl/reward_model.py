"""``diffrl reward-model``: train the differentiable shapes-world reward (``models/reward_cnn.py``).

The network learns to count the objects of each (colour, shape) kind, plus off-palette objects, as
the exact detector (``reward_servers/scorers/shapes.py``) counts them; its reward is the probability
that every count equals the prompt's (the detector's strict pass). Every training image is labelled
by the detector on the image itself, never by a prompt, so the labels stay right for whatever the
image shows. Images come from the TRAIN prompts only, and any image whose detected content is the
composition of an eval prompt is dropped, so the eval prompts' compositions are never seen.

The data mix (fractions of ``--images``, see ``MIX``):

- ``clean``: renders of random train prompts;
- ``wrong``: renders of near misses of train prompts (one count, colour or shape changed, a clause
  dropped or added; kept when the result is a train prompt) and scenes of a train prompt with one or
  two extra random objects (5 or 6 objects, beyond the grammar);
- ``colour``: renders with the palette permuted, a global colour jitter, a hue rotation, or one object
  repainted off the palette;
- ``blur``, ``noise``, ``shift``: Gaussian blur, additive Gaussian noise, a sub-pixel translation;
  a third of all perturbed images also get a second, random one of blur/noise/shift;
- ``base``: samples of the base model (``--base-steps`` Euler steps, CFG 1);
- ``student``: samples of the one-step student (``--student-steps`` steps, CFG 1);
- ``denoised``: the base model's short-step estimates at high noise: x0 of a render or a base sample,
  σ ~ U(0.3, 1), x_σ = (1 − σ) x0 + σ ε, then k ∈ {1, 2} Euler steps of the base's velocity (CFG 1)
  from σ to 0; blurry images that a reward-gradient algorithm sees early in training.

``--no-model-samples`` leaves the model-based sources out (their share goes to the renders). After
training, the held-out figures (fresh seeds, EVAL prompts) go to ``training.json``: agreement of the
network's strict verdict with the detector's on clean renders, renders of a wrong prompt, base and
student samples and denoised estimates; per-slot count accuracy; and the correlation of the reward
with the detector's strict on model samples.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from diffrl.config import ConfigError, require
from diffrl.models import reward_cnn
from diffrl.models.reward_cnn import (
    KIND_INDEX,
    MAX_COUNT,
    NUM_SLOTS,
    OTHER_INDEX,
    RewardNetConfig,
    ShapesRewardNet,
)
from diffrl.models.shapes_world import (
    BACKGROUND,
    BORDER_PX,
    COLORS,
    IMAGE_SIZE,
    MAX_SIZE_PX,
    MIN_GAP_PX,
    MIN_SIZE_PX,
    SHAPES,
    Clause,
    SceneObject,
    all_prompts,
    canonical_prompt,
    eval_prompts,
    format_prompt,
    parse_prompt,
    render,
    render_batch,
    sample_scene,
    train_prompts,
)
from diffrl.reward_servers.scorers import shapes as detector

MIX: dict[str, float] = {"clean": 0.14, "wrong": 0.10, "colour": 0.12, "blur": 0.10, "noise": 0.10,
                         "shift": 0.06, "base": 0.04, "student": 0.22, "denoised": 0.12}
"""Share of each source in the training images (sums to 1)."""
MODEL_SOURCES = ("base", "student", "denoised")
PERTURBATIONS = ("colour", "blur", "noise", "shift")
EVAL_SETS = ("clean", "wrong", "base", "student", "denoised")
"""The held-out sets, in the order training.json reports them."""
TRAIN_SEED_RANGE = (0, 2**31)
EVAL_SEED_RANGE = (2**31, 2**32)
"""Held-out images use seeds no training image uses."""
OFF_PALETTE_RGB = np.array([(20, 20, 20), (120, 120, 120), (150, 60, 200), (30, 200, 200), (120, 120, 30),
                            (130, 80, 40), (240, 120, 200), (110, 20, 20)], dtype=np.uint8)
"""Colours that the detector does not take for a palette colour (black, grey, purple, cyan, olive,
brown, pink, dark red)."""

assert reward_cnn.OTHER == detector.OFF_PALETTE, "the 'other' slot must be the detector's colour name"


@dataclass
class RewardModelConfig:
    """What ``diffrl reward-model`` trains, from what, and where it writes it."""

    out: str = "assets/shapes-reward-cnn"
    """Output folder: config.json, model.safetensors, training.json (and model.onnx with onnx)."""
    base: str = "assets/shapes-base-3k"
    """Base model folder: its samples and its denoised estimates are training data."""
    student: str = "assets/shapes-student-1step"
    """One-step student folder: its samples are training data."""
    images: int = 30000
    """Training images in all (split by ``MIX``)."""
    model_samples: bool = True
    """False: renders only (no base, student or denoised images; their share goes to the renders)."""
    base_steps: int = 20
    """Euler steps of the base model's samples."""
    student_steps: int = 1
    """Euler steps of the student's samples."""
    epochs: int = 5
    """Passes over the training images (fewer if ``time_budget_s`` binds)."""
    batch_size: int = 128
    """Images per optimizer step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to 0 over the steps or the time
    budget, whichever binds)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    time_budget_s: float = 300.0
    """Most seconds of the training loop (0 = no limit)."""
    eval_seeds: int = 4
    """Held-out images per eval prompt in each held-out set (63 eval prompts)."""
    sample_batch: int = 128
    """Images per model call when sampling."""
    seed: int = 0
    """Seed of the prompts, seeds, perturbations, initial weights and batches."""
    threads: int = 2
    """torch and OpenCV CPU threads."""
    adv_eps: float = 0.0
    """L2 radius of adversarial training on [0, 1] pixels (0 = off). With it, ``adv_fraction`` of each
    batch is replaced by its projected-gradient-ascent perturbation (Madry et al. 2018) within that
    radius, keeping the clean image's labels: a robust network's input gradient points at changes a
    person (and the detector) would see, not at imperceptible patterns a generator can hack
    (Santurkar et al. 2019). 0.5 is about 2/255 RMS per value on a 32x32 image."""
    adv_steps: int = 3
    """Projected-gradient steps of each adversarial example (step size 2.5 ``adv_eps`` / steps)."""
    adv_fraction: float = 0.5
    """Share of each batch replaced by adversarial examples when ``adv_eps`` > 0."""
    onnx: bool = False
    """Also write model.onnx (image [B, 3, H, W] in [0, 1] -> logits [B, 13, 6])."""
    net: RewardNetConfig = field(default_factory=RewardNetConfig)
    """The network's sizes and score mode."""

    def validate(self) -> None:
        require(self.images >= 10, "images", "an int >= 10", self.images)
        require(self.epochs >= 1, "epochs", "an int >= 1", self.epochs)
        require(self.batch_size >= 2, "batch_size", "an int >= 2", self.batch_size)
        require(self.lr > 0, "lr", "a float > 0", self.lr)
        require(self.base_steps >= 1 and self.student_steps >= 1, "base_steps",
                "steps >= 1", (self.base_steps, self.student_steps))
        require(self.eval_seeds >= 1, "eval_seeds", "an int >= 1", self.eval_seeds)
        require(self.threads >= 1, "threads", "an int >= 1", self.threads)
        require(self.time_budget_s >= 0, "time_budget_s", "seconds >= 0", self.time_budget_s)
        require(self.adv_eps >= 0, "adv_eps", "an L2 radius >= 0", self.adv_eps)
        require(self.adv_steps >= 1, "adv_steps", "an int >= 1", self.adv_steps)
        require(0 < self.adv_fraction <= 1, "adv_fraction", "a share in (0, 1]", self.adv_fraction)
        self.net.validate()

    def command(self) -> str:
        """The ``diffrl reward-model`` command line that reproduces this config."""
        d = RewardModelConfig()
        parts = ["diffrl reward-model", f"--out {self.out}", f"--base {self.base}",
                 f"--student {self.student}", f"--images {self.images}", f"--epochs {self.epochs}",
                 f"--seed {self.seed}", f"--threads {self.threads}"]
        for name in ("base_steps", "student_steps", "batch_size", "lr", "weight_decay", "time_budget_s",
                     "eval_seeds", "adv_eps", "adv_steps", "adv_fraction"):
            if getattr(self, name) != getattr(d, name):
                parts.append(f"--{name.replace('_', '-')} {getattr(self, name)}")
        if self.net.score != d.net.score:
            parts.append(f"--score {self.net.score}")
        if not self.model_samples:
            parts.append("--no-model-samples")
        if self.onnx:
            parts.append("--onnx")
        return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def detected_counts(images: np.ndarray) -> np.ndarray:
    """int64 ``[B, 13]``: the detector's count of each slot of ``KINDS`` (not capped)."""
    out = np.zeros((len(images), NUM_SLOTS), dtype=np.int64)
    for i, objs in enumerate(detector.detect_batch(images)):
        for o in objs:
            out[i, OTHER_INDEX if o.color == detector.OFF_PALETTE else KIND_INDEX[(o.color, o.shape)]] += 1
    return out


def _eval_compositions() -> set[tuple[int, ...]]:
    """The per-slot counts of every eval prompt (what no training image may show)."""
    return {tuple(int(v) for v in row) for row in reward_cnn.want_counts(eval_prompts())}


# --------------------------------------------------------------------------------------------
# Renders and perturbations
# --------------------------------------------------------------------------------------------


def _seeds(rng: np.random.Generator, n: int, span: tuple[int, int]) -> list[int]:
    return [int(s) for s in rng.integers(span[0], span[1], size=n, dtype=np.int64)]


def near_miss(prompt: str, rng: np.random.Generator, pool: Sequence[str]) -> str:
    """A prompt of the grammar that differs from ``prompt`` in one count, colour or shape, or by a clause
    dropped or added; a random other prompt of ``pool`` when no such variant in ``pool`` is found."""
    allowed = set(pool)
    clauses = parse_prompt(prompt)
    for _ in range(32):
        cand = list(clauses)
        i = int(rng.integers(len(cand)))
        c = cand[i]
        op = rng.choice(["count", "color", "shape", "clause"])
        if op == "count":
            cand[i] = Clause(int(c.count + rng.choice([-1, 1])), c.color, c.shape)
        elif op == "color":
            cand[i] = Clause(c.count, str(rng.choice([x for x in COLORS if x != c.color])), c.shape)
        elif op == "shape":
            cand[i] = Clause(c.count, c.color, str(rng.choice([s for s in SHAPES if s != c.shape])))
        elif len(cand) == 2:
            cand.pop(i)
        else:
            new = Clause(int(rng.integers(1, 4)), str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)))
            cand.append(new)
        try:
            text = canonical_prompt(format_prompt(cand))
        except ValueError:  # outside the grammar (count 0 or 5, a repeated kind): draw again
            continue
        if text in allowed and text != canonical_prompt(prompt):
            return text
    others = [p for p in pool if p != prompt]
    return str(others[int(rng.integers(len(others)))])


def _box_clear(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Pixel boxes (x0, y0, x1, y1) at least MIN_GAP_PX background pixels apart (as shapes_world places)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) - 1 >= MIN_GAP_PX


def scene_with_extras(prompt: str, extra: int, rng: np.random.Generator) -> np.ndarray:
    """A render of ``prompt``'s scene plus up to ``extra`` more objects of random kinds (placed with the
    world's gaps; fewer when they do not fit)."""
    scene = list(sample_scene(prompt, rng))
    boxes = [o.pixel_bbox() for o in scene]
    for _ in range(extra):
        size = int(rng.integers(MIN_SIZE_PX, MAX_SIZE_PX + 1))
        for _ in range(64):
            x0, y0 = (int(v) for v in rng.integers(BORDER_PX, IMAGE_SIZE - BORDER_PX - size + 1, size=2))
            box = (x0, y0, x0 + size - 1, y0 + size - 1)
            if all(_box_clear(box, b) for b in boxes):
                scene.append(SceneObject(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))),
                                         x0 + size / 2.0, y0 + size / 2.0, float(size)))
                boxes.append(box)
                break
    return render(scene)


def _permute_palette(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = img.copy()
    rgb = np.array(list(COLORS.values()), dtype=np.uint8)
    perm = rng.permutation(len(rgb))
    for src, dst in zip(rgb, rgb[perm]):
        out[(img == src).all(axis=-1)] = dst
    return out


def _jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # mild enough that the background stays background (its channel spread stays below the detector's
    # off-palette ink threshold, CHROMA_MIN = 64)
    gain = rng.uniform(0.92, 1.08, size=3)
    offset = rng.uniform(-10, 10, size=3)
    return np.clip(img.astype(np.float32) * gain + offset, 0, 255).round().astype(np.uint8)


def _hue_rotate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(rng.integers(-30, 31))) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _repaint_off_palette(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One object (a connected component of one palette colour) repainted in an off-palette colour."""
    out = img.copy()
    present = [rgb for rgb in COLORS.values() if (img == rgb).all(axis=-1).any()]
    if not present:
        return out
    mask = (img == present[int(rng.integers(len(present)))]).all(axis=-1).astype(np.uint8)
    n, labels = cv2.connectedComponents(mask, connectivity=8)
    out[labels == int(rng.integers(1, n))] = OFF_PALETTE_RGB[int(rng.integers(len(OFF_PALETTE_RGB)))]
    return out


def _colour(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ops = (_permute_palette, _jitter, _hue_rotate, _repaint_off_palette)
    return ops[int(rng.integers(len(ops)))](img, rng)


def _blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigmaX=float(rng.uniform(0.4, 1.5)), borderType=cv2.BORDER_REPLICATE)


def _noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = img.astype(np.float32) + rng.normal(0.0, rng.uniform(4.0, 25.0), size=img.shape)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def _shift(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    dx, dy = rng.uniform(-2.5, 2.5, size=2)
    m = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]], dtype=np.float32)
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(int(v) for v in BACKGROUND))


PERTURB = {"colour": _colour, "blur": _blur, "noise": _noise, "shift": _shift}


def perturbed_renders(kind: str, prompts: Sequence[str], seeds: Sequence[int],
                      rng: np.random.Generator) -> np.ndarray:
    """Renders with perturbation ``kind``; a third of them also get a second, random blur/noise/shift."""
    images = render_batch(prompts, seeds)
    second = ("blur", "noise", "shift")
    for i in range(len(images)):
        images[i] = PERTURB[kind](images[i], rng)
        if rng.random() < 1 / 3:
            images[i] = PERTURB[second[int(rng.integers(3))]](images[i], rng)
    return images


def wrong_renders(prompts: Sequence[str], seeds: Sequence[int], rng: np.random.Generator,
                  pool: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Half renders of near misses of ``prompts`` (within ``pool``), half scenes with 1-2 extra objects;
    returns the images and what each image was rendered from."""
    images = np.empty((len(prompts), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    shown = []
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        if i % 2 == 0:
            other = near_miss(p, rng, pool)
            images[i] = render_batch([other], [s])[0]
            shown.append(other)
        else:
            images[i] = scene_with_extras(p, int(rng.integers(1, 3)), np.random.default_rng(s))
            shown.append(f"{p} + extras")
    return images, shown


# --------------------------------------------------------------------------------------------
# Model samples and denoised estimates
# --------------------------------------------------------------------------------------------


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def model_samples(model, prompts: Sequence[str], seeds: Sequence[int], steps: int, batch: int,
                  desc: str) -> np.ndarray:
    """uint8 [B, H, W, 3] samples (``steps`` Euler steps, CFG 1), one per (prompt, seed)."""
    out = []
    for start in tqdm(range(0, len(prompts), batch), desc=desc, unit="batch", leave=False):
        out.append(model.generate(list(prompts[start:start + batch]), list(seeds[start:start + batch]),
                                  num_steps=steps, guidance_scale=1.0))
    return np.concatenate(out) if out else np.empty((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


@torch.no_grad()
def denoised_estimates(model, images: np.ndarray, prompts: Sequence[str], rng: np.random.Generator,
                       batch: int, desc: str = "denoised") -> np.ndarray:
    """The base model's k-step (k in {1, 2}) Euler estimates of x0 from x_σ = (1 − σ) x0 + σ ε, σ ~ U(0.3, 1),
    x0 the encoding of ``images``; uint8 [B, H, W, 3]."""
    out = np.empty_like(images)
    sigma_all = rng.uniform(0.3, 1.0, size=len(images))
    k_all = rng.integers(1, 3, size=len(images))
    noise_seeds = rng.integers(0, 2**31, size=len(images))
    for start in tqdm(range(0, len(images), batch), desc=desc, unit="batch", leave=False):
        idx = np.arange(start, min(start + batch, len(images)))
        for k in (1, 2):
            sel = idx[k_all[idx] == k]
            if len(sel):
                out[sel] = _denoise(model, images[sel], [prompts[i] for i in sel], sigma_all[sel], k,
                                    noise_seeds[sel])
    return out


def _denoise(model, images: np.ndarray, prompts: list[str], sigma: np.ndarray, k: int,
             noise_seeds: np.ndarray) -> np.ndarray:
    x0 = model.encode_images(_to_pixels(images))  # [b, C, h, w]
    eps = model.initial_noise([int(s) for s in noise_seeds], tuple(x0.shape[1:]))
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x0.device)  # [b]
    x = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
    cond = model.encode_prompts(prompts)
    for j in range(k):  # uniform grid σ·(1 − j/k), j = 0..k
        hi, lo = s * (1 - j / k), s * (1 - (j + 1) / k)
        x = x + (lo - hi).view(-1, 1, 1, 1) * model.velocity(x, hi, cond).float()
    return model.to_uint8(model.decode(x))


# --------------------------------------------------------------------------------------------
# The training set
# --------------------------------------------------------------------------------------------


def mix_sizes(images: int, with_models: bool) -> dict[str, int]:
    """Images per source; without model samples their share goes to the render sources in proportion."""
    shares = {k: v for k, v in MIX.items() if with_models or k not in MODEL_SOURCES}
    total = sum(shares.values())
    sizes = {k: int(images * v / total) for k, v in shares.items()}
    sizes["clean"] += images - sum(sizes.values())
    return sizes


def _load_models(cfg: RewardModelConfig):
    from diffrl.models.adapter import FlowModel

    base = FlowModel.from_pretrained(cfg.base, device="cpu")
    student = FlowModel.from_pretrained(cfg.student, device="cpu")
    return base, student


def build_training_set(cfg: RewardModelConfig, models,
                       rng: np.random.Generator) -> tuple[np.ndarray, list[str], dict]:
    """uint8 images [N, H, W, 3] from train prompts, the prompt each was made for (the asked one for the
    wrong renders) and the sources' record (sizes, seconds)."""
    pool = train_prompts()
    sizes = mix_sizes(cfg.images, models is not None)
    parts: dict[str, np.ndarray] = {}
    used: dict[str, list[str]] = {}  # the prompts of each source's images
    seconds: dict[str, float] = {}

    def draw(n: int) -> tuple[list[str], list[int]]:
        return [pool[i] for i in rng.integers(len(pool), size=n)], _seeds(rng, n, TRAIN_SEED_RANGE)

    for name, n in sizes.items():
        t0 = time.perf_counter()
        prompts, seeds = draw(n)
        if name == "clean":
            parts[name] = render_batch(prompts, seeds)
        elif name == "wrong":
            parts[name] = wrong_renders(prompts, seeds, rng, pool)[0]
        elif name in PERTURB:
            parts[name] = perturbed_renders(name, prompts, seeds, rng)
        elif name == "base":
            parts[name] = model_samples(models[0], prompts, seeds, cfg.base_steps, cfg.sample_batch,
                                        "base samples")
        elif name == "student":
            parts[name] = model_samples(models[1], prompts, seeds, cfg.student_steps, cfg.sample_batch,
                                        "student samples")
        elif name == "denoised":
            sources, prompts = _denoise_sources(parts.get("base"), used.get("base", []), prompts, seeds)
            parts[name] = denoised_estimates(models[0], sources, prompts, rng, cfg.sample_batch)
        used[name] = prompts
        seconds[name] = round(time.perf_counter() - t0, 1)
        tqdm.write(f"reward-model: {n} {name} images in {seconds[name]:.1f} s")
    prompts = [p for k in sizes for p in used[k]]
    return np.concatenate([parts[k] for k in sizes]), prompts, {"sizes": sizes, "seconds": seconds,
                                                                "order": list(sizes)}


def _denoise_sources(base_samples: np.ndarray | None, base_prompts: list[str], prompts: list[str],
                     seeds: list[int]) -> tuple[np.ndarray, list[str]]:
    """x0 images for the denoised estimates and the prompts that condition them: renders of ``prompts``,
    the second half replaced by base samples (with their own prompts) when there are some."""
    images, prompts = render_batch(prompts, seeds), list(prompts)
    if base_samples is not None and len(base_samples):
        half = len(images) // 2
        take = min(len(images) - half, len(base_samples))
        images[half:half + take] = base_samples[:take]
        prompts[half:half + take] = base_prompts[:take]
    return images, prompts


def label_and_filter(images: np.ndarray, prompts: list[str],
                     record: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Detector labels (capped at MAX_COUNT), minus the images that show an eval prompt's composition."""
    counts = detected_counts(images)
    strict = (counts == reward_cnn.want_counts(prompts).numpy()).all(1)
    banned = _eval_compositions()
    keep = np.array([tuple(int(v) for v in row) not in banned for row in counts], dtype=bool)
    source = np.repeat(np.arange(len(record["order"])), [record["sizes"][k] for k in record["order"]])
    order = record["order"]
    record["dropped_eval_compositions"] = {k: int((~keep[source == i]).sum()) for i, k in enumerate(order)}
    record["kept"] = int(keep.sum())
    record["detector_strict_vs_prompt"] = {k: _r(float(strict[source == i].mean())) if (source == i).any()
                                           else None for i, k in enumerate(order)}
    kept_counts = counts[keep]
    record["label_stats"] = {
        "objects_per_image": {str(n): int(v) for n, v in
                              enumerate(np.bincount(np.minimum(kept_counts.sum(1), 8), minlength=9))},
        "with_other": int((kept_counts[:, OTHER_INDEX] > 0).sum()),
        "slot_at_cap": int((kept_counts >= MAX_COUNT).any(1).sum()),
    }
    return images[keep], np.minimum(counts[keep], MAX_COUNT), record


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _lr_factor(step: int, total: int, elapsed: float, budget: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay over whichever of steps and time budget runs out first."""
    if step < warmup:
        return (step + 1) / warmup
    progress = step / max(total, 1)
    if budget > 0:
        progress = max(progress, elapsed / budget)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def slot_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the 13 slots, averaged over images: logits ``[B, 13, 6]``, labels
    ``[B, 13]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum") / len(labels)


def adversarial_images(net: ShapesRewardNet, x: torch.Tensor, labels: torch.Tensor, eps: float,
                       steps: int) -> torch.Tensor:
    """L2 projected gradient ascent on ``slot_loss`` from ``x`` ``[B, 3, H, W]`` in [0, 1]: each image
    moves at most ``eps`` (L2) and stays in [0, 1]. The network runs in eval mode (BatchNorm's
    running statistics, as the reward is used) and its weights get no gradient."""
    was_training = net.training
    net.eval()
    step_size = 2.5 * eps / steps
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(slot_loss(net(x + delta), labels), delta)
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = delta.detach() + step_size * grad / norm
        scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0).view(-1, 1, 1, 1)
        delta = ((x + delta * scale).clamp(0.0, 1.0) - x).detach()
    net.train(was_training)
    return x + delta


def train_net(cfg: RewardModelConfig, images: np.ndarray, labels: np.ndarray) -> tuple[ShapesRewardNet, dict]:
    """AdamW on cross-entropy summed over the 13 slots; random horizontal flips (which change no
    detector label: the shapes are left-right symmetric); with ``adv_eps`` > 0, L2 adversarial
    training on a share of each batch (``adversarial_images``)."""
    torch.manual_seed(cfg.seed)
    net = ShapesRewardNet(cfg.net)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, H, W]
    y_all = torch.from_numpy(labels).long()
    steps_per_epoch = max(1, len(x_all) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    warmup = min(100, total // 10 + 1)
    t0, step, history = time.perf_counter(), 0, []
    bar = tqdm(total=total, desc="train reward cnn", unit="step")
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x_all), generator=gen)
        loss_sum = right_sum = seen = 0.0
        for b in range(steps_per_epoch):
            elapsed = time.perf_counter() - t0
            if cfg.time_budget_s and elapsed > cfg.time_budget_s:
                break
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x = x_all[idx].float() / 255.0
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, total, elapsed, cfg.time_budget_s, warmup)
            if cfg.adv_eps > 0:
                n_adv = max(1, round(cfg.adv_fraction * len(idx)))
                x = torch.cat([adversarial_images(net, x[:n_adv], y_all[idx[:n_adv]], cfg.adv_eps,
                                                  cfg.adv_steps), x[n_adv:]])
            logits = net(x)
            loss = slot_loss(logits, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            right_sum += float((logits.argmax(-1) == y_all[idx]).all(-1).sum())
            seen += len(idx)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", epoch=epoch)
        if seen:
            history.append({"epoch": epoch, "loss": round(loss_sum / seen, 4),
                            "all_slots_right": round(right_sum / seen, 4), "steps": step,
                            "seconds": round(time.perf_counter() - t0, 1)})
            tqdm.write(f"reward-model: epoch {epoch}: loss {history[-1]['loss']:.4f}, all slots right "
                       f"{history[-1]['all_slots_right']:.3f} ({history[-1]['seconds']:.0f} s)")
        if cfg.time_budget_s and time.perf_counter() - t0 > cfg.time_budget_s:
            break
    bar.close()
    net.eval()
    return net, {"steps": step, "planned_steps": total, "seconds": round(time.perf_counter() - t0, 1),
                 "epochs": history}


# --------------------------------------------------------------------------------------------
# Held-out figures
# --------------------------------------------------------------------------------------------


def held_out_sets(cfg: RewardModelConfig, models,
                  rng: np.random.Generator) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Per held-out set: uint8 images and the prompt each is scored against (EVAL prompts, fresh seeds)."""
    prompts = [p for p in eval_prompts() for _ in range(cfg.eval_seeds)]
    sets: dict[str, tuple[np.ndarray, list[str]]] = {}
    sets["clean"] = (render_batch(prompts, _seeds(rng, len(prompts), EVAL_SEED_RANGE)), prompts)
    wrong = [near_miss(p, rng, eval_prompts()) if i % 2 == 0 else near_miss(p, rng, all_prompts())
             for i, p in enumerate(prompts)]  # half near misses among eval prompts, half among all prompts
    sets["wrong"] = (render_batch(wrong, _seeds(rng, len(prompts), EVAL_SEED_RANGE)), prompts)
    if models is not None:
        sets["base"] = (model_samples(models[0], prompts, _seeds(rng, len(prompts), EVAL_SEED_RANGE),
                                      cfg.base_steps, cfg.sample_batch, "held-out base samples"), prompts)
        sets["student"] = (model_samples(models[1], prompts, _seeds(rng, len(prompts), EVAL_SEED_RANGE),
                                         cfg.student_steps, cfg.sample_batch, "held-out student samples"),
                          prompts)
        renders = render_batch(prompts, _seeds(rng, len(prompts), EVAL_SEED_RANGE))
        sets["denoised"] = (denoised_estimates(models[0], renders, prompts, rng, cfg.sample_batch,
                                               "held-out denoised"), prompts)
    return sets


def _rank(a: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.arange(1, len(a) + 1)
    _, inv = np.unique(a, return_inverse=True)
    return (np.bincount(inv, ranks) / np.bincount(inv))[inv]


def correlations(reward: np.ndarray, strict: np.ndarray) -> dict[str, float | None]:
    """Pearson and Spearman correlation, and ROC AUC, of the reward with the detector's strict (None
    where undefined: one class only)."""
    if len(reward) < 2 or strict.min() == strict.max():
        return {"pearson": None, "spearman": None, "auc": None}
    pearson = float(np.corrcoef(reward, strict)[0, 1]) if reward.std() > 0 else None
    rr, rs = _rank(reward), _rank(strict)
    spearman = float(np.corrcoef(rr, rs)[0, 1]) if rr.std() > 0 else None
    pos = strict > 0.5
    auc = (rr[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())
    return {"pearson": _r(pearson), "spearman": _r(spearman), "auc": _r(float(auc))}


def _r(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(v, nd)


@torch.no_grad()
def _net_outputs(net: ShapesRewardNet, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, ...]:
    rewards, pred, counts = [], [], []
    for start in range(0, len(images), 512):
        x = _to_pixels(images[start:start + 512])
        p = prompts[start:start + 512]
        logp = net.log_reward(x, p)
        rewards.append(logp.exp().numpy())
        pred.append(net.predicted_strict(x, p).numpy())
        counts.append(net.predict_counts(x).numpy())
    return np.concatenate(rewards), np.concatenate(pred), np.concatenate(counts)


def evaluate_net(net: ShapesRewardNet, sets: dict[str, tuple[np.ndarray, list[str]]]) -> dict:
    """Agreement with the detector per held-out set, per-slot count accuracy, reward correlations."""
    out: dict = {"sets": {}}
    slot_right = np.zeros(NUM_SLOTS)
    n_all = 0
    model_r, model_s = [], []
    for name, (images, prompts) in sets.items():
        strict = np.array([s.strict for s in detector.score_batch(images, prompts)], dtype=np.float64)
        truth = np.minimum(detected_counts(images), MAX_COUNT)
        prob, pred, counts = _net_outputs(net, images, prompts)
        agree = pred == (strict > 0.5)
        slot_right += (counts == truth).sum(0)
        n_all += len(images)
        out["sets"][name] = {
            "images": len(images), "agreement": _r(float(agree.mean())),
            "detector_strict": _r(float(strict.mean())), "predicted_strict": _r(float(pred.mean())),
            "false_pass": int((pred & (strict < 0.5)).sum()),
            "false_fail": int((~pred & (strict > 0.5)).sum()),
            "all_counts_right": _r(float((counts == truth).all(1).mean())),
            "mean_reward": _r(float(prob.mean())),
            **({"correlation": correlations(prob, strict)} if name in MODEL_SOURCES else {}),
        }
        if name in ("base", "student"):
            model_r.append(prob)
            model_s.append(strict)
    out["slot_accuracy"] = {k: _r(float(v / max(n_all, 1))) for k, v in zip(reward_cnn.KINDS, slot_right)}
    if model_r:
        out["model_samples_correlation"] = correlations(np.concatenate(model_r), np.concatenate(model_s))
    return out


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def export_onnx(net: ShapesRewardNet, path: Path) -> dict:
    """model.onnx (image [B, 3, H, W] in [0, 1] -> logits [B, 13, 6]; batch, height and width dynamic) by
    torch's TorchScript exporter (no onnxscript needed), checked against torch with onnxruntime; a record
    of what happened (skipped with the reason when the exporter fails)."""
    import copy

    t0 = time.perf_counter()
    model = copy.deepcopy(net).eval()
    dummy = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    check = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE)  # another batch size: the batch axis is dynamic
    try:
        with warnings.catch_warnings():  # the tracer warns about the input-shape checks (constant here)
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (dummy,), str(path), input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                            "logits": {0: "batch"}},
                              opset_version=17, dynamo=False)
        import onnxruntime as ort

        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"image": check.numpy()})[0]
        # compare count probabilities: the logits reach -1e4 (sharp bells), where float32 rounding is ~1e-3
        err = float((torch.from_numpy(got).softmax(-1) - model(check).detach().softmax(-1)).abs().max())
    except Exception as exc:  # noqa: BLE001 - the export is optional: report why it was skipped
        path.unlink(missing_ok=True)
        return {"written": False, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return {"written": True, "file": path.name, "max_prob_diff_vs_torch": err,
            "seconds": round(time.perf_counter() - t0, 1)}


def train_reward_model(cfg: RewardModelConfig) -> dict:
    """Build the data, train, evaluate on held-out eval prompts, write ``cfg.out``; returns training.json."""
    cfg.validate()
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    cv2.setNumThreads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    models = _load_models(cfg) if cfg.model_samples else None
    images, prompts, record = build_training_set(cfg, models, rng)
    t_data = time.perf_counter()
    images, labels, record = label_and_filter(images, prompts, record)
    record["label_seconds"] = round(time.perf_counter() - t_data, 1)
    net, train_record = train_net(cfg, images, labels)
    t_eval = time.perf_counter()
    figures = evaluate_net(net, held_out_sets(cfg, models, np.random.default_rng(cfg.seed + 1)))
    figures["seconds"] = round(time.perf_counter() - t_eval, 1)
    out = Path(cfg.out)
    net.save_pretrained(out)
    onnx = (export_onnx(net, out / "model.onnx") if cfg.onnx
            else {"written": False, "reason": "not asked (--onnx)"})
    report = {
        "command": cfg.command(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.perf_counter() - t_start, 1),
        "threads": cfg.threads, "torch": torch.__version__,
        "parameters": sum(p.numel() for p in net.parameters()),
        "config": {**asdict(cfg), "net": cfg.net.to_dict()},
        "dataset": {**record, "data_seconds": round(t_data - t_start, 1), "prompts": "train split only",
                    "labels": "detector counts per slot on each image, capped at 5"},
        "training": train_record,
        "held_out": {"prompts": "eval split", "per_prompt": cfg.eval_seeds, **figures},
        "onnx": onnx,
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _print_summary(report: dict) -> None:
    held = report["held_out"]
    print(f"saved the reward model to {report['config']['out']} ({report['parameters']} parameters, "
          f"{report['seconds']:.0f} s)")
    print("held-out agreement with the detector's strict (eval prompts, fresh seeds):")
    for name, s in held["sets"].items():
        corr = s.get("correlation", {})
        extra = f"  spearman {corr['spearman']}" if corr.get("spearman") is not None else ""
        print(f"  {name:<9} {s['agreement']:.3f}  (detector strict {s['detector_strict']:.3f}, "
              f"predicted {s['predicted_strict']:.3f}, {s['images']} images){extra}")
    slots = held["slot_accuracy"]
    values = list(slots.values())
    print(f"  per-slot count accuracy: min {min(values):.3f}, mean {np.mean(values):.3f}")
    if not report["onnx"]["written"]:
        print(f"  no model.onnx: {report['onnx']['reason']}")


def cmd_reward_model(args: argparse.Namespace) -> int:
    net = RewardNetConfig(score=args.score)
    cfg = RewardModelConfig(
        out=args.out, base=args.base, student=args.student, images=args.images,
        model_samples=not args.no_model_samples, base_steps=args.base_steps, student_steps=args.student_steps,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        time_budget_s=args.time_budget_s, eval_seeds=args.eval_seeds, seed=args.seed, threads=args.threads,
        adv_eps=args.adv_eps, adv_steps=args.adv_steps, adv_fraction=args.adv_fraction, onnx=args.onnx, net=net)
    if cfg.model_samples:
        for name in ("base", "student"):
            path = _resolve_model(getattr(cfg, name))
            if not (Path(path) / "model_index.json").is_file():
                raise ConfigError(name, f"{getattr(cfg, name)!r} is not a model folder (no "
                                        "model_index.json); give --base/--student or --no-model-samples")
            setattr(cfg, name, path)
    _print_summary(train_reward_model(cfg))
    return 0


def _resolve_model(path: str) -> str:
    from diffrl.models.adapter import resolve_model_path

    return resolve_model_path(path)


def register(sub) -> None:
    """Add ``reward-model`` to the ``diffrl`` subcommands."""
    d = RewardModelConfig()
    p = sub.add_parser(
        "reward-model", help="train the differentiable shapes-world reward (a small counting CNN)",
        description="Train models/reward_cnn.py's ShapesRewardNet to count the objects of each (colour, "
                    "shape) kind as the exact detector does, on ~30k detector-labelled images of TRAIN "
                    "prompts: renders, perturbed renders (wrong prompts, extra objects, colour changes, "
                    "blur, noise, shifts), base and one-step-student samples, and the base's short-step "
                    "denoised estimates at high noise. Writes OUT/config.json, OUT/model.safetensors and "
                    "OUT/training.json (the command, time, data mix and held-out agreement with the detector "
                    "on EVAL prompts). "
                    "With --onnx also OUT/model.onnx. About 7 minutes on 2 CPU cores with the defaults. "
                    "docs/shapes_world.md, "
                    "\"The differentiable reward model\".",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=d.out, metavar="DIR", help="output folder")
    p.add_argument("--base", default=d.base, metavar="DIR", help="base model (samples, denoised estimates)")
    p.add_argument("--student", default=d.student, metavar="DIR", help="one-step student (samples)")
    p.add_argument("--images", type=int, default=d.images, help="training images in all")
    p.add_argument("--no-model-samples", action="store_true",
                   help="renders only: no base/student samples or denoised estimates (no model is loaded)")
    p.add_argument("--base-steps", type=int, default=d.base_steps, help="Euler steps of the base's samples")
    p.add_argument("--student-steps", type=int, default=d.student_steps,
                   help="Euler steps of the student's samples")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training images")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--time-budget-s", type=float, default=d.time_budget_s,
                   help="most seconds of the training loop (0 = none); the cosine schedule follows it")
    p.add_argument("--eval-seeds", type=int, default=d.eval_seeds,
                   help="held-out images per eval prompt (63 prompts) in each held-out set")
    p.add_argument("--score", choices=reward_cnn.SCORES, default=d.net.score,
                   help="what the saved model's reward() returns: P(strict) or log P(strict)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data, weights and batches")
    p.add_argument("--threads", type=int, default=d.threads, help="torch and OpenCV CPU threads")
    p.add_argument("--adv-eps", type=float, default=d.adv_eps,
                   help="L2 radius (on [0, 1] pixels) of adversarial training, 0 = off: a robust network's "
                        "gradient is perceptually aligned, which reward-gradient algorithms (DIDR) need")
    p.add_argument("--adv-steps", type=int, default=d.adv_steps, help="projected-gradient steps per example")
    p.add_argument("--adv-fraction", type=float, default=d.adv_fraction,
                   help="share of each batch replaced by adversarial examples")
    p.add_argument("--onnx", action="store_true", help="also write OUT/model.onnx (image -> count logits)")
    p.set_defaults(func=cmd_reward_model)

