"""`dina serve --replicas 2`: the same HTTP API from two Ray Serve replicas on a local Ray cluster (2 CPUs), started
and stopped by the test through the server's process handle."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from modeling_dina.serving.client import drm_payload, score_latents
from modeling_dina.serving.protocol import seeded_noise

pytest.importorskip("ray.serve")

HEADERS = {"content-type": "application/octet-stream", "x-drm-protocol-version": "1"}


def test_two_ray_replicas_serve_the_same_api(start_server, tiny_dina_dir, tiny_reward_pipe):
    _, url = start_server(tiny_dina_dir, "--replicas", "2", "--ray-num-cpus", "2", "--max-wait-ms", "20", timeout=420)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        embeds, _, pooled, _ = tiny_reward_pipe.encode_prompt(
            ["a red circle", "a cat"],
            None,
            None,
            device="cpu",
            do_classifier_free_guidance=False,
            max_sequence_length=16,
        )
    seeds = torch.tensor([4, 5])
    local = tiny_reward_pipe(
        latents=latents,
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        noise=seeded_noise(latents, seeds),
        noise_level=0.4,
    ).rewards
    # Ray's router spreads concurrent requests over both replicas (each answers with its own process id); the second
    # may still be loading when the first answers, so look for a bounded while.
    replicas, deadline = set(), time.monotonic() + 240
    with ThreadPoolExecutor(8) as pool, httpx.Client(timeout=120) as client:
        while len(replicas) < 2 and time.monotonic() < deadline:
            replicas |= set(pool.map(lambda _: client.get(f"{url}/healthz").json()["pid"], range(32)))
            time.sleep(1)
    assert len(replicas) == 2
    with httpx.Client(timeout=120) as client:
        served = score_latents(client, url, latents, embeds, pooled, 0.4, seeds)
        assert (served - local).abs().max() <= 1e-4
        bad = client.post(f"{url}/v1/score", content=b"not safetensors", headers=HEADERS)
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "body"
    # Concurrent requests spread over both replicas (Ray's router) and batched there (serve.batch).
    bodies = [
        drm_payload(
            latents[i % 2 : i % 2 + 1], embeds[i % 2 : i % 2 + 1], pooled[i % 2 : i % 2 + 1], 0.4, [int(seeds[i % 2])]
        )
        for i in range(16)
    ]
    with ThreadPoolExecutor(4) as pool, httpx.Client(timeout=120) as client:
        answers = list(pool.map(lambda body: client.post(f"{url}/v1/score", content=body, headers=HEADERS), bodies))
    assert all(a.status_code == 200 for a in answers)
    rewards = [a.json()["raw_scores"][0] for a in answers]
    np.testing.assert_allclose(rewards, [float(local[i % 2]) for i in range(16)], rtol=1e-5, atol=1e-4)
