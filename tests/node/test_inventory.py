"""GGUF inventory: the real SmolLM2 file, broken files, rescans and the sha256 cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_agent.inventory import Inventory, ModelFile, quantization_name, read_model_file


def write_gguf(path: Path, *, block_count: int | None = 2, arch: str = "llama") -> Path:
    """A tiny valid GGUF written with gguf's own writer."""
    w = gguf.GGUFWriter(str(path), arch)
    if block_count is not None:
        w.add_block_count(block_count)
    w.add_context_length(4096)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_key_length(4)
    w.add_value_length(4)
    w.add_token_list(["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_real_model_metadata(model_path: Path) -> None:
    m = read_model_file(model_path)
    assert m.usable, m.reason
    assert m.name == "SmolLM2-135M-Instruct.Q4_1"
    assert m.architecture == "llama"
    assert m.quantization == "Q4_1"
    assert m.parameter_count == 134_515_008  # "135M"
    assert (m.context_length, m.block_count, m.embedding_length) == (8192, 30, 576)
    assert (m.head_count, m.head_count_kv) == (9, 3)
    assert m.vocab_size == 49152
    assert m.size_bytes == model_path.stat().st_size
    assert m.tensor_bytes is not None
    assert m.tensor_bytes < m.size_bytes
    assert 4.5 < m.bits_per_weight < 6.5  # type: ignore[operator]


def test_fast_reader_agrees_with_the_stock_gguf_reader(model_path: Path) -> None:
    stock = gguf.GGUFReader(model_path)
    m = read_model_file(model_path)
    assert m.parameter_count == sum(int(t.n_elements) for t in stock.tensors)
    assert m.tensor_bytes == sum(int(t.n_bytes) for t in stock.tensors)
    assert m.context_length == stock.fields["llama.context_length"].contents()
    assert m.vocab_size == len(stock.fields["tokenizer.ggml.tokens"].contents())


def test_reading_the_real_model_metadata_is_fast(model_path: Path) -> None:
    read_model_file(model_path)
    t0 = time.perf_counter()
    for _ in range(5):
        read_model_file(model_path)
    per_file = (time.perf_counter() - t0) / 5
    assert per_file < 0.5, f"{per_file * 1000:.0f} ms per 98 MB GGUF"


def test_truncated_real_model_is_unusable_with_a_reason(tmp_path: Path, model_path: Path) -> None:
    bad = tmp_path / "truncated.gguf"
    with open(model_path, "rb") as f:
        bad.write_bytes(f.read(1000))
    m = read_model_file(bad)
    assert not m.usable
    assert m.reason is not None
    assert m.reason.startswith("unreadable GGUF")


def test_random_bytes_are_unusable_and_do_not_stop_the_scan(
    tmp_path: Path, model_path: Path
) -> None:
    (tmp_path / "x.gguf").write_bytes(os.urandom(4096))
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    os.symlink(model_path, tmp_path / "sub" / "smol.gguf")
    by_name = {m.name: m for m in Inventory([tmp_path]).scan()}
    assert set(by_name) == {"x", "empty", "smol"}
    assert not by_name["x"].usable
    assert "magic" in (by_name["x"].reason or "")
    assert not by_name["empty"].usable
    assert by_name["smol"].usable


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(min_value=0, max_value=2_100_000))
def test_a_gguf_cut_anywhere_in_its_header_is_unusable(
    cut: int, tmp_path: Path, model_path: Path
) -> None:
    bad = tmp_path / "cut.gguf"
    with open(model_path, "rb") as f:
        bad.write_bytes(f.read(cut))
    m = read_model_file(bad)
    assert not m.usable
    assert m.reason


def test_a_gguf_missing_its_last_byte_is_truncated(tmp_path: Path, model_path: Path) -> None:
    bad = tmp_path / "short.gguf"
    shutil.copyfile(model_path, bad)
    with open(bad, "r+b") as f:
        f.truncate(model_path.stat().st_size - 1)
    m = read_model_file(bad)
    assert not m.usable
    assert "truncated" in (m.reason or "")


def test_small_written_gguf_reports_key_and_value_lengths(tmp_path: Path) -> None:
    m = read_model_file(write_gguf(tmp_path / "tiny.gguf"))
    assert m.usable, m.reason
    assert (m.key_length, m.value_length, m.head_count_kv) == (4, 4, 1)
    assert m.vocab_size == 3
    assert m.parameter_count == 3 * 8 + 8 * 8
    assert m.quantization == "F16"  # no general.file_type: the dominant non-F32 type


def test_gguf_without_block_count_is_unusable(tmp_path: Path) -> None:
    m = read_model_file(write_gguf(tmp_path / "noblocks.gguf", block_count=None))
    assert not m.usable
    assert m.reason == "no llama.block_count in the GGUF metadata"


def test_quantization_name_from_file_type_or_dominant_tensor_type() -> None:
    assert quantization_name(3, Counter()) == "Q4_1"
    assert quantization_name(15, Counter()) == "Q4_K_M"
    by_type = Counter({"F32": 10_000, "Q8_0": 500, "Q4_K": 4000})
    assert quantization_name(None, by_type) == "Q4_K"
    assert quantization_name(99999, by_type) == "Q4_K"
    assert quantization_name(None, Counter({"F32": 1})) == "F32"
    assert quantization_name(None, Counter()) is None


def test_scan_is_recursive_and_ignores_other_files(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    write_gguf(deep / "one.gguf")
    write_gguf(tmp_path / "TWO.GGUF")
    (tmp_path / "notes.txt").write_text("hi")
    names = [m.name for m in Inventory([tmp_path, tmp_path / "nonexistent"]).scan()]
    assert sorted(names) == ["TWO", "one"]


def test_changed_tracks_added_rewritten_and_removed_files(tmp_path: Path) -> None:
    inv = Inventory([tmp_path])
    assert inv.changed()  # never scanned
    first = inv.scan()
    assert first == []
    assert not inv.changed()
    path = write_gguf(tmp_path / "m.gguf")
    assert inv.changed()
    (kept,) = inv.scan()
    assert not inv.changed()
    assert inv.scan()[0] is kept  # unchanged files are not parsed again
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert inv.changed()
    assert inv.scan()[0] is not kept
    path.unlink()
    assert inv.changed()
    assert inv.scan() == []


def test_sha256_is_lazy_correct_and_cached(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    cache = tmp_path / "cache"
    (m,) = Inventory([tmp_path]).scan()
    assert not (cache / "sha256.json").exists()  # the scan hashes nothing
    digest = m.sha256(cache)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    entries = json.loads((cache / "sha256.json").read_text())
    assert entries[str(path)]["sha256"] == digest
    entries[str(path)]["sha256"] = "cached"
    (cache / "sha256.json").write_text(json.dumps(entries))
    assert m.sha256(cache) == "cached"  # served from the cache, the file is not read
    moved = ModelFile(**{**m.to_dict(), "mtime_ns": m.mtime_ns + 1})
    assert moved.sha256(cache) == digest  # another mtime: computed again


def test_corrupt_sha256_cache_is_ignored(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "sha256.json").write_text("{not json")
    assert read_model_file(path).sha256(tmp_path / "cache") == hashlib.sha256(
        path.read_bytes()
    ).hexdigest()


@pytest.mark.parametrize("field", ["path", "name", "usable", "quantization"])
def test_model_file_to_dict_is_plain_data(field: str, model_path: Path) -> None:
    d = read_model_file(model_path).to_dict()
    assert json.loads(json.dumps(d))[field] == d[field]
