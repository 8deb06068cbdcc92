"""Serving throughput and latency of `dina serve` next to the same scoring in process.

    nice python bench/bench_serving.py                      # the shipped Shapes reward model
    python bench/bench_serving.py --model DIR --latent-side 64 --threads 2

Prints two tables:
1. Throughput (latents scored per second) at request batch 1, 8 and 32: in process (`pipe(latents=..., noise=...)`,
   exactly what the server runs) and served (one client, sequential DRM v1 requests), and the served overhead per
   request (served minus in-process time per call: HTTP, safetensors, JSON, the batcher's wait).
2. Latency under 8 concurrent clients sending one-sample requests: p50 / p99 and aggregate throughput, with
   micro-batching (`--max-batch-size 8`) and without (`--max-batch-size 1`).

The server runs in a subprocess on 127.0.0.1 with the same number of torch threads as the in-process runs. Each
figure is the best of `--repeats` runs (other processes on a shared machine only ever add time).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from modeling_dina.pipeline_dina import DiNaRewardPipeline
from modeling_dina.serving.client import drm_payload
from modeling_dina.serving.protocol import seeded_noise

SHAPES_REWARD = Path(__file__).resolve().parents[1] / "modeling_dina" / "shapes" / "assets" / "reward"
HEADERS = {"content-type": "application/octet-stream", "x-drm-protocol-version": "1"}


def make_inputs(pipe: DiNaRewardPipeline, batch: int, side: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    channels = pipe.reward_model.backbone.latent_channels
    latents = torch.randn(batch, channels, side, side, generator=generator)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            [f"prompt {i % 4}" for i in range(batch)],
            None,
            None,
            device="cpu",
            do_classifier_free_guidance=False,
            max_sequence_length=pipe.reward_model.config.max_sequence_length,
        )
    return latents, embeds, pooled, torch.arange(batch)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def start_server(model: str, threads: int, *extra: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "modeling_dina.cli", "serve", "--model", model, "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--log-level", "warning", *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not become healthy")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def throughput_table(pipe, url, side: int, repeats: int) -> list[str]:
    rows = []
    with httpx.Client(timeout=600) as client:
        for batch in (1, 8, 32):
            latents, embeds, pooled, seeds = make_inputs(pipe, batch, side)
            noise = seeded_noise(latents, seeds)
            kwargs = dict(latents=latents, prompt_embeds=embeds, pooled_prompt_embeds=pooled, noise=noise)
            local = best_time(lambda kw=kwargs, b=batch: pipe(**kw, noise_level=0.4, batch_size=b), repeats)
            body = drm_payload(latents, embeds, pooled, 0.4, seeds)

            def post(body=body):
                response = client.post(f"{url}/v1/score", content=body, headers=HEADERS)
                response.raise_for_status()

            served = best_time(post, repeats)
            rows.append(f"| {batch} | {batch / local:.1f} | {batch / served:.1f} | {1000 * (served - local):.1f} |")
    return rows


def concurrent_row(pipe, url, side: int, label: str, clients: int = 8, per_client: int = 40) -> str:
    latents, embeds, pooled, seeds = make_inputs(pipe, clients * per_client, side, seed=1)
    bodies = [
        drm_payload(latents[i : i + 1], embeds[i : i + 1], pooled[i : i + 1], 0.4, seeds[i : i + 1])
        for i in range(len(latents))
    ]

    def run_client(index: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=600) as client:
            for body in bodies[index::clients]:
                start = time.perf_counter()
                client.post(f"{url}/v1/score", content=body, headers=HEADERS).raise_for_status()
                latencies.append(time.perf_counter() - start)
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = np.concatenate(list(pool.map(run_client, range(clients))))
    wall = time.perf_counter() - start
    p50, p99 = np.percentile(latencies * 1000, [50, 99])
    return f"| {label} | {clients} | {p50:.1f} | {p99:.1f} | {len(bodies) / wall:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(SHAPES_REWARD), help="DiNa model folder (default: the Shapes reward)")
    parser.add_argument("--latent-side", type=int, default=None, help="latent pixels a side (default: the model's max)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-fuse", action="store_true", help="keep the LoRA unfused (in process and served)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = DiNaRewardPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    backbone = pipe.reward_model.eval().backbone
    if not args.no_fuse:
        pipe.reward_model.fuse_reward_lora()
    side = args.latent_side or backbone.max_patches * backbone.patch_size
    fuse = ["--no-fuse"] if args.no_fuse else []
    print(
        f"model {args.model}, latents {backbone.latent_channels}x{side}x{side}, {args.threads} torch threads, "
        f"LoRA {'unfused' if args.no_fuse else 'fused'}\n"
    )

    process, url = start_server(args.model, args.threads, "--max-batch-size", "32", "--max-wait-ms", "2", *fuse)
    try:
        rows = throughput_table(pipe, url, side, args.repeats)
    finally:
        stop_server(process)
    print("| request batch | in process (latents/s) | served (latents/s) | served overhead per request (ms) |")
    print("|---:|---:|---:|---:|")
    print("\n".join(rows))

    print("\n| server | concurrent clients | p50 latency (ms) | p99 latency (ms) | throughput (latents/s) |")
    print("|---|---:|---:|---:|---:|")
    for label, extra in (
        ("micro-batching (max 8, wait 10 ms)", ["--max-batch-size", "8", "--max-wait-ms", "10"]),
        ("no batching (max 1)", ["--max-batch-size", "1", "--max-wait-ms", "0"]),
    ):
        process, url = start_server(args.model, args.threads, *extra, *fuse)
        try:
            print(concurrent_row(pipe, url, side, label), flush=True)
        finally:
            stop_server(process)


if __name__ == "__main__":
    main()
