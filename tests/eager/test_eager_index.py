"""The persistent per-op index: JSON round trip, dedupe, atomic writes, corruption repair, 4-process appends."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from aotcache import config
from aotcache.eager import meta
from aotcache.eager.index import IndexStatus, KernelEntry, OpIndex, iter_op_indexes
from aotcache.eager.manage import clear, list_entries
from aotcache.eager.versions import FORMAT_VERSION
from aotcache.logs import CacheFault

try:  # tests/ is not a package: pytest puts it on sys.path and imports its conftest as `conftest`
    from conftest import REPO_ROOT
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.conftest import REPO_ROOT

aten = torch.ops.aten
VERSIONS = {"format": FORMAT_VERSION, "aotcache": "test", "torch": torch.__version__}


def add_meta(rows: int, alpha: int = 1) -> list[dict]:
    op = aten.add.Tensor
    values = meta.binder_for(op).bind((torch.ones(rows, 4), torch.ones(rows, 4)), {"alpha": alpha})
    return meta.extract_call_metadata(op, values, dynamic=False, device_type="cpu")


def make_index(cache_dir) -> OpIndex:
    return OpIndex("aten", "add.Tensor", "cpu", cache_dir=cache_dir)


def test_index_round_trip_and_layout(isolated_cache_dir):
    index = make_index(isolated_cache_dir)
    entry = index.new_entry(add_meta(2), VERSIONS, num_outputs=1)
    assert index.add(entry, b"library bytes") is True
    assert index.index_path == isolated_cache_dir / "aoti_eager" / "aten" / "cpu" / "add.Tensor.json"
    assert index.library_path(entry).read_bytes() == b"library bytes"
    assert entry.kernel_path == f"lib/add.Tensor/{entry.digest}.so"
    raw = json.loads(index.index_path.read_text())
    assert isinstance(raw, list) and raw[0]["meta_info"] == entry.meta_info
    assert raw[0]["kernel_path"] == entry.kernel_path
    snapshot = index.read()
    assert snapshot.status is IndexStatus.OK and snapshot.entries == (entry,)
    assert not [path for path in index.device_dir.iterdir() if path.name.endswith(".tmp")]


def test_identical_signature_is_not_appended_twice(isolated_cache_dir):
    index = make_index(isolated_cache_dir)
    first = index.new_entry(add_meta(2), VERSIONS, 1)
    grad_meta = add_meta(2)
    grad_meta[0]["requires_grad"] = True  # recorded, but not part of the identity
    assert index.add(first, b"x") is True
    assert index.add(index.new_entry(grad_meta, VERSIONS, 1), b"x") is False
    assert index.add(index.new_entry(add_meta(2, alpha=3), VERSIONS, 1), b"y") is True
    assert index.add(index.new_entry(add_meta(2), {**VERSIONS, "torch": "other"}, 1), b"z") is True
    assert len(index.read().entries) == 3


@pytest.mark.parametrize("garbage", [b"[{\"meta_info\": [", b"{}", b"[1, 2]", b"\xff\xfe", b""])
def test_corrupt_index_is_rebuilt_from_sidecars(isolated_cache_dir, garbage, caplog):
    index = make_index(isolated_cache_dir)
    entries = [index.new_entry(add_meta(rows), VERSIONS, 1) for rows in (2, 3)]
    for entry in entries:
        index.add(entry, b"lib")
    index.index_path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="aotcache"):
        snapshot = index.read()
    assert snapshot.status is IndexStatus.REBUILT and snapshot.problem
    assert sorted(entry.digest for entry in snapshot.entries) == sorted(entry.digest for entry in entries)
    assert "corrupt per-op kernel index" in caplog.text
    assert index.read().status is IndexStatus.OK  # the repaired index was written back
    assert len(json.loads(index.index_path.read_text())) == 2


def test_rebuild_skips_entries_whose_library_is_gone(isolated_cache_dir):
    index = make_index(isolated_cache_dir)
    kept, lost = (index.new_entry(add_meta(rows), VERSIONS, 1) for rows in (2, 3))
    index.add(kept, b"lib")
    index.add(lost, b"lib")
    index.library_path(lost).unlink()
    index.index_path.write_text("not json")
    assert [entry.digest for entry in index.read().entries] == [kept.digest]


def test_corrupt_index_raises_in_strict_mode_after_repair(isolated_cache_dir):
    index = make_index(isolated_cache_dir)
    index.add(index.new_entry(add_meta(2), VERSIONS, 1), b"lib")
    index.index_path.write_text("[")
    with config.patch(strict=True), pytest.raises(CacheFault, match="corrupt"):
        index.read()
    assert index.read().status is IndexStatus.OK


def test_append_repairs_a_corrupt_index(isolated_cache_dir):
    index = make_index(isolated_cache_dir)
    index.add(index.new_entry(add_meta(2), VERSIONS, 1), b"lib")
    index.index_path.write_text("{broken")
    index.add(index.new_entry(add_meta(3), VERSIONS, 1), b"lib")
    assert len(index.read().entries) == 2


def test_kernel_path_outside_the_cache_is_corruption():
    with pytest.raises(ValueError, match="inside the cache"):
        KernelEntry.from_json({"meta_info": [], "kernel_path": "../../etc/x.so", "digest": "d", "versions": {},
                               "num_outputs": 1}, namespace="aten", op_name="add.Tensor", device="cpu")


def test_list_and_clear(isolated_cache_dir):
    add_index = make_index(isolated_cache_dir)
    add_index.add(add_index.new_entry(add_meta(2, alpha=2), VERSIONS, 1), b"lib")
    mm_index = OpIndex("aten", "mm.default", "cpu", cache_dir=isolated_cache_dir)
    mm_index.add(mm_index.new_entry(add_meta(5), VERSIONS, 1), b"lib")
    assert [index.op_name for index in iter_op_indexes(isolated_cache_dir)] == ["add.Tensor", "mm.default"]
    rows = list_entries()
    assert {row["op"] for row in rows} == {"aten::add.Tensor", "aten::mm.default"}
    add_row = next(row for row in rows if row["op"] == "aten::add.Tensor")
    assert add_row["signature"] == "self=float32[2,4], other=float32[2,4], alpha=2"
    assert add_row["usable"] is False and "built for aotcache" in add_row["problem"]
    assert add_row["size"] == 3
    assert clear(op="aten::add.Tensor") == 1
    assert {row["op"] for row in list_entries()} == {"aten::mm.default"}
    assert not add_index.index_path.exists() and not any(add_index.lib_dir.glob("*.so"))
    assert clear() == 1 and list_entries() == []


APPENDER = r"""
import sys, torch
from aotcache.eager import meta
from aotcache.eager.index import OpIndex
import os
worker = int(os.environ["WORKER"])
library = open(os.environ["LIBRARY"], "rb").read()
index = OpIndex("aten", "add.Tensor", "cpu")
op = torch.ops.aten.add.Tensor
for rows in [*range(worker * 10 + 1, worker * 10 + 11), 1000, 1001]:  # 10 own + 2 shared signatures
    values = meta.binder_for(op).bind((torch.ones(rows, 2), torch.ones(rows, 2)), {})
    info = meta.extract_call_metadata(op, values, dynamic=False, device_type="cpu")
    index.add(index.new_entry(info, {"format": 1, "aotcache": "test"}, 1), library)
print("done")
"""


def test_four_processes_appending_to_one_index(isolated_cache_dir, tmp_path):
    library = tmp_path / "library.so"
    library.write_bytes(b"\x7fELF" + bytes(range(256)) * 64)  # any bytes: the append path ignores them
    env_base = {"AOTCACHE_CACHE_DIR": str(isolated_cache_dir), "LIBRARY": str(library),
                "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER],
                              env={**os.environ, **env_base, "WORKER": str(worker)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for worker in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    index = make_index(isolated_cache_dir)
    raw = json.loads(index.index_path.read_text())  # valid JSON
    assert len(raw) == 4 * 10 + 2
    assert len({item["digest"] for item in raw}) == len(raw)
    rows = sorted(item["meta_info"][0]["sizes"][0] for item in raw)
    assert rows == [*range(1, 41), 1000, 1001]
    assert all(index.library_path(entry).read_bytes() == library.read_bytes() for entry in index.read().entries)
