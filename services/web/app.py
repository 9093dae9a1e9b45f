"""The aiohttp application: routes and middlewares."""

from __future__ import annotations

import ssl

from aiohttp import web

from services.web import middleware
from services.web.grpc_clients import Backends
from services.web.progress import Progress
from services.web.render import STATIC, environment
from services.web.session import Csrf, Sessions
from services.web.settings import WebSettings
from services.web.state import STATE, WebState
from services.web.throughput import Throughput
from services.web.views import annotate, api, auth, edit, manage, people, quality, workforce


def create_app(settings: WebSettings, backends: Backends, *, tls: bool) -> web.Application:
    app = web.Application(
        middlewares=[middleware.metrics, middleware.failures, middleware.authenticate],
        # Form posts only; uploads are streamed by their view and not bound by this.
        client_max_size=1 << 20,
    )
    app[STATE] = WebState(
        settings=settings,
        backends=backends,
        env=environment(),
        csrf=Csrf(settings.secret.get_secret_value().encode()),
        sessions=Sessions(settings.principal_cache_seconds),
        progress=Progress(),
        throughput=Throughput(),
        secure_cookies=tls if settings.cookie_secure is None else settings.cookie_secure,
    )
    app.on_response_prepare.append(middleware.security_headers)
    r = app.router
    r.add_get("/login", auth.login_form, name="login")
    r.add_post("/login", auth.login, name="login_post")
    r.add_post("/logout", auth.logout, name="logout")
    r.add_get("/", annotate.home, name="home")
    r.add_get("/projects", annotate.my_projects, name="projects")
    r.add_get("/review", annotate.review_page, name="review")
    r.add_get("/projects/new", manage.new_project_form, name="project_new")
    r.add_post("/projects/new", manage.create_project, name="project_create")
    r.add_get("/projects/{project_id}", manage.status, name="status")
    r.add_get("/projects/{project_id}/edit", edit.edit_form, name="project_edit")
    r.add_post("/projects/{project_id}/edit", edit.update_project, name="project_update")
    r.add_get("/projects/{project_id}/label", annotate.label_screen, name="label")
    r.add_get("/projects/{project_id}/upload", manage.upload_form, name="upload_form")
    r.add_post("/projects/{project_id}/upload", manage.upload, name="upload")
    r.add_post("/projects/{project_id}/exports", manage.create_export, name="export_create")
    r.add_get("/projects/{project_id}/exports/{export_id}", manage.export_page, name="export")
    r.add_get(
        "/projects/{project_id}/exports/{export_id}/download", manage.export_download, name="export_download"
    )
    r.add_get("/projects/{project_id}/quality", quality.quality_page, name="quality")
    r.add_post("/projects/{project_id}/quality", quality.make_report, name="quality_report")
    r.add_get("/projects/{project_id}/members", people.members_page, name="members")
    r.add_post("/projects/{project_id}/members", people.add_member, name="member_add")
    r.add_post("/projects/{project_id}/members/{user_id}/remove", people.remove_member, name="member_remove")
    r.add_get("/projects/{project_id}/workforce", workforce.workforce_page, name="workforce")
    r.add_post("/projects/{project_id}/workforce/pause", workforce.set_paused, name="workforce_pause")
    r.add_post("/projects/{project_id}/workforce/gold", workforce.upload_gold, name="gold_upload")
    r.add_post(
        "/projects/{project_id}/workforce/settings", workforce.update_settings, name="workforce_settings"
    )
    r.add_get("/pools", workforce.pools_page, name="pools")
    r.add_post("/pools", workforce.put_pool, name="pool_put")
    r.add_post("/pools/annotators", workforce.put_annotator, name="annotator_put")
    r.add_get("/tokens", people.tokens_page, name="tokens")
    r.add_post("/tokens", people.create_token, name="token_create")
    r.add_post("/tokens/{token_id}/revoke", people.revoke_token, name="token_revoke")
    r.add_get("/admin/users", people.users_page, name="users")
    r.add_post("/admin/users", people.create_user, name="user_create")
    r.add_post("/admin/users/{user_id}", people.update_user, name="user_update")
    r.add_post("/api/projects/{project_id}/next", api.next_task, name="api_next")
    r.add_post("/api/tasks/{task_id}/submit", api.submit, name="api_submit")
    r.add_post("/api/tasks/{task_id}/skip", api.skip, name="api_skip")
    r.add_post("/api/tasks/{task_id}/extend", api.extend, name="api_extend")
    r.add_post("/api/tasks/{task_id}/release", api.release, name="api_release")
    r.add_static("/static/", STATIC, name="static", append_version=False)
    return app


def ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context
