"""Server-side pages: Jinja2 with autoescape, templates and assets shipped in the package."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"


def static_version() -> str:
    """A digest of the assets, appended to their URLs: browsers may cache them for long and
    still never run an old script against a new page."""
    digest = hashlib.sha256()
    for path in sorted(STATIC.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.globals["static_v"] = static_version()
    env.filters["pct"] = lambda x: f"{100 * float(x):.1f}%"
    env.filters["ms_date"] = _ms_date
    env.filters["rate"] = _rate
    env.filters["age"] = _age
    return env


def page(env: jinja2.Environment, template: str, context: dict[str, Any], status: int = 200) -> web.Response:
    body = env.get_template(template).render(context)
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")


def _rate(r: Any) -> str:
    """A workforce Rate: the share, its 95% interval and the answers it rests on."""
    return f"{r.value:.2f} [{r.low:.2f}, {r.high:.2f}] n={r.n}" if r.n else "—"


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def _ms_date(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "never"
