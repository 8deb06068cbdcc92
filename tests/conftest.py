"""Shared test fixtures; everything runs offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP's waits dominate their runtime."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A saved tiny SD3 pipeline folder (default `build_tiny_sd3_components` settings, seed 0)."""
    from modeling_dina.tiny_sd3 import save_tiny_sd3_pipeline

    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"), seed=0)


@pytest.fixture(scope="session")
def tiny_dina_dir(tiny_sd3_dir, tmp_path_factory):
    """A saved DiNa model on the tiny SD3 base (2 blocks, rank-4 LoRA, 16 T5 tokens) whose trainable weights are
    perturbed (seeded), so rewards depend on the image and the prompt."""
    import torch

    from modeling_dina import DiNaRewardModel
    from modeling_dina.tiny_sd3 import TINY_DINA

    model = DiNaRewardModel.from_base(tiny_sd3_dir, **TINY_DINA)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    folder = tmp_path_factory.mktemp("tiny_dina")
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_reward_pipe(tiny_dina_dir):
    """`DiNaRewardPipeline.from_pretrained(tiny_dina_dir)`, progress bars off. Shared: do not modify it."""
    from modeling_dina.pipeline_dina import DiNaRewardPipeline

    pipe = DiNaRewardPipeline.from_pretrained(tiny_dina_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CLIP_WORDS = ["a", "gray", "dark", "bright", "square", "photo", "of"]


@pytest.fixture(scope="session")
def clip_parts():
    """A tiny random CLIP with a word-level tokenizer and a 32-pixel image processor, all built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3} | {w: i + 4 for i, w in enumerate(CLIP_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.model_max_length = 16
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    import torch

    torch.manual_seed(0)
    return CLIPModel(config), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def start_server():
    """`start_server(model_dir, *extra_args, timeout=...)`: run `dina serve` on 127.0.0.1 (a free port) in a
    subprocess, wait (bounded) for `/healthz` to answer 200, return `(process, base_url)`. Every server started is
    stopped at the end of the session through its own process handle (SIGTERM, then kill)."""
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    import httpx

    processes = []

    def start(model_dir, *extra_args, timeout: float = 240.0):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "modeling_dina.cli", "serve", "--model", str(model_dir), "--port", str(port)]
        log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks on it
        process = subprocess.Popen(
            [*command, "--log-level", "warning", *extra_args], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"`dina serve` exited with {process.returncode}: {log.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    return process, url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"`dina serve` was not healthy within {timeout} s")

    yield start
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
