"""`python -m services.web`: the people's app over HTTP(S), a gRPC client of the other services."""

from __future__ import annotations

import logging

from aiohttp import web

from services.common.lifecycle import Runtime, run
from services.web.app import create_app, ssl_context
from services.web.grpc_clients import Backends, channel_credentials
from services.web.settings import WebSettings

log = logging.getLogger(__name__)


def main() -> None:
    settings = WebSettings()

    async def setup(rt: Runtime) -> None:
        common = rt.common
        tls = common.tls_cert_file is not None and common.tls_key_file is not None
        backends = Backends(settings.targets(), channel_credentials(settings.tls_ca_file, tls))
        app = create_app(settings, backends, tls=tls)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        context = ssl_context(str(common.tls_cert_file), str(common.tls_key_file)) if tls else None
        site = web.TCPSite(runner, common.bind_host, settings.app_port, ssl_context=context)
        await site.start()

        async def close() -> None:
            await runner.cleanup()
            await backends.close()

        rt.add_closer(close)
        scheme = "https" if tls else "http"
        log.info("web app at %s://%s:%d", scheme, common.bind_host, settings.app_port)

    # No tables of its own and no bus traffic: the lifecycle's NATS connection goes unused.
    run("web", settings, setup, schema=None)


if __name__ == "__main__":
    main()
