"""How much memory one llama-server instance needs, from the GGUF header alone.

    total = weights + kv_cache + compute + overhead            (each rounded up to MiB)

    weights  = sum of tensor data sizes from the header (`tensor_bytes`); the file size
               when the header could not size every tensor (a quant type newer than `gguf`,
               or a split GGUF, whose first part lists only its own tensors).
    kv_cache = n_ctx x kv_heads x (head_dim_k x b_k + head_dim_v x b_v)
               kv_heads = the KV heads summed over layers (n_layers x n_head_kv when every
               layer has the same count; per-layer counts where the header lists them).
               n_ctx = ctx_size, or the trained context when ctx_size is 0. `-c` is the total
               shared by all `-np` slots, so `parallel` does not multiply it.
               b = bytes per element of the cache type: f32 4, f16/bf16 2, q8_0 34/32,
               q4_0 18/32, q4_1 20/32, q5_0 22/32, q5_1 24/32, iq4_nl 18/32.
    compute  = n_ubatch x 4 x (n_vocab + 4 x n_embd + n_ctx)     n_ubatch = 512
               f32 logits of one micro-batch, its activations, and the attention mask; this
               assumes flash attention (llama.cpp's default on GPUs). Without it the KQ matrix
               adds n_ubatch x n_ctx x n_head x 4 bytes: set `memory_mib` then.
    overhead = 512 MiB per process on a GPU (CUDA context, cuBLAS workspace, pools);
               128 MiB for a CPU-only process.

Sliding-window layers are sized for the full context, a safe upper bound (llama.cpp
allocates less for them). n_gpu_layers: None (or >= n_layers) = everything on the GPU; 0 = a
CPU process, the total is RAM; in between, weights, KV and compute scale with the offloaded
fraction (the GPU part only). Worked example, Llama-3-8B Q4_K_M at 8192 context (32 layers,
8 KV heads of 128 dims, 128256 tokens): weights 4.6 GiB + KV 8192 x 32 x 8 x 512 B = 1.0 GiB
+ compute 512 x 4 x (128256 + 16384 + 8192) B = 0.3 GiB + overhead 0.5 GiB = 6.4 GiB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from proto.messages import GgufSummary

N_UBATCH = 512  # llama-server's default -ub
GPU_OVERHEAD_MIB = 512
CPU_OVERHEAD_MIB = 128
MIB = 1 << 20

# bytes per element of each KV cache type (`--cache-type-k/-v`)
CACHE_TYPE_BYTES: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
    "iq4_nl": 18 / 32,
}


def gib(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB"


@dataclass(frozen=True)
class Estimate:
    weights_mib: int
    kv_cache_mib: int
    compute_mib: int
    overhead_mib: int
    total_mib: int
    ctx_size: int  # the context the KV cache was sized for (after ctx_size 0 -> trained)
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"

    def explain(self) -> str:
        cache = self.cache_type_k
        if self.cache_type_v != self.cache_type_k:
            cache += "/" + self.cache_type_v
        return (
            f"{gib(self.total_mib)} = weights {gib(self.weights_mib)}"
            f" + KV cache {gib(self.kv_cache_mib)} ({self.ctx_size} ctx, {cache})"
            f" + compute {gib(self.compute_mib)} + overhead {gib(self.overhead_mib)}"
        )


def cache_bytes_per_element(cache_type: str) -> float:
    try:
        return CACHE_TYPE_BYTES[cache_type.lower()]
    except KeyError:
        known = ", ".join(CACHE_TYPE_BYTES)
        raise ValueError(f"unknown KV cache type {cache_type!r} (known: {known})") from None


def kv_cache_bytes(s: GgufSummary, n_ctx: int, cache_type_k: str, cache_type_v: str) -> float:
    b_k = cache_bytes_per_element(cache_type_k)
    b_v = cache_bytes_per_element(cache_type_v)
    kv_heads = s.kv_heads_total or s.n_layers * s.n_head_kv
    return n_ctx * kv_heads * (s.head_dim_k * b_k + s.head_dim_v * b_v)


def compute_bytes(s: GgufSummary, n_ctx: int) -> int:
    return N_UBATCH * 4 * (s.n_vocab + 4 * s.n_embd + n_ctx)


def _mib(n_bytes: float) -> int:
    return math.ceil(n_bytes / MIB)


def estimate_mib(
    summary: GgufSummary,
    file_size: int,
    ctx_size: int,
    parallel: int = 1,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    n_gpu_layers: int | None = None,
) -> Estimate:
    """Memory for one instance (see the module docstring for the formula)."""
    del parallel  # -c is shared by the slots; kept so callers can pass what they launch with
    n_ctx = ctx_size if ctx_size > 0 else summary.n_ctx_train
    weights = summary.tensor_bytes or file_size
    kv = kv_cache_bytes(summary, n_ctx, cache_type_k, cache_type_v)
    compute: float = compute_bytes(summary, n_ctx)
    overhead = GPU_OVERHEAD_MIB
    if n_gpu_layers == 0:
        overhead = CPU_OVERHEAD_MIB
    elif n_gpu_layers is not None and 0 < n_gpu_layers < summary.n_layers:
        part = n_gpu_layers / summary.n_layers
        weights, kv, compute = weights * part, kv * part, compute * part
    parts = (_mib(weights), _mib(kv), _mib(compute), overhead)
    return Estimate(*parts, sum(parts), n_ctx, cache_type_k, cache_type_v)
