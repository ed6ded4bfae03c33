"""Placement and lifecycle across several hosts on real NATS and real llama-server: each
agent has its own host id, simulated GPUs and store, like separate machines."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import pytest

import proto
from lls.bus import kv_snapshot
from stack import Cluster, llama_server_pids


async def instances(bus) -> list[proto.InstanceRecord]:
    return list((await kv_snapshot(bus, bus.instances, proto.InstanceRecord)).values())


async def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await predicate()
        if result:
            return result
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def hosts_joined(bus, n: int) -> None:
    async def joined():
        return len(await kv_snapshot(bus, bus.hosts, proto.HostRecord)) >= n

    await wait_for(joined, what=f"{n} hosts")


async def ask(base: str, model: str, max_tokens: int = 2) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as c:
        return await c.post(
            f"{base}/v1/completions", json={"model": model, "prompt": "a", "max_tokens": max_tokens}
        )


@pytest.fixture
def cluster(tmp_path, nats_url, llama_server_bin):
    clusters: list[Cluster] = []

    def make(models: dict, **top) -> Cluster:
        c = Cluster(tmp_path, nats_url, models, **top)
        clusters.append(c)
        return c

    yield make
    for c in clusters:
        c.stop()
    assert llama_server_pids(str(tmp_path)) == [], "llama-server left running"


def gguf_models(tiny_gguf, names: list[str], memory_mib: int, **extra) -> dict:
    return {
        n: {
            "url": f"file://{tiny_gguf(10 + i)}",
            "ctx_size": 256,
            "memory_mib": memory_mib,
            **extra,
        }
        for i, n in enumerate(names)
    }


async def start_services(c: Cluster, bus, hosts: dict[str, list[dict]]) -> None:
    """An agent per host with its simulated GPUs, one placer and one gateway, all up."""
    for host_id, gpus in hosts.items():
        c.agent(host_id, gpus)
    c.spawn("placer")
    c.spawn("gateway")
    c.wait_gateway()
    await hosts_joined(bus, len(hosts))


async def serve_on_big_or_small(c: Cluster, bus, small_gpu_mib: int) -> proto.InstanceRecord:
    """Hosts "big" (one 8000 MiB GPU) and "small" (2000 and `small_gpu_mib` MiB) serve one
    request for model "m"; the instance that answered."""
    small = [{"name": "sim-2g", "memory_mib": 2000}, {"name": "sim", "memory_mib": small_gpu_mib}]
    await start_services(c, bus, {"big": [{"name": "sim-8g", "memory_mib": 8000}], "small": small})
    r = await ask(c.base, "m")
    assert r.status_code == 200, r.text
    [rec] = [i for i in await instances(bus) if i.state == proto.InstanceState.READY]
    return rec


async def test_best_fit_places_on_the_tightest_gpu_that_fits(cluster, bus, tiny_gguf):
    rec = await serve_on_big_or_small(cluster(gguf_models(tiny_gguf, ["m"], 1500)), bus, 1000)
    assert (rec.host, rec.gpus) == ("small", [0]), rec.placement
    assert "small" in rec.placement  # every decision says why


async def test_model_never_downloaded_is_placed_by_the_header_read_from_its_source(
    cluster, bus, tiny_gguf
):
    from services.downloader.devserver import FileServer

    # No memory_mib and no host holds the file: the header, read over HTTP before any
    # download, says 663 MiB, so best fit takes the 700 MiB GPU rather than downloading to
    # the host with the most free memory.
    with FileServer({"/m.gguf": tiny_gguf(30).read_bytes()}) as files:
        c = cluster({"m": {"url": files.url("m.gguf"), "ctx_size": 256}})
        rec = await serve_on_big_or_small(c, bus, 700)
    assert (rec.host, rec.gpus, rec.memory_mib) == ("small", [1], 663), rec.placement
    assert "model needs 0.6 GiB" in rec.placement
    assert not list((c.tmp / "store-big").glob("m*.gguf"))  # nothing went to the big host
    info = proto.decode((await bus.models.get("m")).value, proto.ModelInfo)
    assert info.gguf is not None and info.gguf.n_layers == 2


async def test_lru_idle_instance_is_evicted_and_a_busy_one_never(cluster, bus, tiny_gguf):
    # --context-shift lets one request on the tiny model generate for as long as we hold it.
    c = cluster(
        gguf_models(tiny_gguf, ["a", "b", "c"], 600, args=["--context-shift"]),
        placer={"host_lost_after": 3, "failure_backoff": 5, "min_turn": 0.5, "drain_timeout": 3},
    )
    await start_services(c, bus, {"h1": [{"name": "sim-1g", "memory_mib": 1000}]})

    assert (await ask(c.base, "a")).status_code == 200
    # b does not fit beside a: a is idle, so it is evicted and b starts.
    assert (await ask(c.base, "b")).status_code == 200
    states = {i.model: i.state for i in await instances(bus) if i.state in proto.LIVE_STATES}
    assert states == {"b": proto.InstanceState.READY}
    evicted = [i for i in await instances(bus) if i.model == "a"]
    assert evicted and "evicted" in evicted[0].reason

    # Keep b busy with a long stream; c must not cut it off: b yields (drains), its stream
    # outlasts placer.drain_timeout, so the swap is abandoned and c is refused with why.
    body = {"model": "b", "prompt": "a", "max_tokens": 100000, "ignore_eos": True, "stream": True}
    started = threading.Event()
    stop_stream = threading.Event()

    def hold() -> None:
        with httpx.stream("POST", f"{c.base}/v1/completions", json=body, timeout=60) as r:
            for _ in r.iter_raw():
                started.set()
                if stop_stream.is_set():
                    return

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert started.wait(20)
        await asyncio.sleep(1.5)  # the gateway reports in-flight requests every second
        r = await ask(c.base, "c")
        assert r.status_code == 503, r.text
        assert "drain_timeout" in r.json()["error"]["message"], r.text
        live = {i.model: i.state for i in await instances(bus) if i.state in proto.LIVE_STATES}
        assert live == {"b": proto.InstanceState.READY}  # serving again
        assert not stop_stream.is_set() and t.is_alive()  # the stream was never cut
    finally:
        stop_stream.set()
        t.join(30)


async def test_request_storm_over_more_models_than_fit_answers_every_request(
    cluster, bus, tiny_gguf
):
    names = ["s1", "s2", "s3", "s4"]
    c = cluster(gguf_models(tiny_gguf, names, 900))
    await start_services(c, bus, {"h1": [{"name": "sim-2g", "memory_mib": 2000}]})  # two fit
    results = await asyncio.gather(*(ask(c.base, names[i % 4]) for i in range(24)))
    codes = [r.status_code for r in results]
    assert all(code in (200, 429, 503) for code in codes), codes  # answered, never hung
    assert codes.count(200) >= 2
    for r in results:
        if r.status_code != 200:
            assert r.json()["error"]["message"] and r.headers.get("retry-after")


async def test_killed_agent_is_lost_its_model_moves_and_its_orphans_are_stopped_on_return(
    cluster, bus, tiny_gguf, tmp_path
):
    c = cluster(gguf_models(tiny_gguf, ["m"], 500, host=None))
    a1 = c.agent("h1", [{"name": "sim", "memory_mib": 1000}])
    c.spawn("placer")
    c.spawn("gateway")
    c.wait_gateway()
    await hosts_joined(bus, 1)
    assert (await ask(c.base, "m")).status_code == 200
    c.agent("h2", [{"name": "sim", "memory_mib": 1000}])
    await hosts_joined(bus, 2)

    a1.send_signal(signal.SIGKILL)
    a1.wait()

    async def lost():
        return [i for i in await instances(bus) if i.host == "h1" and i.state == "lost"]

    await wait_for(lost, 15, "instance on h1 marked lost")
    r = await ask(c.base, "m")
    assert r.status_code == 200
    ready = [i for i in await instances(bus) if i.state == proto.InstanceState.READY]
    assert [i.host for i in ready] == ["h2"]

    # h1 comes back: its orphaned llama-server is no longer wanted, so it is stopped.
    orphans = llama_server_pids(str(tmp_path / "store-h1"))
    assert len(orphans) == 1
    c.agent("h1", [{"name": "sim", "memory_mib": 1000}])

    async def orphan_gone():
        return not llama_server_pids(str(tmp_path / "store-h1"))

    await wait_for(orphan_gone, 20, "orphan stopped by the returning agent")


async def test_standby_placer_takes_over_when_the_leader_dies(cluster, bus, tiny_gguf):
    c = cluster(gguf_models(tiny_gguf, ["m"], 500))
    c.agent("h1", [{"name": "sim", "memory_mib": 4000}])
    leader = c.spawn("placer", "placer-1")
    await asyncio.sleep(1.0)
    c.spawn("placer", "placer-2")
    c.spawn("gateway")
    c.wait_gateway()
    await hosts_joined(bus, 1)
    await asyncio.sleep(1.0)
    assert "holds the lease" in c.logs("placer-1")
    assert "holds the lease" not in c.logs("placer-2")

    leader.send_signal(signal.SIGKILL)
    leader.wait()
    t0 = time.monotonic()

    async def took_over():
        return "holds the lease" in c.logs("placer-2")

    await wait_for(took_over, 10, "standby takes the lease")
    assert time.monotonic() - t0 < 5.0
    results = await asyncio.gather(*(ask(c.base, "m") for _ in range(8)))
    assert [r.status_code for r in results] == [200] * 8
    live = [i for i in await instances(bus) if i.state in proto.LIVE_STATES]
    assert len(live) == 1, "no duplicated instance for the same demand"


async def test_idle_instance_is_stopped_after_its_idle_timeout(cluster, bus, tiny_gguf):
    models = gguf_models(tiny_gguf, ["quick", "never"], 300)
    models["quick"]["idle_timeout"] = 2
    models["never"]["idle_timeout"] = 0
    c = cluster(models, idle_timeout=300)
    await start_services(c, bus, {"h1": [{"name": "sim", "memory_mib": 4000}]})
    assert (await ask(c.base, "quick")).status_code == 200
    assert (await ask(c.base, "never")).status_code == 200

    async def quick_stopped():
        recs = await instances(bus)
        return [i for i in recs if i.model == "quick" and i.state == proto.InstanceState.STOPPED]

    [rec] = await wait_for(quick_stopped, 15, "idle instance stopped")
    assert "idle" in rec.reason
    live = {i.model for i in await instances(bus) if i.state in proto.LIVE_STATES}
    assert live == {"never"}  # idle_timeout 0 = never stopped


async def test_streaming_request_for_a_cold_model_gets_its_head_at_once(cluster, bus, tiny_gguf):
    c = cluster(gguf_models(tiny_gguf, ["cold"], 300))
    c.spawn("placer")
    c.spawn("gateway")
    c.wait_gateway()
    body = {"model": "cold", "prompt": "a", "max_tokens": 4, "stream": True}
    async with httpx.AsyncClient(timeout=60) as client:
        t0 = time.monotonic()
        async with client.stream("POST", f"{c.base}/v1/completions", json=body) as r:
            head_after = time.monotonic() - t0
            assert r.status_code == 200 and "text/event-stream" in r.headers["content-type"]
            await asyncio.sleep(6)  # no agent yet: the model cannot start
            c.agent("h1", [{"name": "sim", "memory_mib": 4000}])
            text = "".join([chunk async for chunk in r.aiter_text()])
    assert head_after < 2.0, "the response head is not held back by the cold start"
    assert ": waiting for cold: position 1 of 1" in text  # keep-alive comments while waiting
    assert "data: [DONE]" in text


async def test_placer_killed_mid_download_is_replaced_and_the_request_still_served(
    cluster, bus, tiny_gguf
):
    from services.downloader.devserver import Behaviour, FileServer

    slow = Behaviour(ranges=False, rate_bps=150_000)  # ~3 s for the tiny model
    with FileServer({"/m.gguf": tiny_gguf(20).read_bytes()}, slow) as files:
        c = cluster({"m": {"url": files.url("m.gguf"), "ctx_size": 256, "memory_mib": 300}})
        c.agent("h1", [{"name": "sim", "memory_mib": 4000}])
        first = c.spawn("placer", "placer-1")
        c.spawn("gateway")
        c.wait_gateway()
        await hosts_joined(bus, 1)
        request = asyncio.create_task(ask(c.base, "m"))

        async def downloading():
            return [i for i in await instances(bus) if i.state == "downloading"]

        await wait_for(downloading, 10, "download under way")
        first.send_signal(signal.SIGKILL)
        first.wait()
        c.spawn("placer", "placer-2")  # rebuilds its view from KV and carries on
        r = await asyncio.wait_for(request, 40)
        assert r.status_code == 200, r.text
    live = [i for i in await instances(bus) if i.state in proto.LIVE_STATES]
    assert len(live) == 1 and live[0].state == proto.InstanceState.READY


async def test_two_gateway_replicas_share_instances_and_activity(cluster, bus, tiny_gguf):
    from conftest import free_port

    c = cluster(gguf_models(tiny_gguf, ["m"], 300, idle_timeout=3))
    c.agent("h1", [{"name": "sim", "memory_mib": 4000}])
    c.spawn("placer")
    other = free_port()
    c.spawn("gateway", "gateway-1")
    c.spawn("gateway", "gateway-2", port=other)
    c.wait_gateway()
    await hosts_joined(bus, 1)
    second = f"http://127.0.0.1:{other}"
    results = await asyncio.gather(*(ask(b, "m") for b in [c.base, second] * 4))
    assert [r.status_code for r in results] == [200] * 8
    live = [i for i in await instances(bus) if i.state in proto.LIVE_STATES]
    assert len(live) == 1, "both replicas route to the one instance"

    # Use goes through replica 2 only; the placer merges both reports, so the model stays
    # up while it is used and stops once idle everywhere.
    for _ in range(4):
        assert (await ask(second, "m")).status_code == 200
        await asyncio.sleep(1.0)
    assert [i for i in await instances(bus) if i.state == proto.InstanceState.READY]

    async def stopped():
        return [i for i in await instances(bus) if i.state == proto.InstanceState.STOPPED]

    await wait_for(stopped, 15, "idle stop after use ends")


async def test_a_host_whose_clock_is_off_is_not_lost(cluster, bus, tiny_gguf):
    """Liveness is judged by when the placer received a heartbeat, not by the host's clock."""
    c = cluster(gguf_models(tiny_gguf, ["m"], 300))
    c.spawn("placer")
    lost: list[bytes] = []

    async def on_lost(msg) -> None:  # noqa: ANN001
        lost.append(msg.data)

    sub = await bus.nc.subscribe(proto.evt("host.lost"), cb=on_lost)

    async def heartbeat(ts_offset: float) -> None:
        rec = proto.HostRecord(
            host_id="skewed",
            ts=time.time() + ts_offset,
            started_at=time.time(),
            runtime="process",
            gpus=[],
            cpu_count=2,
            ram_total_mib=8000,
            ram_free_mib=8000,
        )
        await bus.put(bus.hosts, "skewed", rec)

    for _ in range(12):  # 6 s of heartbeats from a host whose clock is 30 s behind
        await heartbeat(-30)
        await asyncio.sleep(0.5)
    assert lost == []  # host_lost_after is 3 s here: by its own clock it was long gone
    await asyncio.sleep(4.5)  # now it really is silent
    assert len(lost) == 1 and b"skewed" in lost[0]
    await sub.unsubscribe()


async def test_nats_frozen_then_back_marks_no_host_lost(cluster, bus, tiny_gguf, nats_server):
    """A placer that heard nothing because the bus itself stopped must not conclude the
    hosts are gone; warm models serve again once it is back."""
    c = cluster(gguf_models(tiny_gguf, ["m", "cold"], 300))
    await start_services(c, bus, {"h1": [{"name": "sim", "memory_mib": 4000}]})
    assert (await ask(c.base, "m")).status_code == 200
    nats_server.proc.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(2.5)
        assert (await ask(c.base, "m")).status_code == 200  # warm: served from the view
        t0 = time.monotonic()
        cold = await ask(c.base, "cold")  # cold: needs the bus, refused fast and clearly
        assert cold.status_code == 503 and "bus" in cold.json()["error"]["message"].lower()
        assert time.monotonic() - t0 < 8 and cold.headers.get("retry-after")
        await asyncio.sleep(max(0.0, 8 - (time.monotonic() - t0)))  # over 2x host_lost_after
    finally:
        nats_server.proc.send_signal(signal.SIGCONT)
    await asyncio.sleep(5)  # the placer's first passes after the bus came back
    recs = await instances(bus)
    assert [i.state for i in recs if i.model == "m"] == [proto.InstanceState.READY], recs
    assert (await ask(c.base, "m")).status_code == 200
    assert "host h1 lost" not in c.logs("placer")
    # And what needs the bus works again: the gateway's demand, the placer's and agent's
    # watches and commands (a frozen bus once left the gateway's requests all timing out).
    t0 = time.monotonic()
    r = await ask(c.base, "cold")
    assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < 15
