"""The memory estimate, pinned to hand-computed numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from lls.gguf_header import read_summary
from proto.messages import GgufSummary
from services.placer.memory import (
    CPU_OVERHEAD_MIB,
    GPU_OVERHEAD_MIB,
    estimate_mib,
)

MIB = 1 << 20

# Llama-3-8B Q4_K_M: 32 layers, 8 KV heads x 128 dims, 128256 tokens, 8192 trained context
LLAMA3_8B = GgufSummary(
    architecture="llama",
    n_layers=32,
    n_ctx_train=8192,
    n_embd=4096,
    n_head=32,
    n_head_kv=8,
    head_dim_k=128,
    head_dim_v=128,
    n_vocab=128256,
    file_type=15,
    tensor_bytes=4_920_734_016,
)


def test_llama3_8b_at_8k_context_by_hand() -> None:
    e = estimate_mib(LLAMA3_8B, file_size=4_920_739_232, ctx_size=8192)
    # 4_920_734_016 B / MiB = 4692.7 -> 4693
    assert e.weights_mib == 4693
    # 8192 ctx x 32 layers x 8 heads x (128 x 2 + 128 x 2) B = 1 GiB exactly
    assert e.kv_cache_mib == 1024
    # 512 x 4 x (128256 + 4 x 4096 + 8192) B = 312_999_936 B = 298.5 MiB -> 299
    assert e.compute_mib == 299
    assert e.overhead_mib == GPU_OVERHEAD_MIB == 512
    assert e.total_mib == 4693 + 1024 + 299 + 512 == 6528


def test_q8_0_and_q4_0_cache_types_shrink_the_kv_cache() -> None:
    q8 = estimate_mib(LLAMA3_8B, 0, 8192, cache_type_k="q8_0", cache_type_v="q8_0")
    # f16 is 2 B per element, q8_0 34/32 B: the 1 GiB f16 cache becomes 1024 x 34/64 MiB
    assert q8.kv_cache_mib == 1024 * 34 // 64 == 544
    q4 = estimate_mib(LLAMA3_8B, 0, 8192, cache_type_k="q4_0", cache_type_v="q4_0")
    assert q4.kv_cache_mib == 1024 * 18 // 64 == 288
    mixed = estimate_mib(LLAMA3_8B, 0, 8192, cache_type_k="q8_0", cache_type_v="f16")
    assert mixed.kv_cache_mib == (544 + 1024) // 2 == 784
    assert "q8_0/f16" in mixed.explain()


def test_ctx_size_0_means_the_trained_context() -> None:
    s = GgufSummary(**{**_fields(LLAMA3_8B), "n_ctx_train": 131072})
    e = estimate_mib(s, 0, ctx_size=0)
    assert e.ctx_size == 131072
    assert e.kv_cache_mib == 16 * 1024  # 16 x the 8k figure


def test_parallel_slots_share_the_context() -> None:
    one = estimate_mib(LLAMA3_8B, 0, 8192, parallel=1)
    four = estimate_mib(LLAMA3_8B, 0, 8192, parallel=4)
    assert one == four  # -c is the total over all -np slots


def test_key_and_value_head_dims_are_used_separately() -> None:
    gemma = GgufSummary("gemma2", 26, 8192, 2304, 8, 4, 256, 128, n_vocab=256000)
    e = estimate_mib(gemma, 5 * 1024 * MIB, 4096)
    # 4096 x 26 x 4 x (256 x 2 + 128 x 2) B = 312 MiB
    assert e.kv_cache_mib == 4096 * 26 * 4 * 768 // MIB == 312


def test_per_layer_kv_heads_size_the_cache_layer_by_layer() -> None:
    # 32 layers, half with 8 KV heads and half with 2: 160 heads, not 32 x 8 = 256
    s = GgufSummary(**{**_fields(LLAMA3_8B), "kv_heads_total": 16 * 8 + 16 * 2})
    e = estimate_mib(s, file_size=0, ctx_size=8192)
    assert e.kv_cache_mib == 8192 * 160 * 128 * 2 * 2 // MIB  # 640 MiB
    assert estimate_mib(LLAMA3_8B, 0, 8192).kv_cache_mib == 1024


def test_weights_fall_back_to_file_size_when_tensors_are_unsized() -> None:
    s = GgufSummary(**{**_fields(LLAMA3_8B), "tensor_bytes": 0})
    e = estimate_mib(s, file_size=3 * 1024 * MIB, ctx_size=8192)
    assert e.weights_mib == 3072


def test_cpu_and_partial_offload() -> None:
    cpu = estimate_mib(LLAMA3_8B, 0, 8192, n_gpu_layers=0)
    assert cpu.overhead_mib == CPU_OVERHEAD_MIB
    assert cpu.weights_mib == 4693 and cpu.kv_cache_mib == 1024  # all of it in RAM
    half = estimate_mib(LLAMA3_8B, 0, 8192, n_gpu_layers=16)
    assert half.kv_cache_mib == 512 and half.weights_mib == 2347
    assert estimate_mib(LLAMA3_8B, 0, 8192, n_gpu_layers=999) == estimate_mib(LLAMA3_8B, 0, 8192)


def test_unknown_cache_type_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown KV cache type 'q3_k'.*q8_0"):
        estimate_mib(LLAMA3_8B, 0, 8192, cache_type_k="q3_k")


def test_explain_reads_as_one_line() -> None:
    text = estimate_mib(LLAMA3_8B, 0, 8192).explain()
    assert text == (
        "6.4 GiB = weights 4.6 GiB + KV cache 1.0 GiB (8192 ctx, f16)"
        " + compute 0.3 GiB + overhead 0.5 GiB"
    )


def test_estimate_from_a_real_tiny_header(tmp_path: Path) -> None:
    import make_tiny_gguf

    path = tmp_path / "tiny.gguf"
    make_tiny_gguf.write(path)
    s = read_summary(path)
    e = estimate_mib(s, path.stat().st_size, ctx_size=4096)
    # 4096 x 2 layers x 4 heads x (16 x 2 + 16 x 2) B = 2 MiB; compute 512 x 4 x (269+256+4096)
    assert e.kv_cache_mib == 2
    assert e.compute_mib == -(-512 * 4 * (269 + 256 + 4096) // MIB) == 10
    assert e.weights_mib == 1 and e.total_mib == 1 + 2 + 10 + 512


def _fields(s: GgufSummary) -> dict[str, object]:
    return {f: getattr(s, f) for f in s.__struct_fields__}
