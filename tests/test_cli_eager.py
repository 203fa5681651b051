"""`aotcache eager ls | precompile | clear`: on an index written without compiling, plus one real precompile."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from aotcache.cli import cli
from aotcache.eager import meta
from aotcache.eager.index import OpIndex
from aotcache.eager.versions import FORMAT_VERSION

aten = torch.ops.aten
FAKE_VERSIONS = {"format": FORMAT_VERSION, "aotcache": "test", "torch": torch.__version__}  # not loadable here (by design)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def invoke_json(*args: str):
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def add_meta(rows: int, alpha: int = 1) -> list[dict]:
    values = meta.binder_for(aten.add.Tensor).bind((torch.ones(rows, 4), torch.ones(rows, 4)), {"alpha": alpha})
    return meta.extract_call_metadata(aten.add.Tensor, values, dynamic=False, device_type="cpu")


@pytest.fixture
def fake_index(isolated_cache_dir):
    """Two indexed entries of aten::add.Tensor and one of aten::mm.default, with stand-in library bytes."""
    add_index = OpIndex("aten", "add.Tensor", "cpu", cache_dir=isolated_cache_dir)
    for rows in (2, 3):
        assert add_index.add(add_index.new_entry(add_meta(rows, alpha=2), FAKE_VERSIONS, 1), b"library")
    mm_index = OpIndex("aten", "mm.default", "cpu", cache_dir=isolated_cache_dir)
    assert mm_index.add(mm_index.new_entry(add_meta(5), FAKE_VERSIONS, 1), b"lib")
    return isolated_cache_dir


def test_eager_ls_lists_signatures_and_why_an_entry_is_not_usable(fake_index):
    data = invoke_json("eager", "ls")
    assert data["total_entries"] == 3 and data["total_bytes"] == 2 * len(b"library") + len(b"lib")
    add_rows = [row for row in data["entries"] if row["op"] == "aten::add.Tensor"]
    assert sorted(row["signature"] for row in add_rows) == [
        "self=float32[2,4], other=float32[2,4], alpha=2", "self=float32[3,4], other=float32[3,4], alpha=2"]
    assert all(row["usable"] is False and "built for aotcache" in row["problem"] for row in add_rows)
    text = invoke("eager", "ls").stdout
    assert "aten::add.Tensor" in text and "aten::mm.default" in text and "3 precompiled kernels" in text
    assert [row["op"] for row in invoke_json("eager", "ls", "--op", "aten::mm")["entries"]] == ["aten::mm.default"]
    assert invoke("eager", "ls", "--namespace", "other").stdout.startswith("No precompiled kernels")


def test_eager_ls_bad_op_name_is_bad_input(fake_index):
    result = invoke("eager", "ls", "--op", "::")
    assert result.exit_code == 2 and result.stderr.startswith("aotcache: error:") and "op name" in result.stderr


def test_eager_clear_asks_unless_yes_and_honours_filters(fake_index):
    result = invoke("eager", "clear")  # CliRunner's stdin is not a terminal
    assert result.exit_code == 1 and "refusing to clear 3 precompiled kernels" in result.stderr
    assert invoke_json("eager", "ls")["total_entries"] == 3
    assert invoke_json("eager", "clear", "--op", "aten::add.Tensor", "--yes") == {"removed": 2}
    assert [row["op"] for row in invoke_json("eager", "ls")["entries"]] == ["aten::mm.default"]
    assert "Removed 1 precompiled kernels (every op)." in invoke("eager", "clear", "-y").stdout
    assert invoke_json("eager", "ls")["entries"] == []
    assert invoke("eager", "clear").stdout.startswith("Nothing to clear")


def test_eager_precompile_rejects_a_bad_spec_without_compiling(isolated_cache_dir, tmp_path):
    result = invoke("eager", "precompile", '{"op": "aten::add.Tensor", "args": [{"tensor": "big"}]}')
    assert result.exit_code == 2 and "'tensor' must be a list of sizes" in result.stderr
    result = invoke("eager", "precompile", str(tmp_path / "missing.json"))
    assert result.exit_code == 2 and "cannot read precompile spec file" in result.stderr
    result = invoke("eager", "precompile", '{"op": "aten::no_such_op"}')
    assert result.exit_code == 2 and "does not name an op overload" in result.stderr
    assert invoke_json("eager", "ls")["entries"] == []


@pytest.mark.slow
def test_eager_precompile_one_op_then_ls_shows_it_usable(isolated_cache_dir, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([{"op": "aten::add.Tensor", "args": [{"tensor": [4]}, {"tensor": [4]}]}]))
    data = invoke_json("eager", "precompile", str(spec))  # one real AOTInductor compile
    assert data["compiled"] == 1 and data["results"][0]["op"] == "aten::add.Tensor"
    [row] = invoke_json("eager", "ls")["entries"]
    assert row["usable"] is True and row["signature"] == "self=float32[4], other=float32[4], alpha=1"
    assert row["size"] > 0
    assert invoke_json("eager", "precompile", str(spec))["existing"] == 1
