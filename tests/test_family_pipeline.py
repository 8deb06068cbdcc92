"""`DiNaRewardPipeline` on tiny FLUX.1, Qwen-Image and Z-Image generators built locally: the family's prompt encoding,
VAE convention and geometry, images / latents / prompt embeddings scored alike, the generators' packed latents,
`from_pipe` sharing without copies, the alignment reward and the served model spec."""

import diffusers
import pytest
import torch

from modeling_dina import DiNaRewardModel, DiNaRewardPipeline
from modeling_dina.alignment.reward_fns import DiNaLatentReward
from modeling_dina.serving.protocol import ModelSpec
from modeling_dina.tiny_families import TINY_FAMILY_DINA, build_tiny_pipeline

FAMILIES = ["flux", "qwenimage", "zimage"]
PROMPTS = ["a red cat", "a blue dog on the mat"]  # of different lengths: masks differ
LEVEL = 0.5


def reward_pipe(family):
    generator = build_tiny_pipeline(family, " ".join(PROMPTS).split())
    torch.manual_seed(0)
    model = DiNaRewardModel.from_base(generator.transformer, **TINY_FAMILY_DINA).eval()
    return generator, DiNaRewardPipeline.from_pipe(generator, reward_model=model)


def prompt_inputs(pipe) -> dict:
    """The prompt arguments of `__call__` as embeddings, encoded by the pipeline."""
    encoded = pipe.encode_prompts(PROMPTS)
    return {
        "prompt_embeds": encoded.embeds,
        "pooled_prompt_embeds": encoded.pooled,
        "prompt_embeds_mask": encoded.mask,
    }


def latents_by_hand(vae, family, images):
    """The family pipeline's VAE convention, written out: FLUX / Z-Image `(z - shift) * scale`, Qwen-Image per-channel
    `(z - mean) / std` on the single frame."""
    with torch.no_grad():
        if family == "qwenimage":
            z = vae.encode(images.unsqueeze(2) * 2 - 1).latent_dist.mean[:, :, 0]
            mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (vae.config.latents_mean, vae.config.latents_std))
            return (z - mean) / std
        z = vae.encode(images * 2 - 1).latent_dist.mean
        return (z - vae.config.shift_factor) * vae.config.scaling_factor


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pipe_shares_the_generator_without_copies(family):
    generator, pipe = reward_pipe(family)
    model = pipe.reward_model
    base = {p.data_ptr() for p in generator.transformer.parameters()}
    frozen = [p for n, p in model.backbone.named_parameters() if "lora_" not in n]
    assert frozen and all(p.data_ptr() in base for p in frozen)
    new = [n for n, p in model.named_parameters() if p.data_ptr() not in base]
    assert new and all("lora_" in n or n.startswith("reward_head.") for n in new)
    assert pipe.vae is generator.vae and pipe.scheduler is generator.scheduler
    for name in type(model.backbone).text_components:
        assert pipe.components[name] is getattr(generator, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_loads_the_family_base(family, tmp_path):
    generator = build_tiny_pipeline(family, " ".join(PROMPTS).split())
    generator.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    model = DiNaRewardModel.from_base(str(tmp_path / "base"), **TINY_FAMILY_DINA).eval()
    model.save_pretrained(tmp_path / "dina")
    loaded = DiNaRewardPipeline.from_pretrained(str(tmp_path / "dina"))
    for name in type(model.backbone).text_components:
        assert type(loaded.components[name]) is type(getattr(generator, name))
    assert loaded.text_encoder_3 is None and type(loaded.vae) is type(generator.vae)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = DiNaRewardPipeline.from_pipe(generator, reward_model=model)(PROMPTS, images=images).rewards
    torch.testing.assert_close(loaded(PROMPTS, images=images).rewards, expected)


def test_from_pipe_refuses_a_generator_of_another_family():
    _, flux = reward_pipe("flux")
    generator = build_tiny_pipeline("zimage", PROMPTS)
    with pytest.raises(ValueError, match="zimage generator; the reward model reads flux"):
        DiNaRewardPipeline.from_pipe(generator, reward_model=flux.reward_model)


@pytest.mark.parametrize("family", FAMILIES)
def test_images_latents_and_prompt_embeds_score_alike(family):
    _, pipe = reward_pipe(family)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    latents = latents_by_hand(pipe.vae, family, images)
    torch.testing.assert_close(pipe.encode_images(images), latents, atol=1e-5, rtol=1e-5)
    prompts = prompt_inputs(pipe)

    from_images = pipe(PROMPTS, images=images, noise_level=LEVEL).rewards
    from_latents = pipe(PROMPTS, latents=latents, noise_level=LEVEL).rewards  # the same default noise
    torch.testing.assert_close(from_images, from_latents, atol=1e-5, rtol=1e-5)

    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    from_embeds = pipe(**prompts, latents=latents, noise=noise, noise_level=LEVEL).rewards
    from_text = pipe(PROMPTS, latents=latents, noise=noise, noise_level=LEVEL).rewards
    torch.testing.assert_close(from_embeds, from_text)
    from_images = pipe(PROMPTS, images=images, noise=noise, noise_level=LEVEL).rewards
    torch.testing.assert_close(from_images, from_embeds, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        direct = pipe.reward_model.score_clean(
            latents,
            prompts["prompt_embeds"],
            prompts.get("pooled_prompt_embeds"),
            prompts.get("prompt_embeds_mask"),
            noise=noise,
            noise_level=LEVEL,
        ).rewards
    torch.testing.assert_close(from_embeds, direct)
    assert from_embeds.shape == (2,) and torch.isfinite(from_embeds).all()


@pytest.mark.parametrize("family", ["qwenimage", "zimage"])
def test_the_prompt_mask_reaches_the_model(family):
    _, pipe = reward_pipe(family)
    prompts = prompt_inputs(pipe)
    assert not prompts["prompt_embeds_mask"].all()  # the shorter prompt is padded
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
    scored = pipe(**prompts, latents=latents, noise=noise, noise_level=LEVEL).rewards
    padded = prompts["prompt_embeds"].clone()
    padded[~prompts["prompt_embeds_mask"]] = 5.0  # what masked positions hold must not matter
    rescored = pipe(**{**prompts, "prompt_embeds": padded}, latents=latents, noise=noise, noise_level=LEVEL).rewards
    torch.testing.assert_close(scored, rescored, atol=1e-5, rtol=1e-5)
    unmasked = pipe(prompt_embeds=padded, latents=latents, noise=noise, noise_level=LEVEL).rewards
    assert not torch.allclose(scored, unmasked)


@pytest.mark.parametrize("family", FAMILIES)
def test_generator_latents_are_scored_after_unpacking(family):
    generator, pipe = reward_pipe(family)
    prompt = {"prompt": PROMPTS[0]}
    out = generator(
        **prompt,
        height=32,
        width=32,
        num_inference_steps=1,
        max_sequence_length=TINY_FAMILY_DINA["max_sequence_length"],
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    latents = pipe.unpack_latents(out, 32, 32)
    assert latents.shape == (1, 4, 16, 16)
    if family == "zimage":
        assert latents is out  # Z-Image returns them unpacked
    else:
        repacked = getattr(diffusers, generator.__class__.__name__)._pack_latents(latents, 1, 4, 16, 16)
        assert torch.equal(repacked, out)  # exactly the generator's own layout
        with pytest.raises(ValueError, match="look packed"):
            pipe(**prompt, latents=out)
        with pytest.raises(ValueError, match="do not make a 64x64 image"):
            pipe.unpack_latents(out, 64, 64)
    rewards = pipe(**prompt, latents=latents).rewards
    assert rewards.shape == (1,) and torch.isfinite(rewards).all()


def test_family_prompt_inputs_are_checked():
    _, flux = reward_pipe("flux")
    _, qwen = reward_pipe("qwenimage")
    latents = torch.randn(1, 4, 16, 16)
    embeds = flux.encode_prompts(PROMPTS[:1])
    with pytest.raises(ValueError, match="`pooled_prompt_embeds` is required"):
        flux(prompt_embeds=embeds.embeds, latents=latents)
    with pytest.raises(ValueError, match="takes no `prompt_embeds_mask`"):
        flux(
            prompt_embeds=embeds.embeds,
            pooled_prompt_embeds=embeds.pooled,
            prompt_embeds_mask=torch.ones(1, 16),
            latents=latents,
        )
    with pytest.raises(ValueError, match="reads no pooled prompt embedding"):
        qwen(prompt_embeds=torch.randn(1, 16, 32), pooled_prompt_embeds=torch.randn(1, 16), latents=latents)
    with pytest.raises(ValueError, match="width 24; the reward model expects 32"):
        qwen(prompt_embeds=torch.randn(1, 16, 24), latents=latents)
    without_encoders = build_tiny_pipeline("qwenimage", text_encoders=False)
    bare = DiNaRewardPipeline.from_pipe(without_encoders, reward_model=qwen.reward_model)
    with pytest.raises(ValueError, match=r"missing \['text_encoder', 'tokenizer'\]"):
        bare(prompt="a red cat", latents=latents)
    with pytest.raises(ValueError, match="`prompt_embeds_mask` covers 12 tokens; `prompt_embeds` have 16"):
        qwen(
            prompt_embeds=torch.randn(1, 16, 32),
            prompt_embeds_mask=torch.ones(1, 12, dtype=torch.bool),
            latents=latents,
        )
    with pytest.raises(ValueError, match="`prompt_embeds_mask` must be bool or integer"):
        qwen(prompt_embeds=torch.randn(1, 16, 32), prompt_embeds_mask=torch.ones(1, 16), latents=latents)


@pytest.mark.parametrize("family", FAMILIES)
def test_alignment_reward_is_differentiable_per_family(family):
    _, pipe = reward_pipe(family)
    prompts = prompt_inputs(pipe)
    reward = DiNaLatentReward(pipe.reward_model, noise_level=LEVEL)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5), requires_grad=True)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(6))
    rewards = reward(
        latents,
        prompts["prompt_embeds"],
        prompts["pooled_prompt_embeds"] if family == "flux" else None,
        noise,
        encoder_attention_mask=prompts["prompt_embeds_mask"],
    )
    rewards.sum().backward()
    assert rewards.shape == (2,) and latents.grad.abs().sum() > 0
    expected = pipe(**prompts, latents=latents.detach(), noise=noise, noise_level=LEVEL).rewards
    torch.testing.assert_close(rewards.detach(), expected)


@pytest.mark.parametrize(("family", "widths"), [("flux", (32, 16)), ("qwenimage", (32, None)), ("zimage", (24, None))])
def test_served_model_spec_reads_the_family(family, widths):
    _, pipe = reward_pipe(family)
    spec = ModelSpec.from_model(pipe.reward_model)
    assert (spec.text_width, spec.pooled_width) == widths
    assert spec.latent_channels == 4 and spec.patch_size == 2
