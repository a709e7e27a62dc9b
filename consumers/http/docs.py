"""The API's description (title, version) and the served documentation: ``/docs`` (Swagger UI,
its assets from the installed swagger-ui-bundle-v2 package: no CDN, the page works without
internet) and ``/`` (where things are). None of them needs a token or is in openapi.json."""

from __future__ import annotations

from typing import Any, Final

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

API_TITLE: Final = "GPU cloud billing API"
API_VERSION: Final = "1.0.0"
API_DESCRIPTION: Final = (
    "Billing and metering service of the GPU cloud: wallet top-ups through Stripe, "
    "Stripe webhooks, wallet and rental reads. Money is integer micro-USD (`...Micros`)."
)
DOCS_ASSETS_PATH: Final = "/docs/assets"


def index(openapi_url: str) -> dict[str, Any]:
    """The body of ``GET /``."""
    return {
        "service": API_TITLE,
        "version": API_VERSION,
        "docs": "/docs",
        "openapi": openapi_url,
        "health": "/healthz",
        "ready": "/readyz",
        "metrics": "/metrics",
        "auth": "Authorization: Bearer <token> (BILLING_API_TOKENS; scopes wallet, finance)",
    }


def install_docs(app: FastAPI) -> None:
    """``/docs``, its assets under :data:`DOCS_ASSETS_PATH`, and ``/``. ``app.openapi_url`` must
    be set (``/openapi.json``)."""
    import swagger_ui_bundle
    from fastapi.openapi.docs import get_swagger_ui_html
    from starlette.staticfiles import StaticFiles

    openapi_url = app.openapi_url or "/openapi.json"
    app.mount(DOCS_ASSETS_PATH, StaticFiles(directory=str(swagger_ui_bundle.swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{API_TITLE} - docs",
            swagger_js_url=f"{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS_PATH}/favicon-32x32.png",
        )

    @app.get("/", include_in_schema=False)
    async def root() -> dict[str, Any]:
        return index(openapi_url)
