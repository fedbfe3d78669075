"""Running the app: the bind check (an API token unless the address is loopback) and uvicorn with a
bounded graceful shutdown, so that SIGTERM stops the server within seconds even while a batch computes
(the batching threads are daemons)."""

from __future__ import annotations

import ipaddress
import os

from vptune.errors import VptuneError
from vptune.multitask import MultiTaskModel
from vptune.serve.app import create_app
from vptune.serving_limits import ServeConfig

TOKEN_ENV = "VPTUNE_API_TOKEN"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost``."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(token: str | None) -> str | None:
    """``token``, else the ``VPTUNE_API_TOKEN`` environment variable, else None."""
    return token or os.environ.get(TOKEN_ENV) or None


def check_bind(host: str, cfg: ServeConfig) -> None:
    """Refuse to serve a non-loopback address without an API token."""
    if not cfg.token and not is_loopback(host):
        raise VptuneError(
            f"--host {host} is not a loopback address: set an API token ({TOKEN_ENV}=... or --token) so that "
            "clients must send 'Authorization: Bearer <token>', or bind 127.0.0.1"
        )


def run_server(
    model: MultiTaskModel,
    cfg: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    limit_concurrency: int | None = None,
) -> None:
    """Serve ``model`` with uvicorn until interrupted (SIGINT/SIGTERM)."""
    import uvicorn


    check_bind(host, cfg)
    app = create_app(model, cfg)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        limit_concurrency=limit_concurrency,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=max(1, round(cfg.shutdown_timeout_s)),
    )
