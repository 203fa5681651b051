"""The entry container: round trip, manifest without blobs, and every malformed form is an EntryError."""

from __future__ import annotations

import json

import pytest

from aotcache.autograd_cache.entry import (
    ENTRY_FORMAT,
    CacheEntry,
    EntryError,
    current_versions,
    pack_entry,
    read_manifest,
    unpack_entry,
)


def make_entry(**overrides) -> CacheEntry:
    fields = dict(key={"schema": 1, "digest": "ab" * 32, "parts": {}}, metadata={"is_inference": True},
                  artifacts={"inference": b"\x00artifact-bytes\xff" * 10}, guards="L['t0'].size()[0] >= 2",
                  compilers={"inference": "nop"}, compile_seconds=1.5,
                  summary={"name": "f", "ops": {"aten.sin.default": 1}})
    fields.update(overrides)
    return CacheEntry(**fields)


def test_round_trip_keeps_every_field():
    entry = make_entry(artifacts={"forward": b"fw" * 100, "backward": b"bw" * 50})
    blob = pack_entry(entry)
    assert blob[:4] == b"AOTE"
    restored = unpack_entry(blob)
    assert restored.artifacts == entry.artifacts
    assert restored.manifest() == entry.manifest()
    assert restored.digest == "ab" * 32
    assert restored.versions == current_versions()


def test_manifest_is_json_and_lists_artifact_sizes():
    blob = pack_entry(make_entry())
    manifest = read_manifest(blob)
    json.dumps(manifest)  # plain JSON all the way down
    assert manifest["format"] == ENTRY_FORMAT
    assert manifest["artifact_bytes"] == {"inference": 160}
    assert manifest["summary"]["name"] == "f"
    assert manifest["guards"] == "L['t0'].size()[0] >= 2"
    # the manifest is readable even when the artifact bytes are cut off (listings never need them)
    assert read_manifest(blob[:-100])["digest"] == "ab" * 32


@pytest.mark.parametrize("damage, reason", [
    (lambda blob: blob[:-1], "truncated"),
    (lambda blob: blob[:6], "foreign"),
    (lambda blob: b"XXXX" + blob[4:], "foreign"),
    (lambda blob: blob + b"!", "malformed"),
    (lambda blob: blob[:-5] + bytes([blob[-5] ^ 1]) + blob[-4:], "checksum"),
])
def test_damaged_containers_are_rejected_with_a_reason(damage, reason):
    with pytest.raises(EntryError) as info:
        unpack_entry(damage(pack_entry(make_entry())))
    assert info.value.reason == reason


def test_other_torch_version_or_format_is_rejected():
    entry = make_entry()
    entry.versions = {**current_versions(), "torch": "1.0.0"}
    with pytest.raises(EntryError) as info:
        unpack_entry(pack_entry(entry))
    assert info.value.reason == "version" and "torch" in str(info.value)
    assert unpack_entry(pack_entry(entry), check_versions=False).versions["torch"] == "1.0.0"
    entry = make_entry()
    entry.format = ENTRY_FORMAT + 1
    with pytest.raises(EntryError) as info:
        unpack_entry(pack_entry(entry))
    assert info.value.reason == "format"


def test_unknown_roles_and_unserializable_manifests_are_refused():
    with pytest.raises(EntryError, match="unknown artifact roles"):
        pack_entry(make_entry(artifacts={"weights": b"x"}))
    with pytest.raises(EntryError, match="JSON"):
        pack_entry(make_entry(summary={"bad": object()}))
