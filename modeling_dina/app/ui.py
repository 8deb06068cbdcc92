"""The web demo's page: Score, Compare and (for the Shapes model) Shapes world tabs, built with Gradio Blocks.

Every handler turns bad input into a message in the page (`gr.Error`, `gr.Warning` for a skipped image); the model
calls share one queue slot, since the Shapes generator and its reward share the transformer blocks.
"""

from __future__ import annotations

import html
import os
import tempfile
from functools import partial
from pathlib import Path

import gradio as gr
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError

from ..shapes.render import render
from ..shapes.report import held_out_prompts
from .models import AppModels, load_models, score_images, shapes_candidates

__all__ = ["build_app", "compare_handler", "score_handler", "serve", "shapes_handler", "shapes_examples"]

MODEL_SLOT = "model"  # concurrency id of every event that runs a model
# Gradio hands a handler its request's progress tracker through a `Progress` default argument.
PROGRESS = gr.Progress()
TQDM_PROGRESS = gr.Progress(track_tqdm=True)  # also follows the generator's tqdm bar
TILE = 192  # display size of the Shapes world's 64x64 images
EXAMPLE_SCENES = (  # (prompt, violated attributes per image) for the Shapes model's examples
    ("two red circles", ((), ("colour",), ("count",))),
    ("a blue square left of a yellow triangle", ((), ("position",))),
)


def _open_image(path: str, label: str) -> Image.Image:
    """An uploaded file as a decoded RGB image, or `gr.Error` naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB") if image.mode not in ("RGB", "RGBA") else image.copy()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise gr.Error(f"{html.escape(label)} is not a readable image ({html.escape(str(err))}).") from err


def _require_prompt(prompt: str | None) -> str:
    if not prompt or not prompt.strip():
        raise gr.Error("Type a prompt first.")
    return prompt.strip()


def _model_errors(fn):
    """Run `fn`; a ValueError/TypeError from the models (a prompt outside the grammar, an image too small) becomes a
    message in the page."""
    try:
        return fn()
    except (ValueError, TypeError) as err:
        raise gr.Error(html.escape(str(err))) from err


def _uploaded_images(files) -> tuple[list[Image.Image], list[str]]:
    """Decoded uploads and their file names; unreadable files are skipped with a warning."""
    images, names = [], []
    for path in files or []:
        name = Path(path).name
        try:
            images.append(_open_image(path, name))
            names.append(name)
        except gr.Error:
            gr.Warning(f"Skipped {html.escape(name)}: not a readable image.")
    if not images:
        raise gr.Error("Upload at least one image (PNG, JPEG, WebP).")
    return images, names


def reward_plot(result, names: list[str]) -> Figure:
    """Reward per noise level, one line per image; dashed: its ensemble reward across the ensemble's levels."""
    figure = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = figure.subplots()
    low, high = min(result.ensemble_levels), max(result.ensemble_levels)
    for level in result.ensemble_levels:
        ax.axvline(level, color="0.85", linewidth=1, zorder=0)
    for rank, i in enumerate(result.order):
        (line,) = ax.plot(result.levels, result.per_level[:, i].tolist(), marker="o", label=f"#{rank + 1} {names[i]}")
        ax.hlines(result.ensemble[i].item(), low, high, colors=line.get_color(), linestyles="dashed")
    ax.axvline(result.noise_level, color="0.4", linestyle=":", linewidth=1)
    levels = ", ".join(f"{u:g}" for u in result.ensemble_levels)
    ax.set(xlabel="noise level u", ylabel="reward", title=f"dashed: ensemble over u = {levels}; dotted: ranking level")
    ax.legend(fontsize="small", loc="best")
    return figure


def ranking_table(result, names: list[str]) -> str:
    """The ranking as a markdown table (rank, image, reward, score, ensemble reward)."""
    lines = [
        f"Ranked by {'the ensemble reward' if result.rank_by_ensemble else 'the reward'} "
        f"(noise level u={result.noise_level:g}, sigma={result.sigma:.3f})",
        "",
        "| rank | image | reward | score | ensemble reward |",
        "|---:|---|---:|---:|---:|",
    ]
    for rank, i in enumerate(result.order):
        lines.append(
            f"| {rank + 1} | {html.escape(names[i])} | {result.rewards[i]:.3f} | {result.scores[i]:.3f} "
            f"| {result.ensemble[i]:.3f} |"
        )
    return "\n".join(lines)


def score_handler(models: AppModels, prompt_text, uploads, noise_level, rank_by_ensemble, progress=PROGRESS):
    """Score tab: the gallery (ranked), the ranking table and the reward-per-level plot."""
    text = _require_prompt(prompt_text)
    images, names = _uploaded_images(uploads)
    result = _model_errors(
        lambda: score_images(
            models.reward, text, images, noise_level, rank_by_ensemble=rank_by_ensemble, progress=progress
        )
    )
    shown = [
        (images[i], f"#{rank + 1} {names[i]}: reward {result.rewards[i]:.2f}, score {result.scores[i]:.2f}")
        for rank, i in enumerate(result.order)
    ]
    return shown, ranking_table(result, names), reward_plot(result, names)


def compare_handler(models: AppModels, prompt_text, path_a, path_b, noise_level, progress=PROGRESS):
    """Compare tab: P(A preferred) and P(B preferred) for the label, and a sentence with the noise level used."""
    text = _require_prompt(prompt_text)
    if not path_a or not path_b:
        raise gr.Error("Upload both images, A and B.")
    a, b = _open_image(path_a, "Image A"), _open_image(path_b, "Image B")
    progress(0, desc="comparing")
    p = _model_errors(lambda: models.reward.compare(text, a, b, noise_level=noise_level))
    sigma, timestep = (t.item() for t in models.reward.noise_grid.snap([noise_level]))
    summary = (
        f"**P(A > B) = {p:.4f}** (noise-calibrated Thurstone) at noise level u={noise_level:g} "
        f"(snapped: sigma={sigma:.3f}, timestep {timestep:.0f})"
    )
    return {"A": p, "B": 1 - p}, summary


def shapes_handler(models: AppModels, prompt_text, n, seed, run_name, progress=TQDM_PROGRESS):
    """Shapes world tab: the summary, the base generator's ranked candidates and, when `run_name` names an aligned
    run, the aligned generator's on the same seeds."""
    text = _require_prompt(prompt_text)
    n, seed = int(n), int(seed or 0)
    progress(0, desc="generating with the base generator")
    ranked = _model_errors(lambda: shapes_candidates(models, text, n, seed))
    lines, aligned_tiles = [_summary("Base", ranked)], []
    if run_name in models.aligned:
        progress(0.5, desc=f"generating with the aligned generator ({run_name})")
        aligned_ranked = shapes_candidates(models, text, n, seed, generator=models.aligned[run_name])
        lines.append(_summary(f"Aligned ({html.escape(run_name)})", aligned_ranked))
        aligned_tiles = _candidate_tiles(aligned_ranked)
    return "\n\n".join(lines), _candidate_tiles(ranked), aligned_tiles


def _on_click(button, handler, models: AppModels, inputs: list, outputs: list, api_name: str) -> None:
    """A tab's handler on the served models, in the one queue slot every model call shares."""
    button.click(partial(handler, models), inputs, outputs, concurrency_id=MODEL_SLOT, api_name=api_name)


def _score_tab(models: AppModels, examples: dict) -> None:
    default_level = models.reward.reward_model.config.noise_level_images
    ensemble = ", ".join(f"{u:g}" for u in models.reward.reward_model.config.ensemble_noise_levels)
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", elem_id="score-prompt")
            files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="score-images")
            level = gr.Slider(0.0, 1.0, value=default_level, step=0.05, label="Noise level u (snapped to the grid)")
            by_ensemble = gr.Checkbox(label=f"Rank by the ensemble (u = {ensemble})")
            button = gr.Button("Score", variant="primary", elem_id="score-button")
        with gr.Column():
            gallery = gr.Gallery(label="Ranked by reward", columns=4, object_fit="contain", elem_id="score-gallery")
            table = gr.Markdown(elem_id="score-ranking")
    plot = gr.Plot(label="Reward per noise level", elem_id="score-plot")
    if examples.get("score"):
        gr.Examples(examples["score"], inputs=[prompt, files], cache_examples=False)

    _on_click(button, score_handler, models, [prompt, files, level, by_ensemble], [gallery, table, plot], "score")


def _compare_tab(models: AppModels, examples: dict) -> None:
    config = models.reward.reward_model.config
    with gr.Row():
        image_a = gr.Image(label="Image A", type="filepath", height=320, elem_id="compare-a")
        image_b = gr.Image(label="Image B", type="filepath", height=320, elem_id="compare-b")
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", elem_id="compare-prompt")
            level = gr.Slider(0.0, 1.0, value=config.noise_level_images, step=0.05, label="Noise level u")
            button = gr.Button("Compare", variant="primary", elem_id="compare-button")
            label = gr.Label(label="P(preferred)", elem_id="compare-label")
            verdict = gr.Markdown(elem_id="compare-result")
    if examples.get("compare"):
        gr.Examples(examples["compare"], inputs=[prompt, image_a, image_b], cache_examples=False)

    _on_click(button, compare_handler, models, [prompt, image_a, image_b, level], [label, verdict], "compare")


def _candidate_tiles(candidates) -> list[tuple[Image.Image, str]]:
    tiles = []
    for rank, c in enumerate(candidates):
        verdict = "complies" if c.complies else "violates " + ", ".join(c.violations)
        tiles.append((c.image.resize((TILE, TILE), Image.NEAREST), f"#{rank + 1} reward {c.reward:.2f}: {verdict}"))
    return tiles


def _summary(name: str, candidates) -> str:
    complying = sum(c.complies for c in candidates)
    best = "complies" if candidates[0].complies else "violates " + ", ".join(candidates[0].violations)
    return f"**{name}**: {complying} of {len(candidates)} candidates comply (checker); DiNa-LRM's pick {best}."


def _shapes_tab(models: AppModels) -> None:
    prompts = held_out_prompts(24)
    runs = sorted(models.aligned)
    with gr.Row():
        prompt = gr.Dropdown(
            prompts,
            value=prompts[0],
            allow_custom_value=True,
            label="Prompt (held out; or type one)",
            elem_id="shapes-prompt",
        )
        count = gr.Slider(2, 8, value=4, step=1, label="Candidates N")
        seed = gr.Number(value=0, precision=0, label="Seed")
        run_choice = gr.Dropdown(runs, value=runs[0] if runs else None, label="Aligned run", visible=bool(runs))
        button = gr.Button("Generate", variant="primary", elem_id="shapes-button")
    summary = gr.Markdown(elem_id="shapes-summary")
    with gr.Row():
        base = gr.Gallery(label="Base generator, ranked by DiNa-LRM", columns=4, elem_id="shapes-base")
        aligned = gr.Gallery(
            label="Aligned generator, same seeds", columns=4, visible=bool(runs), elem_id="shapes-aligned"
        )

    _on_click(button, shapes_handler, models, [prompt, count, seed, run_choice], [summary, base, aligned], "shapes")


def shapes_examples(folder: str | os.PathLike) -> dict:
    """Rendered Shapes-world examples for the Score and Compare tabs, written to `folder` (satisfying renders and
    renders that violate one attribute)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    score, compare = [], []
    for k, (prompt, violations) in enumerate(EXAMPLE_SCENES):
        paths = []
        for j, violated in enumerate(violations):
            path = folder / f"example{k}_{j}_{'_'.join(violated) or 'ok'}.png"
            render(prompt, seed=100 * k + j, violations=violated).save(path)  # native size: what the reward reads
            paths.append(str(path))
        score.append([prompt, paths])
        compare.append([prompt, paths[0], paths[1]])
    return {"score": score, "compare": compare}


def build_app(model: str | None = None, models: AppModels | None = None, device: str | None = None) -> gr.Blocks:
    """The demo page on `model` (default: the shipped Shapes world) on `device` (default: the accelerator if any),
    or on already loaded `models`."""
    models = models if models is not None else load_models(model, device=device)
    examples = shapes_examples(tempfile.mkdtemp(prefix="dina-app-examples-")) if models.is_shapes else {}
    with gr.Blocks(title="DiNa-LRM", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# DiNa-LRM: a diffusion-native latent reward model\nServing **{html.escape(models.name)}**. Rewards "
            "are read from the image as a noisy latent of the generator's own diffusion transformer."
        )
        with gr.Tabs():
            with gr.Tab("Score", id="score"):
                _score_tab(models, examples)
            with gr.Tab("Compare", id="compare"):
                _compare_tab(models, examples)
            if models.is_shapes:
                with gr.Tab("Shapes world", id="shapes"):
                    _shapes_tab(models)
    return demo


def serve(demo: gr.Blocks, host: str | None = None, port: int | None = None) -> None:
    """Serve the page: one queue, no share link; host/port default to Gradio's (`GRADIO_SERVER_NAME/PORT`)."""
    demo.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        share=False,
        footer_links=["gradio"],
    )
