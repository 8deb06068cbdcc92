"""The web demo (`dina app`, needs the `app` extra): `build_app(model)` returns the Gradio page, `serve` runs it,
`export_space` writes a Hugging Face Space folder. `models` holds what the page computes, Gradio-free."""

import os

# Offline by default: no telemetry or version check (Gradio reads this when it is imported).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

__all__ = ["build_app", "export_space", "serve"]


def __getattr__(name):
    # Imported on use, so that `dina` without Gradio installed still runs its other commands.
    if name in ("build_app", "serve"):
        from . import ui

        return getattr(ui, name)
    if name == "export_space":
        from .space import export_space

        return export_space
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
