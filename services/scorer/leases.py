"""Which projects this scorer replica decides: one active scorer per project.

Each project's model lives in one process's memory, so two replicas deciding one project would
each act on half its labels. A replica owns a project while it holds a PostgreSQL session advisory
lock on it, taken on a connection of its own the first time a message of the project reaches it
and kept while it works on the project (released when the model is evicted for being idle). A
message of a project another replica owns is handed back to the bus (retried with back-off, so it
reaches the owner on a later delivery); when the owner dies its session ends, its locks go with it,
and the next replica that gets a message of the project takes it over and rebuilds the model from
PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from services.scorer import repo

log = logging.getLogger(__name__)


class ProjectLeases:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._conn: asyncpg.pool.PoolConnectionProxy | None = None
        self._owned: set[str] = set()
        self._lock = asyncio.Lock()  # one query at a time on the lease connection

    @property
    def owned(self) -> frozenset[str]:
        return frozenset(self._owned)

    async def owns(self, project_id: str) -> tuple[bool, bool]:
        """(this replica owns the project, the leases were lost since the last call: every model
        must be dropped, another replica may have decided meanwhile)."""
        async with self._lock:
            lost = False
            try:
                if self._conn is not None:
                    # The session that holds the locks must still be there.
                    await self._conn.fetchval("SELECT 1")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.warning("the lease connection was lost: every project is given up", exc_info=True)
                await self._drop()
                lost = True
            if project_id in self._owned:
                return True, lost
            if self._conn is None:
                self._conn = await self._pool.acquire()
            if await repo.try_lease_project(self._conn, project_id):
                self._owned.add(project_id)
                log.info("this scorer now decides %s", project_id)
                return True, lost
            return False, lost

    async def release(self, project_id: str) -> None:
        async with self._lock:
            if project_id in self._owned and self._conn is not None:
                self._owned.discard(project_id)
                try:
                    await repo.release_project(self._conn, project_id)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    await self._drop()

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    async def _drop(self) -> None:
        self._owned.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                # Closing the session releases its locks; a broken one is closed all the same.
                await self._pool.release(conn, timeout=5)
            except Exception:
                conn.terminate()
