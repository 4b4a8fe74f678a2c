"""The mesh view in a real headless Chromium (Debian's chromium + chromedriver,
driven by Selenium): after the demo's traffic (client -> web), the graph shows
the client -> web edge with mTLS, and the service page and config page render.

The control plane serves the page on 127.0.0.1:15014 inside the lab's hub
namespace, so the browser runs there too: this test runs a small Selenium
driver script under `ip netns exec` and reads its JSON answer."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import textwrap
import threading
import time
from typing import Any

import pytest

from nodemesh.lab.harness import Lab
from tests.conftest import require_tool
from tests.netns.conftest import CLIENT_UID
from tests.netns.test_observability import traced  # noqa: F401 - the fixture (conftest layout, REDIRECT inbound)

pytestmark = pytest.mark.netns

DRIVER = textwrap.dedent('''
    import json, sys, time
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    url, profile, ready = sys.argv[1], sys.argv[2], sys.argv[3]
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--user-data-dir=" + profile, "--window-size=1280,900"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    out = {}
    try:
        # The view is behind a login: an operator token (NM_TOKEN_FILE), session cookie after.
        import os
        drv.get(url + "login")
        drv.find_element(By.ID, "token").send_keys(open(os.environ["NM_TOKEN_FILE"]).read().strip())
        drv.find_element(By.ID, "submit").click()
        deadline = time.time() + 10
        while time.time() < deadline and not drv.find_elements(By.ID, "meta"):
            time.sleep(0.2)
        deadline = time.time() + 20
        edge = None
        while time.time() < deadline:
            edges = drv.find_elements(By.CSS_SELECTOR,
                'g.edge[data-source="wl:default/client"][data-target="svc:default/web"]')
            callee = drv.find_elements(By.CSS_SELECTOR,
                'g.edge[data-source="svc:default/web"][data-target="wl:default/web-2"]')
            if edges and callee and float(edges[0].get_attribute("data-total") or 0) >= 3 \
                    and float(callee[0].get_attribute("data-total") or 0) >= 3:
                edge = edges[0]
                break
            time.sleep(0.5)
        out["edges"] = [{k: e.get_attribute("data-" + k) for k in ("source", "target", "reporter", "mtls", "total")}
                        for e in drv.find_elements(By.CSS_SELECTOR, "g.edge")]
        out["nodes"] = [n.get_attribute("data-id") for n in drv.find_elements(By.CSS_SELECTOR, "g.node")]
        out["edge_label"] = edge.text if edge is not None else ""
        out["meta"] = drv.find_element(By.ID, "meta").text
        if len(sys.argv) > 4:
            drv.save_screenshot(sys.argv[4])
        # Live: the test sends more traffic now; the same page (no reload) must show it.
        sel = 'g.edge[data-source="wl:default/client"][data-target="svc:default/web"]'
        first = float(drv.find_elements(By.CSS_SELECTOR, sel)[0].get_attribute("data-total") or 0)
        open(ready, "w").write(str(first))
        out["live"] = [first]
        deadline = time.time() + 20
        while time.time() < deadline:
            found = drv.find_elements(By.CSS_SELECTOR, sel)
            now = float(found[0].get_attribute("data-total") or 0) if found else 0.0
            if now >= first + 3:
                out["live"].append(now)
                out["live_label"] = found[0].text
                break
            time.sleep(0.3)
        drv.find_element(By.CSS_SELECTOR, 'g.node[data-id="svc:default/web"]').click()
        time.sleep(0.3)
        deadline = time.time() + 10
        while time.time() < deadline and not drv.find_elements(By.ID, "service-title"):
            time.sleep(0.3)
        out["service_title"] = drv.find_element(By.ID, "service-title").text
        deadline = time.time() + 10  # the control plane's series needs two summaries with traffic between
        while time.time() < deadline and drv.find_elements(
                By.CSS_SELECTOR, '.chart[data-field="request_rate"] .empty'):
            time.sleep(0.3)
        out["charts"] = [c.get_attribute("data-field") for c in drv.find_elements(By.CSS_SELECTOR, ".chart")]
        out["charts_with_data"] = [c.get_attribute("data-field") for c in
                                   drv.find_elements(By.CSS_SELECTOR, ".chart") if c.find_elements(By.TAG_NAME, "svg")]
        drv.get(url + "#/config")
        deadline = time.time() + 10
        while time.time() < deadline and not drv.find_elements(By.CSS_SELECTOR, "pre.resource"):
            time.sleep(0.3)
        out["config"] = drv.find_element(By.ID, "main").text[:2000]
    finally:
        drv.quit()
    print(json.dumps(out))
''')


def test_mesh_view_shows_client_to_web(traced: Lab) -> None:  # noqa: F811
    mesh = traced
    require_tool("chromium")
    require_tool("chromedriver")
    vip = mesh.service_vip("web")
    for i in range(3):
        assert mesh.curl(1, f"http://{vip}/view-{i}", uid=CLIENT_UID).returncode == 0
    ready = mesh.workdir / "meshview-ready"
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="nm-chromium-") as profile:
        def drive() -> None:
            result["res"] = mesh.ns_exec(mesh.hub, ["env", f"NM_TOKEN_FILE={mesh.admin_token_file}", sys.executable,
                                                    "-c", DRIVER, "http://127.0.0.1:15014/", profile,
                                                    str(ready), str(mesh.workdir / "meshview.png")],
                                         check=False, timeout=90)
        browser = threading.Thread(target=drive)
        browser.start()
        deadline = time.monotonic() + 60
        while not ready.exists() and browser.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if ready.exists():  # the page is up and showing the first 3 requests: now 3 more, live
            for i in range(3):
                assert mesh.curl(1, f"http://{vip}/live-{i}", uid=CLIENT_UID).returncode == 0
        browser.join(120)
    res = result["res"]
    assert res.returncode == 0, f"browser driver failed:\n{res.stderr[-3000:]}"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    client_web = [e for e in out["edges"] if e["source"] == "wl:default/client" and e["target"] == "svc:default/web"]
    assert client_web, f"no client -> web edge in the graph: {out['edges']}"
    assert client_web[0]["reporter"] == "source" and client_web[0]["mtls"] == "mutual_tls"
    assert float(client_web[0]["total"]) >= 3
    # The callee's view: web -> its replica on node 2, also over mTLS.
    assert any(e["source"] == "svc:default/web" and e["target"] == "wl:default/web-2" and e["mtls"] == "mutual_tls"
               for e in out["edges"]), out["edges"]
    assert "100%" in out["edge_label"] and "mTLS" in out["edge_label"]
    assert {"wl:default/client", "svc:default/web", "wl:default/web-2"} <= set(out["nodes"])
    assert "2 node(s) reporting" in out["meta"]
    assert out["service_title"] == "default/web"
    assert out["charts"] == ["request_rate", "connection_rate", "success_rate", "p99_ms"]
    # Golden metrics over time, from the control plane's series (HTTP: no connection rate).
    assert {"request_rate", "success_rate", "p99_ms"} <= set(out["charts_with_data"]), out["charts_with_data"]
    # Live: the same page showed the later requests without a reload; the label has p99 and mTLS.
    assert len(out["live"]) == 2 and out["live"][1] >= out["live"][0] + 3, out["live"]
    assert "p99" in out["live_label"] and "mTLS" in out["live_label"] and "rps" in out["live_label"]
    assert "Service default/web" in out["config"] and "MeshConfig" in out["config"]
    shot = mesh.workdir / "meshview.png"
    assert shot.stat().st_size > 10_000
    if os.environ.get("NODEMESH_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["NODEMESH_KEEP_SCREENSHOT"])


# A node whose heartbeats carry markup: over the local-admin socket it registers (no
# workloads) and sends telemetry naming a "workload" and an mTLS mode that are HTML.
EVIL_NODE = r"""
import asyncio, json, sys, time
import grpc
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc
target, seconds = sys.argv[1], float(sys.argv[2])
XSS = {"reporter": "source", "source": "default/<img src=x onerror=\"document.title='pwned'\">",
       "destination_service_key": "default/web", "destination_service": "web.default.svc.mesh",
       "destination_workload": "<script>document.title='pwned2'</script>", "requests": 5, "errors": 0,
       "mtls": ["<b id=injected>bold</b>"], "p99_ms": 1.0}
async def main():
    async with grpc.aio.insecure_channel(target) as ch:
        call = mesh_pb2_grpc.RegistryStub(ch).Session()
        await call.write(mesh_pb2.NodeReport(register=mesh_pb2.NodeRegistration(node_name="node-9",
                                                                                addresses=["10.254.0.9"])))
        await call.read()
        end = time.time() + seconds
        while time.time() < end:
            await call.write(mesh_pb2.NodeReport(heartbeat=mesh_pb2.Heartbeat(
                sent_unix_ms=int(time.time() * 1000), telemetry_json=json.dumps({"node": "node-9", "edges": [XSS]}))))
            await call.read()
            await asyncio.sleep(1.0)
        call.cancel()
asyncio.run(main())
"""

XSS_DRIVER = textwrap.dedent('''
    import json, os, sys, time
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    url, profile = sys.argv[1], sys.argv[2]
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--user-data-dir=" + profile):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    out = {}
    try:
        drv.get(url)  # no session: the login page
        out["first_url"] = drv.current_url
        drv.find_element(By.ID, "token").send_keys("nmop1.nothere.wrong")
        drv.find_element(By.ID, "submit").click()
        time.sleep(0.5)
        out["bad_login"] = drv.find_element(By.ID, "error").text
        drv.find_element(By.ID, "token").send_keys(open(os.environ["NM_TOKEN_FILE"]).read().strip())
        drv.find_element(By.ID, "submit").click()
        deadline = time.time() + 20
        found = []
        while time.time() < deadline and not found:
            found = [n for n in drv.find_elements(By.CSS_SELECTOR, "g.node")
                     if "<img" in (n.get_attribute("data-key") or "")]
            time.sleep(0.5)
        out["xss_node_key"] = found[0].get_attribute("data-key") if found else ""
        out["title"] = drv.title
        out["injected_elements"] = len(drv.find_elements(By.ID, "injected")) + len(
            drv.find_elements(By.CSS_SELECTOR, "#main img"))
        out["table_text"] = drv.find_element(By.ID, "edges").text if drv.find_elements(By.ID, "edges") else ""
        out["cookie_js"] = drv.execute_script("return document.cookie")
        out["cookies"] = [{"name": c["name"], "httpOnly": c.get("httpOnly"), "sameSite": c.get("sameSite")}
                          for c in drv.get_cookies()]
        # An inline script the server did not send is refused by the Content-Security-Policy.
        drv.execute_script("const s = document.createElement('script'); s.textContent = 'window.ran = 1';"
                           "document.body.appendChild(s);")
        out["inline_ran"] = drv.execute_script("return window.ran === 1")
    finally:
        drv.quit()
    print(json.dumps(out))
''')


def curl_view(mesh: Lab, path: str, *extra: str) -> tuple[str, str]:
    """(status line and headers, body) of one request to the mesh view from the hub."""
    r = mesh.ns_exec(mesh.hub, ["curl", "-sS", "-D", "-", "--max-time", "5", *extra,
                                f"http://127.0.0.1:15014{path}"], check=False)
    head, _, body = r.stdout.replace("\r\n", "\n").partition("\n\n")
    return head, body


def test_mesh_view_needs_a_login_checks_host_and_renders_node_data_inert(mesh: Lab) -> None:
    require_tool("chromium")
    require_tool("chromedriver")
    # Without a session: the APIs refuse, the page sends to the login.
    head, body = curl_view(mesh, "/api/config")
    assert head.startswith("HTTP/1.1 401") and "needs a login" in body, head
    head, _ = curl_view(mesh, "/")
    assert head.startswith("HTTP/1.1 303") and "Location: /login" in head, head
    assert curl_view(mesh, "/metrics")[0].startswith("HTTP/1.1 200")  # Prometheus stays open
    # A wrong token, then the operator's: a session cookie HttpOnly and SameSite=Strict.
    token = mesh.admin_token_file.read_text().strip()
    head, body = curl_view(mesh, "/login", "--data-urlencode", "token=nmop1.abc.def")
    assert head.startswith("HTTP/1.1 401") and "not a live operator token" in body, head
    head, _ = curl_view(mesh, "/login", "--data-urlencode", f"token={token}")
    assert head.startswith("HTTP/1.1 303"), head
    cookie = next(ln for ln in head.split("\n") if ln.startswith("Set-Cookie:"))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie, cookie
    session = cookie.split(":", 1)[1].split(";")[0].strip()
    head, body = curl_view(mesh, "/api/config", "-H", f"Cookie: {session}")
    assert head.startswith("HTTP/1.1 200") and "MeshConfig" in body, head
    # DNS rebinding: the same session, another name in Host.
    head, body = curl_view(mesh, "/api/config", "-H", f"Cookie: {session}", "-H", "Host: attacker.example:15014")
    assert head.startswith("HTTP/1.1 421") and "MeshConfig" not in body, head
    head, _ = curl_view(mesh, "/", "-H", f"Cookie: {session}")
    assert "Content-Security-Policy: default-src 'none'; script-src 'sha256-" in head, head
    assert "unsafe-inline" not in head
    # A node's heartbeat carrying markup, then the page in a real browser.
    evil = mesh.spawn("evil-node", mesh.hub, [sys.executable, "-c", EVIL_NODE, mesh.cp_unix, "40"])
    try:
        with tempfile.TemporaryDirectory(prefix="nm-chromium-") as profile:
            res = mesh.ns_exec(mesh.hub, ["env", f"NM_TOKEN_FILE={mesh.admin_token_file}", sys.executable, "-c",
                                          XSS_DRIVER, "http://127.0.0.1:15014/", profile], check=False, timeout=90)
    finally:
        evil.kill()
    assert res.returncode == 0, f"browser driver failed:\n{res.stderr[-3000:]}\n{mesh.log('evil-node')[-2000:]}"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["first_url"].endswith("/login"), out
    assert "not a live operator token" in out["bad_login"], out
    assert out["xss_node_key"].startswith("default/<img src=x onerror="), out  # shown as text
    assert out["title"] == "nodemesh · mesh view", out  # no handler ran
    assert out["injected_elements"] == 0, out
    assert ("<script>document.title='pwned2'</script>" in out["table_text"]
            or "<b id=injected>" in out["table_text"]), out
    assert out["cookie_js"] == "", out  # HttpOnly: page scripts cannot read the session
    assert out["cookies"] and out["cookies"][0]["httpOnly"] and out["cookies"][0]["sameSite"] == "Strict", out
    assert out["inline_ran"] is False, out
