"""The memory estimate, pinned to hand-computed numbers and to one real H200 measurement;
the measured-memory memory the placer keeps."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from lls.config import parse, store_filename_of
from lls.gguf_header import read_summary
from proto.messages import FileInfo, GgufSummary, GpuInfo, HostRecord, MeasuredMemory
from services.placer.memory import (
    CPU_OVERHEAD_MIB,
    GPU_OVERHEAD_MIB,
    estimate_mib,
    gpu_needs,
    remember_measured,
)
from services.placer.service import Placer

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
    # 512 x (4 x (128256 + 32 x 4096) + 2 x 8192) B = 539_492_352 B = 514.5 MiB -> 515
    assert e.compute_mib == 515
    assert e.overhead_mib == GPU_OVERHEAD_MIB == 656
    assert e.total_mib == 4693 + 1024 + 515 + 656 == 6888


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
    # the fixed part and 128256 x 352 B of vocabulary = 43.1 MiB -> 44
    assert cpu.overhead_mib == CPU_OVERHEAD_MIB + 44
    assert cpu.weights_mib == 4693 and cpu.kv_cache_mib == 1024  # all of it in RAM
    # no micro-batch of logits on a CPU: 512 x (4 x 16 x 4096 + 2 x 8192) B = 136 MiB
    assert cpu.compute_mib == 136
    half = estimate_mib(LLAMA3_8B, 0, 8192, n_gpu_layers=16)
    assert half.kv_cache_mib == 512 and half.weights_mib == 2347
    assert estimate_mib(LLAMA3_8B, 0, 8192, n_gpu_layers=999) == estimate_mib(LLAMA3_8B, 0, 8192)


def test_unknown_cache_type_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown KV cache type 'q3_k'.*q8_0"):
        estimate_mib(LLAMA3_8B, 0, 8192, cache_type_k="q3_k")


def test_explain_reads_as_one_line() -> None:
    text = estimate_mib(LLAMA3_8B, 0, 8192).explain()
    assert text == (
        "6.7 GiB = weights 4.6 GiB + KV cache 1.0 GiB (8192 ctx, f16)"
        " + compute 0.5 GiB + overhead 0.6 GiB"
    )


def test_estimate_from_a_real_tiny_header(tmp_path: Path) -> None:
    import make_tiny_gguf

    path = tmp_path / "tiny.gguf"
    make_tiny_gguf.write(path)
    s = read_summary(path)
    e = estimate_mib(s, path.stat().st_size, ctx_size=4096)
    # 4096 x 2 layers x 4 heads x (16 x 2 + 16 x 2) B = 2 MiB
    assert e.kv_cache_mib == 2
    # 512 x (4 x (269 + 32 x 64) + 2 x 4096) B = 8.8 MiB -> 9
    assert e.compute_mib == -(-512 * (4 * (269 + 32 * 64) + 2 * 4096) // MIB) == 9
    assert e.weights_mib == 1 and e.total_mib == 1 + 2 + 9 + 656


# ---------------------------------------------------------------- one real H200 measurement

# scripts/make_tiny_gguf.py's output, as lls.gguf_header reads it (f32, 2 layers, 64 wide)
TINY = GgufSummary(
    architecture="llama",
    n_layers=2,
    n_ctx_train=2048,
    n_embd=64,
    n_head=4,
    n_head_kv=4,
    head_dim_k=16,
    head_dim_v=16,
    n_vocab=269,
    file_type=0,
    tensor_bytes=466_688,
    n_params=116_672,
)

# The "1.4 GiB F16" model's header was not recorded. Assumed: the same generator's vocabulary
# (269 tokens) on a ~0.76B-parameter llama layout: n_embd 2048, 16 layers, 16 heads of 128,
# 8 KV heads, n_ff 5632, F16 weights and f32 norms. That gives what was reported: weights
# 1_512_423_424 B = 1442.4 MiB (llama.cpp: 1441 MiB on the GPU), KV 4096 x 16 x 8 x 512 B
# = 256 MiB and 2048 MiB at 32768, and it matches the old formula's compute figures (25 and
# 81 MiB, which pin n_vocab + 4 x n_embd to 8193..8704).
F16_07B = GgufSummary(
    architecture="llama",
    n_layers=16,
    n_ctx_train=32768,
    n_embd=2048,
    n_head=16,
    n_head_kv=8,
    head_dim_k=128,
    head_dim_v=128,
    n_vocab=269,
    file_type=1,  # MOSTLY_F16
    tensor_bytes=1_512_423_424,
    n_params=756_144_128,
)


@pytest.mark.parametrize(
    ("summary", "ctx", "real_mib", "parts"),
    [
        # NVML per-process MiB on an H200 (driver 580, CUDA 13.0, sm_90 build, process runtime)
        (TINY, 512, 628, (1, 1, 6, 656)),
        (F16_07B, 4096, 2434, (1443, 256, 133, 656)),
        (F16_07B, 32768, 4230, (1443, 2048, 161, 656)),
    ],
    ids=["tiny-512", "f16-0.7b-4096", "f16-0.7b-32768"],
)
def test_estimate_covers_the_h200_measurement_within_10_percent(
    summary: GgufSummary, ctx: int, real_mib: int, parts: tuple[int, int, int, int]
) -> None:
    e = estimate_mib(summary, summary.tensor_bytes, ctx_size=ctx)
    assert (e.weights_mib, e.kv_cache_mib, e.compute_mib, e.overhead_mib) == parts
    assert real_mib <= e.total_mib <= 1.10 * real_mib


def test_the_tiny_pin_matches_the_real_generator(tmp_path: Path) -> None:
    import make_tiny_gguf

    path = tmp_path / "tiny.gguf"
    make_tiny_gguf.write(path)
    assert read_summary(path) == TINY


def test_a_cpu_process_carries_no_gpu_overhead() -> None:
    gpu = estimate_mib(TINY, TINY.tensor_bytes, 512)
    cpu = estimate_mib(TINY, TINY.tensor_bytes, 512, n_gpu_layers=0)
    # compute 512 x (4 x 16 x 64 + 2 x 512) B = 2.5 MiB -> 3; vocabulary 269 x 352 B -> 1 MiB
    assert gpu.total_mib == 664 and cpu.total_mib == 1 + 1 + 3 + CPU_OVERHEAD_MIB + 1 == 26


# Gemma 3 270M Q4_K_M, config.yaml's real model (lls/real_model.py), as lls.gguf_header reads
# it (tests/test_real_model.py checks this pin against the file).
GEMMA3_270M = GgufSummary(
    architecture="gemma3",
    n_layers=18,
    n_ctx_train=32768,
    n_embd=640,
    n_head=4,
    n_head_kv=1,
    head_dim_k=256,
    head_dim_v=256,
    n_vocab=262144,
    file_type=15,
    tensor_bytes=246_587_904,
    n_params=268_098_176,
    has_chat_template=False,  # config.yaml sets `chat_template: gemma`
)


@pytest.mark.parametrize(
    ("summary", "ctx", "real_mib", "parts"),
    [
        # VmHWM of llama-server on 2 x86 cores (-t 1, 4 slots, --cache-ram 0 --swa-full)
        # after a ~1,900-token prompt and four 5-turn chats
        (TINY, 2048, 23, (1, 1, 4, 21)),
        (GEMMA3_270M, 2048, 383, (236, 36, 22, 108)),
        (GEMMA3_270M, 4096, 422, (236, 72, 24, 108)),
        (GEMMA3_270M, 8192, 499, (236, 144, 28, 108)),
    ],
    ids=["tiny-2048", "gemma3-270m-2048", "gemma3-270m-4096", "gemma3-270m-8192"],
)
def test_cpu_estimate_covers_the_measured_peak_rss(
    summary: GgufSummary, ctx: int, real_mib: int, parts: tuple[int, int, int, int]
) -> None:
    e = estimate_mib(summary, summary.tensor_bytes, ctx_size=ctx, n_gpu_layers=0)
    assert (e.weights_mib, e.kv_cache_mib, e.compute_mib, e.overhead_mib) == parts
    assert real_mib <= e.total_mib
    if summary is not TINY:  # the tiny model's few MiB are all fixed costs, +17%
        assert e.total_mib <= 1.10 * real_mib


# ---------------------------------------------------------------- what agents measured


def _reading(
    model: str, mib: int, gpu: str = "NVIDIA H200", ctx: int = 4096, gpus: int = 1
) -> MeasuredMemory:
    return MeasuredMemory(
        instance_id=f"{model}-1", model=model, ctx_size=ctx, gpu_name=gpu, used_mib=mib, gpus=gpus
    )


def test_the_highest_single_gpu_reading_per_model_ctx_and_gpu_kind_is_kept() -> None:
    seen = remember_measured({}, [_reading("a", 2434), _reading("a", 900, gpu="NVIDIA L4")])
    assert seen == {("a", 4096, "NVIDIA H200"): 2434, ("a", 4096, "NVIDIA L4"): 900}
    # a fresh instance that has not served yet reads lower: the peak stays
    later = remember_measured(seen, [_reading("a", 2300), _reading("a", 2500, ctx=8192)])
    assert later[("a", 4096, "NVIDIA H200")] == 2434 and later[("a", 8192, "NVIDIA H200")] == 2500
    assert seen == {("a", 4096, "NVIDIA H200"): 2434, ("a", 4096, "NVIDIA L4"): 900}  # not mutated
    # split instances (a context per GPU) and empty readings teach nothing
    assert remember_measured({}, [_reading("a", 5000, gpus=2), _reading("a", 0)]) == {}


def test_the_need_per_gpu_kind_is_the_larger_of_estimate_and_measured() -> None:
    seen = {
        ("a", 4096, "NVIDIA H200"): 2600,
        ("a", 4096, "NVIDIA L4"): 2300,
        ("a", 8192, "NVIDIA H200"): 9999,  # another context
        ("b", 4096, "NVIDIA H200"): 9999,  # another model
    }
    assert gpu_needs(2488, seen, "a", 4096) == {"NVIDIA H200": 2600}  # L4: the estimate wins
    assert gpu_needs(3000, seen, "a", 4096) == {}
    assert gpu_needs(2488, {}, "a", 4096) == {}


def _fields(s: GgufSummary) -> dict[str, object]:
    return {f: getattr(s, f) for f in s.__struct_fields__}


# ---------------------------------------------------------------- the placer's need, wired


def _placer_with(tiny_on: str, gpus: list[GpuInfo], measured: list[MeasuredMemory]) -> Placer:
    """A Placer with one host holding the tiny model's file, fed one heartbeat (no bus)."""
    cfg = parse({"models": {"tiny": {"url": "file:///m/tiny.gguf", "ctx_size": 512}}})
    placer = Placer(SimpleNamespace(cfg=cfg, bus=SimpleNamespace(leases=None), host_id="p"))  # type: ignore[arg-type]
    filename = store_filename_of("tiny", cfg.models["tiny"])
    rec = HostRecord(
        host_id=tiny_on,
        ts=0.0,
        started_at=0.0,
        runtime="process",
        gpus=gpus,
        cpu_count=2,
        ram_total_mib=4096,
        ram_free_mib=4096,
        files=[FileInfo("tiny", filename, TINY.tensor_bytes, TINY)],
        measured=measured,
    )
    placer.watches.on_host(tiny_on, rec, 1)
    return placer


def test_the_placer_needs_the_cpu_figure_on_a_cpu_host_and_the_measured_one_on_a_gpu() -> None:
    placer = _placer_with("cpu", [], [])
    cfg = placer.cfg.models["tiny"]
    n = placer.planning.need("tiny", cfg, host=None)
    assert (n.memory_mib, n.cpu_memory_mib, n.ram_mib, dict(n.gpu_memory_mib)) == (
        664,
        26,
        26,
        {},
    )
    h200 = GpuInfo(0, "GPU-0", "NVIDIA H200", 143771, 700)
    seen = [
        MeasuredMemory("i1", "tiny", 512, "NVIDIA H200", 700),
        MeasuredMemory("i2", "x", 512, "NVIDIA H200", 9),
    ]
    placer = _placer_with("gpu", [h200], seen)
    assert placer.watches.measured == {
        ("tiny", 512, "NVIDIA H200"): 700,
        ("x", 512, "NVIDIA H200"): 9,
    }
    n = placer.planning.need("tiny", cfg, host=None)
    assert n.memory_mib == 664 and dict(n.gpu_memory_mib) == {"NVIDIA H200": 700}
    # an operator's memory_mib is the need as given: measurements do not override it
    fixed = msgspec.structs.replace(cfg, memory_mib=500)
    assert dict(placer.planning.need("tiny", fixed, host=None).gpu_memory_mib) == {}
