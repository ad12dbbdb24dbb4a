"""Small SD3-family pipelines built from configs, with a locally written tokenizer: no downloads.

The shapes-world base model is one of these (trained by ``diffrl pretrain``): a real
``StableDiffusion3Pipeline`` with two small CLIP text encoders, no T5, an ``SD3Transformer2DModel``
that works directly in pixel space (``vae=None``; 3 channels in [-1, 1]) and the flow-matching Euler
scheduler. Tests build the same thing with random weights to exercise the SD3 code path on CPU, and
with ``TinySD3Arch.t5_layers > 0`` also a small T5 encoder (``text_encoder_3``) with a locally built
Unigram tokenizer, as SD3/SD3.5 have.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffrl.config import require

# Whole-word tokens; anything else falls back to characters, so no text is ever rejected.
DEFAULT_WORDS = (
    "a", "an", "one", "two", "three", "four", "and", "with", "of",
    "red", "green", "blue", "yellow",
    "circle", "circles", "square", "squares", "triangle", "triangles",
)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass
class TinySD3Arch:
    """Sizes of a small SD3-family pipeline."""

    image_size: int = 32
    """Image side in pixels (the transformer works in pixel space: sample_size = image_size)."""
    patch_size: int = 4
    """Transformer patch side; (image_size / patch_size)^2 image tokens."""
    num_layers: int = 4
    """Joint-attention transformer blocks."""
    num_heads: int = 4
    """Attention heads per block."""
    head_dim: int = 32
    """Channels per head; the transformer width is num_heads * head_dim."""
    text_hidden: int = 64
    """Hidden width of each of the two CLIP text encoders."""
    text_layers: int = 2
    """Layers of each CLIP text encoder (SD3 takes the penultimate hidden state)."""
    text_heads: int = 2
    """Attention heads of each CLIP text encoder."""
    text_projection: int = 32
    """Pooled projection width of each CLIP encoder (pooled_projection_dim = 2 x this)."""
    max_tokens: int = 16
    """Tokenizer max length (prompt tokens incl. start/end)."""
    t5_layers: int = 0
    """Layers of a small T5 encoder (text_encoder_3, width 2 x text_hidden, text_heads heads) with a
    locally built tokenizer (tokenizer_3); 0 = no T5, as before."""

    def validate(self) -> None:
        require(self.t5_layers >= 0, "t5_layers", "an int >= 0 (0 = no T5)", self.t5_layers)
        require(self.image_size > 0 and self.image_size % self.patch_size == 0, "image_size",
                "a positive multiple of patch_size", self.image_size)
        for name in ("patch_size", "num_layers", "num_heads", "head_dim", "text_hidden", "text_layers",
                     "text_heads", "text_projection"):
            require(getattr(self, name) >= 1, name, "an int >= 1", getattr(self, name))
        require(self.text_layers >= 2, "text_layers", "an int >= 2 (SD3 reads the penultimate layer)")
        require(self.text_hidden % self.text_heads == 0, "text_hidden", "a multiple of text_heads")
        require(self.max_tokens >= 4, "max_tokens", "an int >= 4", self.max_tokens)


def _bpe(word: str, ranks: dict[str, int]) -> list[str]:
    """Byte-pair encode one word with the given merge ranks (lowest rank merges first)."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [f"{a} {b}" for a, b in itertools.pairwise(symbols)]
        best = min(pairs, key=lambda p: ranks.get(p, len(ranks) + 1))
        if best not in ranks:
            break
        i = pairs.index(best)
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def _whole_word_merges(words: Iterable[str]) -> list[str]:
    """Merge rules under which every word is one token: append the merge of the first two symbols of
    any word still split, until none is (appended rules rank last, so earlier words stay whole)."""
    merges: list[str] = []
    ranks: dict[str, int] = {}
    pending = list(dict.fromkeys(words))
    while pending:
        still_split = []
        for word in pending:
            symbols = _bpe(word, ranks)
            if len(symbols) > 1:
                pair = f"{symbols[0]} {symbols[1]}"
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(pair)
                still_split.append(word)
        pending = still_split
    return merges


DEFAULT_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def write_clip_tokenizer(folder: str | Path, words: Iterable[str] = DEFAULT_WORDS, max_length: int = 16,
                         chars: str = DEFAULT_CHARS):
    """Write vocab.json / merges.txt / configs of a CLIP BPE tokenizer whose whole words are single
    tokens (see _whole_word_merges); characters stay as a fallback, so no text is rejected. With no
    ``words`` it is character-level: one token per character (two per letter, inside a word and
    word-final, as CLIP's BPE marks the end of a word)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for c in chars:
        add(c)
        add(c + "</w>")
    merges = _whole_word_merges(words)
    for pair in merges:
        add(pair.replace(" ", ""))
    add(BOS)
    add(EOS)
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges],
        model_max_length=max_length,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )
    tok.save_pretrained(folder)
    return tok


def _clip_text_encoders(workdir: str | Path, hidden: int, layers: int, heads: int, projection: int,
                        max_tokens: int, words: Iterable[str] = DEFAULT_WORDS, chars: str = DEFAULT_CHARS):
    """A locally written tokenizer and two small CLIPTextModelWithProjection encoders (SD3's CLIP pair)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = write_clip_tokenizer(Path(workdir) / "tokenizer", words=words, max_length=max_tokens, chars=chars)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_tokens,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, CLIPTextModelWithProjection(text_config), CLIPTextModelWithProjection(text_config)


T5_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789\"'.,:!?-"


def t5_tokenizer(words: Iterable[str] = DEFAULT_WORDS, max_length: int = 512):
    """A T5 (Unigram) tokenizer built in memory: whole words are single pieces, characters are a
    fallback (anything else is <unk>); ids 0, 1, 2 are <pad>, </s>, <unk> as in T5."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    for piece, score in [*((f"\u2581{w}", -1.0) for w in words), *((c, -10.0) for c in T5_CHARS),
                         *((f"\u2581{c}", -10.0) for c in T5_CHARS)]:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _t5_encoder(arch: TinySD3Arch, vocab_size: int):
    """A small T5EncoderModel whose width is the transformer's joint_attention_dim (2 x text_hidden)."""
    from transformers import T5Config, T5EncoderModel

    width = 2 * arch.text_hidden
    config = T5Config(vocab_size=vocab_size, d_model=width, d_kv=width // arch.text_heads, d_ff=2 * width,
                      num_layers=arch.t5_layers, num_heads=arch.text_heads, dropout_rate=0.0,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config)


def build_tiny_sd3(arch: TinySD3Arch, workdir: str | Path, seed: int = 0):
    """A randomly initialised StableDiffusion3Pipeline of the given sizes (pixel space, no VAE; a T5
    encoder only with ``arch.t5_layers > 0``). ``workdir`` receives the CLIP tokenizer files."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    arch.validate()
    torch.manual_seed(seed)
    tokenizer, text_encoder, text_encoder_2 = _clip_text_encoders(
        workdir, arch.text_hidden, arch.text_layers, arch.text_heads, arch.text_projection, arch.max_tokens)
    transformer = SD3Transformer2DModel(
        sample_size=arch.image_size,
        patch_size=arch.patch_size,
        in_channels=3,
        out_channels=3,
        num_layers=arch.num_layers,
        attention_head_dim=arch.head_dim,
        num_attention_heads=arch.num_heads,
        joint_attention_dim=2 * arch.text_hidden,
        caption_projection_dim=arch.num_heads * arch.head_dim,
        pooled_projection_dim=2 * arch.text_projection,
        pos_embed_max_size=arch.image_size // arch.patch_size,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    tokenizer_3 = t5_tokenizer() if arch.t5_layers else None  # after the transformer: same weights as without
    text_encoder_3 = _t5_encoder(arch, len(tokenizer_3)) if tokenizer_3 is not None else None
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


@dataclass
class TinyUNetArch:
    """Sizes of a small text-conditioned UNet flow pipeline (the shapes-world base model)."""

    image_size: int = 32
    """Image side in pixels (the UNet works in pixel space)."""
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    """UNet block widths, full resolution first; each further block halves the resolution."""
    layers_per_block: int = 1
    """ResNet layers per UNet block."""
    attention_head_dim: int = 16
    """Channels per cross-attention head (cross-attention to the prompt tokens at the lowest
    resolution and in the middle block)."""
    text_hidden: int = 64
    """Hidden width of each of the two CLIP text encoders (cross_attention_dim = 2 x this)."""
    text_layers: int = 2
    """Layers of each CLIP text encoder (the penultimate hidden state is used, as in SD3)."""
    text_heads: int = 2
    """Attention heads of each CLIP text encoder."""
    text_projection: int = 64
    """Pooled projection width of each CLIP encoder; the pooled pair (2 x this) is added to the time
    embedding."""
    max_tokens: int = 16
    """Tokenizer max length (prompt tokens incl. start/end)."""
    vocab_words: list[str] = field(default_factory=lambda: list(DEFAULT_WORDS))
    """Words that are single tokens; [] = a character-level tokenizer (the text world's: letters
    must be learned, so unseen words are new sequences of known tokens)."""
    vocab_chars: str = DEFAULT_CHARS
    """Characters of the tokenizer (each a token, also the fallback for words not in vocab_words)."""
    cross_attention_blocks: int = 1
    """How many of the lowest-resolution UNet blocks attend to the prompt (1: the last only; the
    text world uses 2 so that letters are placed at 16 x 16)."""

    def validate(self) -> None:
        require(1 <= self.cross_attention_blocks <= len(self.channels), "cross_attention_blocks",
                f"an int in [1, {len(self.channels)}]", self.cross_attention_blocks)
        require(bool(self.vocab_chars) and len(set(self.vocab_chars)) == len(self.vocab_chars), "vocab_chars",
                "distinct characters", self.vocab_chars)
        require(len(self.channels) >= 2 and all(c >= 4 and c % 4 == 0 for c in self.channels), "channels",
                "at least two widths, each a multiple of 4", list(self.channels))
        require(self.image_size % 2 ** (len(self.channels) - 1) == 0, "image_size",
                "divisible by 2^(len(channels) - 1)", self.image_size)
        require(self.layers_per_block >= 1, "layers_per_block", "an int >= 1", self.layers_per_block)
        require(self.attention_head_dim >= 1 and self.channels[-1] % self.attention_head_dim == 0,
                "attention_head_dim", "a divisor of the last channel width", self.attention_head_dim)
        require(self.text_layers >= 2, "text_layers", "an int >= 2")
        require(self.text_hidden % self.text_heads == 0, "text_hidden", "a multiple of text_heads")
        require(self.max_tokens >= 4, "max_tokens", "an int >= 4", self.max_tokens)


def build_tiny_unet(arch: TinyUNetArch, workdir: str | Path, seed: int = 0):
    """A randomly initialised :class:`diffrl.models.flow_pipeline.FlowUNetPipeline` of the given sizes."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

    from diffrl.models.flow_pipeline import FlowUNetPipeline

    arch.validate()
    torch.manual_seed(seed)
    tokenizer, text_encoder, text_encoder_2 = _clip_text_encoders(
        workdir, arch.text_hidden, arch.text_layers, arch.text_heads, arch.text_projection, arch.max_tokens,
        arch.vocab_words, arch.vocab_chars)
    n, k = len(arch.channels), arch.cross_attention_blocks
    unet = UNet2DConditionModel(
        sample_size=arch.image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(arch.channels),
        layers_per_block=arch.layers_per_block,
        down_block_types=("DownBlock2D",) * (n - k) + ("CrossAttnDownBlock2D",) * k,
        up_block_types=("CrossAttnUpBlock2D",) * k + ("UpBlock2D",) * (n - k),
        cross_attention_dim=2 * arch.text_hidden,
        attention_head_dim=arch.attention_head_dim,
        norm_num_groups=min(8, arch.channels[0]),
        class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * arch.text_projection,
    )
    return FlowUNetPipeline(unet=unet, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                            text_encoder=text_encoder, tokenizer=tokenizer,
                            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer)
