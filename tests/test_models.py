"""The model adapter on the SD3 code path, with tiny SD3 components built from configs (random
weights, locally written tokenizer, no downloads)."""

import numpy as np
import pytest
import torch

from diffrl.models.adapter import FlowModel, PromptEmbeds
from diffrl.models.tiny_sd3 import DEFAULT_WORDS, TinySD3Arch, build_tiny_sd3, write_clip_tokenizer

ARCH = TinySD3Arch(image_size=16, patch_size=4, num_layers=1, num_heads=2, head_dim=16, text_hidden=32,
                   text_layers=2, text_heads=2, text_projection=16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd3")
    pipe = build_tiny_sd3(ARCH, root / "work", seed=0)
    pipe.save_pretrained(str(root / "model"))
    return root / "model"


@pytest.fixture(scope="module")
def model(model_dir):
    return FlowModel.from_pretrained(str(model_dir), device="cpu")


class ConstantVelocity(torch.nn.Module):
    """A stand-in denoiser with v ≡ c, so the ODE has a closed-form solution."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, *args, **kwargs):
        return (torch.full_like(x, self.c),)


def test_tokenizer_keeps_every_vocabulary_word_whole(tmp_path):
    tok = write_clip_tokenizer(tmp_path)
    for word in DEFAULT_WORDS:
        assert len(tok(word).input_ids) == 3, word  # start, word, end
    ids = tok("a purple hexagon").input_ids  # unknown words fall back to characters
    assert len(ids) > 5


def test_loaded_pipeline_is_a_real_sd3_pipeline(model, model_dir):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    assert isinstance(model.pipe, StableDiffusion3Pipeline)
    assert isinstance(model.transformer, SD3Transformer2DModel)
    assert model.vae is None and model.latent_shape == (3, 16, 16) and model.image_size == 16
    assert (model_dir / "model_index.json").is_file()


def test_prompt_encoding_and_cache(model):
    emb = model.encode_prompts(["a red circle", "two blue squares", "a red circle"])
    assert emb.hidden.shape == (3, ARCH.max_tokens, 2 * ARCH.text_hidden)
    assert emb.pooled.shape == (3, 2 * ARCH.text_projection)
    assert torch.equal(emb.hidden[0], emb.hidden[2])
    assert not torch.equal(emb.hidden[0], emb.hidden[1])
    empty = model.empty_embeds(2)
    assert empty.hidden.shape[0] == 2 and torch.equal(empty.hidden[0], empty.hidden[1])
    assert not torch.equal(empty.pooled[0], emb.pooled[0])


def test_cfg_is_the_guidance_formula(model):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.3, 0.8])
    cond = model.encode_prompts(["a red circle", "four yellow triangles"])
    v_c = model.velocity(x, sigma, cond)
    v_u = model.velocity(x, sigma, model.empty_embeds(2))
    w = 4.5
    assert torch.allclose(model.guided_velocity(x, sigma, cond, w), v_u + w * (v_c - v_u), atol=1e-5)
    assert torch.equal(model.guided_velocity(x, sigma, cond, 1.0), v_c)


def test_euler_sampler_integrates_a_constant_field_exactly(model):
    # dx/dσ = c from σ = 1 to 0: x0 = ε − c, whatever the number of steps or the shift.
    seeds = [3, 4]
    eps = model.initial_noise(seeds)
    for steps, shift in [(1, 1.0), (7, 3.0)]:
        x0 = model.sample(["a red circle"] * 2, seeds, num_steps=steps, shift=shift, transformer=ConstantVelocity(0.25))
        assert torch.allclose(x0, eps - 0.25, atol=1e-6)


def test_sigma_schedule_and_shift(model):
    s = model.sigmas(4, shift=1.0)
    assert torch.allclose(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    s3 = model.sigmas(2, shift=3.0)  # σ' = 3σ / (1 + 2σ): 0.5 -> 0.75
    assert torch.allclose(s3, torch.tensor([1.0, 0.75, 0.0]))


def test_sampling_is_deterministic_per_seed_and_batch_independent(model):
    prompts, seeds = ["a red circle", "two green squares", "a red circle"], [11, 12, 13]
    a = model.sample(prompts, seeds, num_steps=3, guidance_scale=2.0)
    b = model.sample(prompts, seeds, num_steps=3, guidance_scale=2.0)
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[2])  # same prompt, other seed
    alone = model.sample(prompts[1:2], seeds[1:2], num_steps=3, guidance_scale=2.0)
    assert torch.allclose(alone[0], a[1], atol=1e-4)  # a sample does not depend on its batch
    chunked = model.sample(prompts, seeds, num_steps=3, guidance_scale=2.0, batch_size=2)
    assert torch.allclose(chunked, a, atol=1e-4)


def test_generate_returns_uint8_images_and_pixels_round_trip(model):
    images = model.generate(["a blue circle"] * 2, [1, 2], num_steps=2)
    assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
    pixels = torch.rand(2, 3, 16, 16)
    assert torch.allclose(model.decode(model.encode_images(pixels)), pixels, atol=1e-6)


def test_save_and_reload_gives_the_same_velocity(model, tmp_path):
    model.save_pretrained(tmp_path / "copy")
    again = FlowModel.from_pretrained(str(tmp_path / "copy"), device="cpu")
    x, sigma = torch.randn(1, 3, 16, 16), torch.tensor([0.5])
    cond = model.encode_prompts(["three red squares"])
    with torch.no_grad():
        assert torch.equal(model.velocity(x, sigma, cond), again.velocity(x, sigma, again.encode_prompts(["three red squares"])))


def test_latent_sd3_path_with_a_vae(tmp_path):
    """SD3 proper works in a VAE's latent space: latents [B, C, h, w] decode to larger images."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline

    pipe = build_tiny_sd3(TinySD3Arch(image_size=8, patch_size=2, num_layers=1, num_heads=2, head_dim=8,
                                      text_hidden=16, text_projection=8), tmp_path / "w")
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, shift_factor=0.1, scaling_factor=1.5)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=pipe.scheduler, vae=vae,
                                    text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                    text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(str(tmp_path / "m"))
    model = FlowModel.from_pretrained(str(tmp_path / "m"), device="cpu")
    assert model.vae is not None and model.latent_shape == (4, 8, 8) and model.image_size == 16
    images = model.generate(["a red circle"], [0], num_steps=2)
    assert images.shape == (1, 16, 16, 3)
    latents = model.encode_images(torch.rand(1, 3, 16, 16))
    assert latents.shape == (1, 4, 8, 8)


def test_prompt_embeds_helpers():
    e = PromptEmbeds(torch.arange(6.0).view(2, 3, 1), torch.arange(2.0).view(2, 1))
    r = e.repeat_interleave(2)
    assert r.hidden.shape == (4, 3, 1) and torch.equal(r.pooled.view(-1), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert len(PromptEmbeds.cat([e, e[0:1]])) == 3
