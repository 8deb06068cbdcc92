"""The web demo's handlers and models, in process (the page itself is driven in a browser by test_app_server.py)."""

import pytest

gr = pytest.importorskip("gradio")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from modeling_dina.app.models import AppModels, aligned_runs, load_models, score_images, shapes_candidates  # noqa: E402
from modeling_dina.app.space import export_space  # noqa: E402
from modeling_dina.app.ui import compare_handler, score_handler, shapes_handler  # noqa: E402
from modeling_dina.cli import build_parser  # noqa: E402
from modeling_dina.shapes.checker import check  # noqa: E402


def no_progress(*args, **kwargs):
    pass


@pytest.fixture
def image_files(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def shapes_models():
    return load_models()


def test_score_matches_the_pipeline(tiny_reward_pipe, image_files):
    images = [Image.open(p).convert("RGB") for p in image_files]
    result = score_images(tiny_reward_pipe, "a photo", images, 0.3)
    direct = tiny_reward_pipe("a photo", images=images, noise_level=0.3)
    torch.testing.assert_close(result.rewards, direct.rewards)
    torch.testing.assert_close(result.scores, direct.scores)
    assert result.order == direct.rewards.argsort(descending=True).tolist()
    levels = tiny_reward_pipe.reward_model.config.ensemble_noise_levels
    torch.testing.assert_close(result.ensemble, tiny_reward_pipe("a photo", images=images, noise_levels=levels).rewards)
    row = result.levels.index(0.5)
    torch.testing.assert_close(
        result.per_level[row], tiny_reward_pipe("a photo", images=images, noise_level=0.5).rewards
    )
    by_ensemble = score_images(tiny_reward_pipe, "a photo", images, 0.3, rank_by_ensemble=True)
    assert by_ensemble.order == result.ensemble.argsort(descending=True).tolist()


def test_score_handler_ranks_the_gallery_and_table(tiny_reward_pipe, image_files):
    models = AppModels(reward=tiny_reward_pipe, name="tiny")
    gallery, table, figure = score_handler(models, "a photo", image_files, 0.3, False, progress=no_progress)
    rewards = tiny_reward_pipe("a photo", images=image_files, noise_level=0.3).rewards
    order = rewards.argsort(descending=True).tolist()
    assert [caption.split(":")[0] for _, caption in gallery] == [f"#{r + 1} img{i}.png" for r, i in enumerate(order)]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "img" in line]
    assert [row.split("|")[2].strip() for row in rows] == [f"img{i}.png" for i in order]
    assert float(rows[0].split("|")[3]) == pytest.approx(rewards[order[0]].item(), abs=5e-4)
    assert len(figure.axes[0].lines) >= len(image_files)


def test_bad_input_becomes_a_message(tiny_reward_pipe, image_files, tmp_path):
    models = AppModels(reward=tiny_reward_pipe, name="tiny")
    with pytest.raises(gr.Error, match="Type a prompt"):
        score_handler(models, "  ", image_files, 0.3, False, progress=no_progress)
    with pytest.raises(gr.Error, match="Upload at least one image"):
        score_handler(models, "a photo", [], 0.3, False, progress=no_progress)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="Skipped broken.png"):
        gallery, _, _ = score_handler(models, "a photo", [str(broken), image_files[0]], 0.3, False, no_progress)
    assert len(gallery) == 1
    with pytest.raises(gr.Error, match="Image B is not a readable image"):
        compare_handler(models, "a photo", image_files[0], str(broken), 0.3, progress=no_progress)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (64, 1)).save(tiny)  # thinner than one patch: the pipeline's ValueError, shown as a message
    with pytest.raises(gr.Error, match="images"):
        score_handler(models, "a photo", [str(tiny)], 0.3, False, progress=no_progress)


def test_compare_handler(tiny_reward_pipe, image_files):
    models = AppModels(reward=tiny_reward_pipe, name="tiny")
    label, summary = compare_handler(models, "a photo", image_files[0], image_files[1], 0.5, progress=no_progress)
    a, b = (Image.open(p).convert("RGB") for p in image_files[:2])
    p = tiny_reward_pipe.compare("a photo", a, b, noise_level=0.5)
    assert label["A"] == pytest.approx(p) and label["B"] == pytest.approx(1 - p)
    sigma = tiny_reward_pipe.noise_grid.snap([0.5])[0].item()
    assert f"P(A > B) = {p:.4f}" in summary and f"sigma={sigma:.3f}" in summary


def test_shapes_candidates_ranked_with_verdicts(shapes_models):
    candidates = shapes_candidates(shapes_models, "two red circles", 3, seed=5)
    rewards = [c.reward for c in candidates]
    assert rewards == sorted(rewards, reverse=True)
    assert sorted(c.seed for c in candidates) == [5, 6, 7]
    for c in candidates:
        assert c.complies == check("two red circles", c.image).overall
    with pytest.raises(gr.Error, match="not a Shapes-world prompt"):
        shapes_handler(shapes_models, "a red fox", 2, 0, None, progress=no_progress)


def test_aligned_lora_side_by_side(tmp_path, shapes_models):
    """A tiny perturbed generator LoRA saved in diffusers' format shows up as an aligned run next to the base."""
    from modeling_dina.alignment.sampling import add_generator_lora, save_generator_lora
    from modeling_dina.shapes.generator import load_generator

    assert aligned_runs(tmp_path / "missing") == {}
    pipe = load_generator()
    add_generator_lora(pipe.transformer, rank=2, alpha=2.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    save_generator_lora(pipe, tmp_path / "aligned" / "tiny-run")
    (tmp_path / "aligned" / "empty").mkdir()
    assert list(aligned_runs(tmp_path / "aligned")) == ["tiny-run"]

    models = load_models(aligned_dir=tmp_path / "aligned")
    summary, base, aligned = shapes_handler(models, "two red circles", 2, 0, "tiny-run", progress=no_progress)
    assert "**Base**" in summary and "**Aligned (tiny-run)**" in summary
    assert len(base) == len(aligned) == 2
    base_pixels = sorted(np.asarray(image).tobytes() for image, _ in base)
    aligned_pixels = sorted(np.asarray(image).tobytes() for image, _ in aligned)
    assert base_pixels != aligned_pixels
    # The base generator is untouched by the aligned run: same candidates as without it.
    reference = shapes_candidates(shapes_models, "two red circles", 2, seed=0)
    assert [f"{c.reward:.2f}" for c in reference] == [caption.split()[2][:-1] for _, caption in base]


def test_export_space(tmp_path):
    space = export_space(tmp_path / "space")
    readme = (space / "README.md").read_text()
    assert readme.startswith("---\n") and "sdk: gradio\n" in readme and "app_file: app.py\n" in readme
    assert f"sdk_version: {gr.__version__}\n" in readme
    requirements = (space / "requirements.txt").read_text().splitlines()
    assert any(r.startswith("torch") for r in requirements) and any(r.startswith("diffusers") for r in requirements)
    assert "MODEL = None" in (space / "app.py").read_text()
    assert (space / "modeling_dina" / "shapes" / "assets" / "reward" / "model.safetensors").is_file()
    assert not list(space.rglob("__pycache__"))
    with pytest.raises(FileExistsError):
        export_space(space)
    with pytest.raises(ValueError, match="Hub id"):
        export_space(tmp_path / "other", model=str(tmp_path))
    assert not (tmp_path / "other").exists()
    hub = export_space(tmp_path / "hub", model="owner/dina-model")
    assert "MODEL = 'owner/dina-model'" in (hub / "app.py").read_text()


def test_cli_parses_app():
    args = build_parser().parse_args(["app", "--port", "7999", "--export-space", "out"])
    assert (args.model, args.host, args.port, args.export_space) == (None, "127.0.0.1", 7999, "out")
