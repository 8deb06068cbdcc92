"""Tiny FLUX.1, Qwen-Image and Z-Image transformers and generator pipelines built locally (no download), with the
classes and wiring of the real ones, for tests and benchmarks; and the real transformers' configs for meta-device
parameter counts."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3Model,
)

from .tiny_sd3 import _t5_encoder, make_word_tokenizer

__all__ = [
    "TINY_FAMILY_DINA",
    "TINY_PROMPT_WIDTHS",
    "build_tiny_pipeline",
    "build_tiny_transformer",
    "make_chat_tokenizer",
    "make_qwen_vl_tokenizer",
    "tiny_vae",
]

# Latents of every tiny family have 4 channels; prompt embeddings are (B, L, TINY_PROMPT_WIDTHS[family]) and FLUX's
# pooled vector has width 16.
TINY_PROMPT_WIDTHS = {"flux": 32, "qwenimage": 32, "zimage": 24}
TINY_FLUX_POOLED_WIDTH = 16

_TINY_CONFIGS = {
    "flux": (
        FluxTransformer2DModel,
        dict(
            in_channels=16,
            num_layers=3,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=TINY_FLUX_POOLED_WIDTH,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
    ),
    "qwenimage": (
        QwenImageTransformer2DModel,
        dict(
            in_channels=16,
            out_channels=4,
            num_layers=3,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(4, 6, 6),
        ),
    ),
    "zimage": (
        ZImageTransformer2DModel,
        dict(
            in_channels=4,
            dim=32,
            n_layers=3,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=24,
            axes_dims=[4, 6, 6],
            axes_lens=[256, 64, 64],
        ),
    ),
}

# A DiNa-LRM on each tiny transformer: its first 2 of 3 blocks, the embedders' output and both blocks tapped.
TINY_FAMILY_DINA = dict(
    num_backbone_layers=2,
    visual_layers=[0, 1, 2],
    text_layers=[1, 2],
    lora_rank=4,
    lora_alpha=8,
    head_width=16,
    head_use_proj_in=True,
    head_num_attention_heads=4,
    max_sequence_length=16,
)


def build_tiny_transformer(family: str, seed: int = 0):
    """A randomly initialised (seeded) tiny transformer of `family` ("flux", "qwenimage" or "zimage"), in eval mode.
    Z-Image's pad tokens start at zero in diffusers; they get random values here so that padding shows in tests."""
    if family not in _TINY_CONFIGS:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(_TINY_CONFIGS)}.")
    cls, config = _TINY_CONFIGS[family]
    torch.manual_seed(seed)
    transformer = cls(**config)
    if family == "zimage":
        with torch.no_grad():
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
    return transformer.eval()


def make_chat_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a Qwen-style chat template (`<|im_start|>role content<|im_end|>`), right padding."""
    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
    vocab = {t: i for i, t in enumerate([*specials, *sorted(set(words) - set(specials))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )
    return tokenizer


def make_qwen_vl_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """`make_chat_tokenizer` over `words` and the words of the installed diffusers' Qwen-Image system template, with
    a newline as a token of its own (as in the real Qwen2.5 tokenizer): the template's prefix then tokenizes to exactly
    `prompt_template_encode_start_idx` tokens, so that `QwenImagePipeline` drops the template and nothing else."""
    # The template is set in `QwenImagePipeline.__init__`: read off a pipeline without components.
    template = QwenImagePipeline(None, None, None, None, None).prompt_template_encode
    for marker in ("<|im_start|>", "<|im_end|>", "{}"):
        template = template.replace(marker, " ")
    template_words = [word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(template)]
    tokenizer = make_chat_tokenizer([*words, *template_words])
    tokenizer.add_tokens([AddedToken("\n", normalized=False)])
    return tokenizer


def _qwen_vl_encoder(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLForConditionalGeneration:
    """A one-layer Qwen2.5-VL of Qwen-Image's tiny prompt width (32: heads of 16, so multimodal rotary sections
    summing to 8), with a one-block vision tower that prompts never reach."""
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=TINY_PROMPT_WIDTHS["qwenimage"],
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=TINY_PROMPT_WIDTHS["qwenimage"],
        patch_size=2,
        window_size=8,
        fullatt_block_indexes=[0],
    )
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()


def tiny_vae(family: str):
    """A 4-channel VAE of the family's kind, 2 pixels per latent cell."""
    if family == "qwenimage":
        return AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 2],
            num_res_blocks=1,
            temperal_downsample=[False],
            latents_mean=[0.1, -0.2, 0.3, 0.0],
            latents_std=[2.0, 1.0, 0.5, 4.0],
        ).eval()
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    ).eval()


def _tiny_text_components(family: str, words: list[str]) -> dict:
    """FLUX: CLIP-L-like (pooled width 16, 16 tokens) + T5 (width 32); Z-Image: Qwen3 (width 24, chat template);
    Qwen-Image: Qwen2.5-VL (width 32, the pipeline's system template)."""
    if family == "flux":
        clip_tokenizer, t5_tokenizer = make_word_tokenizer(words, 16, "clip"), make_word_tokenizer(words, 64, "t5")
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tokenizer),
                hidden_size=TINY_FLUX_POOLED_WIDTH,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=16,
                bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
            )
        ).eval()
        t5 = _t5_encoder(t5_tokenizer, TINY_PROMPT_WIDTHS["flux"])
        return {"text_encoder": clip, "tokenizer": clip_tokenizer, "text_encoder_2": t5, "tokenizer_2": t5_tokenizer}
    if family == "zimage":
        tokenizer = make_chat_tokenizer(words)
        config = Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=TINY_PROMPT_WIDTHS["zimage"],
            intermediate_size=32,
            num_hidden_layers=2,  # Z-Image reads the second-to-last hidden state
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
        return {"text_encoder": Qwen3Model(config).eval(), "tokenizer": tokenizer}
    tokenizer = make_qwen_vl_tokenizer(words)
    return {"text_encoder": _qwen_vl_encoder(tokenizer), "tokenizer": tokenizer}


def build_tiny_pipeline(family: str, words: Iterable[str] = (), seed: int = 0, *, text_encoders: bool = True):
    """A tiny generator pipeline of `family` (`FluxPipeline`, `QwenImagePipeline` or `ZImagePipeline`) on
    `build_tiny_transformer(family, seed)`, with a seeded 4-channel VAE (2 pixels per latent cell) and text encoders
    whose vocabulary is `words` (see `_tiny_text_components`); `text_encoders=False` leaves them out, as a pipeline
    saved without them, whose prompts can only enter as embeddings."""
    pipeline_class = {"flux": FluxPipeline, "qwenimage": QwenImagePipeline, "zimage": ZImagePipeline}[family]
    transformer = build_tiny_transformer(family, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = tiny_vae(family)
        text = _tiny_text_components(family, sorted({w.lower() for w in words} | {"a"}))
    if not text_encoders:
        text = dict.fromkeys(text)
    return pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, transformer=transformer, **text
    )
