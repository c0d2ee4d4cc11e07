"""The SDK's text/event-stream parser, against the WHATWG parsing rules."""

from __future__ import annotations

import json

from spool.client import Event, SSEDecoder, parse_sse


def events(raw: bytes, chunk: int | None = None) -> list[Event]:
    if chunk is None:
        return list(parse_sse([raw]))
    return list(parse_sse(raw[i : i + chunk] for i in range(0, len(raw), chunk)))


STREAM = (
    b": keep-alive\n"
    b'id: 1\nevent: status\ndata: {"status": "running"}\n\n'
    b'id: 2\nevent: progress\ndata: {"current": 1,\r\ndata: "total": 4}\r\n\r\n'
    b"id: 3\revent: token\rdata: caf\xc3\xa9 \xe2\x80\xa8 \xf0\x9f\xa6\x8a\r\r"
    b'id: 4\nevent: done\ndata: {"status": "succeeded"}\n\n'
)


def test_fields_events_and_line_endings() -> None:
    got = events(STREAM)
    assert [(e.id, e.event) for e in got] == [
        ("1", "status"),
        ("2", "progress"),
        ("3", "token"),
        ("4", "done"),
    ]
    assert got[0].json() == {"status": "running"}
    assert got[1].data == '{"current": 1,\n"total": 4}'
    assert got[1].json() == {"current": 1, "total": 4}
    # U+2028 is not a line break for SSE, and multi-byte UTF-8 survives.
    assert got[2].data == "café \u2028 🦊"


def test_any_chunking_gives_the_same_events() -> None:
    whole = events(STREAM)
    for size in (1, 2, 3, 5, 7, 64):
        assert events(STREAM, size) == whole


def test_crlf_split_across_chunks_is_one_line_break() -> None:
    got = list(parse_sse([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]))
    assert got == [Event("message", "a\nb", None)]


def test_defaults_comments_and_unknown_fields() -> None:
    raw = b": hello\nfoo: bar\ndata\n\ndata:no-space\n\ndata:  two spaces\n\n"
    got = events(raw)
    assert [e.event for e in got] == ["message", "message", "message"]
    assert [e.data for e in got] == ["", "no-space", " two spaces"]


def test_event_without_data_is_not_dispatched_but_id_is_kept() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 7\nevent: status\n\n") == []
    assert decoder.last_event_id == "7"
    [event] = decoder.feed(b"data: x\n\n")
    # The event type does not leak into the next event; the id persists.
    assert event == Event("message", "x", "7")


def test_retry_and_id_rules() -> None:
    decoder = SSEDecoder(last_event_id="0")
    decoder.feed(b"retry: 2500\nretry: soon\nid: bad\x00id\ndata: x\n\n")
    assert decoder.retry_ms == 2500
    assert decoder.last_event_id == "0"  # an id with NUL is ignored
    decoder.feed(b"id\ndata: y\n\n")
    assert decoder.last_event_id == ""  # an empty id resets it


def test_id_of_an_incomplete_event_is_not_the_last_event_id() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b")
    assert decoder.last_event_id == "1"  # resuming after 1 gets event 2 again, whole
    decoder.feed(b"\n\n")
    assert decoder.last_event_id == "2"


def test_unterminated_event_is_dropped_at_end_of_stream() -> None:
    assert events(b"data: complete\n\ndata: partial\n") == [Event("message", "complete", None)]
    assert events(b"data: partial") == []


def test_bom_is_skipped_once() -> None:
    got = events(b"\xef\xbb\xbfdata: 1\n\ndata: \xef\xbb\xbf2\n\n")
    assert [e.data for e in got] == ["1", "\ufeff2"]


def test_json_payloads_roundtrip() -> None:
    payload = {"text": "line1\nline2", "n": 3}
    raw = b"event: token\ndata: " + json.dumps(payload).encode() + b"\n\n"
    assert events(raw)[0].json() == payload
