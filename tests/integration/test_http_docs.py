"""The served API docs (issue 14 item 4): ``/docs`` is FastAPI's Swagger UI page with its JavaScript
and CSS served by the service itself, rendered in headless Chromium (Debian's package) with no
internet: the rendered DOM lists the operations, and a screenshot is saved as an artefact
(``tests/artifacts/docs.png``) and checked to be a real picture, not a blank page."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from consumers.http.app import create_app
from devtools.export_openapi import DEFAULT_PATH, openapi_document
from tests.integration.http_support import live_server, make_settings

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
OPERATIONS = ("/wallet/create-intent", "/wallets/{walletId}", "/finance/trial-balance", "/stripe/webhook")
CHROMIUM_TIMEOUT_S = 90


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (make test installs Debian's chromium package)")
        pytest.skip("chromium is not installed: apt-get install -y chromium")
    return found


def headless(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    args = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=15000",
        *extra,
        url,
    ]
    return subprocess.run(args, capture_output=True, timeout=CHROMIUM_TIMEOUT_S, check=False)


def png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, the decompressed scanlines) of a PNG, without an imaging library."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def test_docs_and_openapi_need_no_token_and_the_root_says_where_things_are(app_engine: Engine) -> None:
    with TestClient(create_app(app_engine, make_settings())) as c:
        assert c.get("/openapi.json").json() == json.loads(DEFAULT_PATH.read_text())
        page = c.get("/docs")
        assert page.status_code == 200
        assert "/docs/assets/swagger-ui-bundle.js" in page.text
        assert "cdn" not in page.text.lower()  # nothing from the internet
        assert c.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
        assert c.get("/docs/assets/swagger-ui.css").status_code == 200
        root = c.get("/").json()
        assert (root["docs"], root["openapi"], root["health"]) == ("/docs", "/openapi.json", "/healthz")
        assert c.get("/wallets/w1").status_code == 401  # the API itself still needs a token


def test_docs_render_the_operations_in_headless_chromium(app_engine: Engine, tmp_path: Path) -> None:
    chromium()
    assert set(OPERATIONS) <= set(openapi_document()["paths"])
    with live_server(create_app(app_engine, make_settings())) as base:
        assert httpx.get(f"{base}/docs").status_code == 200
        dom = headless(f"{base}/docs", tmp_path / "profile-dom", "--dump-dom")
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "docs.png"
        shot.unlink(missing_ok=True)
        headless(f"{base}/docs", tmp_path / "profile-shot", "--window-size=1280,2000", f"--screenshot={shot}")
    html = dom.stdout.decode("utf-8", "replace")
    assert "swagger-ui" in html, dom.stderr.decode(errors="replace")[-2000:]
    for path in OPERATIONS:  # rendered by Swagger UI's JavaScript: only in the DOM once it ran
        assert f'data-path="{path}"' in html, f"{path} not rendered"
    assert "GPU cloud billing API" in html
    assert shot.exists(), "chromium wrote no screenshot"
    data = shot.read_bytes()
    width, height, pixels = png_pixels(data)
    assert (width, height) == (1280, 2000)
    assert len(data) > 30_000  # a blank page of this size compresses to a few kilobytes
    assert len(set(pixels)) > 50  # many distinct byte values: text and colours, not one flat colour
    print(f"\n/docs rendered {len(OPERATIONS)} checked operations; screenshot {shot} ({len(data)} bytes)")
