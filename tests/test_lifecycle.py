"""The lifecycle table (proto/lifecycle.py): who may move an instance record where."""

from __future__ import annotations

import pytest

from proto import END_STATES, InstanceState
from proto.lifecycle import AGENT, PLACER, WRITERS, refusal

S = InstanceState


def test_only_the_placer_creates_a_record_and_only_pending():
    assert refusal(PLACER, None, S.PENDING) is None
    assert refusal(AGENT, None, S.PENDING) is not None
    for state in S:
        if state != S.PENDING:
            assert refusal(PLACER, None, state) is not None
            assert refusal(AGENT, None, state) is not None


def test_a_purged_record_is_not_created_again_by_a_late_transition():
    for state in (S.READY, S.STOPPED, S.FAILED, S.STARTING):
        why = refusal(AGENT, None, state)
        assert why is not None and "no record" in why


@pytest.mark.parametrize("ended", sorted(END_STATES))
def test_an_ended_record_never_changes_again(ended):
    for writer in WRITERS:
        for state in S:
            assert refusal(writer, ended, state) is not None, (writer, ended, state)


@pytest.mark.parametrize("decided", [S.STOPPING, S.DRAINING, S.LOST])
def test_an_agents_ready_cannot_undo_the_placers_decision(decided):
    assert refusal(AGENT, decided, S.READY) is not None


def test_the_agent_reports_what_happens_on_its_host():
    assert refusal(AGENT, S.STARTING, S.READY) is None
    assert refusal(AGENT, S.READY, S.FAILED) is None  # crashed
    assert refusal(AGENT, S.STOPPING, S.STOPPED) is None
    assert refusal(AGENT, S.DRAINING, S.STOPPED) is None  # stopped on its own (shutdown)
    assert refusal(AGENT, S.READY, S.DRAINING) is not None  # a decision, not an observation


def test_the_placer_decides_drains_stops_and_lost_hosts():
    assert refusal(PLACER, S.READY, S.DRAINING) is None
    assert refusal(PLACER, S.DRAINING, S.READY) is None  # the drain ended, moot or abandoned
    assert refusal(PLACER, S.STARTING, S.READY) is not None  # only the agent sees /health
    assert refusal(PLACER, S.READY, S.STOPPED) is not None  # only the agent sees it gone
    for state in (S.PENDING, S.DOWNLOADING, S.STARTING, S.READY, S.DRAINING, S.STOPPING):
        assert refusal(PLACER, state, S.LOST) is None


def test_a_write_that_keeps_the_state_is_allowed_until_the_record_ends():
    assert refusal(PLACER, S.STARTING, S.STARTING) is None  # start resent, new reason
    assert refusal(AGENT, S.READY, S.READY) is None
    assert refusal(AGENT, S.STOPPED, S.STOPPED) is not None


def test_the_architecture_docs_table_is_the_codes() -> None:
    """docs/architecture.md draws the lifecycle table; its first three columns must say what
    proto/lifecycle.py enforces (edit the code, then the doc: this test names the row)."""
    from pathlib import Path

    from proto.lifecycle import table

    doc = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
    rows = [
        tuple(cell.strip() for cell in line.strip().strip("|").split("|")[:3])
        for line in doc.splitlines()
        if line.startswith("| ") and line.split("|")[1].strip() in {s for s, _, _ in table()}
    ]
    assert rows == table()
