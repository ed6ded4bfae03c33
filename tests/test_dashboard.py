"""The dashboard on real parts: the UI service against a real NATS server, driven by Chromium."""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import msgspec
import pytest

import proto
from conftest import free_port, require
from lls.bus import Bus, connect
from lls.config import parse
from lls.service import ServiceContext
from lls.ui_secret import SECRET_HEADER, ui_secret
from services.ui import history
from services.ui.hub import Hub
from services.ui.service import run
from services.ui.view import View

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


DEMO = {"demo": {"url": "file:///models/demo.gguf"}}


@pytest.fixture
async def start_ui(nats_url: str) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """start_ui(models=DEMO) -> base URL of a UI service running in this event loop."""
    stops: list[tuple[ServiceContext, asyncio.Task]] = []

    async def start(models: dict | None = None) -> str:
        cfg = parse({"models": models or DEMO})
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
    assert state["replicas"] == {"demo": {"min": 1, "max": 1}}  # the config's default


def test_slow_client_is_bounded_and_resynced() -> None:
    hub = Hub(maxlen=10)
    client = hub.subscribe()
    client.take()
    client.resync = False
    for i in range(1000):
        hub.publish("event", str(i).encode())
    assert len(client.queue) == 10 and client.dropped == 990
    assert client.resync  # the stream sends a snapshot instead of the stale deltas


def test_reloaded_models_reach_every_page() -> None:
    """A config reload swaps the models (and their replica limits) into the view, and every
    open page gets a fresh snapshot: deltas do not carry the config."""
    view, hub = View(["demo"]), Hub()
    client = hub.subscribe()
    client.take()
    client.resync = False
    cfg = parse({"models": {"b": {"url": "file:///b.gguf", "replicas": {"min": 2, "max": 4}}}})
    view.set_models(cfg.models)
    hub.resync()
    snap = view.snapshot()
    assert snap["models"] == ["b"] and snap["replicas"] == {"b": {"min": 2, "max": 4}}
    assert view.history.models == ["b"]  # charted before its first request
    assert client.resync and client.wakeup.is_set()


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
            await bus.put(bus.instances, proto.instance_key("gpu-a", "i-ready"), ready)
            await bus.put(bus.instances, proto.instance_key("gpu-b", "i-failed"), failed)
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
            assert await page.locator("#instances-section img").count() == 0
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
            await bus.put(bus.instances, proto.instance_key("gpu-a", "i-drain"), draining)
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
    base = await start_ui(
        {"demo": {"url": "file:///models/demo.gguf", "replicas": {"min": 1, "max": 2}}}
    )

    stop = asyncio.Event()
    traffic = {"rate": 0}  # requests per report, set by the test as it goes

    async def gateway() -> None:
        """A gateway reporting every 0.1 s, as app.py counts through router.stats."""
        done, slow, i = 1000, 0, 0
        while not stop.is_set():
            i += 1
            done += traffic["rate"] + (i % 3 if traffic["rate"] else 0)
            slow += 1 if traffic["rate"] and i % 4 == 0 else 0
            clients = {"alice": 3, "bob": 1}
            queues = (
                {"demo": proto.ModelQueue(4, time.time() - 1, clients)} if traffic["rate"] else {}
            )
            busy = {  # both replicas of the screenshot serving while requests wait
                iid: proto.InstanceActivity(in_flight=n, last_used=time.time())
                for iid, n in (("i-ready", 2), ("i-ready-2", 1))
                if traffic["rate"]
            }
            rep = proto.ActivityReport(
                gateway_id="gw1",
                ts=time.time(),
                instances=busy,
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
                for iid, where, port in (
                    ("i-ready", "gpu-a", 39001),
                    ("i-ready-2", "gpu-b", 39002),
                ):
                    rec = instance(
                        iid,
                        proto.InstanceState.READY,
                        host=where,
                        gpus=[0],
                        memory_mib=4096,
                        endpoint=f"http://127.0.0.1:{port}",
                        reason="binpack: most free memory after placement",
                        ready_at=time.time() - 75,
                    )
                    await bus.put(bus.instances, proto.instance_key(where, iid), rec)
                await bus.emit(
                    proto.ReplicaChanged(
                        model="demo",
                        stage="added",
                        instance_id="i-ready-2",
                        replicas=2,
                        reason="waited 2.1 s with every instance busy",
                    )
                )
                await bus.emit(
                    proto.SlotCacheChanged(
                        model="demo",
                        host="gpu-b",
                        instance_id="i-ready-2",
                        stage="restored",
                        slots=1,
                        tokens=2000,
                        bytes=47 << 20,
                        seconds=0.21,
                    )
                )
                for n in range(8):  # some history: it folds into "recent history"
                    await live_and_end(bus, n)
                await asyncio.sleep(history.SPAN_S)  # a full window of samples
                await page.screenshot(path=shot, full_page=True)
            assert errors == []
        finally:
            stop.set()
            await publisher
            await browser.close()


def queue(waiting: int, age_s: float, **clients: int) -> proto.ModelQueue:
    return proto.ModelQueue(waiting, time.time() - age_s, clients)


@pytest.mark.browser
async def test_replicas_queues_and_warm_swaps_live(bus: Bus, start_ui) -> None:
    """Per model: live replicas out of replicas.max, each replica, and what waits, merged by
    client over live gateways; replica and slot-cache events read as sentences and filter."""
    require("Chromium", HAVE_CHROMIUM, "apt-get install chromium")
    from playwright.async_api import async_playwright, expect

    models = {
        "demo": {"url": "file:///models/demo.gguf", "replicas": {"min": 1, "max": 3}},
        "other": {"url": "file:///models/other.gguf"},
    }
    base = await start_ui(models)
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
            count = page.locator('[data-replicas="demo"]')
            await expect(count).to_contain_text("0/3")
            await expect(count).to_contain_text("min 1 · max 3")
            await expect(page.locator('[data-replicas="other"]')).to_contain_text("0/1")

            # Two replicas serving, a third starting; an ended one is not a replica.
            for iid, state, where in (
                ("demo-1", proto.InstanceState.READY, ("gpu-a", [0])),
                ("demo-2", proto.InstanceState.READY, ("gpu-b", [1])),
                ("demo-3", proto.InstanceState.STARTING, ("gpu-a", [1])),
                ("demo-0", proto.InstanceState.STOPPED, ("gpu-a", [0])),
            ):
                rec = instance(iid, state, host=where[0], gpus=where[1], memory_mib=2048)
                await bus.put(bus.instances, proto.instance_key(where[0], iid), rec)
            t = time.time()
            use = {
                "demo-1": proto.InstanceActivity(in_flight=3, last_used=t),
                "demo-2": proto.InstanceActivity(in_flight=1, last_used=t),
            }
            fresh = {"demo": queue(5, 4.0, alice=3, **{"(by address)": 2})}
            await bus.put(
                bus.activity,
                "gw1",
                proto.ActivityReport(gateway_id="gw1", ts=t, instances=use, queues=fresh),
            )
            other = {"demo": queue(2, 1.0, alice=1, bob=1), "other": queue(1, 0.5)}
            await bus.put(
                bus.activity, "gw2", proto.ActivityReport(gateway_id="gw2", ts=t, queues=other)
            )
            # Silent for 45 s: still in the UI's table, but no longer counted, as in "Waiting".
            stale = {"demo": queue(50, 60.0, mallory=50)}
            await bus.put(
                bus.activity,
                "gw3",
                proto.ActivityReport(gateway_id="gw3", ts=t - 45, queues=stale),
            )

            await expect(count).to_contain_text("3/3")
            row = page.locator('[data-model-replicas="demo"]')
            await expect(row.locator("[data-replica]")).to_have_count(3)
            demo1 = row.locator('[data-replica="demo-1"]')
            await expect(demo1.locator(".state")).to_have_text("ready")
            await expect(demo1).to_contain_text("gpu-a · GPU 0 · 3 in flight")
            await expect(row.locator('[data-replica="demo-2"]')).to_contain_text("gpu-b · GPU 1")
            await expect(row.locator('[data-replica="demo-2"]')).to_contain_text("1 in flight")
            await expect(row.locator('[data-replica="demo-3"]')).to_contain_text("starting")
            await expect(page.locator('[data-waiting="demo"]')).to_have_text("7")
            await expect(page.locator('[data-queue="demo"]')).to_have_text("7")  # the old column
            oldest = await page.locator('[data-oldest="demo"]').text_content()
            assert oldest is not None and 4 <= int(oldest.removesuffix(" s")) <= 30, oldest
            clients = page.locator('[data-clients="demo"] [data-client]')
            await expect(clients).to_have_count(3)
            names = await clients.evaluate_all(
                "cs => cs.map(c => c.dataset.client + '=' + c.dataset.count)"
            )
            assert names == ["alice=4", "(by address)=2", "bob=1"]  # busiest first
            await expect(page.locator('[data-clients="other"]')).to_have_text("no breakdown")
            await expect(page.locator('[data-waiting="other"]')).to_have_text("1")

            # The merge itself, on plain values.
            merged = await page.evaluate(
                "([reps, t]) => mergeQueues(reps, t)",
                [
                    [
                        {
                            "ts": 100,
                            "queues": {"m": {"waiting": 2, "since": 90, "clients": {"a": 2}}},
                        },
                        {
                            "ts": 99,
                            "queues": {"m": {"waiting": 1, "since": 95, "clients": {"a": 1}}},
                        },
                        {
                            "ts": 50,
                            "queues": {"m": {"waiting": 9, "since": 10, "clients": {"z": 9}}},
                        },
                        {"ts": 100, "queues": {"idle": {"waiting": 0, "since": 0}}},
                    ],
                    100,
                ],
            )
            assert merged == {"m": {"waiting": 3, "since": 90, "clients": {"a": 3}}}

            # Replica and warm-swap events, one readable line each.
            for ev in (
                proto.ReplicaChanged(
                    model="demo",
                    stage="added",
                    instance_id="demo-3",
                    replicas=3,
                    reason="waited 2.4 s with every instance busy",
                ),
                proto.SlotCacheChanged(
                    model="demo",
                    host="gpu-a",
                    instance_id="demo-0",
                    stage="saved",
                    slots=2,
                    tokens=2048,
                    bytes=48 << 20,
                    seconds=0.42,
                ),
                proto.SlotCacheChanged(
                    model="demo",
                    host="gpu-a",
                    instance_id="demo-3",
                    stage="restored",
                    slots=2,
                    tokens=2048,
                    bytes=48 << 20,
                    seconds=0.18,
                ),
                proto.SlotCacheChanged(
                    model="other",
                    host="gpu-b",
                    instance_id="other-1",
                    stage="failed",
                    reason="slot save: 501 (server started without --slot-save-path)",
                ),
                proto.ReplicaChanged(
                    model="demo",
                    stage="removed",
                    instance_id="demo-2",
                    replicas=2,
                    reason="idle 60 s above replicas.min 1",
                ),
            ):
                await bus.emit(ev)
            log = page.locator("#events")
            await expect(log.locator('[data-kind="replica.added"]')).to_contain_text(
                "started demo-3, 3 replicas live: waited 2.4 s with every instance busy"
            )
            await expect(log.locator('[data-kind="slots.saved"]')).to_contain_text(
                "saved 2 slots of demo-0: 2,048 tokens, 48.0 MiB in 420 ms"
            )
            await expect(log.locator('[data-kind="slots.restored"]')).to_contain_text(
                "restored 2 slots of demo-3: 2,048 tokens, 48.0 MiB in 180 ms"
            )
            await expect(log.locator('[data-kind="slots.restored"]')).to_contain_text(
                "demo @ gpu-a"
            )
            await expect(log.locator('[data-kind="slots.failed"] .kind-bad')).to_be_visible()
            await expect(log.locator('[data-kind="slots.failed"]')).to_contain_text(
                "other-1: slot save: 501"
            )
            await expect(log.locator('[data-kind="replica.removed"]')).to_contain_text(
                "stopped demo-2, 2 replicas live: idle 60 s above replicas.min 1"
            )
            rows = page.locator("#events tr:not([hidden])")
            await expect(rows).to_have_count(5)
            await page.select_option("#f-type", "slots.restored")
            await expect(rows).to_have_count(1)
            await page.select_option("#f-type", "")
            await page.select_option("#f-model", "other")
            await expect(rows).to_have_count(1)
            await page.select_option("#f-model", "")
            await page.fill("#filter", "replicas live")
            await expect(rows).to_have_count(2)
            await page.fill("#filter", "")

            # The removed replica ends: the count follows the instance records.
            ended = instance("demo-2", proto.InstanceState.STOPPED, host="gpu-b")
            await bus.put(bus.instances, proto.instance_key("gpu-b", "demo-2"), ended)
            await expect(count).to_contain_text("2/3")
            await expect(row.locator('[data-replica="demo-2"]')).to_have_count(0)
            assert errors == []
        finally:
            await browser.close()


def changed(
    iid: str, model: str, state: proto.InstanceState, revision: int, **kw: object
) -> proto.InstanceChanged:
    """An instance record's write as the event log carries it: the whole record."""
    t = time.time()
    rec = proto.InstanceRecord(
        instance_id=iid, model=model, state=state, created=t - 30, updated=t, **kw
    )
    return proto.InstanceChanged(
        instance_id=iid,
        model=model,
        state=state,
        host=rec.host,
        reason=rec.reason,
        record=rec,
        revision=revision,
    )


def test_view_files_events_by_the_models_they_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model's timeline holds its own events and those that evict or swap it out; it says
    when older ones were dropped."""
    from services.ui import view as view_mod

    view = View(["demo", "big"])
    placed = proto.PlacementDecided(
        model="big", instance_id="big-1", host="h", gpus=[0], memory_mib=1, reason="r"
    )
    evicting = proto.PlacementDecided(
        model="big",
        instance_id="big-2",
        host="h",
        gpus=[0],
        memory_mib=1,
        reason="r",
        evicted=["demo-1"],
    )
    swap = proto.SwapChanged(model="big", stage="draining", yielding_models=["demo"])
    for seq, ev in enumerate(
        [changed("demo-1", "demo", proto.InstanceState.READY, 1), placed, evicting, swap], 1
    ):
        view.apply_event(seq, msgspec.to_builtins(ev))
    demo = view.timeline("demo")
    assert [e["kind"] for e in demo["events"]] == ["instance", "placement.decided", "swap"]
    assert demo["events"][1]["instance_id"] == "big-2" and demo["complete"]
    assert [e.get("instance_id") for e in view.timeline("big")["events"]] == [
        "big-1",
        "big-2",
        None,
    ]
    monkeypatch.setattr(view_mod, "MODEL_EVENTS", 2)
    small = View(["demo"])
    for seq in range(1, 4):
        small.apply_event(seq, msgspec.to_builtins(proto.Demand(model="demo", gateway_id="g")))
    assert len(small.timeline("demo")["events"]) == 2
    assert not small.timeline("demo")["complete"]


@pytest.mark.browser
async def test_model_timeline_explains_an_eviction(bus: Bus, start_ui) -> None:
    """Clicking a model opens its story: who asked, where it was placed and what was free,
    why it yielded and was evicted (told on both models' timelines), what failed; live."""
    require("Chromium", HAVE_CHROMIUM, "apt-get install chromium")
    from playwright.async_api import async_playwright, expect

    ready, draining = proto.InstanceState.READY, proto.InstanceState.DRAINING
    evicted = "evicted to make room for big (drained first)"
    big_fit = (
        "best fit on gpu-a GPU 0: 2.0 GiB free, model needs 20.0 GiB; once demo yield "
        "(drain, then stop), which frees 4.0 GiB"
    )
    demo_fit = "best fit on gpu-a GPU 0: 20.0 GiB free, model needs 4.0 GiB"
    at = {"host": "gpu-a", "gpus": [0]}
    t0 = time.time()
    history = [  # the recent past the UI replays on start, in the placer's order
        proto.Demand(model="demo", gateway_id="gw1", waiting=2),
        changed(
            "demo-1",
            "demo",
            proto.InstanceState.PENDING,
            1,
            memory_mib=4096,
            placement=demo_fit,
            **at,
        ),
        proto.PlacementDecided(
            model="demo", instance_id="demo-1", memory_mib=4096, reason=demo_fit, **at
        ),
        changed(
            "demo-1", "demo", ready, 2, endpoint="http://h:1", ready_at=t0, memory_mib=4096, **at
        ),
        proto.SwapChanged(
            model="big",
            stage="draining",
            yielding=["demo-1"],
            yielding_models=["demo"],
            reason="no GPU has 20.0 GiB free",
        ),
        changed("demo-1", "demo", draining, 3, drain_for="big", reason="yielding to big", **at),
        proto.SwapChanged(
            model="big", stage="done", yielding=["demo-1"], yielding_models=["demo"], drain_s=1.5
        ),
        proto.PlacementDecided(
            model="big",
            instance_id="big-1",
            memory_mib=20480,
            reason=big_fit,
            evicted=["demo-1"],
            **at,
        ),
        changed("demo-1", "demo", proto.InstanceState.STOPPING, 4, reason=evicted, **at),
        changed("demo-1", "demo", proto.InstanceState.STOPPED, 5, reason=evicted, **at),
        changed("x-1", "x", ready, 1, **at),  # another model's: in no timeline here
        proto.PlacementFailed(model="demo", reason="no GPU has 4.0 GiB free", retry_after_s=5),
    ]
    for ev in history:
        await bus.emit(ev)
    asked = proto.DesiredModel(model="big", wanted="run", since=t0 - 5, by="cli", seen_by="p1")
    await bus.put(bus.desired, "big", asked)

    models = {m: {"url": f"file:///models/{m}.gguf"} for m in ("demo", "big")}
    base = await start_ui(models)
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
            panel = page.locator("#timeline")
            await expect(panel).to_be_hidden()

            # The victim's side, from the models table.
            await page.locator('#instances [data-timeline="demo"]').click()
            await expect(panel).to_be_visible()
            await expect(page.locator("#tl-model")).to_have_text("demo")
            await expect(page.locator("#tl-reach")).to_contain_text("all the event stream")
            inst = page.locator('[data-timeline-group="demo-1"] .tl-row .text')
            await expect(inst).to_have_text(
                [
                    "pending on gpu-a · GPU 0 · 4.0 GiB",  # why: on the next line
                    f"placed on gpu-a · GPU 0 · 4.0 GiB because {demo_fit}",
                    re.compile(r"^ready at http://h:1, \d"),
                    "yields to big: no GPU has 20.0 GiB free",
                    "draining: yields its memory to big (yielding to big)",
                    "yielded to big after 1.50 s",
                    f"evicted to make room for big (big-1 placed on gpu-a · GPU 0 · 20 GiB "
                    f"because {big_fit})",
                    f"stopping: {evicted}",
                    f"stopped: {evicted}",
                ]
            )
            whole = page.locator('[data-timeline-group=""] .tl-row .text')
            await expect(whole).to_have_text(
                [
                    "2 requests waiting at gateway gw1",
                    "not placed: no GPU has 4.0 GiB free (retry in 5 s)",
                ]
            )
            assert await panel.locator('[data-timeline-group="x-1"]').count() == 0
            await page.screenshot(path="/tmp/timeline.png")  # to look at

            # The other side, from the replicas table: who asked, the swap, the eviction.
            await page.locator('#replicas [data-timeline="big"]').click()
            await expect(page.locator("#tl-model")).to_have_text("big")
            await expect(page.locator("#tl-asked")).to_contain_text("asked to run by cli")
            await expect(page.locator('[data-timeline-group=""] .tl-row .text')).to_have_text(
                [
                    "waits for demo to yield (drain, then stop): no GPU has 20.0 GiB free",
                    "demo yielded after 1.50 s",
                ]
            )
            big = page.locator('[data-timeline-group="big-1"] .tl-row .text')
            await expect(big).to_have_text(
                [f"placed on gpu-a · GPU 0 · 20 GiB because {big_fit}; evicts demo-1"]
            )

            # Live: its own events join, another model's do not.
            await bus.emit(changed("demo-2", "demo", ready, 1, endpoint="http://h:2", **at))
            await bus.emit(changed("big-1", "big", ready, 1, endpoint="http://h:3", **at))
            await expect(big).to_have_count(2)
            await expect(big.nth(1)).to_contain_text("ready at http://h:3")
            await expect(panel.locator('[data-timeline-group="demo-2"]')).to_have_count(0)

            # The rows themselves, from plain values.
            rows = await page.evaluate(
                """() => timelineRows([
                  {kind: "instance", name: "instance.lost", model: "m", instance_id: "m-1",
                   state: "lost", ts: 3, record: {state: "lost", reason: "host h silent 12 s"}},
                  {kind: "stop.requested", model: "m", requested_by: "cli", ts: 2},
                  {kind: "replica", model: "m", stage: "added", instance_id: "m-1",
                   replicas: 2, reason: "waited 2.1 s with every instance busy", ts: 1},
                  {kind: "placement.decided", model: "n", instance_id: "n-1", host: "h",
                   gpus: [], memory_mib: 0, reason: "r", evicted: ["m-9"], ts: 4},
                  {kind: "download.progress", model: "m", ts: 5},
                  {kind: "instance", model: "m", instance_id: "m-2", state: "pending", ts: 6,
                   record: {state: "pending", host: "h", gpus: [1], memory_mib: 512,
                            placement: "most free memory on h GPU 1: 9.0 GiB free"}},
                ], "m", ["m-9"]).map((r) => [r.group, r.text, r.tone])"""
            )
            assert rows == [
                [
                    "m-1",
                    "replica added (2 live) because waited 2.1 s with every instance busy",
                    "place",
                ],
                ["", "stop requested by cli", ""],
                ["m-1", "lost: host h silent 12 s", "bad"],
                ["m-9", "evicted to make room for n (n-1 placed on h · CPU because r)", "bad"],
                # no placement event here: the record's own placement says why
                [
                    "m-2",
                    "pending on h · GPU 1 · 512 MiB: most free memory on h GPU 1: 9.0 GiB free",
                    "",
                ],
            ]
            await page.locator("#tl-close").click()
            await expect(panel).to_be_hidden()
            assert errors == []
        finally:
            await browser.close()


@pytest.mark.browser
async def test_timeline_reads_older_events_on_demand(
    bus: Bus, start_ui, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond what the UI replayed on start, the timeline reads the stream back, a window
    at a time, until its start."""
    require("Chromium", HAVE_CHROMIUM, "apt-get install chromium")
    from playwright.async_api import async_playwright, expect

    from services.ui import feed, older

    monkeypatch.setattr(feed, "REPLAY_MSGS", 3)
    monkeypatch.setattr(older, "SCAN_MSGS", 2)
    for ev in (  # stream sequences 1..7
        proto.Demand(model="demo", gateway_id="g", waiting=1),
        proto.StopRequested(model="demo", requested_by="cli"),
        proto.HostJoined(host_id="h1", gpus=1, runtime="process"),
        proto.Demand(model="demo", gateway_id="g", waiting=2),
        proto.HostJoined(host_id="h2", gpus=1, runtime="process"),
        proto.HostJoined(host_id="h3", gpus=1, runtime="process"),
        proto.Demand(model="demo", gateway_id="g", waiting=3),
    ):
        await bus.emit(ev)
    base = await start_ui()  # replays 5..7
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(extra_http_headers=GATEWAY)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(base + "/dashboard")
            await page.locator('#instances [data-timeline="demo"]').click()
            lines = page.locator('[data-timeline-group=""] .tl-row .text')
            await expect(lines).to_have_text(["3 requests waiting at gateway g"])
            older_button = page.locator("#tl-older")
            await older_button.click()  # reads 3..4
            await expect(lines).to_have_count(2)
            await expect(older_button).to_be_visible()
            await older_button.click()  # reads 1..2: the stream's start
            await expect(lines).to_have_text(
                [
                    "1 request waiting at gateway g",
                    "stop requested by cli",
                    "2 requests waiting at gateway g",
                    "3 requests waiting at gateway g",
                ]
            )
            await expect(older_button).to_have_count(0)
            await expect(page.locator("#tl-reach")).to_contain_text("all the event stream")
            assert errors == []
        finally:
            await browser.close()


async def live_and_end(bus: Bus, n: int, model: str = "demo") -> None:
    """One instance's life as placer and agent write it (each record to KV, then its event):
    placed, pending, ready, stopping, ended: stopped; every 7th failed, every 11th lost."""
    iid = f"{model}-{n}"
    where: dict = {"host": "gpu-a" if n % 2 else "gpu-b", "gpus": [0], "memory_mib": 2048}
    end, why = proto.InstanceState.STOPPED, f"idle 300 s (instance {n})"
    if n % 7 == 0:
        end, why = proto.InstanceState.FAILED, "llama-server exited with status 1"
    elif n % 11 == 0:
        end, why = proto.InstanceState.LOST, f"host {where['host']} silent 12 s"
    await bus.emit(proto.PlacementDecided(model=model, instance_id=iid, reason="binpack", **where))
    life = [
        (proto.InstanceState.PENDING, ""),
        (proto.InstanceState.READY, ""),
        (proto.InstanceState.STOPPING, why),
        (end, why),
    ]
    for revision, (state, reason) in enumerate(life, 1):
        ev = changed(iid, model, state, revision, reason=reason, **where)
        assert ev.record is not None
        await bus.put(bus.instances, proto.instance_key(where["host"], iid), ev.record)
        await bus.emit(ev)


async def page_height(page) -> int:  # type: ignore[no-untyped-def]
    return await page.evaluate("document.documentElement.scrollHeight")


async def log_seqs(page) -> list[int]:  # type: ignore[no-untyped-def]
    return await page.locator("#events tr").evaluate_all("rs => rs.map(r => +r.dataset.seq)")


VIEWPORT = {"width": 1400, "height": 900}
LOG_ROWS = 300  # dashboard.html: the event rows the page keeps
HISTORY_SHOWN = 50  # dashboard.html: the ended instances in "recent history"


@pytest.mark.browser
async def test_history_never_makes_the_page_taller(
    bus: Bus, start_ui, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After 100 instances came and went and 500 events, the page is exactly as tall as with
    a screenful of history (55 instances, 135 events: every bounded panel full), paged back
    or not. And at most two screens at 1400x900: the live part of this cluster (the docs'
    screenshot's: 2 hosts, 3 GPUs, 1 model) is about 1,150 px, the bounded history panels
    (log 340 px, recent history 170 px, their headings and bars) about 600 px more; a page
    that grew with history was 16,772 px. Live instances come before the recent history; the
    log keeps at most LOG_ROWS rows and pages back to the stream's start through the UI
    service (GET log), then returns to the newest."""
    require("Chromium", HAVE_CHROMIUM, "apt-get install chromium")
    from playwright.async_api import async_playwright, expect

    from services.ui import feed

    monkeypatch.setattr(feed, "REPLAY_MSGS", 60)  # most of the past only the stream holds
    monkeypatch.setattr(history, "SAMPLE_S", 0.25)  # the charts are drawn before measuring
    await bus.put(bus.hosts, "gpu-a", host("gpu-a"))
    await bus.put(bus.hosts, "gpu-b", host("gpu-b", gpus=1))
    for i in range(3):  # gone for an hour: their records stay in KV
        gone = msgspec.structs.replace(host(f"old-{i}"), ts=time.time() - 3600)
        await bus.put(bus.hosts, f"old-{i}", gone)
    await bus.emit(proto.HostJoined(host_id="gpu-a", gpus=2, runtime="process"))  # seq 1
    await bus.emit(proto.HostJoined(host_id="gpu-b", gpus=1, runtime="process"))
    live = {
        "demo-live-1": instance("demo-live-1", proto.InstanceState.READY, host="gpu-a", gpus=[1]),
        "demo-live-2": instance("demo-live-2", proto.InstanceState.STARTING, host="gpu-b"),
    }
    for iid, rec in live.items():
        await bus.put(bus.instances, proto.instance_key(rec.host or "", iid), rec)
    for n in range(40):  # before the UI started: in KV, and in the stream only
        await live_and_end(bus, n)

    base = await start_ui()  # one model, "demo", as in docs/dashboard.png
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport=VIEWPORT, extra_http_headers=GATEWAY)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(base + "/dashboard")
            await expect(page.locator("#conn")).to_have_text("live", timeout=5000)
            await expect(page.locator('[data-chart="gpu:gpu-b/0"]')).to_be_visible()
            # Hosts long gone: one line of names, not cards, and not charted.
            await expect(page.locator("[data-gone-host]")).to_have_count(3)
            assert await page.locator('#hosts [data-host^="old-"]').count() == 0
            assert await page.locator('[data-chart^="gpu:old-"]').count() == 0

            # A screenful of history: 55 ended instances, 135 events on the page.
            for n in range(40, 55):
                await live_and_end(bus, n)
            sub = page.locator("#history-sub")
            await expect(sub).to_contain_text(f"the {HISTORY_SHOWN} newest of 55")
            await expect(page.locator("#events tr")).to_have_count(60 + 15 * 5, timeout=10_000)
            await page.wait_for_timeout(300)  # a render pass after the last delta
            screenful = await page_height(page)

            # Three times as much.
            for n in range(55, 100):
                await live_and_end(bus, n)
            last = (await bus.js.stream_info(proto.EVENTS_STREAM)).state.last_seq
            assert last == 2 + 100 * 5
            await expect(sub).to_contain_text(f"the {HISTORY_SHOWN} newest of 100")
            await expect(page.locator("#events tr").first).to_have_attribute(
                "data-seq", str(last), timeout=10_000
            )
            await page.wait_for_timeout(300)
            height = await page_height(page)
            await page.screenshot(path="/tmp/dashboard-history.png", full_page=True)  # to look at
            assert height == screenful, (screenful, height)
            assert height <= 2 * VIEWPORT["height"], height

            # Live instances first, then the history, newest first, scrolling in its box.
            shown_live = await page.locator("#instances [data-instance]").evaluate_all(
                "rs => rs.map(r => r.dataset.instance)"
            )
            assert sorted(shown_live) == sorted(live)
            ended = page.locator("#ended [data-instance]")
            await expect(ended).to_have_count(HISTORY_SHOWN)
            states = await ended.locator(".state").all_text_contents()
            assert set(states) == {"stopped", "failed", "lost"}
            ends = await ended.evaluate_all("rs => rs.map(r => +r.dataset.ended)")
            assert ends == sorted(ends, reverse=True)
            assert await ended.first.get_attribute("data-instance") == "demo-99"
            box = page.locator("#history-box")
            for _ in range(40):  # (a live update re-renders the tables: no box that instant)
                last_live = await page.locator("#instances tr").last.bounding_box()
                history_box = await box.bounding_box()
                if last_live and history_box:
                    break
                await asyncio.sleep(0.05)
            assert last_live and history_box
            assert last_live["y"] + last_live["height"] <= history_box["y"]
            sizes = await box.evaluate("b => [b.clientHeight, b.scrollHeight]")
            assert sizes[0] <= 170 < sizes[1], sizes
            # A failed one's details open in the history too.
            await page.locator('#ended [data-instance="demo-98"]').click()
            await expect(page.locator('[data-detail="demo-98"] pre')).to_contain_text(
                "llama-server exited with status 1"
            )
            await page.locator('#ended [data-instance="demo-98"]').click()

            # The log: the newest LOG_ROWS events, in a panel that scrolls.
            log = page.locator("#log-box")
            sizes = await log.evaluate("b => [b.clientHeight, b.scrollHeight]")
            assert sizes[0] <= 340 < sizes[1], sizes
            assert await log_seqs(page) == list(range(last, last - LOG_ROWS, -1))

            # Older pages come from the stream; the page drops its newest rows to stay bounded.
            older_button = page.locator("#log-older")
            await older_button.click()  # GET log: the 200 events before the oldest shown
            newer = page.locator("#log-newer")
            await expect(newer).to_contain_text("200 newer events not shown")
            seqs = await log_seqs(page)
            assert seqs == list(range(last - 200, last - 200 - LOG_ROWS, -1))
            await older_button.click()  # the stream's start
            await expect(page.locator("#log-reach")).to_contain_text("all the event stream holds")
            await expect(older_button).to_be_hidden()
            assert await log_seqs(page) == list(range(LOG_ROWS, 0, -1))
            first = page.locator('#events tr[data-seq="1"]')
            await expect(first).to_contain_text("host.joined")
            await expect(first).to_contain_text("gpu-a")
            await expect(page.locator("#n-events")).to_contain_text("older events")
            assert await page_height(page) == screenful  # paged back: the same page

            # Paged back, live events wait; "back to the newest" shows them.
            await bus.emit(proto.HostJoined(host_id="gpu-c", gpus=1, runtime="process"))
            await expect(newer).to_contain_text(f"{last + 1 - LOG_ROWS} newer events")
            await page.locator("#log-newest").click()
            await expect(newer).to_be_hidden()
            top = page.locator("#events tr").first
            await expect(top).to_have_attribute("data-seq", str(last + 1))
            await expect(top).to_contain_text("gpu-c")
            assert len(await log_seqs(page)) == LOG_ROWS
            assert errors == []
        finally:
            await browser.close()


def test_snapshot_says_whether_the_log_reaches_the_streams_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The page offers older events only where the view's log lacks some: its ring dropped
    them, or the replay began after the stream's start."""
    from services.ui import view as view_mod

    monkeypatch.setattr(view_mod, "MAX_EVENTS", 3)
    view = View(["demo"])
    demand = msgspec.to_builtins(proto.Demand(model="demo", gateway_id="g"))
    for seq in range(1, 4):
        view.apply_event(seq, dict(demand))
    assert view.snapshot()["events_complete"]
    view.apply_event(4, dict(demand))
    snap = view.snapshot()
    assert not snap["events_complete"] and [e["seq"] for e in snap["events"]] == [2, 3, 4]
    replayed = View(["demo"])
    replayed.replay_from = 100
    assert not replayed.snapshot()["events_complete"]


async def test_log_pages_come_from_the_stream(
    bus: Bus, start_ui, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /dashboard/log?before=SEQ: the newest page of events before SEQ, oldest first,
    progress left out; `held_from` is where the next page ends; bad input names the key."""
    from services.ui import older

    monkeypatch.setattr(older, "LOG_PAGE", 3)
    for i in range(5):  # seq 1..10: a join, then a progress report, five times
        await bus.emit(proto.HostJoined(host_id=f"h{i}", gpus=1, runtime="process"))
        await bus.emit(proto.DownloadProgress(model="m", host=f"h{i}", bytes=i, total=9))
    base = await start_ui()
    async with httpx.AsyncClient(headers=GATEWAY) as http:
        page = (await http.get(base + "/dashboard/log?before=11")).json()
        assert [e["host_id"] for e in page["events"]] == ["h2", "h3", "h4"]
        assert [e["seq"] for e in page["events"]] == [5, 7, 9]
        assert not page["complete"] and page["held_from"] == 5
        page = (await http.get(base + "/dashboard/log?before=5")).json()
        assert [e["host_id"] for e in page["events"]] == ["h0", "h1"]
        assert page["complete"] and page["held_from"] == 0
        for query, code in (("", "invalid_before"), ("?before=x", "invalid_before")):
            r = await http.get(base + "/dashboard/log" + query)
            assert r.status_code == 400 and r.json()["error"]["code"] == code
            assert "before" in r.json()["error"]["message"]
