"""Entry framing: round trips, and every kind of damage or foreign input is a FrameError with its reason."""

from __future__ import annotations

import os
import struct
import sys
import xxhash

import pytest

from aotcache.store import frame
from aotcache.store.frame import FrameError

KEY = b"s:the-key"


class Payload:
    """A picklable class the unpickle test makes disappear."""

    def __init__(self, n):
        self.n = n

    def __eq__(self, other):
        return isinstance(other, Payload) and other.n == self.n


@pytest.mark.parametrize("value", [b"", b"raw bytes", bytearray(b"ba"), memoryview(b"mv"), {"a": [1, 2]}, 3.5,
                                   Payload(7)])
@pytest.mark.parametrize("secret", [None, "s3cret", b"\x00bytes-secret"])
def test_round_trip(value, secret):
    blob = frame.encode(KEY, value, secret=secret)
    decoded = frame.decode(blob, secret=secret, expected_key=KEY)
    expected = bytes(value) if isinstance(value, (bytearray, memoryview)) else value
    assert decoded.value == expected and type(decoded.value) is type(expected)
    assert decoded.key == KEY
    assert decoded.header.signed == (secret is not None)
    assert decoded.header.frame_length == len(blob)


def test_encode_parts_join_to_encode_and_share_the_payload():
    value = os.urandom(1 << 16)
    parts = frame.encode_parts(KEY, value, secret="s")
    assert b"".join(parts) == frame.encode(KEY, value, secret="s")
    assert parts[-1] is value  # raw bytes are not copied
    assert len(parts[0]) == frame.HEADER_SIZE and len(parts[1]) == frame.SIGNATURE_SIZE


def test_compression_only_when_it_helps():
    compressible = b"abc" * 100_000
    blob = frame.encode(KEY, compressible, compress_min_bytes=1024)
    header = frame.read_header(blob)
    assert header.flags & frame.FLAG_ZSTD and len(blob) < len(compressible) // 10
    assert header.raw_length == len(compressible)
    assert frame.decode(blob).value == compressible
    random = os.urandom(100_000)
    assert not frame.read_header(frame.encode(KEY, random, compress_min_bytes=1024)).flags & frame.FLAG_ZSTD
    small = b"abc" * 100
    assert not frame.read_header(frame.encode(KEY, small, compress_min_bytes=1024)).flags & frame.FLAG_ZSTD
    pickled = {"big": "x" * 100_000}
    blob = frame.encode(KEY, pickled, compress_min_bytes=1024, secret="s")
    assert frame.read_header(blob).flags == frame.FLAG_ZSTD | frame.FLAG_PICKLED | frame.FLAG_SIGNED
    assert frame.decode(blob, secret="s").value == pickled


def test_every_truncation_is_rejected():
    blob = frame.encode(KEY, b"0123456789" * 5, secret="s")
    for length in range(len(blob)):
        with pytest.raises(FrameError) as info:
            frame.decode(blob[:length], secret="s")
        assert info.value.reason == "truncated"
    with pytest.raises(FrameError, match="truncated"):
        frame.decode(blob + b"\x00")


@pytest.mark.parametrize("secret", [None, "s"])
def test_every_bit_flip_is_rejected(secret):
    blob = frame.encode(KEY, b"payload bytes", secret=secret)
    for index in range(len(blob)):
        for bit in (0, 7):
            damaged = bytearray(blob)
            damaged[index] ^= 1 << bit
            with pytest.raises(FrameError):
                frame.decode(bytes(damaged), secret=secret, expected_key=KEY)


def test_bit_flip_in_reserved_field_is_rejected():
    blob = bytearray(frame.encode(KEY, b"payload bytes"))
    blob[12] ^= 1  # the reserved field
    with pytest.raises(FrameError):
        frame.decode(bytes(blob))


def test_foreign_version_and_flags():
    blob = frame.encode(KEY, b"v")
    with pytest.raises(FrameError) as info:
        frame.decode(b"PK\x03\x04" + blob[4:])
    assert info.value.reason == "foreign"
    with pytest.raises(FrameError) as info:
        frame.decode(b"")
    assert info.value.reason == "truncated"
    other_version = blob[:4] + struct.pack("<H", frame.FRAME_VERSION + 1) + blob[6:]
    with pytest.raises(FrameError) as info:
        frame.decode(other_version)
    assert info.value.reason == "version"
    unknown_flags = blob[:6] + struct.pack("<H", 0x80) + blob[8:]
    with pytest.raises(FrameError) as info:
        frame.read_header(unknown_flags)
    assert info.value.reason == "foreign"


def test_secret_rejects_unsigned_and_foreign_signatures_before_unpickling(monkeypatch):
    unsigned = frame.encode(KEY, {"x": 1})
    other = frame.encode(KEY, {"x": 1}, secret="other")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("pickle.loads reached for an untrusted frame")

    monkeypatch.setattr(frame.pickle, "loads", no_unpickling)
    with pytest.raises(FrameError) as info:
        frame.decode(unsigned, secret="mine")
    assert info.value.reason == "unsigned"
    with pytest.raises(FrameError) as info:
        frame.decode(other, secret="mine")
    assert info.value.reason == "signature"


def test_signed_frame_tampered_with_fixed_checksum_fails_signature():
    blob = bytearray(frame.encode(KEY, b"trusted", secret="s"))
    blob[-1] ^= 1
    header = frame.read_header(blob)
    zeroed = bytes(blob[:32]) + bytes(8)
    struct.pack_into("<Q", blob, 32, xxhash.xxh3_64_intdigest(zeroed + bytes(blob[frame.HEADER_SIZE:])))
    assert header.signed
    frame.decode(bytes(blob))  # the checksum is right again: without a secret this passes
    with pytest.raises(FrameError) as info:
        frame.decode(bytes(blob), secret="s")
    assert info.value.reason == "signature"


def test_signed_frames_read_without_secret():
    assert frame.decode(frame.encode(KEY, b"v", secret="s")).value == b"v"


def test_key_mismatch():
    with pytest.raises(FrameError) as info:
        frame.decode(frame.encode(KEY, b"v"), expected_key=b"s:other")
    assert info.value.reason == "key mismatch"


def test_unpicklable_payload(monkeypatch):
    blob = frame.encode(KEY, Payload(1))
    monkeypatch.delattr(sys.modules[__name__], "Payload")  # the class is gone when the entry is read
    with pytest.raises(FrameError) as info:
        frame.decode(blob)
    assert info.value.reason == "unpickle"


def test_unpicklable_value_is_a_type_error():
    with pytest.raises(TypeError, match="not picklable"):
        frame.encode_parts(KEY, lambda: 0)


def _outcome(decoder, blob, **kwargs):
    try:
        return ("value", decoder(blob, **kwargs))
    except FrameError as exc:
        return ("error", exc.reason)


@pytest.mark.parametrize("value", [b"payload bytes", {"pickled": [1, 2]}, b"abc" * 2000])
@pytest.mark.parametrize("secret", [None, "s"])
def test_decode_value_fast_path_agrees_with_decode_on_every_damage(value, secret):
    """decode_value takes a one-pass path for plain frames: it must accept and reject exactly as decode."""
    blob = frame.encode(KEY, value, secret=secret, compress_min_bytes=1024)

    def slow(data, **kwargs):
        return frame.decode(data, **kwargs).value

    damaged = [blob, blob + b"\x00", *(blob[:length] for length in range(0, len(blob), 7))]
    for index in range(0, len(blob), 3):
        for bit in (0, 7):
            flipped = bytearray(blob)
            flipped[index] ^= 1 << bit
            damaged.append(bytes(flipped))
    for data in damaged:
        for expected_key in (KEY, b"s:other", None):
            kwargs = {"secret": secret, "expected_key": expected_key}
            assert _outcome(frame.decode_value, data, **kwargs) == _outcome(slow, data, **kwargs)
    assert frame.decode_value(blob, secret=secret, expected_key=KEY) == value


def test_checksum_is_checked_before_the_signature():
    """NOTE [a bad signature is not corruption]: a damaged signed frame is corrupt (deletable) for any reader;
    a whole frame of another secret is not."""
    blob = bytearray(frame.encode(KEY, b"payload" * 10, secret="theirs"))
    with pytest.raises(FrameError) as info:
        frame.decode(bytes(blob), secret="mine")
    assert info.value.reason == "signature" and not info.value.corrupt
    blob[-1] ^= 1
    with pytest.raises(FrameError) as info:
        frame.decode(bytes(blob), secret="mine")
    assert info.value.reason == "checksum" and info.value.corrupt
