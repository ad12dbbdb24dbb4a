"""The seam between the learner and an algorithm: what an algorithm declares and what it gets.

An algorithm is one file under ``learner/algorithms/`` holding its losses (pure functions of tensors),
its config dataclass and one :class:`Algorithm` subclass registered with :func:`register`. The learner
owns everything else (the experience stream, staleness, batching, DeepSpeed engines, snapshots,
publishing, checkpoints and metrics) and never looks at an algorithm's name. docs/algorithms.md,
"Adding an algorithm", walks through it.

What an algorithm declares:
    * ``name`` and ``config_class``: the recipe selects it with ``learner.algorithm: <name>`` and sets
      its options under ``learner.<name>`` (validated like every other section);
    * ``roles()``: the networks it needs, by name: :class:`Trainable` (an engine with its optimizer,
      started from the loaded denoiser or the teacher's), :class:`EMA` (a no-grad snapshot blended
      towards a trainable role after every optimizer step) and :class:`Frozen` (the loaded denoiser or
      the teacher's); ``sampler_role``, the EMA role published to the samplers, and ``eval_role``,
      the one evaluated and exported (default: the sampler role);
    * ``record``: what each sample must carry, ``"final"`` (the final latent) or ``"trajectory"``
      (also the sampler's trajectory record, proto ``Trajectory``), and with it ``trajectory_needs``
      (the step kinds it trains on, whether it needs pairs), checked when a recipe loads
      (:meth:`Algorithm.check_recipe`) and per group (:meth:`Algorithm.sample_problem`; a group
      that fails is dropped and counted as invalid);
    * ``step(batch, ctx)``: one optimizer step of every trainable role on a decoded
      :class:`~diffrl.learner.batch.ExperienceBatch`, through the :class:`StepContext`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from diffrl.learner.batch import TrajectoryNeeds

Tensor = torch.Tensor

RECORDS = ("final", "trajectory")


# ------------------------------------------------------------------------------------------- roles


@dataclass(frozen=True)
class Trainable:
    """A trained network: a copy of the base denoiser (or the base plus LoRA adapters, per
    ``learner.lora``) in its own DeepSpeed engine with its own AdamW optimizer."""

    name: str
    backward_passes: int
    """Backward passes per micro-chunk of groups in one learner step (DeepSpeed accumulates the
    gradients of ``backward_passes x chunks`` passes and steps the optimizer once)."""
    lr: float | None = None
    """Learning rate; None = ``learner.lr``."""
    grad_clip: float | None = None
    """Gradient-norm clip; None = ``learner.grad_clip`` (or, when that is None, the algorithm's
    ``default_grad_clip``)."""
    steps_per_batch: int = 1
    """Optimizer steps this role takes per learner step (each after ``backward_passes x chunks``
    passes). 1 for most algorithms; SDPO takes one per shuffled time slot, as its public code does.
    The policy version still counts learner steps."""
    betas: tuple[float, float] | None = None
    """AdamW (beta1, beta2); None = ``learner.betas`` (TDM-R1's generator and fake score use beta1 0)."""
    init: str = "model"
    """Where its weights start: ``model`` (the loaded model's denoiser, the policy) or ``teacher``
    (``learner.teacher``'s denoiser: TDM-R1's fake score and surrogate reward start from the base the
    student was distilled from)."""


@dataclass(frozen=True)
class EMA:
    """A no-grad fp32 snapshot of a trainable role: snap ← d·snap + (1 − d)·source after every
    optimizer step, d = ``decay(s)`` with s the optimizer steps taken (this one included); an exact
    copy of the source at the start."""

    name: str
    source: str
    decay: Callable[[int], float]


@dataclass(frozen=True)
class Frozen:
    """A frozen denoiser (a KL anchor or reference): the loaded model's, or the teacher's."""

    name: str
    weights: str = "model"
    """``model`` (the loaded model's denoiser) or ``teacher`` (``learner.teacher``'s: a few-step
    student's real score)."""


INITS = ("model", "teacher")


def start_of(role: Trainable | EMA | Frozen) -> str:
    """Which weights a role starts from: ``model`` or ``teacher`` (an EMA role: its source's)."""
    return role.init if isinstance(role, Trainable) else role.weights if isinstance(role, Frozen) else "model"


Role = Trainable | EMA | Frozen


# ------------------------------------------------------------------------------------- the context


class StepContext(Protocol):
    """What the learner gives an algorithm's step (``Learner._context`` builds it).

    Networks are addressed by role name; ``net(role)`` is what the model's forward passes take as
    ``transformer=`` (a trainable role's engine runs with grad, the others are frozen).
    """

    model: Any
    """The base model (``diffrl.models.adapter.FlowModel``): ``velocity``, ``guided_velocity``,
    ``encode_prompts``, ``empty_embeds``, ``latent_shape``."""
    device: torch.device
    generator: torch.Generator
    """CPU generator seeded from (learner.seed, version, rank): this step's randomness."""
    shared_generator: torch.Generator
    """CPU generator seeded from (learner.seed, version) alone: draws every rank must agree on (which
    steps or noise levels a step trains)."""
    chunks: list[Tensor]
    """Micro-chunks of this rank's groups: group indices ``[g]`` per forward/backward pass."""
    world_size: int

    def net(self, role: str) -> Any: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def backward(self, role: str, loss: Tensor, share: float) -> None:
        """Backpropagate ``loss`` of one micro-chunk into ``role``; ``share`` is the chunk's share of
        the rank's batch (the learner scales so that the optimizer step sees the mean over the
        ``backward_passes`` passes of the batch loss) and steps the engine at the boundary."""

    def log(self, stats: dict[str, Tensor | float], share: float) -> None:
        """Accumulate detached scalar stats of one pass; the step reports, per key, the mean over the
        passes that logged it, weighted by ``share``."""

    def batch_wide(self, fn: Callable[..., tuple[Tensor, ...]], rewards: Tensor, mask: Tensor
                   ) -> tuple[Tensor, ...]:
        """``fn(rewards, mask)`` over every rank's groups, returning this rank's rows (batch-wide
        statistics such as a global advantage std). ``[G, K]`` in, ``[G, K]`` tensors out."""


@dataclass
class StepResult:
    """What ``Algorithm.step`` returns beside the logged stats."""

    advantages: Tensor
    """``[G, K]`` the advantages the step used (for the learner's advantage statistics)."""
    adv_clip: float | None = None
    """|a| at which advantages were clipped (the clip fraction is reported), None: not clipped."""
    stats: dict[str, float] | None = None
    """Constants of the step to report as they are (e.g. CRD's β)."""


# ----------------------------------------------------------------------------------- the algorithm


class Algorithm:
    """Base class of a learner algorithm (see the module docstring)."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    record: ClassVar[str] = "final"
    trajectory_needs: ClassVar[TrajectoryNeeds] = TrajectoryNeeds()
    """With ``record = "trajectory"``: the step kinds it trains on and whether it needs pairs."""
    sampler_role: str = "p_samp"
    eval_role: str | None = None
    """The EMA role the learner evaluates and ``diffrl export`` writes by default; None = the sampler
    role (TDM-R1 evaluates an EMA of its generator while the samplers use the generator itself)."""
    default_grad_clip: float = 1.0
    gauges: ClassVar[dict[str, tuple[str, str]]] = {}
    """Step stat -> (Prometheus gauge name, help) of the algorithm's own metrics."""
    stat_aliases: ClassVar[dict[str, str]] = {}
    """Reported stat -> the stat it copies (friendlier names for dashboards)."""

    def __init__(self, config: Any, learner_config: Any):
        self.config = config
        self.learner_config = learner_config

    def roles(self) -> list[Role]:
        raise NotImplementedError

    @property
    def evaluated_role(self) -> str:
        """The role evaluations and exports use (``eval_role``, else the sampler role)."""
        return self.eval_role or self.sampler_role

    def needs_teacher(self) -> bool:
        """Whether a role starts from ``learner.teacher``'s denoiser."""
        return any(start_of(r) == "teacher" for r in self.roles())

    def step(self, batch: Any, ctx: StepContext) -> StepResult:
        raise NotImplementedError

    def sample_problem(self, sample: Any, model: Any) -> str | None:
        """Why one sample's record cannot be trained by this algorithm (None when it can); the
        learner has already checked the latent, the rewards and, for ``record="trajectory"``, that
        the trajectory is present and well-shaped."""
        return None

    @classmethod
    def check_recipe(cls, config: Any, sampler: Any) -> None:
        """Raise ``ConfigError`` (full dotted field) when the samplers of a recipe cannot give this
        algorithm what it trains on. ``config``: its validated config; ``sampler``: ``SamplerConfig``."""
        if cls.record == "trajectory":
            from diffrl.config import require

            needs = cls.trajectory_needs
            require(sampler.record_trajectory, "sampler.record_trajectory",
                    f"true when learner.algorithm={cls.name} (it trains on the samplers' trajectory records)",
                    sampler.record_trajectory)
            require(sampler.sampling.kind() in needs.step_kinds, "sampler.sampling.step_kind",
                    f"one of {needs.step_kinds} when learner.algorithm={cls.name}", sampler.sampling.kind())
            require(sampler.paired or not needs.paired, "sampler.paired",
                    f"true when learner.algorithm={cls.name} (it trains on pairs sharing the initial noise)",
                    sampler.paired)

    def check_roles(self) -> None:
        """The declared roles are consistent (called when the learner is built)."""
        roles = self.roles()
        names = [r.name for r in roles]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: role names must be distinct, got {names}")
        trainable = {r.name for r in roles if isinstance(r, Trainable)}
        if not trainable:
            raise ValueError(f"{self.name}: at least one Trainable role is needed")
        for r in roles:
            if isinstance(r, EMA) and r.source not in trainable:
                raise ValueError(f"{self.name}: EMA role {r.name!r} follows {r.source!r}, not a trainable role")
            if isinstance(r, Trainable) and (r.backward_passes < 1 or r.steps_per_batch < 1):
                raise ValueError(f"{self.name}: role {r.name!r} needs backward_passes >= 1 and steps_per_batch >= 1")
            if start_of(r) not in INITS:
                raise ValueError(f"{self.name}: role {r.name!r} starts from one of {INITS}")
        for what, role in (("sampler_role", self.sampler_role), ("eval_role", self.evaluated_role)):
            if not isinstance(next((r for r in roles if r.name == role), None), EMA):
                raise TypeError(f"{self.name}: {what} {role!r} must name an EMA role")
        if self.record not in RECORDS:
            raise ValueError(f"{self.name}: record must be one of {RECORDS}, got {self.record!r}")


# -------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make ``cls`` selectable as ``learner.algorithm: <cls.name>``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{cls.__name__}.name: expected an identifier, got {name!r}")
    if not hasattr(cls, "config_class"):
        raise ValueError(f"{cls.__name__}.config_class: expected a config dataclass")
    known = _REGISTRY.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"algorithm {name!r} is already registered by {known.__module__}.{known.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove an algorithm (tests that register their own)."""
    _REGISTRY.pop(name, None)


def registry() -> dict[str, type[Algorithm]]:
    """Every registered algorithm by name (the shipped ones are imported first)."""
    _import_shipped()
    return dict(_REGISTRY)


def get(name: str) -> type[Algorithm]:
    found = registry().get(name)
    if found is None:
        raise KeyError(name)
    return found


@functools.cache
def _import_shipped() -> None:
    """Import every module of this package once: each shipped algorithm file registers itself."""
    import importlib
    import pkgutil

    from diffrl.learner import algorithms

    for info in pkgutil.iter_modules(algorithms.__path__):
        if info.name != "base":
            importlib.import_module(f"{algorithms.__name__}.{info.name}")
