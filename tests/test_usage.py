"""Per-key limits and token counts: the pure limiter with made-up times, token counts read
from answers, the per-request lease, and the config of keys. No stack: see
test_usage_stack.py for the whole path."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator

import pytest
from prometheus_client import generate_latest

from lls.config import ApiKey, ConfigError, key_label, parse
from services.gateway.errors import ApiError
from services.gateway.metrics import Metrics, answer_tokens
from services.gateway.usage import KeyLimits, KeyWindow, Usage, whole_seconds

# ------------------------------------------------------------------ the pure limiter


def test_requests_per_minute_slides_and_says_when_there_is_room() -> None:
    w = KeyWindow(KeyLimits(requests_per_minute=2))
    assert w.admit(0.0) is None
    assert w.admit(30.0) is None
    refused = w.admit(45.0)
    assert refused is not None and refused.limit == "requests_per_minute"
    assert refused.retry_after == 15  # the request at 0 leaves the window at 60
    assert w.requests_in_window(45.0) == 2  # a refusal is not counted
    assert w.admit(59.5) is not None
    assert w.admit(60.0) is None  # exactly a minute later: room again
    refused = w.admit(61.0)
    assert refused is not None and refused.retry_after == 29  # now the one at 30 leaves first


def test_requests_per_minute_retry_after_counts_from_the_oldest_that_must_leave() -> None:
    w = KeyWindow(KeyLimits(requests_per_minute=3))
    for t in (0.0, 1.0, 2.0):
        assert w.admit(t) is None
    refused = w.admit(10.0)
    assert refused is not None and refused.retry_after == 50
    # the retry time it gave is really when one more is admitted
    assert w.admit(59.9) is not None and w.admit(60.0) is None


def test_tokens_per_minute_refuses_once_over_until_the_window_frees_room() -> None:
    w = KeyWindow(KeyLimits(tokens_per_minute=120))
    assert w.admit(0.0) is None
    w.charge(100, 0.5)  # counted after the answer
    assert w.admit(5.0) is None  # under budget: one more may start, whatever it will cost
    w.charge(50, 10.0)
    assert w.tokens_in_window(10.0) == 150
    refused = w.admit(20.0)
    assert refused is not None and refused.limit == "tokens_per_minute"
    # 150 - 100 (charged at 0.5) = 50 < 120: room at 60.5, 40.5 s from now, rounded up
    assert refused.retry_after == 41
    assert w.admit(60.4) is not None
    assert w.admit(60.5) is None
    assert w.tokens_in_window(60.5) == 50


def test_tokens_retry_after_waits_for_as_many_charges_as_needed() -> None:
    w = KeyWindow(KeyLimits(tokens_per_minute=100))
    w.charge(60, 0.0)
    w.charge(60, 20.0)
    w.charge(60, 40.0)  # 180 in the window: two charges must leave to go below 100
    refused = w.check(45.0)
    assert refused is not None and refused.retry_after == 35  # at 80 (20 + 60)
    assert w.check(80.0) is None


def test_one_answer_over_the_whole_budget_blocks_for_a_minute_then_clears() -> None:
    w = KeyWindow(KeyLimits(tokens_per_minute=10))
    assert w.admit(0.0) is None
    w.charge(5000, 3.0)
    refused = w.check(4.0)
    assert refused is not None and refused.retry_after == 59
    assert w.check(63.0) is None


def test_charges_in_one_second_share_an_entry_that_expires_with_the_last() -> None:
    w = KeyWindow(KeyLimits(tokens_per_minute=1000))
    for i in range(100):
        w.charge(5, 7.0 + i / 1000)  # all within second 7
    assert len(w._tokens) == 1 and w.tokens_in_window(8.0) == 500
    assert w.tokens_in_window(67.05) == 500  # the last charge was at 7.099: not yet gone
    assert w.tokens_in_window(67.1) == 0


def test_tokens_are_not_kept_for_a_key_without_a_token_limit() -> None:
    w = KeyWindow(KeyLimits(requests_per_minute=5))
    w.charge(100, 0.0)
    assert w.tokens_in_window(0.0) == 0 and not w._tokens


def test_max_concurrent_counts_running_requests() -> None:
    w = KeyWindow(KeyLimits(max_concurrent=2))
    assert w.admit(0.0) is None and w.admit(0.0) is None
    refused = w.admit(0.1)
    assert refused is not None and refused.limit == "max_concurrent"
    assert refused.retry_after == 1  # nothing measured yet
    w.release(10.0)
    assert w.running == 1 and w.admit(0.2) is None
    refused = w.admit(0.3)
    # a slot frees about every average request time / slots: 10 s / 2
    assert refused is not None and refused.retry_after == 5
    w.release()
    w.release()
    w.release()  # one too many (a bug elsewhere) must not open extra slots
    assert w.running == 0


def test_no_limits_admit_everything_and_check_changes_nothing() -> None:
    w = KeyWindow(KeyLimits())
    assert all(w.admit(float(t)) is None for t in range(1000))
    assert w.requests_in_window(999.0) == 0  # nothing kept when nothing is limited
    w = KeyWindow(KeyLimits(requests_per_minute=1))
    assert w.check(0.0) is None and w.check(0.0) is None
    assert w.requests_in_window(0.0) == 0


def test_the_first_limit_reached_is_the_one_reported() -> None:
    w = KeyWindow(KeyLimits(requests_per_minute=1, tokens_per_minute=1, max_concurrent=1))
    assert w.admit(0.0) is None
    w.charge(10, 0.0)
    refused = w.admit(1.0)
    assert refused is not None and refused.limit == "max_concurrent"
    w.release(1.0)
    refused = w.admit(1.0)
    assert refused is not None and refused.limit == "requests_per_minute"
    assert w.admit(60.0) is None  # the request left, and the tokens with it


def test_retry_after_is_whole_seconds_rounded_up_at_least_one() -> None:
    assert whole_seconds(0.0) == 1
    assert whole_seconds(0.2) == 1
    assert whole_seconds(1.0) == 1
    assert whole_seconds(1.01) == 2
    assert whole_seconds(59.99999999999) == 60  # float noise does not add a second
    assert whole_seconds(-5.0) == 1


# ------------------------------------------------------------------ token counts from answers


def test_tokens_come_from_openai_usage_in_a_whole_answer() -> None:
    whole = (
        b'{"choices":[{"text":"hi"}],"usage":{"completion_tokens":4,"prompt_tokens":17,'
        b'"total_tokens":21,"prompt_tokens_details":{"cached_tokens":3}},'
        b'"timings":{"cache_n":3,"prompt_n":14,"predicted_n":4,"predicted_per_second":9.5}}'
    )
    assert answer_tokens(whole) == (17, 4)
    embeddings = b'{"data":[{"embedding":[0.1]}],"usage":{"prompt_tokens":5,"total_tokens":5}}'
    assert answer_tokens(embeddings) == (5, 0)


def test_tokens_come_from_timings_with_the_cached_prompt_added_back() -> None:
    last = (
        b'data: {"choices":[{"finish_reason":"length","delta":{}}],"timings":{"cache_n":4,'
        b'"prompt_n":23,"prompt_ms":0.6,"predicted_n":3,"predicted_per_second":68.5}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert answer_tokens(last) == (27, 3)
    older = b'{"timings":{"prompt_n":9,"predicted_n":2,"predicted_per_second":1.0}}'
    assert answer_tokens(older) == (9, 2)  # no cache_n: nothing cached


def test_tokens_from_input_and_output_only_when_both_are_there() -> None:
    assert answer_tokens(b'{"usage":{"input_tokens":12,"output_tokens":7}}') == (12, 7)
    assert answer_tokens(b'{"input_tokens":12}') is None  # count_tokens: nothing generated
    # Anthropic counts the tokens read from the cache apart: they are prompt tokens too
    anthropic = b'{"usage":{"cache_read_input_tokens":26,"input_tokens":1,"output_tokens":3}}'
    assert answer_tokens(anthropic) == (27, 3)
    assert answer_tokens(b'{"usage":{"output_tokens":3}}', prompt_hint=27) == (27, 3)


def test_bodies_without_usable_counts_give_none() -> None:
    assert answer_tokens(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n') is None
    assert answer_tokens(b'{"timings":{"prompt_n":4,"predicted_n":') is None  # cut off
    assert answer_tokens(b'{"usage":{"prompt_tokens":12') is None  # 12 or 120?
    assert answer_tokens(b"") is None


def test_generated_text_cannot_forge_counts() -> None:
    # A quote inside a JSON string is escaped, so the text's copy never matches the key.
    body = (
        b'{"choices":[{"text":"\\"prompt_tokens\\":999999,\\"completion_tokens\\":9"}],'
        b'"usage":{"completion_tokens":2,"prompt_tokens":3}}'
    )
    assert answer_tokens(body) == (3, 2)
    only_text = b'{"choices":[{"text":"\\"prompt_tokens\\":999999"}]}'
    assert answer_tokens(only_text) is None


# ------------------------------------------------------------------ the gateway's glue


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeReply:
    def __init__(self, status: int = 200) -> None:
        self.status_code = status


def key(**kw: object) -> ApiKey:
    return ApiKey(key="sk-secret-value-123", **kw)  # type: ignore[arg-type]


def scrape(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def make(*keys: ApiKey) -> tuple[Usage, Metrics, FakeClock]:
    metrics, clock = Metrics(), FakeClock()
    return Usage(list(keys), metrics, clock), metrics, clock


def test_a_refusal_is_a_429_naming_the_key_and_limit_with_retry_after() -> None:
    k = key(name="team-a", requests_per_minute=1)
    usage, metrics, clock = make(k)
    usage.enter(k, "tiny").close(200)
    clock.now += 20
    with pytest.raises(ApiError) as e:
        usage.enter(k, "tiny")
    err = e.value
    assert err.status == 429 and err.retry_after == 40 and err.code == "rate_limit_exceeded"
    assert "team-a" in err.message and "requests_per_minute" in err.message
    assert "sk-secret" not in err.message
    text = scrape(metrics)
    assert 'lls_key_requests_total{code="429",key="team-a",model="tiny"} 1.0' in text
    assert 'lls_key_requests_total{code="200",key="team-a",model="tiny"} 1.0' in text
    assert 'lls_key_limited_total{key="team-a",limit="requests_per_minute"} 1.0' in text


def test_a_lease_ends_once_and_gives_its_slot_back() -> None:
    k = key(max_concurrent=1)
    usage, metrics, _ = make(k)
    lease = usage.enter(k, "tiny")
    with pytest.raises(ApiError):  # the one slot is taken until the request ends
        usage.enter(k, "tiny")
    lease.close(200)
    lease.close(200)  # a second end (a bug elsewhere) neither frees twice nor counts twice
    assert usage.windows[k.name].running == 0
    assert f'lls_key_requests_total{{code="200",key="{k.name}",model="tiny"}} 1.0' in scrape(
        metrics
    )
    usage.enter(k, "tiny").close(200)


def test_a_lease_dropped_unended_gives_its_slot_back() -> None:
    k = key(name="solo", max_concurrent=1)
    usage, _, _ = make(k)
    usage.enter(k, "tiny")  # a streaming body that never started: nobody ends it
    gc.collect()
    assert usage.windows["solo"].running == 0


def test_a_whole_answer_is_counted_once_and_charged_to_the_key() -> None:
    k = key(name="team-a", tokens_per_minute=50)
    usage, metrics, clock = make(k)
    lease = usage.enter(k, "tiny")
    lease.close(200)
    body = b'{"usage":{"completion_tokens":30,"prompt_tokens":25}}'
    lease.count(body)
    lease.count(body)
    text = scrape(metrics)
    assert 'lls_tokens_total{key="team-a",kind="prompt",model="tiny"} 25.0' in text
    assert 'lls_tokens_total{key="team-a",kind="completion",model="tiny"} 30.0' in text
    with pytest.raises(ApiError) as e:  # 55 >= 50: the next request waits for the window
        usage.enter(k, "tiny")
    assert e.value.retry_after == 60 and "tokens_per_minute" in e.value.message
    clock.now += 60
    usage.enter(k, "tiny").close(200)


def test_a_stream_is_counted_from_its_tail_even_when_the_last_event_is_split() -> None:
    usage, metrics, _ = make()
    lease = usage.enter(None, "tiny")  # an open gateway: counted as "open"
    lease.feed(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
    lease.feed(b'data: {"choices":[{"finish_reason":"length"}],"timings":{"cache_n":2,"pro')
    lease.feed(b'mpt_n":5,"predicted_n":8,"predicted_per_second":9.1}}\n\n')
    lease.feed(b"data: [DONE]\n\n")
    lease.close(200)
    text = scrape(metrics)
    assert 'lls_tokens_total{key="open",kind="prompt",model="tiny"} 7.0' in text
    assert 'lls_tokens_total{key="open",kind="completion",model="tiny"} 8.0' in text


def test_an_anthropic_stream_takes_input_from_its_first_event_and_output_from_its_last() -> None:
    usage, metrics, _ = make()
    lease = usage.enter(None, "tiny")
    lease.feed(
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
        b'{"cache_read_input_tokens":20,"input_tokens":7,"output_tokens":0}}}\n\n'
    )
    lease.feed(b'event: content_block_delta\ndata: {"delta":{"text":"hi"}}\n\n')
    lease.feed(b'event: message_delta\ndata: {"usage":{"output_tokens":3}}\n\n')
    lease.feed(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    lease.close(200)
    text = scrape(metrics)
    assert 'lls_tokens_total{key="open",kind="prompt",model="tiny"} 27.0' in text
    assert 'lls_tokens_total{key="open",kind="completion",model="tiny"} 3.0' in text


def test_a_stream_with_timings_in_every_chunk_counts_the_last() -> None:
    usage, metrics, _ = make()
    lease = usage.enter(None, "tiny")
    for n in range(1, 6):
        lease.feed(b'data: {"timings":{"prompt_n":3,"predicted_n":%d}}\n\n' % n)
    lease.close(200)
    assert 'lls_tokens_total{key="open",kind="completion",model="tiny"} 5.0' in scrape(metrics)


def test_a_stream_cut_short_without_counts_charges_nothing() -> None:
    usage, metrics, _ = make()
    lease = usage.enter(None, "tiny")
    lease.feed(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
    lease.close(200)
    assert "lls_tokens_total{" not in scrape(metrics)


async def test_ollama_lines_pass_through_and_the_usage_line_is_counted() -> None:
    usage, metrics, _ = make()
    lease = usage.enter(None, "tiny")
    sent = [
        'data: {"choices":[{"delta":{"content":"a"}}]}',
        "",
        'data: {"choices":[],"usage":{"prompt_tokens":6,"completion_tokens":2}}',
        "data: [DONE]",
    ]

    async def lines() -> AsyncIterator[str]:
        for line in sent:
            yield line

    assert [line async for line in lease.lines(lines())] == sent
    lease.close(200)
    assert 'lls_tokens_total{key="open",kind="prompt",model="tiny"} 6.0' in scrape(metrics)


def test_keys_without_limits_keep_no_state() -> None:
    free, limited = key(name="free"), key(name="lim", requests_per_minute=5)
    usage, _, _ = make(free, limited)
    assert set(usage.windows) == {"lim"}
    for _ in range(100):
        usage.enter(free, "tiny").close(200)


# ------------------------------------------------------------------ config


def test_a_key_without_a_name_gets_a_stable_label_that_is_not_the_secret() -> None:
    k = ApiKey(key="sk-very-secret-0123456789")
    assert k.name == key_label(k.key) and k.name.startswith("key-") and len(k.name) == 12
    assert "secret" not in k.name and k.name == ApiKey(key=k.key).name
    assert ApiKey(key="sk-very-secret-0123456789", name="team-a").name == "team-a"
    assert k.requests_per_minute is None and k.tokens_per_minute is None
    assert k.max_concurrent is None


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"requests_per_minute": 0}, "gateway.api_keys[0].requests_per_minute"),
        ({"tokens_per_minute": -5}, "gateway.api_keys[0].tokens_per_minute"),
        ({"max_concurrent": 0}, "gateway.api_keys[0].max_concurrent"),
        ({"max_concurrent": "two"}, "gateway.api_keys[0].max_concurrent"),
        ({"name": "has space"}, "gateway.api_keys[0].name"),
        ({"rpm": 5}, "rpm"),
    ],
)
def test_bad_key_settings_stop_start_up_naming_the_field(entry: dict, named: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse({"gateway": {"api_keys": [{"key": "sk-0123456789", **entry}]}})
    assert named in str(e.value)


def test_names_are_unique_and_never_a_key() -> None:
    two = [{"key": "sk-0123456789", "name": "a"}, {"key": "sk-9876543210", "name": "a"}]
    with pytest.raises(ConfigError, match=r"api_keys\[1\]: .a. names another key"):
        parse({"gateway": {"api_keys": two}})
    twice = [{"key": "sk-0123456789"}, {"key": "sk-0123456789", "admin": True}]
    with pytest.raises(ConfigError, match="the same key is listed twice"):
        parse({"gateway": {"api_keys": twice}})
    leaked = [{"key": "sk-0123456789", "name": "sk-9876543210"}, {"key": "sk-9876543210"}]
    with pytest.raises(ConfigError, match="not secret"):
        parse({"gateway": {"api_keys": leaked}})
    cfg = parse({"gateway": {"api_keys": [{"key": "sk-0123456789", "requests_per_minute": 60}]}})
    assert cfg.gateway.api_keys[0].requests_per_minute == 60


# ------------------------------------------------------------------ lls usage


def test_lls_usage_sums_codes_and_kinds_per_key_and_model() -> None:
    from lls.cli_local import usage_rows

    metrics = Metrics()
    metrics.key_requests.labels("team-a", "tiny", "200").inc(3)
    metrics.key_requests.labels("team-a", "tiny", "429").inc(2)
    metrics.key_requests.labels("b", "emb", "200").inc()
    metrics.key_tokens.labels("team-a", "tiny", "prompt").inc(40)
    metrics.key_tokens.labels("team-a", "tiny", "completion").inc(12)
    metrics.requests.labels("tiny", "/v1/completions", "200").inc()  # not per key: ignored
    assert usage_rows(scrape(metrics)) == [
        ("b", "emb", "1", "0", "0", "0"),
        ("team-a", "tiny", "5", "2", "40", "12"),
    ]
