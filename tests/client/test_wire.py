"""Binary WebSocket frames."""

import numpy as np
import pytest

from service.wire import FrameError, decode_frame, encode_frame


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
