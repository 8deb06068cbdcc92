"""`dina app`: subcommand builder and runner (wired into the `dina` entry point elsewhere)."""

from __future__ import annotations


def add_app_parser(subparsers) -> None:
    p = subparsers.add_parser("app", help="the web demo (Gradio): score, compare, and the Shapes world")
    p.add_argument("--model", default=None, help="DiNa model folder or Hub id (default: the shipped Shapes model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to serve the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="torch device (default: the accelerator if there is one, else cpu)")
    p.add_argument("--export-space", metavar="DIR", default=None, help="write a Hugging Face Space folder and exit")
    p.set_defaults(func=run_app)


def run_app(args) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise SystemExit("`dina app` needs Gradio: pip install 'dina-lrm[app]'") from err
    if args.export_space is not None:
        from .space import export_space

        print(f"wrote {export_space(args.export_space, model=args.model)}")
        return
    from .ui import build_app, serve

    serve(build_app(args.model, device=args.device), host=args.host, port=args.port)
