"""`sdstack serve`: the HTTP server (registered in sdstack/cli.py; heavy imports happen inside the command)."""

from __future__ import annotations

import click

from ..errors import UserError
from .config import DEFAULT_MAX_PIXELS, LOOPBACK_HOSTS, parse_api_auth


def _auth(ctx, param, value):
    try:
        return parse_api_auth(value)
    except UserError as e:
        raise click.BadParameter(str(e)) from None


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes the server: use --api-auth.")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535))
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder in A1111's layout [default: .]")
@click.option("--api-auth", envvar="SDSTACK_API_AUTH", default=None, callback=_auth,
              help="user:password[,user:password...] for HTTP Basic on every route (or env SDSTACK_API_AUTH).")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(64 * 64),
              help="Largest width x height a request may ask for.")
@click.option("--model", default=None, help="Default checkpoint (name, title or short hash) [default: built-in, "
                                            "else the first in models/Stable-diffusion].")
@click.option("--models-in-memory", default=2, show_default=True, type=click.IntRange(1, 16),
              help="Loaded models kept in memory (least recently used dropped first).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--preview-interval", default=1.0, show_default=True, type=click.FloatRange(0),
              help="Seconds between live previews of a running job (0 = every step).")
@click.option("--ui/--no-ui", default=True, show_default=True, help="Serve the web UI at / (Gradio).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(host, port, data_dir, api_auth, max_pixels, model, models_in_memory, device, preview_interval, ui,
          log_level):
    """Serve the web UI (/), the A1111-compatible API (/sdapi/v1), the native API (/api/v1) and the docs (/docs)."""
    import logging

    import uvicorn

    from ..paths import DataDir
    from .app import create_app
    from .config import ServerConfig

    config = ServerConfig(data_dir=DataDir.at(data_dir).root, host=host, port=port,
                          api_auth=api_auth, max_pixels=max_pixels, model=model,
                          models_in_memory=models_in_memory, device=device, preview_interval=preview_interval,
                          ui=ui)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if host not in LOOPBACK_HOSTS and not config.api_auth:
        click.echo(f"warning: serving on {host} without --api-auth: anyone who can reach it can use it", err=True)
    try:
        app = create_app(config)
    except UserError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"sdstack serving http://{host}:{port} (web UI at /, docs at /docs, data in {config.data_dir})",
               err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
