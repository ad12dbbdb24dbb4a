"""Configuration of the learner (the ``learner:`` section of a recipe).

Plain dataclasses with a docstring under every field; ``validate()`` raises ``ConfigError`` through
``diffrl.config.require`` (the config loader prefixes the dotted path). Each registered algorithm adds
its own section, ``learner.<name>`` (``LearnerConfig.config_sections``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from diffrl.config import require
from diffrl.learner.algorithms import base as algorithms
from diffrl.models.lora import SD3_ATTENTION_TARGETS, LoraConfig  # noqa: F401 - part of the learner config

DTYPES = ("auto", "float32", "bfloat16")
DEVICES_HINT = "auto|cpu|cuda[:N]"


@dataclass
class LearnerConfig:
    """The learner: algorithm, batch, optimizer, DeepSpeed, snapshots, staleness, checkpoints."""

    algorithm: str = "crd"
    """Training algorithm, by its registered name: 'crd' (Centered Reward Distillation), 'nft'
    (DiffusionNFT-style baseline), 'grpo' (Flow-GRPO-style baseline; needs samplers with
    record_trajectory), for few-step students 'sdpo' and 'tdmr1', for one-step students 'didr'. Each algorithm's
    options are the section of its name, learner.<name>
    (docs/algorithms.md)."""
    groups_per_step: int = 8
    """G: prompt groups per optimizer step, over all ranks (each rank trains groups_per_step /
    world_size of them)."""
    micro_groups: int = 0
    """Groups per forward/backward pass on one rank (memory bound); a rank's groups are split into
    ceil(groups_per_rank / micro_groups) near-equal chunks. 0 = all of a rank's groups in one pass."""
    reward_weights: dict[str, float] = field(default_factory=dict)
    """The trained reward of a sample: sum of weight x reward over these reward names (a group whose
    samples lack one is dropped as invalid). Empty: the sum of every reward a sample carries."""
    lr: float = 3e-4
    """AdamW learning rate."""
    lr_warmup_steps: int = 0
    """Linear LR warmup: optimizer step k (k = 1, 2, ...) uses lr x min(1, k / lr_warmup_steps), then lr
    stays constant; a torch LR scheduler inside each trainable role's DeepSpeed engine, saved and restored
    with the engine checkpoint. 0 = no warmup (lr from the first step)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float | None = None
    """Gradient-norm clip before each optimizer step; None = the algorithm's own (crd.max_grad_norm,
    1.0 for nft and grpo); 0 = no clipping."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (2 or 3, or LoRA, for large models on many GPUs)."""
    world_size: int = 1
    """Learner ranks (one per GPU); the process group must have exactly this many."""
    device: str = "auto"
    """Torch device of the learner: auto (cuda:LOCAL_RANK if CUDA is available, else cpu), cpu, cuda[:N]."""
    dtype: str = "auto"
    """Compute dtype of θ: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16 (DeepSpeed bf16
    with fp32 master weights). The model must be loaded in this dtype. p_old/p_samp are kept in fp32
    (so their slow EMAs do not round away) and run under autocast."""
    dist_backend: str = "auto"
    """torch.distributed backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo."""
    teacher: str = ""
    """The teacher (a local diffusers folder or hub id) of algorithms whose roles start from it: a few-step
    student's base, TDM-R1's real score, fake score and surrogate reward. Empty = the ``teacher`` its
    student.json records (``diffrl distill`` writes it); unused by algorithms without such roles."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters instead of a full fine-tune."""
    gradient_checkpointing: bool = False
    """Recompute θ's activations in the backward pass (diffusers gradient checkpointing)."""
    blend_every: int = 1
    """Snapshot cadence: blend the EMA roles (p_old, p_samp) towards θ after every this many optimizer
    steps, with the decay d(s) of the step s they happen at. 1 (default): after every step, as the
    shapes-world results were made. The public CRD and DiffusionNFT code blends once per epoch: 2
    optimizer steps in the CRD SD3.5-M OCR recipe (and DiffusionNFT's sd3_ocr config), so
    blend_every=2 reproduces those (at the same decay schedule the snapshots then lag θ about twice
    as many steps); DiffusionNFT's other SD3 configs take one optimizer step per epoch (= 1)."""
    max_staleness: int = 4
    """Groups sampled with a p_samp version more than this many versions older than the current one
    are dropped (counted, acknowledged)."""
    checkpoint_every: int = 10
    """Write a checkpoint every this many optimizer steps (and at the end of ``run``); stream entries
    are acknowledged only once a checkpoint covers them. 0 = never (entries acknowledged after each
    step)."""
    keep_checkpoints: int = 3
    """Checkpoints kept in RUN_DIR/checkpoints (older ones deleted); 0 = keep all."""
    max_steps: int = 0
    """Optimizer steps after which ``run`` returns; 0 = run until stopped."""
    read_block_ms: int = 1000
    """How long one read of the experience stream waits for new groups (milliseconds)."""
    consumer_name_prefix: str = "learner"
    """Each rank reads as consumer '<prefix>-<rank>' of the stream's consumer group (a stable name, so
    a restarted rank gets its unacknowledged entries back)."""
    dedup_window: int = 100_000
    """Most recent trained group ids kept (and checkpointed) to skip re-delivered or re-published
    groups."""
    trim_acknowledged: bool = True
    """After each checkpoint, delete the stream entries every consumer group has acknowledged (XTRIM
    MINID), so Redis holds only the backlog (a group is ~100 KB on the shapes world, MBs on SD3).
    Turn off when something reads the stream without a consumer group."""
    torch_threads: int = 0
    """torch.set_num_threads for the learner process; 0 = leave torch's default."""
    seed: int = 0
    """Seed of the noise levels and the forward-process noise (per step and rank) and of LoRA init."""

    # ------------------------------------------------------------------ algorithm sections
    @classmethod
    def config_sections(cls) -> dict[str, type]:
        """The sections this config has beside its fields: ``learner.<name>`` for every registered
        algorithm (diffrl.config adds them to the schema when a recipe loads)."""
        return {name: alg.config_class for name, alg in algorithms.registry().items()}

    def __getattr__(self, name: str):
        # a directly constructed LearnerConfig gets an algorithm's section (defaults) on first use
        if name.startswith("_"):
            raise AttributeError(name)
        sections = type(self).config_sections()
        if name not in sections:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        value = sections[name]()
        object.__setattr__(self, name, value)
        return value

    @property
    def algorithm_class(self) -> type:
        """The registered algorithm ``algorithm`` names."""
        return algorithms.get(self.algorithm)

    @property
    def algorithm_config(self):
        """The options of the selected algorithm (the section ``learner.<algorithm>``)."""
        return getattr(self, self.algorithm)

    def validate(self) -> None:
        names = sorted(algorithms.registry())
        require(self.algorithm in names, "algorithm", f"one of {names}", self.algorithm)
        for name in (self.algorithm, "lora"):
            try:
                getattr(self, name).validate()
            except ValueError as err:
                raise ValueError(f"{name}.{err}") from None
        require(self.world_size >= 1, "world_size", "an int >= 1", self.world_size)
        require(self.groups_per_step >= 1 and self.groups_per_step % self.world_size == 0,
                 "groups_per_step", f"a positive multiple of world_size={self.world_size}",
                 self.groups_per_step)
        require(self.micro_groups >= 0, "micro_groups", "an int >= 0", self.micro_groups)
        for key, w in self.reward_weights.items():
            require(bool(key), "reward_weights", "non-empty reward names", key)
            require(isinstance(w, (int, float)) and math.isfinite(w),
                     f"reward_weights.{key}", "a finite float", w)
        require(self.lr > 0, "lr", "a float > 0", self.lr)
        require(self.lr_warmup_steps >= 0, "lr_warmup_steps", "an int >= 0 (0 = no warmup)", self.lr_warmup_steps)
        require(self.weight_decay >= 0, "weight_decay", "a float >= 0", self.weight_decay)
        require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas",
                 "two floats in [0, 1)", self.betas)
        require(self.adam_eps > 0, "adam_eps", "a float > 0", self.adam_eps)
        require(self.grad_clip is None or self.grad_clip >= 0, "grad_clip", "None or a float >= 0",
                 self.grad_clip)
        require(self.zero_stage in (0, 1, 2, 3), "zero_stage", "0, 1, 2 or 3", self.zero_stage)
        require(self.device == "auto" or self.device.startswith(("cpu", "cuda")), "device",
                 DEVICES_HINT, self.device)
        require(self.dtype in DTYPES, "dtype", f"one of {DTYPES}", self.dtype)
        require(self.dist_backend in ("auto", "nccl", "gloo"), "dist_backend", "auto|nccl|gloo",
                 self.dist_backend)
        require(self.max_staleness >= 0, "max_staleness", "an int >= 0", self.max_staleness)
        require(self.blend_every >= 1, "blend_every", "an int >= 1 (optimizer steps)", self.blend_every)
        require(self.checkpoint_every >= 0, "checkpoint_every", "an int >= 0", self.checkpoint_every)
        require(self.keep_checkpoints >= 0, "keep_checkpoints", "an int >= 0", self.keep_checkpoints)
        require(self.max_steps >= 0, "max_steps", "an int >= 0", self.max_steps)
        require(self.read_block_ms >= 0, "read_block_ms", "an int >= 0", self.read_block_ms)
        require(bool(self.consumer_name_prefix), "consumer_name_prefix", "a non-empty name",
                 self.consumer_name_prefix)
        require(self.dedup_window >= 0, "dedup_window", "an int >= 0", self.dedup_window)
        require(self.torch_threads >= 0, "torch_threads", "an int >= 0", self.torch_threads)

    # ------------------------------------------------------------------ derived values
    @property
    def groups_per_rank(self) -> int:
        return self.groups_per_step // self.world_size

    @property
    def num_chunks(self) -> int:
        """Forward/backward passes per noise level on one rank."""
        if self.micro_groups == 0:
            return 1
        return -(-self.groups_per_rank // self.micro_groups)
