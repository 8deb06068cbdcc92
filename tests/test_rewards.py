"""Alignment-loop adapters (`modeling_dina.rewards`) and the `dina score` / `dina score-dataset` CLI pieces."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from modeling_dina.cli_score import add_score_parser
from modeling_dina.rewards import DiNaScorer, best_of_n, make_latent_reward_fn, make_reward_fn

PROMPT = "a red circle"
NOISE = ("shared", "independent")


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def pipe(tiny_reward_pipe):
    return tiny_reward_pipe


def test_reward_fn_accepts_the_usual_image_forms(pipe):
    fn = make_reward_fn(pipe)
    nhwc = _images(3)
    nchw = torch.from_numpy(nhwc).permute(0, 3, 1, 2).float() / 255
    pil = [Image.fromarray(image) for image in nhwc]
    prompts = [PROMPT, PROMPT, "two blue squares"]
    scores, info = fn(nchw, prompts, [{}] * 3)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32 and scores.shape == (3,)
    for images in (nhwc, pil):
        np.testing.assert_allclose(fn(images, prompts, None)[0], scores, atol=1e-5)
    expected = pipe(prompts, images=pil)
    np.testing.assert_allclose(scores, expected.scores.numpy(), atol=1e-5)
    np.testing.assert_allclose(info["rewards"], expected.rewards.numpy(), atol=1e-5)
    assert info["sigmas"] == pytest.approx(expected.sigmas.tolist())
    raw, _ = make_reward_fn(pipe, normalized=False, noise_levels=[0.2, 0.5])(pil, prompts, None)
    np.testing.assert_allclose(raw, pipe(prompts, images=pil, noise_levels=[0.2, 0.5]).rewards.numpy(), atol=1e-5)


def test_latent_reward_fn_is_differentiable(pipe):
    embeds, _, pooled, _ = pipe.encode_prompt(
        [PROMPT, PROMPT], None, None, do_classifier_free_guidance=False, max_sequence_length=16
    )
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    rewards = make_latent_reward_fn(pipe, noise_level=0.4, differentiable=True)(latents, embeds, pooled)
    expected = pipe(latents=latents.detach(), prompt_embeds=embeds, pooled_prompt_embeds=pooled, noise_level=0.4)
    torch.testing.assert_close(rewards.detach(), expected.rewards)
    rewards.sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    pipe.reward_model.zero_grad(set_to_none=True)
    assert not make_latent_reward_fn(pipe)(latents, embeds, pooled).requires_grad


def test_best_of_n(pipe):
    candidates = list(_images(4, seed=1))
    best = best_of_n(pipe, PROMPT, candidates)
    rewards = pipe(PROMPT, images=candidates).rewards
    torch.testing.assert_close(best.rewards, rewards)
    assert best.index == int(rewards.argmax())
    assert sorted(best.ranking) == [0, 1, 2, 3]
    assert rewards[best.ranking].tolist() == sorted(rewards.tolist(), reverse=True)
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert best_of_n(pipe, PROMPT, latents, as_latents=True).index == int(
        pipe(PROMPT, latents=latents).rewards.argmax()
    )
    with pytest.raises(TypeError, match="`prompt` must be one string"):
        best_of_n(pipe, [PROMPT], candidates)
    with pytest.raises(TypeError, match="`pipe` must be a DiNaRewardPipeline"):
        make_reward_fn(object())


@pytest.fixture
def parser():
    parser = argparse.ArgumentParser(prog="dina")
    add_score_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_score(parser, pipe, tiny_dina_dir, tmp_path, capsys):
    paths = []
    for i, image in enumerate(_images(2)):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    args = parser.parse_args(["score", "--model", tiny_dina_dir, "--prompt", PROMPT, *paths, "--json"])
    args.func(args)
    result = json.loads(capsys.readouterr().out)
    expected = pipe(PROMPT, images=paths)
    assert [row["image"] for row in result["results"]] == paths
    assert [row["reward"] for row in result["results"]] == pytest.approx(expected.rewards.tolist(), abs=1e-5)
    assert result["sigmas"] == pytest.approx(expected.sigmas.tolist())

    args = parser.parse_args(
        ["score", "--model", tiny_dina_dir, "--prompt", PROMPT, *paths, "--noise-levels", "0.2,0.7"]
    )
    args.func(args)
    table = capsys.readouterr().out
    ensemble = pipe(PROMPT, images=paths, noise_levels=[0.2, 0.7])
    assert "| image | reward | score |" in table and f"{ensemble.rewards[1].item():.4f}" in table
    with pytest.raises(SystemExit):
        parser.parse_args(["score", "--model", tiny_dina_dir, "--prompt", PROMPT, paths[0], "--noise-levels", "a,b"])
    args = parser.parse_args(["score", "--model", tiny_dina_dir, "--prompt", PROMPT, str(tmp_path / "missing.png")])
    with pytest.raises(FileNotFoundError, match="`images`"):
        args.func(args)


def test_cli_score_dataset(parser, pipe, tiny_dina_dir, tmp_path):
    images = [Image.fromarray(image) for image in _images(5, seed=2)]
    prompts = [PROMPT, PROMPT, "two blue squares", PROMPT, "a cat"]
    source = tmp_path / "source"
    datasets.Dataset.from_dict({"image": images, "caption": prompts}).cast_column(
        "image", datasets.Image()
    ).save_to_disk(source)
    output = tmp_path / "scored"
    args = parser.parse_args(
        ["score-dataset", "--model", tiny_dina_dir, "--dataset", str(source), "--prompt-column", "caption"]
        + ["--output", str(output), "--batch-size", "2"]
    )
    args.func(args)
    scored = datasets.load_from_disk(output)
    assert scored.column_names == ["image", "caption", "dina_reward", "dina_score"]
    expected = pipe(prompts, images=images)
    assert scored["dina_reward"] == pytest.approx(expected.rewards.tolist(), abs=1e-5)
    assert scored["dina_score"] == pytest.approx(expected.scores.tolist(), abs=1e-5)
    args.output, args.prompt_column = str(tmp_path / "scored.jsonl"), "prompt"
    with pytest.raises(ValueError, match="no column 'prompt'"):
        args.func(args)


SCRIPT = """
import argparse, sys
from modeling_dina.cli_score import add_score_parser
parser = argparse.ArgumentParser(prog="dina")
add_score_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
args.func(args)
"""


@pytest.mark.slow
def test_cli_score_dataset_two_processes(tiny_dina_dir, tmp_path):
    """Under torchrun each process scores its shards; the gathered column equals a single-process run, row by row."""
    images = [Image.fromarray(image) for image in _images(5, seed=3)]
    prompts = [PROMPT, "a cat", PROMPT, "a dog", "two cats"]
    source = tmp_path / "source"
    datasets.Dataset.from_dict({"image": images, "prompt": prompts}).cast_column(
        "image", datasets.Image()
    ).save_to_disk(source)
    script = tmp_path / "dina_cli.py"
    script.write_text(SCRIPT)
    command = ["score-dataset", "--model", tiny_dina_dir, "--dataset", str(source), "--batch-size", "2"]
    command += ["--shard-size", "2", "--output"]  # shards 0 and 2 on process 0, shard 1 on process 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for runner, output in ((launcher, "two"), ([sys.executable], "one")):
        subprocess.run([*runner, str(script), *command, str(tmp_path / output)], check=True, env=env, timeout=300)
    two, one = datasets.load_from_disk(tmp_path / "two"), datasets.load_from_disk(tmp_path / "one")
    assert two["prompt"] == prompts
    assert two["dina_reward"] == pytest.approx(one["dina_reward"], abs=1e-5)


def test_dina_scorer_noise_modes(pipe):
    images = [Image.fromarray(a) for a in _images(4, seed=5)]
    prompts = [PROMPT, PROMPT, "a blue square", "a blue square"]
    shared, independent = (DiNaScorer(pipe, noise_level=1.0, noise=mode) for mode in ("shared", "independent"))
    assert (shared.name, independent.name) == ("dina@1.0", "dina-independent@1.0")
    # At sigma = 1 the latent is the noise alone: shared noise gives a prompt's two images one reward, independent
    # noise two.
    same, fresh = shared(prompts, images), independent(prompts, images)
    assert same[0] == same[1] and same[2] == same[3] and same[0] != same[2]
    assert fresh[0] != fresh[1] and fresh[2] != fresh[3]
    # Shared is the pipeline's own call (common random numbers); independent is one seeded draw per image.
    shared, independent = (DiNaScorer(pipe, noise_level=0.7, noise=mode, batch_size=4) for mode in NOISE)
    torch.testing.assert_close(shared(prompts, images), pipe(prompts, images=images, noise_level=0.7).rewards)
    shape = (1, pipe.reward_model.backbone.latent_channels, 32 // pipe.vae_scale_factor, 32 // pipe.vae_scale_factor)
    by_hand = [
        pipe(p, images=[im], noise=torch.randn(shape, generator=independent.generator(p, im)), noise_level=0.7).rewards
        for p, im in zip(prompts, images)
    ]
    rewards = independent(prompts, images)
    torch.testing.assert_close(rewards, torch.cat(by_hand))
    # Reproducible, whatever the batch and the order; another seed is another draw.
    one_by_one = DiNaScorer(pipe, noise_level=0.7, noise="independent", batch_size=1)
    assert torch.equal(one_by_one(prompts[::-1], images[::-1]).flip(0), rewards)
    reseeded = DiNaScorer(pipe, noise_level=0.7, noise="independent", seed=1)
    assert reseeded.name == "dina-independent-seed1@0.7" and not torch.equal(reseeded(prompts, images), rewards)
    ensemble = DiNaScorer(pipe, noise_levels=[0.2, 0.5], noise="independent")
    assert ensemble.name == "dina-independent@ensemble" and torch.isfinite(ensemble(prompts, images)).all()
    with pytest.raises(ValueError, match="noise"):
        DiNaScorer(pipe, noise_level=0.7, noise="fresh")
