"""report.html and fleet.html as a person sees them: rendered by headless
Chromium (Debian's ``chromium``; ``.ci/install-chromium`` installs it), driven
over the DevTools protocol (Tornado's websocket client, a dependency of Dask's
distributed). Each page loads with no console error or exception, requests
nothing but itself (no network), draws every image and the error plot with a
non-zero size, and shows the first failure without scrolling (a 1280 x 800
window). Without Chromium the tests skip with one line."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request

import pytest

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/install-chromium installs it)")
WINDOW = (1280, 800)

MEASURE = """(() => {
  const box = e => { if (!e) return null; const r = e.getBoundingClientRect();
                     return {top: r.top, bottom: r.bottom, width: r.width, height: r.height}; };
  return {
    images: Array.from(document.images).map(i => ({natural: [i.naturalWidth, i.naturalHeight], box: box(i)})),
    plots: Array.from(document.querySelectorAll('svg')).map(s => ({box: box(s),
             lines: Array.from(s.querySelectorAll('polyline')).map(p => { const b = p.getBBox();
                                                                         return b.width + b.height; })})),
    first: box(document.querySelector(FIRST)),
    firstText: (document.querySelector(FIRST) || {}).textContent || null,
    scrollY: window.scrollY, innerHeight: window.innerHeight,
  };
})()"""


class DevTools:
    """The few DevTools-protocol calls these tests need, over one page's websocket."""

    def __init__(self, ws):
        self.ws, self.next_id, self.events = ws, 0, []

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        mine = self.next_id
        await self.ws.write_message(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            msg = await self._read()
            if msg.get("id") == mine:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    async def until(self, method: str) -> dict:
        while True:
            hit = next((e for e in self.events if e.get("method") == method), None)
            if hit is not None:
                return hit
            self.events.append(await self._read())

    async def _read(self) -> dict:
        raw = await asyncio.wait_for(self.ws.read_message(), 60)
        if raw is None:
            raise RuntimeError("Chromium closed the DevTools connection")
        return json.loads(raw)


async def _render(endpoint: str, url: str, first_selector: str) -> tuple[dict, list[dict]]:
    from tornado.websocket import websocket_connect

    page = next(t for t in json.load(urllib.request.urlopen(f"{endpoint}/json/list", timeout=10))
                if t["type"] == "page")
    ws = await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=1 << 26)
    try:
        dt = DevTools(ws)
        for domain in ("Runtime", "Log", "Network", "Page"):
            await dt.call(f"{domain}.enable")
        await dt.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1], deviceScaleFactor=1,
                      mobile=False)
        await dt.call("Page.navigate", url=url)
        await dt.until("Page.loadEventFired")
        result = await dt.call("Runtime.evaluate", expression=MEASURE.replace("FIRST", json.dumps(first_selector)),
                               returnByValue=True)
        return result["result"]["value"], dt.events
    finally:
        ws.close()


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """A headless Chromium with its DevTools endpoint; ``render(path, first_selector)`` -> (measures, problems)."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-extensions", "--disable-background-networking", "--remote-debugging-port=0",
                             f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"chromium did not start (exit {proc.poll()})")
            time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port_file.read_text().split()[0]}"

        def render(path, first_selector):
            url = path.resolve().as_uri()
            value, events = asyncio.run(_render(endpoint, url, first_selector))
            problems = []
            for e in events:
                m, p = e.get("method"), e.get("params", {})
                if m == "Runtime.exceptionThrown":
                    problems.append(f"exception: {p['exceptionDetails'].get('text')}")
                elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
                    problems.append(f"console {p['type']}: {p.get('args')}")
                elif m == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                    problems.append(f"log {p['entry']['level']}: {p['entry']['text']}")
                elif m == "Network.requestWillBeSent" and not p["request"]["url"].startswith((url, "data:")):
                    problems.append(f"request: {p['request']['url']}")
            return value, problems

        yield render
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def pages(emulated_bundle, fault_bundle, tiny_sd21, certify_cache, tmp_path_factory):
    """report.html of a rejected device (a +1 % UNet bias from step 1) and fleet.html of it beside the good one."""
    from refsd_validate import fleet
    from refsd_validate.certify import certify
    from refsd_validate.outputs import write_outputs
    from refsd_validate.plan import prepare

    out = tmp_path_factory.mktemp("pages")
    entries = []
    for i, bundle in enumerate([emulated_bundle, fault_bundle("bias_1pct_from_step_1")]):
        cert = certify(bundle, tiny_sd21, cache_dir=certify_cache)
        where = write_outputs(cert, out / f"{i:03d}")
        plan = prepare(bundle, tiny_sd21, cache_dir=certify_cache)
        entries.append(fleet.FleetEntry(str(bundle), fleet.device_label(plan), fleet.request_label(plan), cert, where,
                                        fleet.device_declaration(plan)))
    fleet.write_fleet(entries, {"bundles": 2, "reruns_needed": 0, "reruns_run": 0, "local_workers": None}, out)
    return out / "001" / "report.html", out / "fleet.html"


def test_report_renders_offline_with_its_first_failure_in_view(chromium, pages):
    measures, problems = chromium(pages[0], ".why.first_failure")
    assert problems == []
    assert measures["images"] and all(i["natural"][0] > 0 and i["box"]["width"] > 0 and i["box"]["height"] > 0
                                      for i in measures["images"]), measures["images"]
    plot = measures["plots"][0]
    assert plot["box"]["width"] > 0 and plot["box"]["height"] > 0 and plot["lines"] and min(plot["lines"]) > 0
    first = measures["first"]
    assert first is not None and "unet/step_1/noise_pred" in measures["firstText"]
    assert measures["scrollY"] == 0 and 0 <= first["top"] and first["bottom"] <= measures["innerHeight"]


def test_fleet_page_renders_offline_with_its_rejection_in_view(chromium, pages):
    measures, problems = chromium(pages[1], "td.bad")
    assert problems == []
    first = measures["first"]
    assert first is not None and "unet/step_1/noise_pred" in measures["firstText"]
    assert measures["scrollY"] == 0 and 0 <= first["top"] and first["bottom"] <= measures["innerHeight"]


def test_the_browser_checks_can_fail(chromium, tmp_path):
    """A page with a console error, a script exception and a request off the page is caught on each count."""
    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><html><body><p class='x' style='margin-top:2000px'>late</p>"
                    "<img src='http://127.0.0.1:9/x.png'><script>console.error('boom'); undefined_name();</script>"
                    "</body></html>")
    measures, problems = chromium(page, ".x")
    assert any(p.startswith("console error") for p in problems), problems
    assert any(p.startswith("exception") for p in problems), problems
    assert any(p.startswith("request: http://127.0.0.1:9/") for p in problems), problems
    assert measures["first"]["top"] > measures["innerHeight"]  # out of view: the first-failure check would fail
