"""`dina serve` as a real server: a subprocess on 127.0.0.1, driven with httpx. DRM HTTP v1 against in-process scores
under the noise rule, concurrency, every bad request's 4xx, the image route, graceful SIGTERM; and the micro-batcher
on its own."""

import asyncio
import base64
import io
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save as save_tensors

from modeling_dina.serving.batching import MicroBatcher
from modeling_dina.serving.client import drm_payload, score_latents
from modeling_dina.serving.engine import ScoreItem
from modeling_dina.serving.protocol import seeded_noise

PROMPTS = ["a red circle", "two blue squares", "a cat left of a tree"]
HEADERS = {"content-type": "application/octet-stream", "x-drm-protocol-version": "1"}


@pytest.fixture(scope="module")
def server(start_server, tiny_dina_dir):
    _, url = start_server(tiny_dina_dir, "--max-batch-size", "8", "--max-wait-ms", "20", "--max-body-mb", "0.25")
    return url


@pytest.fixture(scope="module")
def inputs(tiny_reward_pipe):
    """Three clean latents (the tiny model's whole 16x16 position table) and their prompt encoding."""
    pipe = tiny_reward_pipe
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=16
        )
    return latents, embeds, pooled


def test_healthz(server):
    answer = httpx.get(f"{server}/healthz").json()
    assert answer["status"] == "ok" and answer["protocol_version"] == "1"


def test_drm_v1_equals_in_process_under_the_seed_rule(server, inputs, tiny_reward_pipe):
    latents, embeds, pooled = inputs
    seeds = torch.tensor([11, 12, 13])
    with httpx.Client(timeout=60) as client:
        served = score_latents(client, server, latents, embeds, pooled, 0.4, seeds)
        # The rule, written out: sample i's noise from a CPU generator seeded with seeds[i].
        noise = torch.cat(
            [torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(s)) for s in [11, 12, 13]]
        )
        local = tiny_reward_pipe(
            latents=latents, prompt_embeds=embeds, pooled_prompt_embeds=pooled, noise=noise, noise_level=0.4
        ).rewards
        assert (served - local).abs().max() <= 1e-4
        assert served.std() > 0.1  # the rewards differ between samples: the comparison is not vacuous
        # `u` per sample: each sample at its own level, as scoring it alone in process.
        levels = [0.2, 0.5, 0.9]
        served = score_latents(client, server, latents, embeds, pooled, levels, seeds)
        for i, level in enumerate(levels):
            alone = tiny_reward_pipe(
                latents=latents[i : i + 1],
                prompt_embeds=embeds[i : i + 1],
                pooled_prompt_embeds=pooled[i : i + 1],
                noise=noise[i : i + 1],
                noise_level=level,
            ).rewards
            assert abs(served[i] - alone[0]) <= 1e-4
        # Without seeds: the pipeline's deterministic default for the request.
        served = score_latents(client, server, latents, embeds, pooled, 0.4)
        local = tiny_reward_pipe(latents=latents, prompt_embeds=embeds, pooled_prompt_embeds=pooled, noise_level=0.4)
        assert (served - local.rewards).abs().max() <= 1e-4


def test_64_concurrent_requests_match_sequential(server, inputs):
    latents, embeds, pooled = inputs
    generator = torch.Generator().manual_seed(2)
    requests = [
        drm_payload(
            torch.randn(1, 4, 16, 16, generator=generator),
            embeds[i % 3 : i % 3 + 1],
            pooled[i % 3 : i % 3 + 1],
            [0.3, 0.6][i % 2],
            [i],
        )
        for i in range(64)
    ]

    def post(client, body):
        response = client.post(f"{server}/v1/score", content=body, headers=HEADERS)
        assert response.status_code == 200, response.text
        return response.json()["raw_scores"][0]

    with httpx.Client(timeout=120) as client:
        sequential = [post(client, body) for body in requests]
    clients = [httpx.Client(timeout=120) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda i: post(clients[i % 8], requests[i]), range(64)))
    for client in clients:
        client.close()
    # Equal up to fp32 round-off of a batched call (batch-mates change the reduction order, ~1e-6 relative).
    np.testing.assert_allclose(concurrent, sequential, rtol=1e-5, atol=1e-5)
    assert len(set(np.round(sequential, 4))) > 32  # 64 different samples, not one answer repeated


def _tensors(inputs, **changes):
    latents, embeds, pooled = inputs
    tensors = {"latents": latents, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "u": torch.tensor([0.4])}
    tensors.update(changes)
    return save_tensors({k: v.contiguous() for k, v in tensors.items() if v is not None})


def test_every_bad_request_gets_its_4xx_and_the_server_keeps_serving(server, inputs):
    latents, embeds, pooled = inputs
    nan_latents = latents.clone()
    nan_latents[0, 0, 0, 0] = float("nan")
    cases = [
        ("not safetensors", b"definitely not safetensors", HEADERS, 400, "body"),
        ("missing tensor", _tensors(inputs, pooled_prompt_embeds=None), HEADERS, 422, "pooled_prompt_embeds"),
        ("wrong channels", _tensors(inputs, latents=latents[:, :3]), HEADERS, 422, "latents"),
        ("wrong rank", _tensors(inputs, latents=latents[0]), HEADERS, 422, "latents"),
        ("batch mismatch", _tensors(inputs, prompt_embeds=embeds[:2]), HEADERS, 422, "prompt_embeds"),
        ("NaN", _tensors(inputs, latents=nan_latents), HEADERS, 422, "latents"),
        ("inf", _tensors(inputs, pooled_prompt_embeds=pooled * float("inf")), HEADERS, 422, "pooled_prompt_embeds"),
        ("u above 1", _tensors(inputs, u=torch.tensor([1.5])), HEADERS, 422, "u"),
        ("u below 0", _tensors(inputs, u=torch.tensor([-0.1, 0.2, 0.3])), HEADERS, 422, "u"),
        ("seeds not int64", _tensors(inputs, seeds=torch.tensor([1.0, 2.0, 3.0])), HEADERS, 422, "seeds"),
        ("odd latent size", _tensors(inputs, latents=latents[..., :15]), HEADERS, 422, "latents"),
        ("protocol 2", _tensors(inputs), {**HEADERS, "x-drm-protocol-version": "2"}, 400, "x-drm-protocol-version"),
        ("no protocol", _tensors(inputs), {"content-type": "application/octet-stream"}, 400, "x-drm-protocol-version"),
        ("content type", _tensors(inputs), {**HEADERS, "content-type": "application/json"}, 415, "content-type"),
        ("over the size limit", b"\0" * 300_000, HEADERS, 413, "body"),
    ]
    with httpx.Client(timeout=60) as client:
        for name, body, headers, status, field in cases:
            response = client.post(f"{server}/v1/score", content=body, headers=headers)
            assert response.status_code == status, (name, response.text)
            assert response.json()["error"]["field"] == field, name
            assert client.get(f"{server}/healthz").status_code == 200, name
        good = client.post(f"{server}/v1/score", content=_tensors(inputs), headers=HEADERS)
        assert good.status_code == 200 and len(good.json()["raw_scores"]) == 3


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_score_images_json_and_multipart_equal_in_process(server, tiny_reward_pipe):
    images = (np.random.default_rng(0).random((3, 32, 32, 3)) * 255).astype(np.uint8)
    local = tiny_reward_pipe(PROMPTS, images=[PIL.Image.fromarray(i) for i in images]).rewards
    with httpx.Client(timeout=60) as client:
        answer = client.post(
            f"{server}/v1/score_images", json={"prompts": PROMPTS, "images": [_png(i) for i in images]}
        )
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()["raw_scores"], local, atol=1e-4)
        files = [("images", (f"{i}.png", base64.b64decode(_png(image)), "image/png")) for i, image in enumerate(images)]
        form = client.post(f"{server}/v1/score_images", data={"prompt": PROMPTS}, files=files)
        assert form.status_code == 200, form.text
        np.testing.assert_allclose(form.json()["raw_scores"], local, atol=1e-4)
        assert client.get(f"{server}/healthz").json()["cached_prompts"] == 3  # encoded once, then served from cache
        bad = [
            ({"prompts": PROMPTS, "images": ["not base64!"] * 3}, "images[0]"),
            ({"prompts": PROMPTS, "images": [base64.b64encode(b"no image").decode()] * 3}, "images[0]"),
            ({"prompts": PROMPTS[:2], "images": [_png(i) for i in images]}, "prompts"),
            ({"prompt": "a cat", "images": [_png(images[0])], "noise_level": 2}, "noise_level"),
            ({"prompt": "a cat"}, "images"),
        ]
        for payload, field in bad:
            response = client.post(f"{server}/v1/score_images", json=payload)
            assert response.status_code == 422 and response.json()["error"]["field"] == field, response.text
        assert client.get(f"{server}/healthz").status_code == 200


def test_sigterm_lets_in_flight_requests_finish(start_server, tiny_dina_dir, inputs):
    process, url = start_server(tiny_dina_dir, "--max-wait-ms", "2000")
    answers = []
    request = threading.Thread(
        target=lambda: answers.append(
            httpx.post(f"{url}/v1/score", content=_tensors(inputs), headers=HEADERS, timeout=60)
        )
    )
    request.start()
    time.sleep(0.7)  # the request now waits in the batcher
    process.send_signal(signal.SIGTERM)
    request.join(timeout=60)
    assert answers and answers[0].status_code == 200, answers
    # uvicorn exits through the signal it caught once the server has shut down (so the code says why it stopped).
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)


# ------------------------------------------------------------------------------------------- the micro-batcher


class _FakeEngine:
    """Scores an item as its latent's first value; an item whose value is negative fails the whole call."""

    def __init__(self):
        self.executor = ThreadPoolExecutor(1)
        self.calls: list[int] = []

    def score_items(self, items, max_batch_size):
        from modeling_dina.serving.engine import RewardEngine

        return RewardEngine.score_items(self, items, max_batch_size)

    def score_group(self, items):
        self.calls.append(len(items))
        if any(item.latent[0].item() < 0 for item in items):
            raise ValueError("bad item")
        return [item.latent[0].item() for item in items]


def _item(value: float, level: float = 0.4, side: int = 4) -> ScoreItem:
    latent = torch.full((side,), value)
    return ScoreItem(latent, latent, torch.zeros(2, 3), torch.zeros(3), level)


def test_micro_batcher_batches_groups_and_isolates_a_bad_item():
    engine = _FakeEngine()

    async def run():
        batcher = MicroBatcher(engine, max_batch_size=4, max_wait_ms=50)
        batcher.start()
        requests = [[_item(1.0)], [_item(2.0)], [_item(-1.0)], [_item(3.0, level=0.7)], [_item(4.0, side=8)]]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)
        await batcher.stop()
        return batcher, results

    batcher, results = asyncio.run(run())
    assert results[0] == [1.0] and results[1] == [2.0] and results[3] == [3.0] and results[4] == [4.0]
    assert isinstance(results[2], ValueError)  # the bad item alone fails
    assert batcher.batch_sizes == [5]  # all five arrived within the wait: one flush
    # Three groups (u=0.4 side 4, u=0.7, side 8); the first failed as a batch of 3, then its items ran alone.
    assert sorted(engine.calls) == [1, 1, 1, 1, 1, 3]


def test_seeded_noise_is_the_documented_rule():
    latents = torch.zeros(2, 4, 6, 6)
    noise = seeded_noise(latents, torch.tensor([3, 9]))
    assert torch.equal(noise[1:], torch.randn((1, 4, 6, 6), generator=torch.Generator("cpu").manual_seed(9)))
    assert noise.dtype == torch.float32
