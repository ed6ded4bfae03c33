"""Reading llama-server's generation speed from bodies the gateway only forwards."""

from __future__ import annotations

from services.gateway.metrics import predicted_per_second


def test_speed_is_read_from_a_whole_answer_and_from_a_last_streamed_chunk() -> None:
    whole = (
        b'{"choices":[{"text":"hi"}],"timings":{"predicted_n":8,"predicted_ms":20.5,'
        b'"predicted_per_token_ms":2.56,"predicted_per_second":390.2439}}'
    )
    assert predicted_per_second(whole) == 390.2439
    last = b'data: {"choices":[],"timings":{"predicted_per_second":1.5e3}}\n\ndata: [DONE]\n\n'
    assert predicted_per_second(last) == 1500.0


def test_bodies_without_a_usable_speed_give_none() -> None:
    assert predicted_per_second(b'{"data":[{"embedding":[0.1,0.2]}]}') is None
    assert predicted_per_second(b'{"timings":{"predicted_per_second":0}}') is None
    assert predicted_per_second(b'{"timings":{"predicted_per_second":') is None  # cut off
    assert predicted_per_second(b'{"timings":{"predicted_per_second":39') is None  # 390.2?
    assert predicted_per_second(b'{"timings":{"predicted_per_second":null}}') is None
