"""How much memory one llama-server instance needs, from the GGUF header alone, and how
what the agents measured raises it.

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
    compute  = n_ubatch x (4 x (n_vocab + 32 x n_embd) + 2 x n_ctx)      n_ubatch = 512
               f32 logits of one micro-batch, its activations, and the f16 attention mask;
               this assumes flash attention (llama.cpp's default on GPUs). Without it the KQ
               matrix adds n_ubatch x n_ctx x n_head x 4 bytes: set `memory_mib` then.
    overhead = 656 MiB per process on a GPU (CUDA context, cuBLAS handle, workspace and
               kernels, the CUDA pool).

A CPU-only process (n_gpu_layers 0; the total is RAM, compared with the process's RSS):

    total = weights + kv_cache + cpu_compute + vocab + 20 MiB                (see "CPU" below)

    cpu_compute = n_ubatch x (4 x 16 x n_embd + 2 x n_ctx)
    vocab       = n_vocab x 352 B

Calibration. The compute and overhead constants were fitted to one measurement, on one H200
(driver 580, CUDA 13.0, llama-server for sm_90, process runtime), NVML per-process memory:

    model                          ctx    real MiB   llama.cpp buffers (model/KV/compute)
    tiny f32 (make_tiny_gguf.py)   512       628      0.4 / 0.3 / 5.6
    1.4 GiB F16, n_embd 2048      4096      2434      1441 / 256 / 50
    1.4 GiB F16, n_embd 2048     32768      4230      1441 / 2048 / 53

What is not weights, KV or compute there is 622 MiB for the tiny model and 687-688 MiB for
the F16 one: the CUDA context, plus cuBLAS (handle, workspace, lazily loaded kernels) and
the CUDA pool's temporaries, which the F16 model's mat-muls use and the tiny one's barely
do, and which llama.cpp's compute-buffer report leaves out. Two models cannot tell whether
that extra follows the width or the weight type; the fit assumes width and puts it in the
compute term: 32 x n_embd f32 values per micro-batch token (llama.cpp's buffer alone was
about 12 x n_embd: the FFN's gate, up and product at n_ff ~ 2.75 x n_embd), over a 656 MiB
floor. The mask is 2 B per context cell (f16 with flash attention); llama.cpp's buffer grew
only 3 MiB from 4k to 32k context, so this bounds it from above. The estimate is then
664 / 2488 / 4308 MiB, 2-6% above each real figure (tests/test_memory.py pins this); the old
512 MiB overhead and 4 x n_embd activations were 111-198 MiB short. One card, one llama.cpp
build, two models: the agents' measurements (below) correct what the fit gets wrong
elsewhere.

CPU. Fitted to llama-server's own buffer report and VmHWM (peak RSS) of two models on this
repository's CPU build (2-core x86 host, AVX2, -t 1, llama-server's default 4 slots in one
unified KV cache, config.yaml's `--cache-ram 0 --swa-full`), after the worst load we ran: one
~1,900-token prompt, then four chats of five turns each, one per slot:

    model                               ctx    real VmHWM MiB   estimate   over
    tiny f32 (make_tiny_gguf.py)       2048         23              27     +17%
    Gemma 3 270M Q4_K_M (config.yaml)  2048        383             402      +5%
    Gemma 3 270M Q4_K_M (config.yaml)  4096        422             440      +4%
    Gemma 3 270M Q4_K_M                8192        499             516      +3%

No logits of a whole micro-batch: llama-server asks for one output per sequence, so the CPU
compute buffer (22.3 MiB for Gemma at 2048, 24.8 at 4096; 1.6-5.1 MiB for the tiny model) is
activations, 9-16 n_embd-wide f32 values per micro-batch token (16 kept), and the f16 mask
(2 B per context cell, measured: +1 KiB per cell). Whether a GPU build also skips the
micro-batch of logits was not measured (the H200 models above had a 269-token vocabulary).
The weights are the mapped file (RssFile counts the pages once read; the few tensors
repacked for AVX2, 12.7 MiB for Gemma, are copies, and fall in the rest). The fixed 20 MiB
is what the tiny model's process holds beyond its buffers (~16 MiB: the binary's and
libraries' pages, threads, heap), with room for the HTTP threads the agent adds. The rest
grows with the vocabulary: the tokenizer's tables, and the per-slot sampler arrays and
output logits (n_vocab f32 per slot). Gemma's 262,144 tokens left 71-107 MiB for it (the
range that keeps all three of its rows within [real, real + 10%]); 352 B a token is kept.
One real model fitted that constant: another vocabulary or tokenizer may land a few per
cent elsewhere.

Not counted: llama-server's RAM that grows with use unless flags bound it. Its prompt cache
(`--cache-ram`, default 8 GiB: +29 MiB RSS per new conversation, measured on Gemma), and,
for sliding-window models without `--swa-full`, its context checkpoints (`--ctx-checkpoints`,
default 32 per slot: +15 MiB per turn of a growing chat). config.yaml's Gemma sets
`--cache-ram 0 --swa-full`; do the same (or set `memory_mib`) for a model whose RAM must
stay as placed.

Measured memory. Once an instance runs on an NVIDIA GPU, its agent reports what the process
really holds (`proto.MeasuredMemory`, NVML per process, in each heartbeat). The placer keeps
the highest reading per (model, ctx_size, GPU name) (`remember_measured`), and a model needs
max(estimate, measured) on that kind of GPU (`gpu_needs`), so the next placement is right
even where the formula is not. Only single-GPU instances teach it (a split one holds a
context per GPU). Nothing is persisted: a restarted placer relearns it from the heartbeats.

Sliding-window layers are sized for the full context: exact with `--swa-full`, an upper
bound without it (llama.cpp then gives them a window per slot plus a micro-batch: Gemma 3
270M's 15 of 18 layers, 49.5 MiB at 4096 context where the formula says 72, and 133.5 at
32768 where it says 576, but the checkpoints above come on top; the GGUF header does not say
which layers slide, so the estimate cannot). n_gpu_layers: None (or >= n_layers) = everything on the GPU; 0 = a CPU process, the total is
RAM; in between, weights, KV and compute scale with the offloaded fraction (the GPU part
only). Worked example, Llama-3-8B Q4_K_M at 8192 context (32 layers, 8 KV heads of 128 dims,
128256 tokens): weights 4.6 GiB + KV 8192 x 32 x 8 x 512 B = 1.0 GiB + compute 512 x (4 x
(128256 + 32 x 4096) + 2 x 8192) B = 0.5 GiB + overhead 0.6 GiB = 6.7 GiB.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proto.messages import GgufSummary, MeasuredMemory

N_UBATCH = 512  # llama-server's default -ub
ACTIVATION_WIDTHS = 32  # f32 values per micro-batch token, in units of n_embd (fitted)
GPU_OVERHEAD_MIB = 656  # fitted to one H200 measurement (see the module docstring)
# A CPU-only process (the module docstring's "CPU"): fitted to two models' peak RSS.
CPU_OVERHEAD_MIB = 20
CPU_ACTIVATION_WIDTHS = 16  # f32 values per micro-batch token, in units of n_embd
CPU_VOCAB_BYTES = 352  # per vocabulary entry: tokenizer tables, 4 slots' sampler and logits
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
    # f32 logits and activations of one micro-batch, plus its f16 attention mask
    return N_UBATCH * (4 * (s.n_vocab + ACTIVATION_WIDTHS * s.n_embd) + 2 * n_ctx)


def cpu_compute_bytes(s: GgufSummary, n_ctx: int) -> int:
    # a CPU process's: activations of one micro-batch and its f16 mask, no batch of logits
    return N_UBATCH * (4 * CPU_ACTIVATION_WIDTHS * s.n_embd + 2 * n_ctx)


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
        compute = cpu_compute_bytes(summary, n_ctx)
        # the vocabulary's share goes with the fixed part: it is not a llama.cpp buffer
        overhead = CPU_OVERHEAD_MIB + _mib(summary.n_vocab * CPU_VOCAB_BYTES)
    elif n_gpu_layers is not None and 0 < n_gpu_layers < summary.n_layers:
        part = n_gpu_layers / summary.n_layers
        weights, kv, compute = weights * part, kv * part, compute * part
    parts = (_mib(weights), _mib(kv), _mib(compute), overhead)
    return Estimate(*parts, sum(parts), n_ctx, cache_type_k, cache_type_v)


# ---------------------------------------------------------------- what the agents measured

# (model, configured ctx_size, GPU name): what one instance of that model holds on that kind
MeasuredKey = tuple[str, int, str]


def remember_measured(
    seen: Mapping[MeasuredKey, int], readings: Iterable[MeasuredMemory]
) -> dict[MeasuredKey, int]:
    """`seen` raised by a heartbeat's readings. The highest reading stays: a process grows
    after loading (cuBLAS makes its workspace on the first request), so a lower reading
    from an instance that has not served yet must not undo what a busy one showed. Split
    instances are left out: they hold a context on each GPU, not what one instance needs."""
    out = dict(seen)
    for r in readings:
        if r.gpus != 1 or r.used_mib <= 0:
            continue
        key = (r.model, r.ctx_size, r.gpu_name)
        out[key] = max(out.get(key, 0), r.used_mib)
    return out


def gpu_needs(
    estimate_mib: int, measured: Mapping[MeasuredKey, int], model: str, ctx_size: int
) -> dict[str, int]:
    """GPU name -> MiB the model needs on that kind of GPU, where it was measured above the
    estimate: max(estimate, measured). Kinds not listed need the estimate."""
    return {
        gpu: mib
        for (m, ctx, gpu), mib in measured.items()
        if m == model and ctx == ctx_size and mib > estimate_mib
    }
