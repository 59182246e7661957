"""Which Prefect API this process's flow runs talk to, by Prefect's own settings resolution.

Prefect finds its API in ``PREFECT_API_URL``, the active profile (``profiles.toml``), a ``.env``, ``prefect.toml``
or ``pyproject.toml``'s ``[tool.prefect]`` in the working directory; :func:`configured_api_url` asks Prefect, so
every place a user may have set it counts. ``modalkit batch`` calls it in a background thread (importing Prefect
costs about two seconds, spent while the job is planned in a process of its own), and points the process at its
own local server with
:func:`use_api_url` only when nothing is configured.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["configured_api_url", "no_heartbeats", "use_api_url"]


def configured_api_url() -> str | None:
    """The Prefect API the user configured (in any of Prefect's settings sources), or None."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def use_api_url(api_url: str) -> None:
    """Point this process's flow runs at ``api_url``, modalkit's own local server: Prefect read its settings when
    it was imported, so the global settings are read again with ``PREFECT_API_URL`` set (child processes inherit
    the variable). The client does not ask that server for its version before its first call: it was started from
    this very installation."""
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = api_url
    os.environ["PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED"] = "false"
    refresh_global_settings_context()


@contextlib.contextmanager
def no_heartbeats() -> Iterator[None]:
    """Flow runs inside the block send no heartbeats: for runs on modalkit's own local server, where nothing
    watches them (they feed a zombie-run automation a user sets up on their own server), and the flow engine
    waits up to a second at the end of every run for its heartbeat thread to wake."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
