"""`python -m services.identity`: users, roles, memberships and tokens."""

from __future__ import annotations

from services.common.lifecycle import Runtime, run
from services.common.projects import ProjectDirectory
from services.gen.tandem.identity.v1 import identity_pb2_grpc
from services.identity.bucket import IdentityBucket
from services.identity.handlers import Directory, IdentityServicer
from services.identity.repo import SCHEMA
from services.identity.settings import IdentitySettings


def main() -> None:
    settings = IdentitySettings()

    async def setup(rt: Runtime) -> None:
        directory = Directory(rt.pool, IdentityBucket(rt.js), settings)
        await directory.republish()
        if settings.bootstrap_file is not None:
            await directory.bootstrap(settings.bootstrap_file)
        identity_pb2_grpc.add_IdentityServiceServicer_to_server(
            IdentityServicer(directory, ProjectDirectory(rt.js, ttl_seconds=0)), rt.grpc_server
        )

    run("identity", settings, setup, schema=SCHEMA)


if __name__ == "__main__":
    main()
