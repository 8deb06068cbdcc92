"""`dina app --export-space DIR`: a folder to push as a Hugging Face Space running the same app.

The folder carries a copy of this package (with the shipped Shapes world), `app.py`, `requirements.txt` (the
package's dependencies; Spaces install Gradio itself from `sdk_version`) and a README with the Space metadata block.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

__all__ = ["export_space"]

PACKAGE_DIR = Path(__file__).parent.parent
DISTRIBUTION = "dina-lrm"

APP_PY = '''"""DiNa-LRM demo Space, written by `dina app --export-space`."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from modeling_dina.app import build_app, serve  # noqa: E402

MODEL = {model!r}  # None: the Shapes world shipped in the package; else a DiNa model's Hub id

demo = build_app(MODEL)

if __name__ == "__main__":
    serve(demo)  # host and port from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, as Spaces set them
'''

README = """---
title: DiNa-LRM
emoji: 🎯
colorFrom: indigo
colorTo: green
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
license: apache-2.0
---

# DiNa-LRM demo

A diffusion-native latent reward model: score images against a prompt, compare two images (calibrated P(a > b)) and,
on the Shapes world shipped with the package, rank a generator's candidates in latent space.

Serving: {served}. Written by `dina app --export-space`; push it with
`huggingface_hub.upload_folder(repo_id=..., repo_type="space", folder_path=...)`.
"""


def _requirements() -> list[str]:
    """The installed package's base dependencies (extras left out: Spaces bring Gradio themselves)."""
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError as err:
        raise RuntimeError(f"the {DISTRIBUTION!r} distribution is not installed: `pip install -e .` first") from err
    return [r for r in requires if "extra ==" not in r]


def export_space(output_dir: str | os.PathLike, model: str | None = None) -> Path:
    """Write the Space folder to `output_dir` (which must not exist or be empty); returns its path.

    `model` is None (the shipped Shapes world) or a Hub id: a Space cannot read a local folder of this machine.
    """
    import gradio

    if model is not None and (os.path.exists(model) or model.count("/") != 1):
        raise ValueError(
            f"--model {model!r} for a Space must be a Hub id (owner/name): push a local model with "
            "`DiNaRewardModel.push_to_hub` first, or leave --model out to serve the Shapes world."
        )
    target = Path(output_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty folder.")
    # Written next to the target, then renamed into place: no half-written Space is left behind.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        shutil.copytree(PACKAGE_DIR, staging / PACKAGE_DIR.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (staging / "app.py").write_text(APP_PY.format(model=model))
        (staging / "requirements.txt").write_text("\n".join(_requirements()) + "\n")
        served = f"`{model}`" if model else "the Shapes world shipped in the package (offline)"
        (staging / "README.md").write_text(README.format(gradio_version=gradio.__version__, served=served))
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
