"""The dashboard on real parts: the UI service against a real NATS server, driven by Chromium."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

import proto
from conftest import free_port, require
from lls.bus import Bus, connect
from lls.config import parse
from lls.service import ServiceContext
from services.ui import history
from services.ui.hub import Hub
from services.ui.secret import SECRET_HEADER, ui_secret
from services.ui.service import run

CHROMIUM = Path("/usr/bin/chromium")
HAVE_CHROMIUM = CHROMIUM.exists()
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = Path("/tmp/dashboard.png")
XSS = '<img src=x onerror="window.__xss=1">'
# The UI answers only the gateway, which adds this after its admin check; tests stand in for it.
GATEWAY = {SECRET_HEADER: ui_secret()}


def host(host_id: str, gpus: int = 2, used: int = 3000) -> proto.HostRecord:
    t = time.time()
    return proto.HostRecord(
        host_id=host_id,
        ts=t,
        started_at=t - 600,
        runtime="process",
        gpus=[
            proto.GpuInfo(
                index=i,
                uuid=f"GPU-{host_id}-{i}",
                name="NVIDIA RTX 4090",
                memory_total_mib=24564,
                memory_used_mib=used * (i + 1),
                memory_claimed_mib=4096 * (i + 1),
                utilization_pct=37,
                temperature_c=61,
                power_w=212.5,
                simulated=True,
            )
            for i in range(gpus)
        ],
        cpu_count=16,
        ram_total_mib=65536,
        ram_free_mib=40000,
        instances=["i-ready"],
        files=[proto.FileInfo(model="demo", filename="demo.gguf", size=4_683_073_536)],
    )


def instance(iid: str, state: proto.InstanceState, **kw: object) -> proto.InstanceRecord:
    t = time.time()
    return proto.InstanceRecord(
        instance_id=iid, model="demo", state=state, created=t - 90, updated=t, **kw
    )


@pytest.fixture
async def start_ui(nats_url: str) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """start_ui() -> base URL of a UI service running in this event loop."""
    stops: list[tuple[ServiceContext, asyncio.Task]] = []

    async def start() -> str:
        cfg = parse({"models": {"demo": {"url": "file:///models/demo.gguf"}}})
        ctx = ServiceContext(
            name="ui", cfg=cfg, bus=await connect(nats_url, "ui"), host_id="t", port=free_port()
        )
        task = asyncio.create_task(run(ctx))
        stops.append((ctx, task))
        base = f"http://127.0.0.1:{ctx.port}"
        async with httpx.AsyncClient(headers=GATEWAY) as http:
            for _ in range(100):
                if task.done():
                    task.result()  # raises what made the service stop
                try:
                    if (await http.get(base + "/dashboard/state")).status_code == 200:
                        return base
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError("the UI service did not start within 5 s")

    yield start
    for ctx, task in stops:
        ctx.stop.set()
        await asyncio.wait_for(task, 10)
        await ctx.bus.close()


async def test_state_replays_recent_past(bus: Bus, start_ui) -> None:
    await bus.put(bus.hosts, "h1", host("h1"))
    await bus.emit(proto.HostJoined(host_id="h1", gpus=2, runtime="process"))
    for b in range(0, 100, 10):  # a finished download: no bar, one log row
        await bus.emit(proto.DownloadProgress(model="old", host="h1", bytes=b, total=100))
    await bus.emit(proto.DownloadCompleted(model="old", host="h1", filename="o.gguf", size=100))
    await bus.emit(proto.DownloadProgress(model="big", host="h1", bytes=5, total=100))

    base = await start_ui()
    async with httpx.AsyncClient(headers=GATEWAY) as http:
        state = (await http.get(base + "/dashboard/state")).json()
        for path in ("/dashboard", "/dashboard/"):
            page = await http.get(base + path)
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]

    assert set(state["hosts"]) == {"h1"}
    assert state["hosts"]["h1"]["gpus"][1]["memory_claimed_mib"] == 8192
    assert state["hosts"]["h1"]["files"] == [
        {"model": "demo", "filename": "demo.gguf", "size": 4_683_073_536}
    ]
    assert [e["name"] for e in state["events"]] == ["host.joined", "download.completed"]
    assert list(state["downloads"]) == ["h1/big"]
    assert state["models"] == ["demo"]


def test_slow_client_is_bounded_and_resynced() -> None:
    hub = Hub(maxlen=10)
    client = hub.subscribe()
    client.take()
    client.resync = False
    for i in range(1000):
        hub.publish("event", str(i).encode())
    assert len(client.queue) == 10 and client.dropped == 990
    assert client.resync  # the stream sends a snapshot instead of the stale deltas


@pytest.mark.browser
async def test_page_updates_live(bus: Bus, start_ui) -> None:
    require("Chromium", HAVE_CHROMIUM, "apt-get install chromium")
    from playwright.async_api import async_playwright, expect

    await bus.put(bus.hosts, "gpu-a", host("gpu-a"))
    base = await start_ui()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(
                viewport={"width": 1280, "height": 1000}, extra_http_headers=GATEWAY
            )
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(base + "/dashboard")
            await expect(page.locator("#conn")).to_have_text("live", timeout=5000)
            await expect(page.locator('[data-host="gpu-a"]')).to_be_visible()
            await expect(page.locator('[data-model="demo"]')).to_contain_text("not loaded")

            # Everything below arrives while the page is open: no reload.
            await bus.put(bus.hosts, "gpu-b", host("gpu-b", gpus=1, used=20000))
            await bus.emit(proto.HostJoined(host_id="gpu-b", gpus=1, runtime="process"))
            ready = instance(
                "i-ready",
                proto.InstanceState.READY,
                host="gpu-a",
                gpus=[0],
                memory_mib=4096,
                endpoint="http://127.0.0.1:39001",
                reason="binpack: most free memory after placement",
                ready_at=time.time() - 75,
                binary="/opt/llama.cpp/llama-server",
                backend="cuda",
            )
            failed = instance(
                "i-failed",
                proto.InstanceState.FAILED,
                host="gpu-b",
                gpus=[0],
                reason=XSS,
                log_tail="llama_model_load: error: model file is truncated\n" + XSS,
            )
            await bus.put(bus.instances, "i-ready", ready)
            await bus.put(bus.instances, "i-failed", failed)
            await bus.emit(
                proto.InstanceChanged(
                    instance_id="i-ready",
                    model="demo",
                    state=proto.InstanceState.READY,
                    host="gpu-a",
                    endpoint="http://127.0.0.1:39001",
                )
            )
            await bus.emit(
                proto.InstanceChanged(
                    instance_id="i-failed",
                    model="demo",
                    state=proto.InstanceState.FAILED,
                    host="gpu-b",
                    reason=XSS,
                )
            )
            await bus.emit(
                proto.DownloadProgress(
                    model="qwen2.5-7b",
                    host="gpu-b",
                    bytes=3 << 30,
                    total=5 << 30,
                    rate_bps=2e8,
                    eta_s=11,
                )
            )

            await expect(page.locator('[data-host="gpu-b"]')).to_contain_text("NVIDIA RTX 4090")
            await expect(page.locator('[data-instance="i-ready"]')).to_contain_text("ready")
            backend = page.locator('[data-backend="i-ready"]')  # the binary on hover
            await expect(backend).to_have_text("cuda")
            await expect(backend).to_have_attribute("title", "/opt/llama.cpp/llama-server")
            await expect(page.locator('[data-kind="instance.ready"]')).to_contain_text("demo")
            bar = page.locator('[data-download="gpu-b/qwen2.5-7b"] [role=progressbar]')
            await expect(bar).to_have_attribute("aria-valuenow", "60.0")
            # Event data is text, never markup.
            await expect(page.locator('[data-kind="instance.failed"]')).to_contain_text(XSS)
            assert await page.evaluate("window.__xss") is None
            assert await page.locator("#events img").count() == 0
            # A click shows a failed instance's server log tail, as text too.
            await page.locator('[data-instance="i-failed"]').click()
            detail = page.locator('[data-detail="i-failed"] pre')
            await expect(detail).to_contain_text("model file is truncated")
            await expect(detail).to_contain_text(XSS)
            assert await page.locator("#instances img").count() == 0
            await page.locator('[data-instance="i-failed"]').click()
            await expect(detail).to_have_count(0)

            # A swap in progress: the yielding instance and the requests waiting per model.
            draining = instance(
                "i-drain",
                proto.InstanceState.DRAINING,
                host="gpu-a",
                gpus=[0],
                memory_mib=1024,
                drain_for="other",
                drain_since=time.time() - 1,
                reason="yielding to other, which waits",
            )
            await bus.put(bus.instances, "i-drain", draining)
            queues = {"demo": proto.ModelQueue(7, time.time() - 2)}
            report = proto.ActivityReport(
                gateway_id="gw1", ts=time.time(), queues=queues, draining=["i-drain"]
            )
            await bus.put(bus.activity, "gw1", report)
            await bus.emit(
                proto.SwapChanged(
                    model="other",
                    stage="draining",
                    yielding=["i-drain"],
                    yielding_models=["demo"],
                    reason="no room",
                )
            )
            await expect(page.locator('[data-instance="i-drain"]')).to_contain_text("draining")
            await expect(page.locator('[data-queue="demo"]')).to_have_text("7")
            await expect(page.locator("#n-waiting")).to_have_text("7")
            await expect(page.locator('[data-kind="swap.draining"]')).to_contain_text("yield")

            await page.wait_for_timeout(300)  # let the bar's transition settle
            await page.screenshot(path=str(SCREENSHOT), full_page=True)

            await bus.emit(
                proto.DownloadCompleted(
                    model="qwen2.5-7b", host="gpu-b", filename="q.gguf", size=5 << 30
                )
            )
            await expect(bar).to_have_count(0)
            await expect(page.locator('[data-kind="download.completed"]')).to_be_visible()

            # The same page behind a trailing slash finds its stream too (relative URLs).
            page2 = await browser.new_page(extra_http_headers=GATEWAY)
            await page2.goto(base + "/dashboard/")
            await expect(page2.locator('[data-instance="i-ready"]')).to_be_visible(timeout=5000)
            assert errors == []
        finally:
            await browser.close()


async def test_ui_answers_only_the_gateway(start_ui) -> None:
    """Without the gateway's secret the UI gives nothing away, and errors read like ours."""
    base = await start_ui()
    async with httpx.AsyncClient() as http:
        for path in ("/dashboard", "/dashboard/state", "/dashboard/events", "/nope"):
            r = await http.get(base + path)
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "ui_secret_required"
        r = await http.get(base + "/dashboard/state", headers={SECRET_HEADER: "a guess"})
        assert r.status_code == 401
        r = await http.get(base + "/dashboard/nope", headers=GATEWAY)
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "code"}


def serving(requests: int, slow: int = 0) -> proto.ModelServing:
    """Cumulative counts: `requests` in 0.25-0.5 s (TTFT 0.05-0.1 s), `slow` more at 2.5-5 s."""
    n = len(proto.SERVING_BUCKETS_S) + 1
    latency, ttft = [0] * n, [0] * n
    latency[3], latency[6], ttft[1] = requests, slow, requests + slow
    return proto.ModelServing(requests=requests + slow, latency=latency, ttft=ttft)


async def legend(page, chart: str, series: str) -> float | None:  # type: ignore[no-untyped-def]
    """The latest value a chart's legend shows for one series (None: no value yet)."""
    sel = f'[data-chart="{chart}"] .legend [data-series="{series}"]'
    last = await page.get_attribute(sel, "data-last", timeout=5000)
    return float(last) if last else None


async def wait_legend(page, chart: str, series: str, ok, what: str) -> float:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 8
    while True:
        value = await legend(page, chart, series)
        if value is not None and ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{chart} {series}: {value} is not {what}")
        await asyncio.sleep(0.1)


@pytest.mark.browser
async def test_charts_filters_and_downloads_live(
    bus: Bus, start_ui, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Charts fill from heartbeats and gateways' activity reports while the page is open;
    the event log filters by type, model and host; download bars move."""
    require("Chromium", HAVE_CHROMIUM, "apt-get install chromium")
    from playwright.async_api import async_playwright, expect

    monkeypatch.setattr(history, "SAMPLE_S", 0.25)
    monkeypatch.setattr(history, "SPAN_S", 12.0)  # the charts' window fills in seconds
    await bus.put(bus.hosts, "gpu-a", host("gpu-a", used=3000))
    await bus.put(bus.hosts, "gpu-b", host("gpu-b", gpus=1, used=9000))
    since = time.time()
    # Counted before the UI looked: a baseline, never charted as a burst.
    await bus.put(
        bus.activity,
        "gw1",
        proto.ActivityReport(
            gateway_id="gw1", ts=time.time(), serving={"demo": serving(1000)}, serving_since=since
        ),
    )
    base = await start_ui()

    stop = asyncio.Event()
    traffic = {"rate": 0}  # requests per report, set by the test as it goes

    async def gateway() -> None:
        """A gateway reporting every 0.1 s, as app.py counts through router.stats."""
        done, slow, i = 1000, 0, 0
        while not stop.is_set():
            i += 1
            done += traffic["rate"] + (i % 3 if traffic["rate"] else 0)
            slow += 1 if traffic["rate"] and i % 4 == 0 else 0
            queues = {"demo": proto.ModelQueue(4, time.time() - 1)} if traffic["rate"] else {}
            rep = proto.ActivityReport(
                gateway_id="gw1",
                ts=time.time(),
                queues=queues,
                serving={"demo": serving(done, slow)},
                serving_since=since,
            )
            await bus.put(bus.activity, "gw1", rep)
            used = int(6000 + 3000 * math.sin(i / 8)) if traffic["rate"] else 3000
            await bus.put(bus.hosts, "gpu-a", host("gpu-a", used=used))
            await bus.put(bus.hosts, "gpu-b", host("gpu-b", gpus=1, used=9000))
            await asyncio.sleep(0.1)

    publisher = asyncio.create_task(gateway())
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(
                viewport={"width": 1400, "height": 1000}, extra_http_headers=GATEWAY
            )
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(base + "/dashboard")
            await expect(page.locator("#conn")).to_have_text("live", timeout=5000)

            # GPU memory: used, claimed and total per GPU, from the heartbeats.
            used_path = '[data-chart="gpu:gpu-a/0"] path[data-series="used"]'
            assert await wait_legend(page, "gpu:gpu-a/0", "used", lambda v: v == 3000, "3000")
            assert await legend(page, "gpu:gpu-a/0", "total") == 24564
            assert await legend(page, "gpu:gpu-b/0", "used") == 9000
            await wait_legend(page, "gpu:gpu-a/1", "claimed", lambda v: v == 8192, "8192")
            # No traffic yet: the baseline of 1000 requests is not a rate.
            assert await wait_legend(page, "model:demo:rps", "req/s", lambda v: True, "") == 0
            assert await legend(page, "model:demo:latency", "p50") is None
            path_before = await page.get_attribute(used_path, "d")

            traffic["rate"] = 5  # about 60 requests/s, and 4 waiting
            rps = await wait_legend(page, "model:demo:rps", "req/s", lambda v: v > 10, "> 10/s")
            assert rps < 200
            p50 = await wait_legend(page, "model:demo:latency", "p50", lambda v: v > 0, "> 0")
            assert 0.25 <= p50 <= 0.5  # the bucket every fast request fell in
            ttft = await legend(page, "model:demo:latency", "TTFT p50")
            assert ttft is not None and 0.05 <= ttft <= 0.1
            await wait_legend(page, "model:demo:queue", "waiting", lambda v: v == 4, "4")
            await wait_legend(page, "gpu:gpu-a/0", "used", lambda v: v != 3000, "moving")
            assert await page.get_attribute(used_path, "d") != path_before
            # p99 sees the slow requests: far above the median.
            await wait_legend(page, "model:demo:latency", "p99", lambda v: v > 2.5, "> 2.5 s")

            # Downloads show as bars that move.
            bar = page.locator('[data-download="gpu-b/big"] [role=progressbar]')
            await bus.emit(proto.DownloadProgress(model="big", host="gpu-b", bytes=1, total=4))
            await expect(bar).to_have_attribute("aria-valuenow", "25.0")
            await bus.emit(
                proto.DownloadProgress(
                    model="big", host="gpu-b", bytes=3 << 30, total=4 << 30, rate_bps=3e8
                )
            )
            await expect(bar).to_have_attribute("aria-valuenow", "75.0")

            # The event log filters by type, model and host.
            for ev in (
                proto.HostJoined(host_id="gpu-a", gpus=2, runtime="process"),
                proto.HostJoined(host_id="gpu-b", gpus=1, runtime="process"),
                proto.InstanceChanged(
                    instance_id="demo-1",
                    model="demo",
                    state=proto.InstanceState.READY,
                    host="gpu-a",
                ),
                proto.PlacementFailed(model="other", reason="no GPU has 80 GiB free"),
                proto.DownloadFailed(model="other", host="gpu-b", reason="404"),
            ):
                await bus.emit(ev)
            rows = page.locator("#events tr:not([hidden])")
            await expect(rows).to_have_count(5)
            await expect(page.locator('#f-model option[value="other"]')).to_have_count(1)
            await page.select_option("#f-model", "other")
            await expect(rows).to_have_count(2)
            await page.select_option("#f-type", "download.failed")
            await expect(rows).to_have_count(1)
            await expect(rows).to_contain_text("404")
            await page.select_option("#f-model", "")
            await page.select_option("#f-type", "")
            await page.select_option("#f-host", "gpu-a")
            await expect(rows).to_have_count(2)  # host.joined and instance.ready on gpu-a
            await expect(page.locator("#n-events")).to_contain_text("2 of 5 shown")
            await page.select_option("#f-host", "")

            # A page opened later gets the history whole, then the same live points.
            page2 = await browser.new_page(
                viewport={"width": 1400, "height": 1000}, extra_http_headers=GATEWAY
            )
            await page2.goto(base + "/dashboard")
            await expect(page2.locator('[data-chart="model:demo:rps"]')).to_be_visible()
            assert int(await page2.get_attribute('[data-chart="gpu:gpu-a/0"]', "data-points")) > 5
            await page2.close()

            shot = os.environ.get("DASHBOARD_SCREENSHOT")  # docs/dashboard.png is made so
            if shot:
                await bus.put(
                    bus.instances,
                    "i-ready",
                    instance(
                        "i-ready",
                        proto.InstanceState.READY,
                        host="gpu-a",
                        gpus=[0],
                        memory_mib=4096,
                        endpoint="http://127.0.0.1:39001",
                        reason="binpack: most free memory after placement",
                        ready_at=time.time() - 75,
                    ),
                )
                await asyncio.sleep(history.SPAN_S)  # a full window of samples
                await page.screenshot(path=shot, full_page=True)
            assert errors == []
        finally:
            stop.set()
            await publisher
            await browser.close()
