"""The compiled-graph cache on the command line: graphs / show / explain / export / import / stats.

The cache is filled by real ``aot_function(..., "nop")`` calls in this process (the nop compiler is fast);
fresh processes check what matters across processes: a warm hit after export -> clear -> import, and that
the listing commands never import torch.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from click.testing import CliRunner

from aotcache.aot import aot_function
from aotcache.autograd_cache.cache import AOTAutogradCache
from aotcache.autograd_cache.entry import pack_entry, read_manifest, unpack_entry
from aotcache.cli import cli
from aotcache.cli.bundles import INDEX_NAME, write_bundle
from aotcache.cli.graph_entries import GraphEntry, installed_torch_version, list_graph_entries, parse_manifest
from aotcache.store.factory import open_tiers
from aotcache.store.journal import default_journal
from tests.conftest import REPO_ROOT, run_python

# A training step in a fresh process; prints the default cache's counters as JSON on the last line.
WARM_STEP = """
import json, torch
from aotcache.aot import aot_function
from aotcache.autograd_cache.cache import default_cache

def body(x, w):
    return (x @ w).sin().sum()

x, w = torch.ones(4, 3), torch.ones(3, 5, requires_grad=True)
aot_function(body, "nop")(x, w).backward()
print(json.dumps({**default_cache().stats(), "fingerprint_hit": default_cache().counters.get("fingerprint_hit", 0)}))
"""


def body(x, w):
    return (x @ w).sin().sum()


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def invoke_json(*args: str):
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def populated(isolated_cache_dir):
    """Two entries of ``body``: float32 (first) and float64 (a deliberate miss on the inputs part)."""
    x, w = torch.ones(4, 3), torch.ones(3, 5, requires_grad=True)
    aot_function(body, "nop")(x, w).backward()
    aot_function(body, "nop")(x.double(), w.detach().double().requires_grad_())
    entries = list_graph_entries()
    assert len(entries) == 2
    default_journal().flush()
    float32 = next(e for e in entries if e.manifest["key"]["parts"]["inputs"]["detail"][0]["dtype"] == "float32")
    float64 = next(e for e in entries if e is not float32)
    return {"float32": float32, "float64": float64}


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The command in a real process (``python -m aotcache.cli``), with this test's environment."""
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "aotcache.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


# ----------------------------------------------------------------------------------------------------
# graphs / show / explain
# ----------------------------------------------------------------------------------------------------


def test_graphs_lists_entries_with_name_kind_and_compiler(populated):
    data = invoke_json("graphs")
    assert data["total_entries"] == 2 and data["namespace"] == "aot"
    for row in data["entries"]:
        assert row["compiler"] == "nop" and row["name"] == "body" and row["kind"] == "training"
        assert row["tiers"] == ["disk"] and row["size"] > 0 and row["created"]
    table = invoke("graphs").stdout
    assert "nop" in table and "body" in table and populated["float32"].digest[:12] in table
    assert "(torch " not in table  # built by this torch: not flagged as another torch's entry
    assert invoke("graphs", "-n", "other").stdout.startswith("No compiled-graph entries")


def test_installed_torch_version_is_torch_dunder_version_without_importing_it():
    # NOTE [torch's local version tag]: PyPI's CUDA wheels say 2.14.1 in their metadata, 2.14.1+cu130 in torch
    assert installed_torch_version() == torch.__version__
    proc = run_python("import sys\nfrom aotcache.cli.graph_entries import installed_torch_version\n"
                      "print(installed_torch_version(), 'torch' in sys.modules)")
    assert proc.stdout.split() == [torch.__version__, "False"]


def test_listing_does_not_count_as_use(populated):
    for _ in range(2):
        rows = invoke_json("graphs", "--sort", "key")["entries"]
    assert [row["last_used"] for row in rows] == [None, None], "reading manifests must not move LRU recency"
    assert "never" in invoke("graphs").stdout


def test_manifest_reader_agrees_with_the_entry_module(populated):
    cache = AOTAutogradCache(open_tiers("disk", namespace="aot"), journal=False)
    for entry in populated.values():
        blob = cache.export_entry(entry.digest, entry.slot)
        assert parse_manifest(blob) == read_manifest(blob) == entry.manifest


def test_show_by_prefix_shows_key_parts_graph_and_artifacts(populated):
    entry = populated["float32"]
    result = invoke("show", entry.digest[:6])
    assert result.exit_code == 0, result.stderr
    for text in ("Key parts", "inputs", "graph", "system", "float32[4,3], float32[3,5] grad",
                 "aten.mm.default", "Artifacts", "forward", "backward", "nop"):
        assert text in result.stdout, text
    [shown] = invoke_json("show", entry.digest[:6])["entries"]
    assert shown["digest"] == entry.digest and set(shown["manifest"]["key"]["parts"]) >= {"inputs", "graph"}
    assert shown["manifest"]["artifact_bytes"]["forward"] > 0


def test_show_errors_are_one_line_with_consistent_exit_codes(populated):
    missing = "0" * 64 if not any(e.digest.startswith("0" * 64) for e in populated.values()) else "f" * 64
    result = invoke("show", missing)
    assert result.exit_code == 1 and result.stderr.startswith("aotcache: error: no compiled-graph entry matches")
    result = invoke("show", "not-hex")
    assert result.exit_code == 2 and "is not a key" in result.stderr
    # a one-character prefix shared by both digests, or else the empty prefix: ambiguous is bad input
    first, second = populated["float32"].digest, populated["float64"].digest
    shared = first[0] if first[0] == second[0] else ""
    result = invoke("show", shared)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


def test_explain_last_miss_names_the_differing_part(populated):
    data = invoke_json("explain")
    assert data["mode"] == "last_miss" and data["missed"] == populated["float64"].digest
    assert data["nearest"] == populated["float32"].ref
    assert data["differing_parts"] == ["inputs"]
    assert "input metadata differs: arg 0 dtype float32 vs float64" in data["differences"]
    text = invoke("explain").stdout
    assert "Differing key parts: inputs" in text and "dtype float32 vs float64" in text


def test_explain_two_keys_and_one_key(populated):
    first, second = populated["float32"], populated["float64"]
    data = invoke_json("explain", first.digest[:10], second.digest[:10])
    assert data["differing_parts"] == ["inputs"] and data["first"] == first.ref
    assert any("dtype float32 vs float64" in line for line in data["differences"])
    assert invoke_json("explain", first.digest[:10], first.digest[:10])["differences"] == []
    assert invoke_json("explain", second.digest[:10])["differing_parts"] == ["inputs"]
    assert invoke("explain", "a", "b", "c").exit_code == 2


def test_explain_without_a_recorded_miss_says_so(isolated_cache_dir):
    result = invoke("explain")
    assert result.exit_code == 1 and "no compiled-graph cache miss is recorded yet" in result.stderr


# ----------------------------------------------------------------------------------------------------
# stats
# ----------------------------------------------------------------------------------------------------


def test_stats_shows_hits_misses_time_saved_and_bypass_reasons(populated):
    library = torch.library.Library("aotcache_test_cli_opaque", "DEF")
    library.define("twice(Tensor x) -> Tensor")
    library.impl("twice", lambda x: x * 2, "CPU")
    library.impl("twice", lambda x: torch.empty_like(x), "Meta")

    def opaque(x):
        return torch.ops.aotcache_test_cli_opaque.twice(x).sin()

    aot_function(opaque, "nop")(torch.ones(3))
    aot_function(body, "nop")(torch.ones(4, 3), torch.ones(3, 5, requires_grad=True))  # memory-tier hit
    default_journal().flush()
    section = invoke_json("stats")["autograd"]
    assert section["counters"]["miss"] == 2 and section["counters"]["hit"] == 1
    assert section["counters"]["bypass"] == 1 and section["hit_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert section["bypass_reasons"] == {"opaque custom op: aotcache_test_cli_opaque::twice": 1}
    assert section["time_saved_s"] > 0
    text = invoke("stats").stdout
    assert "Compiled-graph cache" in text and "bypass reasons" in text and "time saved by hits" in text
    assert "opaque custom op: aotcache_test_cli_opaque::twice" in text


# ----------------------------------------------------------------------------------------------------
# export / import
# ----------------------------------------------------------------------------------------------------


def test_export_clear_import_round_trip_gives_a_warm_hit_in_a_fresh_process(isolated_cache_dir, tmp_path):
    # NOTE: cold and warm runs are both fresh processes a few seconds apart: the key holds a digest of
    # aotcache's own sources, which a long-lived test process computes once (and others edit this checkout).
    cold = json.loads(run_python(WARM_STEP).stdout.strip().splitlines()[-1])
    assert cold["compile"] == 1 and cold["saved"] == 1
    [original] = invoke_json("graphs")["entries"]
    bundle = tmp_path / "graphs.tar"
    run_cli("export", str(bundle))  # a real process
    with tarfile.open(bundle) as archive:
        names = archive.getnames()
        index = json.loads(archive.extractfile(INDEX_NAME).read())
    assert names[0] == INDEX_NAME and [record["digest"] for record in index["entries"]] == [original["digest"]]
    # Issue 13 item 7: the fingerprint record travels with its entry, so the first run after import does not trace
    [alias] = index["aliases"]
    from aotcache.autograd_cache.fingerprint_cache import ALIAS_PREFIX
    from aotcache.cli.graph_entries import ALIAS_KEY_PREFIX

    assert ALIAS_KEY_PREFIX == ALIAS_PREFIX  # the torch-free listing's copy of the prefix
    assert f"aliases/{alias['fingerprint']}.json" in names
    assert invoke("clear", "-n", "aot", "--yes").exit_code == 0
    assert invoke_json("graphs")["total_entries"] == 0
    data = json.loads(run_cli("import", str(bundle), "--json").stdout)
    assert (data["imported"], data["skipped"], data["rejected"], data["other_versions"]) == (1, 0, 0, 0)
    assert data["aliases"] == 1 and data["aliases_rejected"] == []
    assert [e["ref"] for e in invoke_json("graphs")["entries"]] == [original["ref"]]
    warm = json.loads(run_python(WARM_STEP).stdout.strip().splitlines()[-1])
    assert warm["hit"] == 1 and warm["compile"] == 0 and warm["miss"] == 0
    assert warm["fingerprint_hit"] == 1, "the first run after the import traced (no fingerprint record)"
    again = invoke("import", str(bundle))
    assert again.exit_code == 0 and "Imported 0, skipped 1 (already present), rejected 0" in again.stdout


def test_export_selects_by_key_prefix_and_refuses_to_overwrite(populated, tmp_path):
    bundle = tmp_path / "one.tar"
    data = invoke_json("export", str(bundle), "--key", populated["float64"].digest[:8])
    assert data["exported"] == [populated["float64"].ref]
    result = invoke("export", str(bundle))
    assert result.exit_code == 1 and "pass --force" in result.stderr
    assert invoke_json("export", str(bundle), "--force")["entries"] == 2
    result = invoke("export", str(tmp_path / "none.tar"), "--key", "ffffffffffffffffff")
    if result.exit_code != 1:  # the 18-digit prefix matched by chance: astronomically unlikely
        pytest.fail(result.stdout)
    assert not (tmp_path / "none.tar").exists()


def _rewrite_member(bundle, target, mutate) -> None:
    """Rewrite the bundle with ``mutate(name, data) -> data`` applied to the member ``target``."""
    with tarfile.open(bundle) as archive:
        members = [(info, archive.extractfile(info).read()) for info in archive.getmembers()]
    with tarfile.open(bundle, "w") as archive:
        for info, data in members:
            data = mutate(info.name, data) if info.name == target else data
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_tampered_member_is_rejected_and_the_others_imported(populated, tmp_path):
    bundle = tmp_path / "graphs.tar"
    invoke_json("export", str(bundle))
    with tarfile.open(bundle) as archive:
        index = json.loads(archive.extractfile(INDEX_NAME).read())
    victim = index["entries"][0]
    _rewrite_member(bundle, victim["file"], lambda _, data: data[:-1] + bytes([data[-1] ^ 0xFF]))
    invoke("clear", "-n", "aot", "--yes")
    result = invoke("import", str(bundle))
    assert result.exit_code == 1
    assert "Imported 1, skipped 0 (already present), rejected 1" in result.stdout
    assert f"rejected {victim['digest'][:12]}/0: member {victim['file']} does not match its sha256" in result.stdout
    assert result.stderr.strip() == "aotcache: error: 1 of 2 bundle entries rejected (see above)"
    assert [e["digest"] for e in invoke_json("graphs")["entries"]] != [victim["digest"]]


def test_tampered_container_with_a_recomputed_index_is_still_rejected(populated, tmp_path):
    import hashlib

    bundle = tmp_path / "graphs.tar"
    invoke_json("export", str(bundle))
    with tarfile.open(bundle) as archive:
        index = json.loads(archive.extractfile(INDEX_NAME).read())
        victim = index["entries"][0]
        blob = bytearray(archive.extractfile(victim["file"]).read())
    blob[-3] ^= 0x01  # inside the last artifact: only the container's own blob sha256 can tell
    victim["sha256"] = hashlib.sha256(bytes(blob)).hexdigest()
    _rewrite_member(bundle, victim["file"], lambda _, data: bytes(blob))
    _rewrite_member(bundle, INDEX_NAME, lambda _, data: json.dumps(index).encode())
    invoke("clear", "-n", "aot", "--yes")
    data = json.loads(invoke("import", str(bundle), "--json").stdout)
    assert data["rejected"] == 1 and data["imported"] == 1
    assert "does not match its sha256" in data["entries"]["rejected"][0]["reason"]


def test_truncated_and_foreign_files_are_rejected_with_one_line(populated, tmp_path):
    bundle = tmp_path / "graphs.tar"
    invoke_json("export", str(bundle))
    size = bundle.stat().st_size
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(bundle.read_bytes()[: size // 2])
    invoke("clear", "-n", "aot", "--yes")
    result = invoke("import", str(truncated))
    assert result.exit_code == 1 and result.stderr.startswith("aotcache: error:")
    assert "truncated" in result.stdout + result.stderr
    not_a_bundle = tmp_path / "notes.txt"
    not_a_bundle.write_text("hello")
    result = invoke("import", str(not_a_bundle))
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "is not a readable aotcache bundle" in result.stderr
    result = invoke("import", str(tmp_path / "missing.tar"))
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_entry_of_another_torch_is_imported_and_reported(populated, tmp_path):
    cache = AOTAutogradCache(open_tiers("disk", namespace="aot"), journal=False)
    source = populated["float32"]
    entry = unpack_entry(cache.export_entry(source.digest, source.slot))
    entry.versions = {**entry.versions, "torch": "2.0.0", "torch_git": "0" * 40}
    blob = pack_entry(entry)
    foreign = GraphEntry(source.digest, 0, ["disk"], len(blob), entry.created, 0.0, read_manifest(blob))
    bundle = tmp_path / "foreign.tar"
    write_bundle(bundle, "aot", [(foreign, blob)])
    invoke("clear", "-n", "aot", "--yes")
    result = invoke("import", str(bundle))
    assert result.exit_code == 0, result.stderr
    assert "Imported 1" in result.stdout and "built with torch 2.0.0" in result.stdout
    [listed] = invoke_json("graphs")["entries"]
    assert listed["torch"] == "2.0.0" and "2.0.0" in invoke("graphs").stdout


def test_signed_bundles_with_a_secret(populated, tmp_path, monkeypatch):
    bundle = tmp_path / "unsigned.tar"
    invoke_json("export", str(bundle))
    monkeypatch.setenv("AOTCACHE_SECRET", "s3cret")
    result = invoke("import", str(bundle))
    assert result.exit_code == 1 and "the bundle is not signed" in result.stderr
    # the disk entries written without a secret are unreadable with one: start from a fresh cache dir
    monkeypatch.setenv("AOTCACHE_CACHE_DIR", str(tmp_path / "signed-cache"))
    aot_function(body, "nop")(torch.ones(4, 3), torch.ones(3, 5, requires_grad=True))
    signed = tmp_path / "signed.tar"
    assert invoke_json("export", str(signed))["signed"] is True
    with tarfile.open(signed) as archive:
        index = json.loads(archive.extractfile(INDEX_NAME).read())
    index["entries"][0]["name"] = "renamed"
    _rewrite_member(signed, INDEX_NAME, lambda _, data: json.dumps(index).encode())
    result = invoke("import", str(signed))
    assert result.exit_code == 1 and "signature does not match" in result.stderr


def test_listing_commands_do_not_import_torch(populated, tmp_path):
    first = populated["float32"].digest
    code = f"""
import sys
from aotcache.cli import main
for args in (["graphs"], ["show", "{first[:8]}"], ["stats"], ["export", "{tmp_path / 'b.tar'}"]):
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), (args, exc.code)
    assert "torch" not in sys.modules, args
print("torch-free")
"""
    assert run_python(code).stdout.strip().endswith("torch-free")


# ----------------------------------------------------------------------------------------------------
# prune and fingerprint records
# ----------------------------------------------------------------------------------------------------


def test_prune_keeps_the_fingerprint_records_of_the_entries_it_keeps(isolated_cache_dir):
    """Issue 13 item 7: a warm start reads a model's fingerprint record just before its entry, so the record
    was the older of the two and `prune` could remove it while keeping the entry (the next run traced again)."""
    from aotcache.cli.graph_entries import ALIAS_KEY_PREFIX, parse_store_key
    from aotcache.store.disk import OnDiskCache
    from tests.store.test_disk import age_entries

    def model(depth):
        def body(x, w):
            y = x @ w
            for _ in range(depth):
                y = y.sin()
            return y.sum()
        return body

    def run(depth):
        cache = AOTAutogradCache(open_tiers("disk", namespace="aot"), journal=False)
        aot_function(model(depth), "nop", cache=cache)(torch.ones(4, 3), torch.ones(3, 5, requires_grad=True))
        return cache.counters

    for depth in (1, 2, 3):
        assert run(depth)["saved"] == 1
    disk = OnDiskCache("aot", max_bytes=0)
    age_entries(disk, 60)
    assert run(2)["fingerprint_hit"] == 1  # warm starts: a record read, then its entry; model 2, then model 1
    time.sleep(0.01)
    assert run(1)["fingerprint_hit"] == 1
    listed = sorted(disk.entries(), key=lambda info: info.last_access)
    assert [info.key.startswith(ALIAS_KEY_PREFIX) for info in listed[-4:]] == [True, False, True, False]
    oldest_record = listed[-4]  # model 2's: the least recently used of the four just read
    bound = sum(info.size for info in listed[-4:]) - oldest_record.size
    data = invoke_json("prune", "--max-bytes", str(bound))
    assert data["bytes_after"] <= bound

    def record_target(info):
        return json.loads(disk.get(info.key))["key"]

    kept = list(disk.entries())
    kept_keys = {parse_store_key(info.key)[0] for info in kept if not info.key.startswith(ALIAS_KEY_PREFIX)}
    kept_targets = {record_target(info) for info in kept if info.key.startswith(ALIAS_KEY_PREFIX)}
    assert kept_keys and kept_keys == kept_targets, "an entry kept without its fingerprint record, or a record alone"
    assert run(1)["fingerprint_hit"] == 1  # model 1 still starts warm after the prune


# ----------------------------------------------------------------------------------------------------
# explain: the same function's entries only, and a suggestion (issue 13 item 8)
# ----------------------------------------------------------------------------------------------------


def test_explain_after_a_new_model_does_not_diff_against_another_model(isolated_cache_dir):
    def first_model(x, w):
        return (x @ w).sin().sum()

    def second_model(x, w):
        return (x @ w).relu().mean()

    aot_function(first_model, "nop")(torch.ones(4, 3), torch.ones(3, 5, requires_grad=True))
    aot_function(second_model, "nop")(torch.ones(4, 3), torch.ones(3, 5, requires_grad=True))
    data = invoke_json("explain")
    assert data["name"].endswith("second_model") and data["nearest"] is None and data["differences"] == []
    assert "no earlier entry for" in data["note"] and "second_model" in data["note"]
    text = invoke("explain").stdout
    assert "first_model" not in text and len(text.splitlines()) <= 3

    aot_function(second_model, "nop")(torch.ones(6, 3), torch.ones(3, 5, requires_grad=True))  # another size
    data = invoke_json("explain")
    assert data["nearest_name"].endswith("second_model") and "inputs" in data["differing_parts"]
    assert "only input sizes differ" in data["suggestion"] and "dynamic=True" in data["suggestion"]
    assert "Suggestion: only input sizes differ" in invoke("explain").stdout


def test_suggestions_from_the_differing_parts():
    from aotcache.cli.graph_entries import suggest_fix

    def key(**parts):
        return {"parts": {name: {"digest": str(hash(repr(detail))), "detail": detail}
                          for name, detail in parts.items()}}

    tensor = {"kind": "tensor", "dtype": "float32", "shape": [4, 3], "stride": [3, 1], "storage_offset": 0}
    longer = {**tensor, "shape": [6, 3]}
    half = {**tensor, "dtype": "float16"}
    base = dict(graph={"nodes": 3}, config={"v": 1}, system={"torch": "2.13"})
    assert "dynamic=True" in suggest_fix(key(inputs=[tensor], **base), key(inputs=[longer], **{**base, "graph": {"nodes": 4}}))
    assert suggest_fix(key(inputs=[tensor], **base), key(inputs=[half], **base)) is None  # a dtype: no fix
    settings = suggest_fix(key(inputs=[tensor], **base), key(inputs=[tensor], **{**base, "system": {"torch": "2.14"}}))
    assert "only settings or versions differ (system)" in settings
    assert suggest_fix(key(inputs=[tensor], **base), key(inputs=[tensor], **base)) is None
