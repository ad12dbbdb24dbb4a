"""Few-step and one-step students of a flow model (``diffrl distill``): teacher ODE rollouts, then
per-segment regression onto the teacher's secants.

Method (cited; the choices are ours where marked):

* **Teacher rollouts.** The teacher (the base model) integrates its probability-flow ODE with
  ``teacher_steps`` Euler steps at CFG ``teacher_guidance`` from x_1 = z (the initial noise of a
  seed) and keeps its states at every level of the students' grids (each student grid must be a
  subset of the teacher's: ``teacher_steps`` divisible by the student's steps). This is the
  data-generation step of Knowledge Distillation for diffusion (Luhman & Luhman 2021, arXiv
  2101.02388) and of rectified-flow distillation (Liu et al. 2022, arXiv 2209.03003, "k-step"
  distillation of a 1-rectified flow): pairs (x_{σ_k}, x_{σ_{k+1}}) of one deterministic teacher
  trajectory.
* **Segment regression.** A student with S steps samples on σ_k = 1 − k/S (shifted like the
  teacher's), k = 0..S, with plain Euler steps x_{k+1} = x_k + (σ_{k+1} − σ_k)·v_θ(x_k, σ_k). It is
  initialised from the teacher's weights and trained so that one Euler step reproduces the teacher's
  segment: L = E_{z, c, k} ‖v_θ(x^T_{σ_k}, σ_k, c) − (x^T_{σ_{k+1}} − x^T_{σ_k})/(σ_{k+1} − σ_k)‖²,
  x^T the teacher's states. For S = 1 this is ‖(z − v_θ(z, 1)) − x^T_0‖², the one-step map onto the
  teacher's sample (Luhman & Luhman; InstaFlow's distillation stage, Liu et al. 2023, arXiv
  2309.06380, with an L2 instead of LPIPS: ours, no pretrained perceptual net may be downloaded).
  The student is trained on the teacher's states, not its own (ours: the teacher's states are
  precomputed once, so the whole distillation fits a CPU budget; the exposure gap is what the held-out
  teacher-matching error measures).
* **No distribution-matching polish** (DMD2 / TDM's fake-score stage) in this command: the students
  are the starting points of SDPO / TDM-R1 / DIDR, and TDM-R1 and DIDR train a fake score themselves.

The student keeps the teacher's text encoders (only the denoiser is trained: all its weights, or LoRA
adapters on its attention, merged into the saved weights) and is saved as a complete diffusers
pipeline with ``student.json`` (its σ grid, how it was made, its figures). The run resumes: state is
kept in ``<output>.distill/`` (the rollouts, and each student's weights, EMA, optimizer and clock) and
the same command continues where it stopped.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffrl.config import require
from diffrl.models.adapter import FlowModel
from diffrl.models.lora import LoraConfig, inject_lora
from diffrl.models.pretrain import lr_factor

STUDENT_FILE = "student.json"
"""What a student folder says about itself: ``num_steps``, ``sigmas``, the teacher, the method, figures."""


@dataclass
class DistillConfig:
    teacher: str = "assets/shapes-base-3k"
    """The base model (a local diffusers pipeline folder) the students learn from."""
    output: str = "assets/shapes-student"
    """Students are written to ``<output>-<S>step`` (diffusers format); work state to ``<output>.distill``."""
    student_steps: list[int] = field(default_factory=lambda: [4, 1])
    """Sampling steps of each student to make (in this order)."""
    prompts: str = "shapes:train"
    """Prompts of the teacher rollouts: a built-in set or a .txt/.jsonl file (as data.train)."""
    teacher_steps: int = 20
    """Euler steps of the teacher's ODE (every student's step count must divide it)."""
    teacher_guidance: float = 1.0
    """CFG scale of the teacher's rollouts (1.0 = the plain model; the students then sample at CFG 1)."""
    shift: float = 1.0
    """σ-schedule shift of teacher and students (the model's scheduler shift; SD3.5: 3.0)."""
    num_rollouts: int = 4096
    """Teacher trajectories to train on (each: a random training prompt and a fresh seed)."""
    eval_rollouts: int = 256
    """Held-out teacher trajectories (other seeds) for the teacher-matching error."""
    rollout_batch: int = 128
    """Images per teacher forward while rolling out."""
    max_steps: int = 3000
    """Optimizer steps per student at most (each also stops at time_budget_s)."""
    time_budget_s: float = 540.0
    """Wall-clock budget of each student's training loop, seconds (resumed runs count what was spent)."""
    batch_size: int = 64
    """(trajectory, segment) pairs per optimizer step."""
    lr: float = 5e-4
    """Peak AdamW learning rate (linear warm-up, then cosine decay over the budget)."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping."""
    ema_decay: float = 0.998
    """Decay of the EMA of the student's weights that is saved (warmed up as (1 + s)/(10 + s))."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Train LoRA adapters (merged into the saved student) instead of every denoiser weight."""
    device: str = "auto"
    """Torch device: auto, cpu, cuda[:N]."""
    max_sequence_length: int = 256
    """T5 tokens per prompt for pipelines with a T5 encoder (as model.max_sequence_length)."""
    resolution: int = 0
    """Image side in pixels (0 = the model's default), as model.resolution."""
    checkpoint_every_s: float = 60.0
    """Seconds between saves of a student's training state (for resuming)."""
    seed: int = 0
    """Seed of rollout prompts and noise, segment sampling and initialisation of adapters."""
    num_threads: int = 0
    """Torch CPU threads; 0 = all cores."""

    def validate(self) -> None:
        require(bool(self.student_steps) and all(s >= 1 for s in self.student_steps), "student_steps",
                "a non-empty list of step counts >= 1", self.student_steps)
        require(len(set(self.student_steps)) == len(self.student_steps), "student_steps", "distinct counts",
                self.student_steps)
        require(self.teacher_steps >= 1, "teacher_steps", "an int >= 1", self.teacher_steps)
        for s in self.student_steps:
            require(self.teacher_steps % s == 0, "teacher_steps",
                    f"a multiple of every student's steps (the students' levels lie on the teacher's grid; "
                    f"{s} does not divide it)", self.teacher_steps)
        require(self.teacher_guidance >= 0, "teacher_guidance", "a float >= 0", self.teacher_guidance)
        require(self.shift > 0, "shift", "a float > 0", self.shift)
        require(self.num_rollouts >= 1, "num_rollouts", "an int >= 1", self.num_rollouts)
        require(self.eval_rollouts >= 1, "eval_rollouts", "an int >= 1", self.eval_rollouts)
        require(self.rollout_batch >= 1, "rollout_batch", "an int >= 1", self.rollout_batch)
        require(self.max_steps >= 1, "max_steps", "an int >= 1", self.max_steps)
        require(self.time_budget_s > 0, "time_budget_s", "seconds > 0", self.time_budget_s)
        require(self.batch_size >= 1, "batch_size", "an int >= 1", self.batch_size)
        require(self.lr > 0, "lr", "a float > 0", self.lr)
        require(0 <= self.ema_decay < 1, "ema_decay", "a float in [0, 1)", self.ema_decay)
        require(self.checkpoint_every_s > 0, "checkpoint_every_s", "seconds > 0", self.checkpoint_every_s)
        self.lora.validate()

    def student_path(self, steps: int) -> Path:
        return Path(f"{self.output}-{steps}step")

    @property
    def work_dir(self) -> Path:
        return Path(f"{self.output}.distill")


# ----------------------------------------------------------------------------------- the grids


def level_indices(teacher_steps: int, student_steps: int) -> list[int]:
    """Indices into the teacher's levels ``[teacher_steps + 1]`` of a student's levels ``[S + 1]``."""
    stride = teacher_steps // student_steps
    return [k * stride for k in range(student_steps + 1)]


def segment_targets(states: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The teacher's secant velocities of a student's segments: ``states [N, S + 1, C, H, W]`` at levels
    ``sigmas [S + 1]`` -> ``[N, S, C, H, W]``, (x_{k+1} − x_k)/(σ_{k+1} − σ_k)."""
    d_sigma = (sigmas[1:] - sigmas[:-1]).to(states.dtype)  # [S] < 0
    return (states[:, 1:] - states[:, :-1]) / d_sigma.view(1, -1, 1, 1, 1)  # [N, S, C, H, W]


def segment_loss(v_student: torch.Tensor, x_k: torch.Tensor, x_next: torch.Tensor, sigma: torch.Tensor,
                 sigma_next: torch.Tensor) -> torch.Tensor:
    """Mean ‖v_θ(x_k, σ_k) − (x_{k+1} − x_k)/(σ_{k+1} − σ_k)‖² per element over a batch ``[B, C, H, W]``;
    ``sigma``, ``sigma_next`` ``[B]``."""
    d_sigma = (sigma_next - sigma).view(-1, 1, 1, 1).to(x_k.dtype)  # [B, 1, 1, 1]
    return torch.mean((v_student.float() - (x_next - x_k) / d_sigma) ** 2)


# ----------------------------------------------------------------------------------- rollouts


@dataclass
class Rollouts:
    """Teacher trajectories kept at the levels the students need."""

    prompts: list[str]
    seeds: torch.Tensor  # [N] int64
    levels: list[int]  # teacher level indices kept, ascending
    states: torch.Tensor  # [N, len(levels), C, H, W] float32 (or float16 on disk)

    def at(self, teacher_levels: list[int]) -> torch.Tensor:
        """States at the given teacher level indices: ``[N, len(teacher_levels), C, H, W]`` float32."""
        cols = [self.levels.index(i) for i in teacher_levels]
        return self.states[:, cols].float()


@torch.no_grad()
def teacher_rollouts(model: FlowModel, prompts: list[str], seeds: list[int], cfg: DistillConfig, levels: list[int],
                     desc: str, progress: bool = True) -> Rollouts:
    """Euler ODE of the teacher at ``cfg.teacher_steps`` (CFG ``cfg.teacher_guidance``), keeping the states
    at teacher level indices ``levels``."""
    sigmas = model.sigmas(cfg.teacher_steps, cfg.shift).to(model.device)  # [T + 1]
    kept = []
    bar = tqdm(total=len(prompts), desc=desc, unit="img", disable=not progress)
    for start in range(0, len(prompts), cfg.rollout_batch):
        chunk = prompts[start:start + cfg.rollout_batch]
        x = model.initial_noise(seeds[start:start + cfg.rollout_batch]).float()  # [b, C, H, W]
        cond = model.encode_prompts(chunk)
        uncond = model.empty_embeds(len(chunk)) if cfg.teacher_guidance != 1.0 else None
        states = {0: x.cpu()}
        for i in range(cfg.teacher_steps):
            sigma = sigmas[i].expand(len(chunk))  # [b]
            v = model.guided_velocity(x, sigma, cond, cfg.teacher_guidance, None, uncond).float()
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            if i + 1 in levels:
                states[i + 1] = x.cpu()
        kept.append(torch.stack([states[i] for i in levels], dim=1))  # [b, L, C, H, W]
        bar.update(len(chunk))
    bar.close()
    return Rollouts(list(prompts), torch.tensor(seeds, dtype=torch.int64), list(levels), torch.cat(kept))


@torch.no_grad()
def euler_sample(model: FlowModel, denoiser, prompts: list[str], noise: torch.Tensor, sigmas: torch.Tensor,
                 batch: int = 256) -> torch.Tensor:
    """Euler ODE from ``noise [N, C, H, W]`` on ``sigmas [S + 1]`` with ``denoiser`` at CFG 1 -> x0 [N, ...]."""
    out = []
    for start in range(0, len(prompts), batch):
        x = noise[start:start + batch].to(model.device).float()
        cond = model.encode_prompts(prompts[start:start + batch])
        for i in range(len(sigmas) - 1):
            v = model.velocity(x, sigmas[i].expand(len(x)).to(model.device), cond, denoiser).float()
            x = x + float(sigmas[i + 1] - sigmas[i]) * v
        out.append(x.cpu())
    return torch.cat(out)


def teacher_match_error(model: FlowModel, denoiser, held_out: Rollouts, steps: int, cfg: DistillConfig) -> float:
    """Mean squared error per element between ``denoiser``'s ``steps``-step Euler samples and the teacher's
    ``teacher_steps``-step samples from the same initial noise (held-out seeds)."""
    sigmas = model.sigmas(steps, cfg.shift)  # [S + 1]
    x0 = euler_sample(model, denoiser, held_out.prompts, held_out.at([0])[:, 0], sigmas, cfg.rollout_batch)
    target = held_out.at([cfg.teacher_steps])[:, 0]  # [N, C, H, W]
    return float(torch.mean((x0 - target) ** 2))


# ----------------------------------------------------------------------------------- training


def _trainable(denoiser: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in denoiser.parameters() if p.requires_grad]


def make_student(model: FlowModel, cfg: DistillConfig, seed: int) -> torch.nn.Module:
    """A trainable copy of the teacher's denoiser (all weights, or LoRA adapters on a frozen copy)."""
    student = copy.deepcopy(model.transformer).float().train()
    if cfg.lora.enabled:
        torch.manual_seed(seed)
        student.requires_grad_(False)
        inject_lora(student, cfg.lora)
        for name, p in student.named_parameters():
            p.requires_grad_(".lora_" in name)
    else:
        student.requires_grad_(True)
    return student


def merged_denoiser(model: FlowModel, student: torch.nn.Module, cfg: DistillConfig) -> torch.nn.Module:
    """The student as a plain denoiser of the teacher's architecture (LoRA adapters merged in with peft's
    ``merge``: W + (alpha/r)·B·A)."""
    if not cfg.lora.enabled:
        return student
    from peft.tuners.lora import LoraLayer

    work = copy.deepcopy(student)
    for module in work.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    state = {k.replace(".base_layer.", "."): v for k, v in work.state_dict().items() if ".lora_" not in k}
    plain = copy.deepcopy(model.transformer).float()
    plain.load_state_dict(state, strict=True)
    return plain


@dataclass
class StudentState:
    """A student's training state (saved for resuming)."""

    step: int = 0
    elapsed: float = 0.0
    losses: list[float] = field(default_factory=list)


def _state_path(cfg: DistillConfig, steps: int) -> Path:
    return cfg.work_dir / f"student-{steps}step.pt"


def _save_state(path: Path, student, ema, opt, state: StudentState, rng: np.random.Generator) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"student": student.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "state": asdict(state), "rng": rng.bit_generator.state}, tmp)
    tmp.replace(path)  # atomic: a killed save leaves the previous state


def train_student(model: FlowModel, rollouts: Rollouts, steps: int, cfg: DistillConfig,
                  progress: bool = True) -> tuple[torch.nn.Module, StudentState]:
    """Segment regression of a ``steps``-step student on ``rollouts`` (resumes from the work folder)."""
    levels = level_indices(cfg.teacher_steps, steps)
    states = rollouts.at(levels)  # [N, S + 1, C, H, W]
    sigmas = model.sigmas(cfg.teacher_steps, cfg.shift)[levels]  # [S + 1]
    student = make_student(model, cfg, cfg.seed + steps)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    params = _trainable(student)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    rng = np.random.default_rng([cfg.seed, steps])
    state = StudentState()
    path = _state_path(cfg, steps)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        student.load_state_dict(saved["student"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        state = StudentState(**{k: v for k, v in saved["state"].items() if k in ("step", "elapsed", "losses")})
        rng.bit_generator.state = saved["rng"]
        tqdm.write(f"distill: resuming the {steps}-step student at step {state.step} ({state.elapsed:.0f} s spent)")
    bar = tqdm(total=int(cfg.time_budget_s), initial=int(state.elapsed), desc=f"{steps}-step student", unit="s",
               disable=not progress, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s {postfix}")
    start, last_save = time.time() - state.elapsed, time.time()
    while state.step < cfg.max_steps and (elapsed := time.time() - start) < cfg.time_budget_s:
        idx = rng.integers(len(states), size=cfg.batch_size)
        seg = torch.from_numpy(rng.integers(steps, size=cfg.batch_size))  # [B] segment k
        rows = torch.from_numpy(idx)
        x_k, x_next = states[rows, seg], states[rows, seg + 1]  # [B, C, H, W]
        sigma, sigma_next = sigmas[seg].float(), sigmas[seg + 1].float()  # [B]
        cond = model.encode_prompts([rollouts.prompts[i] for i in idx])
        v = model.velocity(x_k, sigma, cond, student)
        loss = segment_loss(v, x_k.to(v.device), x_next.to(v.device), sigma.to(v.device), sigma_next.to(v.device))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(state.step, elapsed, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + state.step) / (10 + state.step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), student.parameters()):
                e.lerp_(p, 1 - decay)
        state.losses.append(loss.item())
        state.step += 1
        if state.step % 10 == 0:
            bar.n = min(int(time.time() - start), int(cfg.time_budget_s))
            bar.set_postfix(step=state.step, loss=f"{np.mean(state.losses[-20:]):.4f}")
        if time.time() - last_save > cfg.checkpoint_every_s:
            state.elapsed = time.time() - start
            _save_state(path, student, ema, opt, state, rng)
            last_save = time.time()
    bar.close()
    state.elapsed = time.time() - start
    _save_state(path, student, ema, opt, state, rng)
    return ema, state


# ----------------------------------------------------------------------------------- the command


def _rollout_plan(cfg: DistillConfig, prompts: list[str]) -> tuple[list[str], list[int], list[str], list[int]]:
    """Train and held-out (prompt, seed) lists of the teacher rollouts (disjoint seed ranges)."""
    rng = np.random.default_rng(cfg.seed)
    train_p = [prompts[i] for i in rng.integers(len(prompts), size=cfg.num_rollouts)]
    train_s = [int(s) for s in rng.integers(2**30, size=cfg.num_rollouts)]
    eval_p = [prompts[i] for i in rng.integers(len(prompts), size=cfg.eval_rollouts)]
    eval_s = [2**30 + int(s) for s in rng.integers(2**30, size=cfg.eval_rollouts)]  # never a training seed
    return train_p, train_s, eval_p, eval_s


def _load_or_roll(model: FlowModel, cfg: DistillConfig, name: str, prompts, seeds, levels, progress) -> Rollouts:
    path = cfg.work_dir / f"{name}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        same = saved["prompts"] == list(prompts) and saved["levels"] == list(levels)
        if same and saved["seeds"].tolist() == list(seeds):
            return Rollouts(saved["prompts"], saved["seeds"], saved["levels"], saved["states"])
    r = teacher_rollouts(model, prompts, seeds, cfg, levels, f"teacher rollouts ({name})", progress)
    tmp = path.with_suffix(".tmp")
    torch.save({"prompts": r.prompts, "seeds": r.seeds, "levels": r.levels, "states": r.states}, tmp)
    tmp.replace(path)
    return r


def distill(cfg: DistillConfig, prompts: list[str], progress: bool = True, command: str = "") -> dict:
    """Make every student of ``cfg.student_steps`` from teacher rollouts on ``prompts`` (``cfg.prompts``
    loaded by the caller) and save each to ``cfg.student_path(S)``. Returns, per student, its training
    stats and held-out teacher-matching errors (student and teacher at 1, 2 and S steps)."""
    cfg.validate()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t0 = time.time()
    model = FlowModel.from_pretrained(cfg.teacher, device=cfg.device, max_sequence_length=cfg.max_sequence_length,
                                      resolution=cfg.resolution)
    model.transformer.requires_grad_(False).eval()
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    levels = sorted({i for s in cfg.student_steps for i in level_indices(cfg.teacher_steps, s)})
    train_p, train_s, eval_p, eval_s = _rollout_plan(cfg, list(prompts))
    rollouts = _load_or_roll(model, cfg, "rollouts", train_p, train_s, levels, progress)
    held_out = _load_or_roll(model, cfg, "held_out", eval_p, eval_s, [0, cfg.teacher_steps], progress)
    rollout_s = time.time() - t0
    report: dict = {"teacher": cfg.teacher, "rollout_seconds": round(rollout_s, 1), "students": {}}
    for steps in cfg.student_steps:
        t = time.time()
        student, state = train_student(model, rollouts, steps, cfg, progress)
        plain = merged_denoiser(model, student, cfg).eval()
        figures = {f"teacher_match_mse_{s}": {
            "student": teacher_match_error(model, plain, held_out, s, cfg),
            "base": teacher_match_error(model, model.transformer, held_out, s, cfg)} for s in sorted({1, 2, steps})}
        info = {"num_steps": steps, "sigmas": [round(float(x), 6) for x in model.sigmas(steps, cfg.shift)],
                "shift": cfg.shift, "guidance_scale": 1.0, "teacher": cfg.teacher,
                "teacher_steps": cfg.teacher_steps, "teacher_guidance": cfg.teacher_guidance,
                "method": "segment regression onto teacher ODE secants (models/distill.py)",
                "lora": cfg.lora.enabled, "optimizer_steps": state.step, "train_seconds": round(state.elapsed, 1),
                "final_loss": float(np.mean(state.losses[-50:])) if state.losses else None,
                "rollouts": cfg.num_rollouts, "command": command, **figures}
        out = cfg.student_path(steps)
        model.save_pretrained(out, transformer=plain)
        (out / STUDENT_FILE).write_text(json.dumps(info, indent=2) + "\n")
        report["students"][f"{steps}step"] = {**info, "path": str(out), "seconds": round(time.time() - t, 1)}
    report["seconds"] = round(time.time() - t0, 1)
    return report


def read_student(path: str | Path) -> dict | None:
    """A model folder's ``student.json`` (None for a model that is not a distilled student)."""
    from diffrl.models.adapter import resolve_model_path

    file = Path(resolve_model_path(str(path))) / STUDENT_FILE
    return json.loads(file.read_text()) if file.is_file() else None
