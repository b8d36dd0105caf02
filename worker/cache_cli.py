"""`vlmq cache stats|purge`: the result cache's entries per scope (docs/cache.md).

Reads the workers' settings (`VLMQ_*`: Redis, `cache_ttl_s`), so it sees what they write.
Only settings and typer are imported at the top: `vlmq --help` stays light.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer

from vlmq.worker.settings import WorkerSettings

app = typer.Typer(help="The result cache: entries per scope (tenant), purge.", no_args_is_help=True)


def _store(settings: WorkerSettings) -> Any:
    from vlmq.core.cache import CacheStore
    from vlmq.core.topology import connect_redis

    redis = connect_redis(settings)
    return CacheStore(
        redis, ttl_s=settings.cache_ttl_s, max_entries=settings.cache_max_entries, lead_s=settings.lease_s
    )


async def _stats() -> list[Any]:
    store = _store(WorkerSettings.load())
    try:
        return list(await store.stats())
    finally:
        await store.redis.aclose()


async def _purge(scope: str | None) -> int:
    store = _store(WorkerSettings.load())
    try:
        return int(await store.purge(scope))
    finally:
        await store.redis.aclose()


@app.command("stats")
def stats() -> None:
    """Entries per scope, with the ages of the oldest and newest (seconds)."""
    rows = asyncio.run(_stats())
    if not rows:
        typer.echo("no cached answers")
    for r in rows:
        name = r.scope or "(no tenant)"
        typer.echo(f"{name}\tentries={r.entries}\toldest_s={r.oldest_s}\tnewest_s={r.newest_s}")


@app.command("purge")
def purge(
    scope: Annotated[
        str | None, typer.Option(help="The scope (tenant) to purge; '' for jobs without one; '*': shared.")
    ] = None,
    all_scopes: Annotated[bool, typer.Option("--all", help="Purge every scope.")] = False,
) -> None:
    """Delete cached answers: one scope's, or with --all every scope's."""
    if scope is None and not all_scopes:
        raise typer.BadParameter("name a --scope, or --all")
    n = asyncio.run(_purge(None if all_scopes else scope))
    typer.echo(f"purged {n} entries")
