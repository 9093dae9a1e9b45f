"""Write side of the `tandem_identity` bucket (read side: services/common/auth.IdentityView).

Only the identity service writes here in production; tests use it to mint grants for services
started without identity.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.common.auth import Role, new_token, token_digest, token_key, user_key
from services.common.bus.topology import IDENTITY_BUCKET
from services.gen.tandem.identity.v1 import identity_pb2


class IdentityBucket:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(IDENTITY_BUCKET)
        return self._kv

    async def put_principal(
        self,
        user_id: str,
        role: Role,
        project_ids: Iterable[str],
        *,
        disabled: bool = False,
        display_name: str = "",
    ) -> None:
        principal = identity_pb2.Principal(
            user_id=user_id,
            role=role.to_proto(),
            project_ids=sorted(set(project_ids)),
            disabled=disabled,
            display_name=display_name,
        )
        await (await self._bucket()).put(user_key(user_id), principal.SerializeToString())

    async def put_grant(
        self, token: str, token_id: str, user_id: str, expires_unix_ms: int, *, session: bool = False
    ) -> None:
        await self.put_grant_digest(token_digest(token), token_id, user_id, expires_unix_ms, session=session)

    async def put_grant_digest(
        self, digest: str, token_id: str, user_id: str, expires_unix_ms: int, *, session: bool = False
    ) -> None:
        grant = identity_pb2.TokenGrant(
            token_id=token_id, user_id=user_id, expires_unix_ms=expires_unix_ms, session=session
        )
        await (await self._bucket()).put(token_key(digest), grant.SerializeToString())

    async def drop_grant_digest(self, digest: str) -> None:
        kv = await self._bucket()
        with contextlib.suppress(KeyNotFoundError):
            await kv.purge(token_key(digest))

    async def issue(
        self, user_id: str, role: Role, project_ids: Iterable[str] = (), *, ttl_seconds: float = 3600
    ) -> str:
        """A principal and a fresh token for it, straight into the bucket (tests, no identity service)."""
        token = new_token()
        await self.put_principal(user_id, role, project_ids)
        expires = int((time.time() + ttl_seconds) * 1000)
        await self.put_grant(token, f"test-{token_digest(token)[:12]}", user_id, expires)
        return token
