"""A text-to-image flow pipeline with a UNet denoiser and SD3's CLIP text-encoder pair.

It is the container of the shapes-world base model: saved and loaded in diffusers format
(model_index.json + component folders) like any DiffusionPipeline. Its ``encode_prompt`` follows
StableDiffusion3Pipeline's (the two CLIP encoders' penultimate hidden states concatenated on the
channel axis, their pooled projections concatenated), so one adapter serves both.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer


class FlowUNetPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet"

    def __init__(self, unet: UNet2DConditionModel, scheduler: FlowMatchEulerDiscreteScheduler,
                 text_encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer,
                 text_encoder_2: CLIPTextModelWithProjection, tokenizer_2: CLIPTokenizer):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)

    def _clip(self, tokenizer, encoder, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], out[0]  # [B, L, D] penultimate layer, [B, P] pooled projection

    def encode_prompt(self, prompt, prompt_2=None, prompt_3=None, device=None, do_classifier_free_guidance=False,
                      max_sequence_length: int = 0, **_):
        """SD3-compatible: returns (prompt_embeds [B, L, D1 + D2], None, pooled [B, P1 + P2], None)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device or self.text_encoder.device
        h1, p1 = self._clip(self.tokenizer, self.text_encoder, prompts, device)
        h2, p2 = self._clip(self.tokenizer_2, self.text_encoder_2, prompts, device)
        return torch.cat([h1, h2], dim=-1), None, torch.cat([p1, p2], dim=-1), None
