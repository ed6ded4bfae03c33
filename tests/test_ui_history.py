"""The dashboard's chart history and the gateway's serving counters: pure code, no bus."""

from __future__ import annotations

import msgspec
import pytest

import proto
from services.gateway.stats import ServingStats, bucket_of
from services.ui import history
from services.ui.history import History, diff_serving, gpu_memory, quantile

B = proto.SERVING_BUCKETS_S
N = len(B) + 1


def hist(**at: int) -> list[int]:
    """A histogram with counts at bucket indexes given as b<i>=n."""
    out = [0] * N
    for k, n in at.items():
        out[int(k[1:])] = n
    return out


def test_quantile_interpolates_like_prometheus() -> None:
    assert quantile([0] * N, 0.5) is None
    # 10 requests all in (0.05, 0.1]: the median is halfway through that bucket.
    assert quantile(hist(b1=10), 0.5) == pytest.approx(0.075)
    # 99 fast, 1 slow: p50 in the first bucket, p99 at its top, p100 in the slow one.
    counts = hist(b0=99, b5=1)
    assert quantile(counts, 0.5) == pytest.approx(0.05 * 50 / 99)
    assert quantile(counts, 0.99) == pytest.approx(0.05)
    assert B[4] < quantile(counts, 1.0) <= B[5]  # type: ignore[operator]
    # Slower than every bound: reported as the last bound, never invented.
    assert quantile(hist(b12=3), 0.5) == B[-1]


def test_gateway_counts_in_proto_buckets() -> None:
    assert bucket_of(0.0) == 0 and bucket_of(B[0]) == 0 and bucket_of(B[0] + 1e-9) == 1
    assert bucket_of(1e9) == len(B)
    stats = ServingStats()
    stats.done("m", 200, 0.07)
    stats.done("m", 503, 400.0)
    stats.first_token("m", 0.02)
    report = stats.report()["m"]
    assert (report.requests, report.errors) == (2, 1)
    assert report.latency == hist(b1=1, b12=1) and report.ttft == hist(b0=1)
    stats.done("m", 200, 0.07)
    assert report.requests == 2  # a copy: the report being sent does not move


def test_older_reports_still_decode() -> None:
    old = b'{"gateway_id":"g","ts":1.0,"queues":{"m":{"waiting":2,"since":0.5}}}'
    rep = proto.decode(old, proto.ActivityReport)
    assert rep.serving == {} and rep.serving_since == 0.0
    new = proto.ActivityReport(
        gateway_id="g", ts=1.0, serving={"m": proto.ModelServing(1, 0, hist(b0=1), [])}
    )
    assert proto.decode(proto.encode(new), proto.ActivityReport) == new


def test_diff_serving_handles_restarts() -> None:
    a = {"requests": 5, "errors": 1, "latency": hist(b0=5), "ttft": hist(b0=2)}
    b = {"requests": 8, "errors": 1, "latency": hist(b0=6, b3=2), "ttft": hist(b0=3)}
    d = diff_serving(a, b)
    assert (d.requests, d.errors, d.latency, d.ttft) == (3, 0, hist(b0=1, b3=2), hist(b0=1))
    # Counters went down: the gateway restarted, and all it counted since is new.
    d = diff_serving(b, {"requests": 2, "latency": hist(b1=2)})
    assert (d.requests, d.latency) == (2, hist(b1=2))
    assert diff_serving(None, b).requests == 8


def report(ts: float, since: float = 100.0, **serving: dict) -> dict:
    return {"gateway_id": "g", "ts": ts, "serving_since": since, "serving": serving}


def test_rates_and_quantiles_across_gateways() -> None:
    h = History(["idle"], every_s=5)
    s0 = {"requests": 10, "latency": hist(b0=10), "ttft": hist(b0=10)}
    first = h.sample(1000, {}, {}, {"g1": report(1000, m=s0)})
    # Counted before we looked: a baseline, not a burst of traffic in the first interval.
    assert first["models"]["m"][1] is None and first["models"]["idle"][2] is None

    s1 = {"requests": 30, "latency": hist(b0=10, b4=20), "ttft": hist(b0=30)}
    g2 = report(1004, since=50.0, m={"requests": 4, "latency": hist(b4=4)})
    g2["queues"] = {"m": {"waiting": 3, "since": 1000}}
    h.sample(1005, {}, {}, {"g1": report(1005, m=s1), "g2": g2})  # g2 seen first: baseline
    g2["serving"]["m"] = {"requests": 14, "latency": hist(b4=14)}
    g2["ts"] = 1009
    point = h.sample(1010, {}, {}, {"g1": report(1010, m=s1), "g2": g2})["models"]["m"]
    t, rps, p50, p99, ttft50, _ttft99, queued = point
    assert t == 1010 and rps == pytest.approx(10 / 5) and queued == 3
    assert B[3] < p50 <= B[4] and ttft50 is None

    # g1 restarts: its new counts are new traffic, not a negative rate.
    again = report(1015, since=200.0, m={"requests": 5, "latency": hist(b0=5)})
    point = h.sample(1015, {}, {}, {"g1": again, "g2": g2})["models"]["m"]
    assert point[1] == pytest.approx(1.0) and point[2] is not None and point[2] <= B[0]

    snap = h.snapshot()
    assert [p[0] for p in snap["models"]["m"]] == [1000, 1005, 1010, 1015]
    assert set(snap["models"]) == {"m", "idle"} and snap["bounds"] == list(B)
    msgspec.json.encode(snap)  # JSON-able as it stands


def test_gpu_memory_and_bounded_rings(monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = {
        "h": {
            "host_id": "h",
            "gpus": [
                {"index": 0, "memory_total_mib": 24000, "memory_used_mib": 5000,
                 "memory_claimed_mib": 4000},
                {"index": 1, "memory_total_mib": 24000, "memory_used_mib": 0},
            ],
        }
    }  # fmt: skip
    instances = {
        "a": {"host": "h", "gpus": [0, 1], "memory_mib": 6000, "state": "starting"},
        "b": {"host": "h", "gpus": [1], "memory_mib": 1000, "state": "stopped"},
    }
    # Placement's reservation counts while the agent has not started it yet (GPU 1).
    assert gpu_memory(hosts, instances) == {"h/0": [5000, 4000, 24000], "h/1": [0, 3000, 24000]}

    monkeypatch.setattr(history, "SPAN_S", 60.0)
    h = History(every_s=10)
    assert h.maxlen == 6
    for i in range(20):
        h.sample(1000 + 10 * i, hosts, {}, {})
    assert len(h.gpus["h/0"]) == 6 and h.gpus["h/0"][-1] == [1190, 5000, 4000, 24000]
    h.sample(1400, {}, {}, {})  # the host is gone: its series leave once out of the window
    assert h.gpus == {}
