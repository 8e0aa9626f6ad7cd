"""Binary WebSocket frames."""

import numpy as np
import pytest

from service.protocol.wire import (
    FrameAnswer,
    FrameError,
    decode_answers,
    decode_frame,
    decode_pushes,
    encode_answers,
    encode_frame,
    encode_pushes,
)


def test_round_trip_with_and_without_header():
    rows = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    header, back = decode_frame(encode_frame(rows, 42), 3, with_header=True)
    assert header == 42
    np.testing.assert_array_equal(back, rows)
    header, back = decode_frame(encode_frame(rows), 3, with_header=False)
    assert header is None
    np.testing.assert_array_equal(back, rows)


def test_layout_is_little_endian_row_major_float32():
    data = encode_frame(np.array([[1.0, 2.0]]), -1)
    assert data[:8] == (-1).to_bytes(8, "little", signed=True)
    assert data[8:] == np.array([1.0, 2.0], dtype="<f4").tobytes()


@pytest.mark.parametrize(
    ("payload", "with_header", "match"),
    [
        (b"\x00" * 12, False, "not a whole number of rows"),
        (b"", False, "not a whole number of rows"),
        (b"\x00" * 4, True, "no 8-byte offset header"),
        (b"\x00" * 8, True, "not a whole number of rows"),
    ],
)
def test_bad_frames(payload, with_header, match):
    with pytest.raises(FrameError, match=match):
        decode_frame(payload, 2, with_header)


def test_multi_session_frames_round_trip_and_refuse_truncation():
    rows = [np.arange(6, dtype=np.float32).reshape(3, 2), np.ones((1, 4), np.float32)]
    frame = encode_pushes([("session-a", 7, rows[0]), ("session-b", None, rows[1])])
    pushes = decode_pushes(frame)
    assert [(p.session_id, p.offset) for p in pushes] == [("session-a", 7), ("session-b", None)]
    assert all(np.array_equal(p.rows, r) for p, r in zip(pushes, rows, strict=True))
    for cut in (1, 5, len(frame) - 1):
        with pytest.raises(FrameError):
            decode_pushes(frame[:cut])
    with pytest.raises(FrameError, match="after the last item"):
        decode_pushes(frame + b"\0")
    answers = [FrameAnswer("a", 10, rows[0], None), FrameAnswer("b", -1, None, b'{"e": 1}')]
    back = decode_answers(encode_answers(answers))
    assert back[0].position == 10 and np.array_equal(back[0].outputs, rows[0])
    assert (back[1].position, back[1].error) == (-1, b'{"e": 1}')


def test_a_frame_claiming_more_pushes_than_it_can_hold_is_refused_before_reading():
    import struct

    empty_items = struct.pack("<I", 70_000) + (b"\0" + struct.pack("<qIH", -1, 0, 0)) * 70_000
    with pytest.raises(FrameError, match="at most 1024"):
        decode_pushes(empty_items, max_items=1024)
    with pytest.raises(FrameError, match="cannot hold"):
        decode_pushes(struct.pack("<I", 4_000_000_000))
