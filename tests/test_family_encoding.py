"""Per-family prompt encoding and VAE latent normalisation, on tiny text encoders and VAEs built locally."""

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    Qwen3Config,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
)

from modeling_dina.backbones import FluxBackbone, QwenImageBackbone, SD3Backbone, ZImageBackbone
from modeling_dina.tiny_families import build_tiny_pipeline, make_chat_tokenizer, tiny_vae
from modeling_dina.tiny_sd3 import make_word_tokenizer

WORDS = "a red cat on the mat blue dog".split()
PROMPTS = ["a red cat", "a blue dog on the mat"]


def test_flux_prompt_is_clip_pooled_and_t5_at_max_length():
    torch.manual_seed(0)
    clip_tok, t5_tok = make_word_tokenizer(WORDS, 16, "clip"), make_word_tokenizer(WORDS, 16, "t5")
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        )
    ).eval()
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(t5_tok), d_model=24, d_kv=12, d_ff=48, num_layers=1, num_heads=2)
    ).eval()
    parts = {"text_encoder": clip, "tokenizer": clip_tok, "text_encoder_2": t5, "tokenizer_2": t5_tok}
    with torch.no_grad():
        out = FluxBackbone.encode_prompt(parts, PROMPTS, max_sequence_length=12)
        ids = clip_tok(PROMPTS, padding="max_length", max_length=16, return_tensors="pt").input_ids
        t5_ids = t5_tok(PROMPTS, padding="max_length", max_length=12, return_tensors="pt").input_ids
        assert torch.allclose(out.pooled, clip(ids).pooler_output)
        assert torch.allclose(out.embeds, t5(t5_ids)[0])
    assert out.embeds.shape == (2, 12, 24) and out.mask is None


def test_zimage_prompt_is_the_chat_templated_real_tokens_padded_with_a_mask():
    torch.manual_seed(0)
    tokenizer = make_chat_tokenizer(WORDS)
    encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
    ).eval()
    with torch.no_grad():
        out = ZImageBackbone.encode_prompt(
            {"text_encoder": encoder, "tokenizer": tokenizer}, PROMPTS, max_sequence_length=16
        )
        assert out.embeds.shape == (2, 16, 16) and out.mask.dtype == torch.bool and out.pooled is None
        for i, prompt in enumerate(PROMPTS):
            text = f"<|im_start|>user {prompt}<|im_end|> <|im_start|>assistant "
            ids = tokenizer(text, return_tensors="pt").input_ids
            n = ids.shape[1]
            assert out.mask[i].tolist() == [True] * n + [False] * (16 - n)
            expected = encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2][0]
            assert torch.allclose(out.embeds[i, :n], expected, atol=1e-5)
            assert not out.embeds[i, n:].any()


def test_qwenimage_prompt_drops_the_system_template_and_pads_with_a_mask():
    pipe = build_tiny_pipeline("qwenimage", WORDS)
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    prefix = tokenizer(template.split("{}")[0]).input_ids
    assert len(prefix) == drop and tokenizer.pad_token_id not in prefix  # the template's prefix, every word known
    with torch.no_grad():
        out = QwenImageBackbone.encode_prompt(pipe.components, PROMPTS, max_sequence_length=16)
        embeds, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=16)
        assert out.embeds.shape == (2, 16, 32) and out.mask.dtype == torch.bool and out.pooled is None
        length = embeds.shape[1]  # the pipeline's own: as long as the longest prompt
        assert torch.equal(out.embeds[:, :length], embeds) and not out.embeds[:, length:].any()
        assert torch.equal(out.mask[:, :length], mask.bool()) and not out.mask[:, length:].any()
        for i, prompt in enumerate(PROMPTS):
            ids = tokenizer(template.format(prompt), return_tensors="pt").input_ids
            n = ids.shape[1] - drop
            assert n == len(prompt.split()) + 5  # the prompt's words and `<|im_end|>\n<|im_start|>assistant\n`
            assert tokenizer.convert_ids_to_tokens(int(ids[0, drop])) == prompt.split()[0]
            assert out.mask[i].tolist() == [True] * n + [False] * (16 - n)
            expected = encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, drop:]
            torch.testing.assert_close(out.embeds[i, :n], expected, atol=1e-5, rtol=1e-5)


def test_latent_normalisation_per_family():
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    vae = tiny_vae("sd3")  # shift 0.1159, scale 0.3611
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (0.1159, 0.3611)
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
        for family in (SD3Backbone, FluxBackbone, ZImageBackbone):
            assert torch.allclose(family.encode_pixels(vae, pixels), (mean - 0.1159) * 0.3611)
    qwen_vae = tiny_vae("qwenimage")
    with torch.no_grad():
        z = qwen_vae.encode(pixels.unsqueeze(2)).latent_dist.mean[:, :, 0]
        latents = QwenImageBackbone.encode_pixels(qwen_vae, pixels)
    mean, std = torch.tensor(qwen_vae.config.latents_mean), torch.tensor(qwen_vae.config.latents_std)
    assert latents.shape == z.shape and z.ndim == 4
    assert torch.allclose(latents, (z - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), atol=1e-6)
