"""The header reader against real GGUF headers written with the `gguf` package."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import gguf
import numpy as np
import pytest

from lls.gguf_header import TruncatedHeader, read_summary, read_summary_from_bytes

Q = gguf.GGMLQuantizationType


def nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def write_header(
    path: Path,
    arch: str,
    setup: Callable[[gguf.GGUFWriter], None],
    tensors: Sequence[tuple[str, tuple[int, ...], Q]] = (),
    endian: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE,
) -> int:
    """Write only the header (metadata and tensor infos, no tensor data); return tensor bytes."""
    w = gguf.GGUFWriter(str(path), arch, endianess=endian)
    setup(w)
    for name, shape, qtype in tensors:
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, qtype), raw_dtype=qtype)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return sum(nbytes(s, q) for _, s, q in tensors)


def layer_tensors(n_layers: int, n_embd: int, n_kv: int, n_ff: int, q: Q) -> list:
    out = [("token_embd.weight", (1000, n_embd), Q.Q6_K), ("output_norm.weight", (n_embd,), Q.F32)]
    for i in range(n_layers):
        p = f"blk.{i}."
        out += [
            (p + "attn_q.weight", (n_embd, n_embd), q),
            (p + "attn_k.weight", (n_kv, n_embd), q),
            (p + "attn_v.weight", (n_kv, n_embd), q),
            (p + "ffn_up.weight", (n_ff, n_embd), q),
            (p + "attn_norm.weight", (n_embd,), Q.F32),
        ]
    return out


def llama_gqa(w: gguf.GGUFWriter) -> None:
    w.add_block_count(32)
    w.add_context_length(8192)
    w.add_embedding_length(4096)
    w.add_head_count(32)
    w.add_head_count_kv(8)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(1000)])


def test_llama_with_grouped_query_attention(tmp_path: Path) -> None:
    path = tmp_path / "llama.gguf"
    expected_bytes = write_header(
        path, "llama", llama_gqa, layer_tensors(32, 4096, 1024, 14336, Q.Q4_K)
    )
    s = read_summary(path)
    assert (s.architecture, s.n_layers, s.n_ctx_train, s.n_embd) == ("llama", 32, 8192, 4096)
    assert (s.n_head, s.n_head_kv, s.head_dim_k, s.head_dim_v) == (32, 8, 128, 128)
    assert s.n_vocab == 1000
    assert s.file_type == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert s.tensor_bytes == expected_bytes
    # hand check of one Q4_K matrix: 4096 x 4096 / 256 per block x 144 bytes
    assert nbytes((4096, 4096), Q.Q4_K) == 9_437_184


def test_qwen2_keys_use_their_architecture_prefix(tmp_path: Path) -> None:
    def qwen2(w: gguf.GGUFWriter) -> None:
        w.add_block_count(28)
        w.add_context_length(32768)
        w.add_embedding_length(3584)
        w.add_head_count(28)
        w.add_head_count_kv(4)
        w.add_uint32("llama.block_count", 99)  # another arch's key must not leak in

    path = tmp_path / "qwen2.gguf"
    write_header(path, "qwen2", qwen2, [("token_embd.weight", (152064, 3584), Q.Q8_0)])
    s = read_summary(path)
    assert (s.architecture, s.n_layers, s.n_ctx_train) == ("qwen2", 28, 32768)
    assert (s.n_head_kv, s.head_dim_k, s.head_dim_v) == (4, 128, 128)
    assert s.tensor_bytes == 152064 * 3584 // 32 * 34
    assert s.n_vocab == 0  # no token list and no vocab_size


def test_explicit_key_and_value_lengths_win_over_embd_by_heads(tmp_path: Path) -> None:
    def gemma2(w: gguf.GGUFWriter) -> None:
        w.add_block_count(26)
        w.add_context_length(8192)
        w.add_embedding_length(2304)
        w.add_head_count(8)
        w.add_head_count_kv(4)
        w.add_key_length(256)
        w.add_value_length(128)
        w.add_vocab_size(256000)

    path = tmp_path / "gemma2.gguf"
    write_header(path, "gemma2", gemma2)
    s = read_summary(path)
    assert 2304 // 8 == 288  # what the default would have been
    assert (s.head_dim_k, s.head_dim_v) == (256, 128)
    assert s.n_vocab == 256000  # from <arch>.vocab_size when there is no token list
    assert s.tensor_bytes == 0


def test_per_layer_kv_head_array_gives_the_maximum_and_the_sum(tmp_path: Path) -> None:
    def openelm(w: gguf.GGUFWriter) -> None:
        w.add_block_count(4)
        w.add_context_length(2048)
        w.add_embedding_length(1280)
        w.add_head_count([12, 16, 20, 20])
        w.add_head_count_kv([3, 4, 5, 5])
        w.add_key_length(64)
        w.add_value_length(64)

    path = tmp_path / "openelm.gguf"
    write_header(path, "openelm", openelm)
    s = read_summary(path)
    assert (s.n_head, s.n_head_kv, s.head_dim_k) == (20, 5, 64)
    assert s.kv_heads_total == 3 + 4 + 5 + 5  # the KV cache is sized per layer


def test_uniform_kv_heads_leave_the_total_to_layers_times_heads(tmp_path: Path) -> None:
    path = tmp_path / "llama.gguf"
    write_header(path, "llama", llama_gqa)
    assert read_summary(path).kv_heads_total == 0


def test_parameters_are_counted_from_the_tensor_shapes(tmp_path: Path) -> None:
    path = tmp_path / "llama.gguf"
    write_header(path, "llama", llama_gqa, layer_tensors(2, 64, 16, 128, Q.F16))
    per_layer = 64 * 64 + 2 * 16 * 64 + 128 * 64 + 64
    assert read_summary(path).n_params == 1000 * 64 + 64 + 2 * per_layer


def test_first_part_of_a_split_gguf_leaves_weights_to_the_file_sizes(tmp_path: Path) -> None:
    def split(w: gguf.GGUFWriter) -> None:
        llama_gqa(w)
        w.add_uint16("split.no", 0)
        w.add_uint16("split.count", 3)

    path = tmp_path / "big-00001-of-00003.gguf"
    write_header(path, "llama", split, layer_tensors(2, 4096, 1024, 14336, Q.Q4_K))
    s = read_summary(path)  # this part lists only its own tensors
    assert (s.tensor_bytes, s.n_params, s.n_layers) == (0, 0, 32)


def test_kv_heads_default_to_attention_heads(tmp_path: Path) -> None:
    def mha(w: gguf.GGUFWriter) -> None:
        w.add_block_count(2)
        w.add_embedding_length(512)
        w.add_head_count(8)

    path = tmp_path / "mha.gguf"
    write_header(path, "gpt2", mha)
    s = read_summary(path)
    assert (s.n_head_kv, s.head_dim_k, s.n_ctx_train) == (8, 64, 0)


def test_big_endian_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    expected = write_header(
        path,
        "llama",
        llama_gqa,
        [("output.weight", (1000, 4096), Q.Q6_K)],
        endian=gguf.GGUFEndian.BIG,
    )
    s = read_summary(path)
    assert (s.n_layers, s.n_head_kv, s.n_vocab, s.tensor_bytes) == (32, 8, 1000, expected)


def test_tiny_model_matches_gguf_reader(tmp_path: Path) -> None:
    import make_tiny_gguf

    path = tmp_path / "tiny.gguf"
    make_tiny_gguf.write(path, seed=3)
    s = read_summary(path)
    r = gguf.GGUFReader(path)
    assert s.tensor_bytes == sum(int(t.n_bytes) for t in r.tensors)
    assert s.n_vocab == len(r.fields["tokenizer.ggml.tokens"].data)
    assert (s.n_layers, s.n_embd, s.n_head, s.n_ctx_train) == (2, 64, 4, 2048)


def test_not_gguf_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_summary(path)


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    full = tmp_path / "full.gguf"
    write_header(full, "llama", llama_gqa)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:500])
    with pytest.raises(ValueError, match="truncated"):
        read_summary(cut)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated"):
        read_summary(empty)


def test_unsupported_version_is_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported GGUF version 1"):
        read_summary_from_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))


def raw_header(tensors: list[tuple[str, list[int], int]]) -> bytes:
    """A hand-assembled v3 header: general.architecture plus the given tensor infos."""

    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1)
    out += s("general.architecture") + struct.pack("<I", 8) + s("llama")
    for name, dims, t in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", t, 0)
    return out


def test_garbage_length_is_corrupt_not_a_request_for_gigabytes() -> None:
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 40) + b"key"
    with pytest.raises(ValueError, match="corrupt GGUF header") as e:
        read_summary_from_bytes(data)
    assert not isinstance(e.value, TruncatedHeader)


def test_quant_type_unknown_to_the_package_falls_back_to_zero_tensor_bytes() -> None:
    known = read_summary_from_bytes(raw_header([("a", [64, 2], int(Q.F16))]))
    assert known.tensor_bytes == 256
    unknown = read_summary_from_bytes(raw_header([("a", [64, 2], int(Q.F16)), ("b", [32], 250)]))
    assert unknown.tensor_bytes == 0  # callers then size weights by the file


def test_remote_header_parses_from_growing_prefixes(tmp_path: Path) -> None:
    """What a downloader does with HTTP Range requests: fetch more until the header parses."""
    path = tmp_path / "llama.gguf"
    write_header(path, "llama", llama_gqa, layer_tensors(4, 256, 64, 512, Q.Q8_0))
    data = path.read_bytes() + bytes(1 << 20)  # tensor data that must never be needed
    size, fetches = 256, 0
    while True:
        fetches += 1
        try:
            s = read_summary_from_bytes(data[:size])
            break
        except TruncatedHeader as e:
            assert e.needed > e.have == size
            size = max(size * 2, e.needed)
    assert s.n_layers == 32 and fetches < 10
    assert size < len(data) - (1 << 20) + 4096  # never read into the tensor data


def test_reads_only_the_header_of_a_big_vocabulary_fast(tmp_path: Path) -> None:
    path = tmp_path / "vocab150k.gguf"
    n = 150_000

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(32)
    w.add_embedding_length(4096)
    w.add_head_count(32)
    w.add_token_list([f"tok{i}" for i in range(n)])
    w.add_token_types([1] * n)
    w.add_token_merges([f"a{i} b{i}" for i in range(n)])
    w.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    t0 = time.perf_counter()
    s = read_summary(path)
    ours = time.perf_counter() - t0
    assert s.n_vocab == n and s.tensor_bytes == 8 * 64 * 4
    # (gguf.GGUFReader, which maps every array, took 7 s on this file; this reader 31 ms)
    print(f"\n150k-token vocab: read_summary {ours * 1000:.1f} ms")
