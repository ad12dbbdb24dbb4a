"""LoRA adapters (peft) on SD3-family denoisers, shared by the learner (training) and the samplers
(applying published adapter weights)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from diffrl.config import require

# Attention projections, as module-name suffixes: every attention of SD3's joint blocks (image stream
# to_q/k/v/out, text stream add_*_proj/to_add_out) and of a UNet's self- and cross-attention layers.
SD3_ATTENTION_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
]


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the denoiser's attention projections; the base weights stay frozen."""

    enabled: bool = False
    """Train LoRA adapters instead of every weight of the denoiser (full fine-tune when off)."""
    rank: int = 32
    """LoRA rank r."""
    alpha: float = 64.0
    """LoRA alpha; the adapter's output is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter input during training (0 keeps θ deterministic, which CRD assumes)."""
    target_modules: list[str] = field(default_factory=lambda: list(SD3_ATTENTION_TARGETS))
    """Module-name suffixes that get adapters (peft ``target_modules``); the default is every attention
    projection (SD3 joint blocks: q, k, v, out of the image and the text stream; UNets: self- and
    cross-attention)."""

    def validate(self) -> None:
        require(self.rank >= 1, "rank", "an int >= 1", self.rank)
        require(self.alpha > 0, "alpha", "a float > 0", self.alpha)
        require(0.0 <= self.dropout < 1.0, "dropout", "a float in [0, 1)", self.dropout)
        require(len(self.target_modules) > 0 and all(isinstance(t, str) and t for t in self.target_modules),
                 "target_modules", "a non-empty list of module-name suffixes", self.target_modules)


def peft_config(cfg: LoraConfig):
    import peft

    return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=list(cfg.target_modules))


def inject_lora(module: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Add (zero-initialised-B) LoRA adapters to ``module`` in place; raises if nothing matched."""
    from peft import inject_adapter_in_model

    module = inject_adapter_in_model(peft_config(cfg), module)
    if not any(".lora_" in name for name, _ in module.named_parameters()):
        raise ValueError(f"lora.target_modules: expected names of modules in the denoiser, "
                         f"got {list(cfg.target_modules)} (nothing matched)")
    return module


def has_lora(module: nn.Module) -> bool:
    return any(".lora_" in name for name, _ in module.named_parameters())


def load_lora_weights(module: nn.Module, tensors: dict, cfg: LoraConfig) -> None:
    """Apply adapter weights published in peft's naming (injecting the adapters first if needed)."""
    from peft import set_peft_model_state_dict

    if not has_lora(module):
        inject_lora(module, cfg)
    result = set_peft_model_state_dict(module, tensors)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"LoRA update has weights the denoiser lacks: {unexpected[:3]}")
