"""`dina serve` on tiny FLUX.1, Qwen-Image and Z-Image reward models: DRM HTTP v1 with and without the pooled vector
and the prompt mask against in-process scores under the seed rule, the image route with the family's own prompt
encoding, the family-specific 4xx, items with and without a mask batched apart; the app in process (Starlette's test
client, lifespan included), then one real loopback server (Z-Image) through `DiNaRemoteReward`, and the framework
adapters fed a masked family's encoding; and the image route of a model saved without text encoders (501)."""

import asyncio
import base64
import contextlib
import io
import time

import numpy as np
import PIL.Image
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as save_tensors

from modeling_dina import DiNaRewardModel, DiNaRewardPipeline
from modeling_dina.integrations import MODEL_ENV, flow_grpo, verl_omni
from modeling_dina.rewards import make_reward_fn
from modeling_dina.serving.app import create_app
from modeling_dina.serving.batching import MicroBatcher
from modeling_dina.serving.client import DiNaRemoteReward, drm_payload
from modeling_dina.serving.engine import RewardEngine
from modeling_dina.serving.protocol import parse_drm_body
from modeling_dina.tiny_families import TINY_FAMILY_DINA, build_tiny_pipeline

FAMILIES = ["flux", "qwenimage", "zimage"]
PROMPTS = ["a red cat", "a blue dog on the mat"]  # of different lengths: masks differ
HEADERS = {"content-type": "application/octet-stream", "x-drm-protocol-version": "1"}


def save_dina(root, base) -> str:
    """A DiNa folder on the generator `base` (saved under `root`), trainable weights perturbed (seeded) as in
    `conftest.py`, so rewards depend on the latent and the prompt."""
    base.save_pretrained(root / "base")
    torch.manual_seed(0)
    model = DiNaRewardModel.from_base(str(root / "base"), **TINY_FAMILY_DINA)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(root / "dina")
    return str(root / "dina")


def serve_in_process(stack: contextlib.ExitStack, folder: str) -> TestClient:
    """A `TestClient` over the served app (engine + micro-batcher, as `dina serve` builds it), once healthy."""
    engine = RewardEngine(folder)
    # Entering runs the lifespan: the batcher starts, the engine loads in the background.
    client = stack.enter_context(TestClient(create_app(engine, MicroBatcher(engine, 8, 20))))
    deadline = time.monotonic() + 120
    while client.get("/healthz").status_code != 200:
        assert time.monotonic() < deadline and engine.load_error is None, engine.load_error
        time.sleep(0.1)
    client.engine = engine  # for the tests that drive the engine directly
    return client


@pytest.fixture(scope="module")
def dina_dirs(tmp_path_factory):
    """`{family: saved DiNa folder}` on each tiny base (see `save_dina`)."""
    words = " ".join(PROMPTS).split()
    return {
        family: save_dina(tmp_path_factory.mktemp(f"serve_{family}"), build_tiny_pipeline(family, words))
        for family in FAMILIES
    }


@pytest.fixture(scope="module")
def pipes(dina_dirs):
    """The in-process reference: each folder through `DiNaRewardPipeline.from_pretrained` (unfused)."""
    loaded = {family: DiNaRewardPipeline.from_pretrained(folder) for family, folder in dina_dirs.items()}
    for pipe in loaded.values():
        pipe.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def clients(dina_dirs):
    """`{family: TestClient}` over each family's served app (see `serve_in_process`)."""
    with contextlib.ExitStack() as stack:
        yield {family: serve_in_process(stack, folder) for family, folder in dina_dirs.items()}


def prompt_encoding(pipe):
    """`(embeds, pooled or None, mask or None)` of PROMPTS as the family encodes them."""
    encoded = pipe.encode_prompts(PROMPTS)
    return encoded.embeds, encoded.pooled, encoded.mask


def seed_rule(latents, seeds):
    """The DRM v1 noise rule, written out: sample i's draw from a CPU generator seeded with `seeds[i]`."""
    return torch.cat(
        [torch.randn((1, *latents.shape[1:]), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    )


def post_drm(client, *args, **kwargs):
    response = client.post("/v1/score", content=drm_payload(*args, **kwargs), headers=HEADERS)
    assert response.status_code == 200, response.text
    return torch.tensor(response.json()["raw_scores"])


@pytest.mark.parametrize("family", FAMILIES)
def test_drm_v1_equals_in_process_under_the_seed_rule(family, clients, pipes):
    client, pipe = clients[family], pipes[family]
    embeds, pooled, mask = prompt_encoding(pipe)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    noise = seed_rule(latents, [11, 12])
    masks = [mask, None] if mask is not None else [None]  # a masked family may leave the mask out (every token real)
    for sent_mask in masks:
        local_args = dict(
            latents=latents, prompt_embeds=embeds, pooled_prompt_embeds=pooled, prompt_embeds_mask=sent_mask
        )
        served = post_drm(client, latents, embeds, pooled, 0.4, [11, 12], encoder_attention_mask=sent_mask)
        local = pipe(**local_args, noise=noise, noise_level=0.4).rewards
        assert (served - local).abs().max() <= 1e-4
        assert (served[0] - served[1]).abs() > 1e-3  # the samples score differently: the comparison is not vacuous
        # Without seeds: the pipeline's deterministic default for the request.
        served = post_drm(client, latents, embeds, pooled, 0.4, encoder_attention_mask=sent_mask)
        assert (served - pipe(**local_args, noise_level=0.4).rewards).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_image_route_encodes_prompts_as_the_pipeline(family, clients, pipes):
    images = (np.random.default_rng(0).random((2, 32, 32, 3)) * 255).astype(np.uint8)
    local = pipes[family](PROMPTS, images=[PIL.Image.fromarray(i) for i in images]).rewards
    answer = clients[family].post("/v1/score_images", json={"prompts": PROMPTS, "images": [_png(i) for i in images]})
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()["raw_scores"], local, atol=1e-4)
    assert clients[family].get("/healthz").json()["cached_prompts"] == 2


def test_image_route_without_text_encoders_says_so(tmp_path):
    folder = save_dina(tmp_path, build_tiny_pipeline("qwenimage", text_encoders=False))
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    with contextlib.ExitStack() as stack:
        client = serve_in_process(stack, folder)
        answer = client.post("/v1/score_images", json={"prompt": PROMPTS[0], "images": [_png(image)]})
    assert answer.status_code == 501 and answer.json()["error"]["field"] == "prompts", answer.text
    assert "/v1/score" in answer.json()["error"]["message"]


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _drm_body(**tensors) -> bytes:
    return save_tensors({name: value.contiguous() for name, value in tensors.items() if value is not None})


@pytest.mark.parametrize("family", ["flux", "qwenimage"])
def test_family_prompt_tensors_get_their_4xx(family, clients, pipes):
    client = clients[family]
    embeds, pooled, mask = prompt_encoding(pipes[family])
    base = dict(latents=torch.randn(2, 4, 16, 16), prompt_embeds=embeds, pooled_prompt_embeds=pooled, u=torch.ones(1))
    if family == "flux":
        cases = [
            (dict(pooled_prompt_embeds=None), "pooled_prompt_embeds"),  # required where the family has one
            (dict(encoder_attention_mask=torch.ones(2, 16, dtype=torch.bool)), "encoder_attention_mask"),
        ]
    else:
        cases = [
            (dict(pooled_prompt_embeds=torch.randn(2, 16)), "pooled_prompt_embeds"),  # the family reads none
            (dict(encoder_attention_mask=mask[:, :12]), "encoder_attention_mask"),  # (B, L) of another L
            (dict(encoder_attention_mask=mask[:1]), "encoder_attention_mask"),  # another B
            (dict(encoder_attention_mask=mask.float()), "encoder_attention_mask"),  # float
            (dict(encoder_attention_mask=mask.long() * 2), "encoder_attention_mask"),  # not 0 / 1
            (dict(encoder_attention_mask=mask[..., None]), "encoder_attention_mask"),  # rank 3
        ]
    for changes, field in cases:
        response = client.post("/v1/score", content=_drm_body(**{**base, **changes}), headers=HEADERS)
        assert response.status_code == 422, (changes, response.text)
        assert response.json()["error"]["field"] == field, response.text
    good = {**base, "encoder_attention_mask": mask.int() if mask is not None else None}
    assert client.post("/v1/score", content=_drm_body(**good), headers=HEADERS).status_code == 200


def test_items_with_and_without_a_mask_batch_apart(clients, pipes):
    engine = clients["zimage"].engine
    embeds, _, mask = prompt_encoding(pipes["zimage"])
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with_mask = engine.latent_items(parse_drm_body(drm_payload(latents, embeds, None, 0.4, [1, 2], mask), engine.spec))
    without = engine.latent_items(parse_drm_body(drm_payload(latents, embeds, None, 0.4, [1, 2]), engine.spec))
    assert with_mask[0].group != without[0].group
    items = [with_mask[0], without[0], with_mask[1], without[1]]
    mixed = engine.score_items(items, 8)
    alone = [engine.score_group([item])[0] for item in items]
    np.testing.assert_allclose(mixed, alone, atol=1e-5)
    assert abs(mixed[0] - mixed[1]) > 1e-4  # unmasked, the padding is read: the mask does reach the model


def test_a_masked_family_over_a_loopback_server(start_server, dina_dirs, pipes):
    _, url = start_server(dina_dirs["zimage"])
    pipe = pipes["zimage"]
    embeds, _, mask = prompt_encoding(pipe)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    remote = DiNaRemoteReward(url)
    served = remote.score_latents(latents, embeds, None, 0.4, [5, 6], encoder_attention_mask=mask)
    local = pipe(
        latents=latents,
        prompt_embeds=embeds,
        prompt_embeds_mask=mask,
        noise=seed_rule(latents, [5, 6]),
        noise_level=0.4,
    ).rewards
    assert (served - local).abs().max() <= 1e-4
    images = (np.random.default_rng(1).random((2, 32, 32, 3)) * 255).astype(np.uint8)
    remote_scores, _ = remote(images, PROMPTS)
    np.testing.assert_allclose(remote_scores, make_reward_fn(pipe)(images, PROMPTS, None)[0], atol=1e-4)
    remote.close()


def test_adapters_take_a_masked_family_encoding(monkeypatch, dina_dirs, pipes):
    pipe = pipes["zimage"]
    monkeypatch.setenv(MODEL_ENV, dina_dirs["zimage"])
    embeds, _, mask = prompt_encoding(pipe)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    fn = flow_grpo.dina_latent_score("cpu")
    expected, _ = fn(latents, PROMPTS, [{}, {}])  # the pipeline encodes the prompts
    scores, _ = fn(latents, PROMPTS, [{}, {}], prompt_embeds=embeds, prompt_embeds_mask=mask)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    # verl-omni: one sample, its mask in `extra_info`, seed 0 (the DRM rule).
    extra_info = {"latents_clean": latents[1], "prompt_embeds": embeds[1], "prompt_embeds_mask": mask[1]}
    # `model_path` given: the process-wide model of `compute_score` is keyed by it, not by the environment.
    result = asyncio.run(
        verl_omni.compute_score("dina", latents[1], PROMPTS[1], extra_info, model_path=dina_dirs["zimage"])
    )
    local = pipe(
        latents=latents[1:],
        prompt_embeds=embeds[1:],
        prompt_embeds_mask=mask[1:],
        noise=seed_rule(latents[1:], [0]),
        noise_level=0.4,
    ).rewards[0]
    assert abs(result["score"] - local) <= 1e-4
