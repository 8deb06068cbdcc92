"""The framework adapters with the call shapes the frameworks use, the served client's signature against the
in-process reward function's, the LoRA fast path and the pipeline's default noise."""

import asyncio
import shutil

import httpx
import numpy as np
import pytest
import torch

from modeling_dina.integrations import MODEL_ENV, URL_ENV, flow_grpo, verl_omni
from modeling_dina.rewards import make_reward_fn
from modeling_dina.serving.client import DiNaRemoteReward, score_latents

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def images():
    """Flow-GRPO's two image forms of the same pixels: float (N, 3, H, W) in [0, 1] and uint8 (N, H, W, 3)."""
    uint8 = (np.random.default_rng(1).random((2, 32, 32, 3)) * 255).astype(np.uint8)
    return torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 255, uint8


def _multi_score_style(score_functions, name, device):
    """How `flow_grpo.rewards.multi_score` builds a registered reward."""
    fn = score_functions[name]
    return fn(device) if "device" in fn.__code__.co_varnames else fn()


def test_flow_grpo_dina_score_in_multi_score(monkeypatch, tiny_dina_dir, tiny_reward_pipe, images):
    monkeypatch.setenv(MODEL_ENV, tiny_dina_dir)
    fn = _multi_score_style({"dina": flow_grpo.dina_score}, "dina", "cpu")
    expected = tiny_reward_pipe(PROMPTS, images=list(images[1])).scores.numpy()
    for form in images:
        scores, details = fn(form, PROMPTS, [{}, {}])
        assert details == {} and scores.dtype == np.float32 and scores.shape == (2,)
        np.testing.assert_allclose(scores, expected, atol=1e-4)
    weighted = [0.5 * score for score in scores]  # what multi_score does with them
    assert len(weighted) == 2


def test_flow_grpo_latent_variant(monkeypatch, tiny_dina_dir, tiny_reward_pipe):
    monkeypatch.setenv(MODEL_ENV, tiny_dina_dir)
    fn = _multi_score_style({"dina_latent": flow_grpo.dina_latent_score}, "dina_latent", "cpu")
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = tiny_reward_pipe(PROMPTS, latents=latents).scores.numpy()
    scores, details = fn(latents, PROMPTS, [{}, {}])
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    with torch.no_grad():
        embeds, _, pooled, _ = tiny_reward_pipe.encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=16
        )
    scores, _ = fn(latents, PROMPTS, [{}, {}], prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    np.testing.assert_allclose(scores, expected, atol=1e-4)


def test_missing_model_names_the_environment_variable(monkeypatch):
    monkeypatch.delenv(MODEL_ENV, raising=False)
    with pytest.raises(ValueError, match=MODEL_ENV):
        flow_grpo.dina_score("cpu")


def test_verl_omni_compute_score_latents_pixels_and_native_model(monkeypatch, tiny_dina_dir, tiny_reward_pipe, images):
    monkeypatch.setenv(MODEL_ENV, tiny_dina_dir)
    latent = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        embeds, _, pooled, _ = tiny_reward_pipe.encode_prompt(
            PROMPTS[:1], None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=16
        )
    extra_info = {"latents_clean": latent, "prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0]}
    # verl-omni's DRM defaults: u = 0.4, noise seed 0, noise by the DRM v1 rule.
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(0))
    expected = tiny_reward_pipe(
        latents=latent[None], prompt_embeds=embeds, pooled_prompt_embeds=pooled, noise=noise, noise_level=0.4
    ).rewards[0]
    pixels = images[0][0]  # (C, H, W) in [0, 1]
    expected_pixels = tiny_reward_pipe(
        PROMPTS[0], images=[pixels], generator=torch.Generator("cpu").manual_seed(0)
    ).rewards[0]

    async def rollout():
        latent_result = await verl_omni.compute_score("dina", latent, PROMPTS[0], extra_info)
        pixel_result = await verl_omni.compute_score("dina", pixels, PROMPTS[0], {})
        return latent_result, pixel_result

    latent_result, pixel_result = asyncio.run(rollout())
    assert abs(latent_result["score"] - expected) <= 1e-4 and latent_result["drm_raw_score"] == latent_result["score"]
    assert abs(pixel_result["score"] - expected_pixels) <= 1e-4

    # The native-model path: built as verl-omni builds it, reached through an async `infer` handle like its executor.
    model = verl_omni.DiNaVerlReward(model_path=tiny_dina_dir, device=torch.device("cpu"))

    class Handle:
        async def infer(self, *args, **kwargs):
            return await asyncio.get_running_loop().run_in_executor(None, lambda: model.infer(*args, **kwargs))

    result = asyncio.run(
        verl_omni.compute_score("dina", latent, PROMPTS[0], extra_info, reward_model=Handle(), score_scale=2.0)
    )
    assert abs(result["score"] - 2 * expected) <= 2e-4
    model.close()
    assert model.pipe is None


def test_remote_reward_has_the_in_process_signature(start_server, tiny_dina_dir, tiny_reward_pipe, images, monkeypatch):
    _, url = start_server(tiny_dina_dir)
    in_process = make_reward_fn(tiny_reward_pipe)
    served = DiNaRemoteReward(url)
    for form in images:  # uint8 pixels survive the PNG exactly; float ones are rounded to 8 bits on the way
        local_scores, local_info = in_process(form, PROMPTS, None)
        remote_scores, remote_info = served(form, PROMPTS, None)
        np.testing.assert_allclose(remote_scores, local_scores, atol=1e-4 if form.dtype == np.uint8 else 5e-2)
        assert remote_scores.dtype == local_scores.dtype and "rewards" in remote_info
    monkeypatch.setenv(URL_ENV, url)
    fn = _multi_score_style({"dina_remote": flow_grpo.dina_score_remote}, "dina_remote", "cuda:0")
    scores, details = fn(images[1], PROMPTS, [{}, {}])
    np.testing.assert_allclose(scores, in_process(images[1], PROMPTS, None)[0], atol=1e-4)
    # And the DRM route through the same client object: verl-omni's request shape (one sample, u, seed 0).
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        embeds, _, pooled, _ = tiny_reward_pipe.encode_prompt(
            PROMPTS[:1], None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=16
        )
    raw = served.score_latents(latent, embeds, pooled, 0.4, [0])
    local = verl_omni.DiNaVerlReward(tiny_dina_dir).infer(
        latents=latent[0], prompt_embeds=embeds, pooled_prompt_embeds=pooled, noise_level=0.4, noise_seed=0
    )
    assert abs(raw[0] - local) <= 1e-4
    with httpx.Client() as client:
        assert torch.equal(score_latents(client, url, latent, embeds, pooled, 0.4, [0]), raw)


def test_fused_lora_scores_as_unfused_and_is_refused_when_shared(tiny_dina_dir, tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    from modeling_dina import DiNaRewardModel
    from modeling_dina.pipeline_dina import DiNaRewardPipeline

    model = DiNaRewardModel.from_pretrained(tiny_dina_dir)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds, pooled = torch.randn(2, 32, 64), torch.randn(2, 64)
    with torch.no_grad():
        before = model(latents, 400.0, embeds, pooled).rewards
        state = {k: v.clone() for k, v in model.merged_state_dict().items()}
        model.fuse_reward_lora()
        after = model(latents, 400.0, embeds, pooled).rewards
        assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in model.merged_state_dict().items())
    assert (before - after).abs().max() <= 1e-5 and before.std() > 0.1
    model.fuse_reward_lora(False)
    with torch.no_grad():
        assert (model(latents, 400.0, embeds, pooled).rewards - before).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="training"):
        model.train().fuse_reward_lora()
    generator = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    shared = DiNaRewardPipeline.from_pipe(generator, reward_model=tiny_dina_dir)
    with pytest.raises(ValueError, match="shared with a generator"):
        shared.reward_model.fuse_reward_lora()


def test_default_noise_is_what_the_pipeline_draws(tiny_reward_pipe):
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds, pooled = torch.randn(2, 32, 64), torch.randn(2, 64)
    embeds, pooled = embeds[[0, 1, 0]], pooled[[0, 1, 0]]  # items 0 and 2 share a prompt, so a draw
    noise = tiny_reward_pipe.default_noise(latents, pooled_prompt_embeds=pooled)
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    kwargs = dict(latents=latents, prompt_embeds=embeds, pooled_prompt_embeds=pooled, noise_level=0.4)
    assert torch.equal(tiny_reward_pipe(**kwargs).rewards, tiny_reward_pipe(**kwargs, noise=noise).rewards)
    text = tiny_reward_pipe.default_noise(latents, prompt=["a cat", "a dog", "a cat"])
    prompted = dict(prompt=["a cat", "a dog", "a cat"], latents=latents, noise_level=0.4)
    assert torch.equal(tiny_reward_pipe(**prompted).rewards, tiny_reward_pipe(**prompted, noise=text).rewards)


def test_verl_omni_shared_model_follows_the_environment_variable(monkeypatch, tiny_dina_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_dina_dir, other)
    monkeypatch.setattr(verl_omni, "_models", {})
    monkeypatch.setenv(MODEL_ENV, tiny_dina_dir)
    first = verl_omni._shared_model(None, "cpu")
    assert verl_omni._shared_model(None, "cpu") is first
    monkeypatch.setenv(MODEL_ENV, str(other))
    assert verl_omni._shared_model(None, "cpu") is not first
