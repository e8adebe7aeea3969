"""``cbir serve`` on the demo's output: search by upload, stored neighbours, and what it refuses."""

from __future__ import annotations

import csv
import os
import socket
import threading
import time

import pytest

pytestmark = pytest.mark.slow


def _groups(out) -> dict[str, str]:
    with open(out / "sample" / "groups.csv", newline="") as fh:
        return {os.path.join(str(out / "sample" / "images"), g["file"]): g["group"] for g in csv.DictReader(fh)}


def _a_copy_and_its_original(out) -> tuple[str, str]:
    groups = _groups(out)
    copy = sorted(p for p in groups if "__original" not in p and "crop" in os.path.basename(p))[0]
    original = next(p for p, g in groups.items() if g == groups[copy] and "__original" in p)
    return copy, original


@pytest.fixture(scope="module")
def client(demo_out, model_cache):
    from starlette.testclient import TestClient

    from cbir_lib.serve import make_app

    out, _ = demo_out
    return TestClient(make_app(str(out), model_cache=model_cache, max_upload_bytes=2 << 20)), out


def test_an_uploaded_copy_finds_its_original_and_its_stored_neighbours(client):
    c, out = client
    copy, original = _a_copy_and_its_original(out)
    r = c.post("/api/query", content=open(copy, "rb").read())
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    paths = [h["path"].replace("file:", "", 1) for h in hits]
    assert original in paths[:3], paths[:5]
    r = c.get("/api/neighbors", params={"id": hits[0]["image_id"]})
    assert r.status_code == 200 and len(r.json()["hits"]) == 10
    img = c.get("/image", params={"id": hits[0]["image_id"]})
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg" and img.content[:2] == b"\xff\xd8"
    assert c.get("/duplicates").status_code == 200 and "<table>" in c.get("/duplicates").text
    page = c.get("/failures").text
    assert "truncated" in page or "not_an_image" in page


def test_what_the_server_refuses(client, tmp_path):
    c, out = client
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(open(_a_copy_and_its_original(out)[0], "rb").read())
    for params in ({"path": str(outside)}, {"path": "/etc/passwd"}, {"path": "file:/etc/passwd"}, {"id": "12345"}):
        r = c.get("/image", params=params)
        assert r.status_code == 404 and b"not an image of this collection" in r.content, params
    bad = c.post("/api/query", content=b"this is not an image")
    assert bad.status_code == 400 and "cannot read the query image" in bad.json()["error"] and "Traceback" not in bad.text
    assert c.post("/api/query", content=b"").status_code == 400
    big = c.post("/api/query", content=b"\0" * (3 << 20))
    assert big.status_code == 413 and "larger than 2 MB" in big.json()["error"]
    assert c.get("/api/neighbors", params={"id": "x"}).status_code == 400
    assert c.post("/image").status_code == 405  # read-only: nothing but GET there


def test_the_page_in_headless_chromium(demo_out, model_cache):
    import uvicorn
    from conftest import headless_browser
    from selenium.webdriver.common.by import By

    from cbir_lib.serve import make_app

    out, _ = demo_out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(str(out), model_cache=model_cache), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    browser = headless_browser()
    try:
        copy, original = _a_copy_and_its_original(out)
        browser.get(f"http://127.0.0.1:{port}/")
        browser.find_element(By.ID, "file").send_keys(copy)
        deadline = time.time() + 120
        while time.time() < deadline and not browser.find_elements(By.CSS_SELECTOR, "#results .hit"):
            time.sleep(0.2)
        cards = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
        assert cards, browser.find_element(By.ID, "status").text
        assert original in [c.get_attribute("data-path").replace("file:", "", 1) for c in cards[:3]]
        cards[1].click()
        while time.time() < deadline and not browser.find_elements(By.CSS_SELECTOR, "#neighbours .hit"):
            time.sleep(0.2)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#neighbours .hit")) == 10
        assert browser.find_element(By.ID, "nbtitle").text.startswith("Stored neighbours of")
        while time.time() < deadline and not browser.execute_script("return Array.from(document.images).every(i => i.complete)"):
            time.sleep(0.2)
        broken = browser.execute_script("return Array.from(document.images).filter(i => !i.naturalWidth).map(i => i.alt)")
        assert not broken, broken  # every thumbnail decoded
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        # A path outside the images table, asked for directly: refused.
        browser.get(f"http://127.0.0.1:{port}/image?path=/etc/passwd")
        assert "not an image of this collection" in browser.page_source
    finally:
        browser.quit()
        server.should_exit = True
        thread.join(timeout=10)
