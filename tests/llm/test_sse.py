"""Cutting a byte stream into server-sent events, and what the gateway notes of each."""

from __future__ import annotations

import pytest

from hangar.errors import BadGateway
from hangar.llm.sse import EventSplitter, StreamTally, event_data, token_counts

CHUNK = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
DONE = b"data: [DONE]\n\n"


def test_events_are_cut_where_they_end_whatever_the_chunks() -> None:
    stream = CHUNK + CHUNK.replace(b"\n\n", b"\r\n\r\n") + DONE
    for size in (1, 3, 7, len(stream)):
        splitter = EventSplitter(1024)
        events = [
            e for i in range(0, len(stream), size) for e in splitter.feed(stream[i : i + size])
        ]
        assert b"".join(events) == stream
        assert len(events) == 3
        assert splitter.pending == b""


def test_an_event_past_the_limit_is_a_replica_failure() -> None:
    splitter = EventSplitter(16)
    with pytest.raises(BadGateway):
        splitter.feed(b"data: " + b"x" * 32)


def test_the_tally_keeps_usage_and_drops_the_usage_event_only_when_told() -> None:
    hidden = StreamTally(strip_usage_event=True)
    assert [hidden.see(e) for e in (CHUNK, CHUNK, USAGE, DONE)] == [True, True, False, True]
    assert hidden.done and hidden.choice_events == 2
    assert token_counts(hidden.usage) == (3, 2)
    shown = StreamTally(strip_usage_event=False)
    assert shown.see(USAGE) and not shown.done


def test_data_lines_are_joined() -> None:
    assert event_data(b"event: x\ndata: a\ndata:b\n\n") == b"a\nb"
    assert token_counts({"prompt_tokens": "3"}) is None
    assert token_counts({"prompt_tokens": 4}) == (4, 0)
