"""testcontainers-backed services, used only when asked for and Docker is there."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager


def requested() -> bool:
    """True when BROKER_TEST_CONTAINERS=1 and a Docker client is installed."""
    return os.environ.get("BROKER_TEST_CONTAINERS") == "1" and shutil.which("docker") is not None


@contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL 16 container; yields a psycopg SQLAlchemy URL."""
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:16-alpine", driver="psycopg") as container:
        yield container.get_connection_url()


@contextmanager
def openbao() -> Iterator[tuple[str, str]]:
    """An OpenBao dev-mode container; yields (address, root token)."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    root = secrets.token_urlsafe(24)
    container = (
        DockerContainer("openbao/openbao:2.7.2")
        .with_command(f"server -dev -dev-root-token-id={root} -dev-listen-address=0.0.0.0:8200")
        .with_exposed_ports(8200)
    )
    with container:
        wait_for_logs(container, "Development mode should NOT be used", timeout=60)
        host = container.get_container_host_ip()
        yield f"http://{host}:{container.get_exposed_port(8200)}", root
