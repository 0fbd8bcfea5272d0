"""``/docs`` and ``/redoc`` that work without internet.

FastAPI's default pages load Swagger UI and ReDoc from a CDN: on a machine without
internet ``/docs`` is blank. This is FastAPI's self-hosting recipe with the assets shipped
in the ``fastapi-offline`` wheel (Swagger UI 5, which renders OpenAPI 3.1) mounted as
static files under ``/docs-assets``. Create the app with ``docs_url=None, redoc_url=None``.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"


def assets_dir() -> str:
    """Where the wheel keeps swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js."""
    return str(files("fastapi_offline") / "static")


def install_offline_docs(app: FastAPI) -> None:
    """Serve ``/docs`` (Swagger UI) and ``/redoc`` from local assets."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError("create the FastAPI app with docs_url=None and redoc_url=None")
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    title = app.title

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} - API docs",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{title} - ReDoc",
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
