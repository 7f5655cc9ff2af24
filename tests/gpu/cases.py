"""The GPU test cases: which kernels to build and which inputs to run them on.

Pure Python (no TVM): ``build_artifacts.py`` reads :data:`CASES` and :data:`QUANT_CASES` on the build
machine to compile every kernel they need into one CUDA library, and ``test_gpu_kernels.py`` reads :data:`CASES`
on the GPU machine to draw inputs, run the kernels and compare with the numpy references.
The grid mirrors the CPU kernel tests (random block tables, NaN-poisoned unused slots, page
sizes, GQA/MQA shapes, windows with sinks, non-causal, empty sequences) with fp16 and bf16.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

PAGE_SIZES = (1, 8, 16, 32)
HEAD_DIMS = (64, 128)
HEADS = ((8, 8), (32, 4), (8, 1))
DTYPES = ("float16", "bfloat16")
KV_LENS = (1, 15, 16, 17, 54, 97, 512, 2048)
#: Absolute and relative tolerance of attention outputs, by cache dtype.
TOL = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 3e-2}


@dataclass(frozen=True)
class KernelSpec:
    """One kernel to build: its factory and the static facts it specialises on."""

    kind: str  # append_kv | lookup_kv | copy_blocks | copy_slots | paged_decode_attention | paged_prefill_attention
    #            | paged_prefill_attention_mma (the opt-in tensor-core prefill, CUDA only)
    heads: tuple[int, int]  # (num_qo_heads, num_kv_heads); cache ops use only num_kv_heads
    head_dim: int
    page: int
    dtype: str
    causal: bool = True
    window: int = 0
    sinks: int = 0
    compute: str | None = None  # compute dtype of a quantized pool (None: the layout's default, float32)

    @property
    def symbol(self) -> str:
        """The global symbol this kernel gets inside the test library (unique per spec)."""
        mask = f"c{int(self.causal)}w{self.window}s{self.sinks}"
        dtype = f"{self.dtype}_{self.compute}" if self.compute else self.dtype
        return f"{self.kind}__h{self.heads[0]}x{self.heads[1]}_d{self.head_dim}_p{self.page}_{dtype}_{mask}"

    @property
    def scale(self) -> float:
        """Softmax scale used for every attention case."""
        return self.head_dim**-0.5


@dataclass(frozen=True)
class Case:
    """One test: a kernel plus the inputs to draw (by ``form``) and a seed."""

    name: str
    spec: KernelSpec
    form: str  # decode | prefill | append | append_empty | lookup | copy | prefill_unowned
    kv_lens: tuple[int, ...] = ()
    q_lens: tuple[int, ...] = ()
    q_len: int = 1
    seed: int = field(default=20261123)


def _attn(kind, heads, dim, page, dtype, causal=True, window=0, sinks=0) -> KernelSpec:
    return KernelSpec(kind, heads, dim, page, dtype, causal, window, sinks)


def _cases() -> list[Case]:
    cases: list[Case] = []
    chunk_q = tuple(min(n, q) for n, q in zip(KV_LENS, (1, 3, 16, 5, 17, 1, 33, 9)))
    for page, dim, heads, dtype in itertools.product(PAGE_SIZES, HEAD_DIMS, HEADS, DTYPES):
        tag = f"p{page}_d{dim}_h{heads[0]}x{heads[1]}_{dtype}"
        cases.append(Case(f"decode_grid_{tag}", _attn("paged_decode_attention", heads, dim, page, dtype), "decode", KV_LENS))
        cases.append(
            Case(f"prefill_chunked_grid_{tag}", _attn("paged_prefill_attention", heads, dim, page, dtype), "prefill", KV_LENS, chunk_q)
        )
    whole = (1, 15, 16, 17, 54, 97)
    for page, heads, dtype in itertools.product(PAGE_SIZES, HEADS, DTYPES):
        spec = _attn("paged_prefill_attention", heads, 64, page, dtype)
        cases.append(Case(f"prefill_whole_p{page}_h{heads[0]}x{heads[1]}_{dtype}", spec, "prefill", whole, whole))
    long_spec = _attn("paged_prefill_attention", (8, 1), 128, 16, "float16")
    cases.append(Case("prefill_whole_long_prompt", long_spec, "prefill", (512, 97), (512, 97)))
    for window, sinks, page, dtype in ((8, 0, 16, "float16"), (8, 4, 1, "bfloat16"), (33, 4, 8, "float16"),
                                       (64, 16, 32, "bfloat16"), (1, 1, 16, "float16"), (256, 4, 16, "float32")):
        tag = f"w{window}_s{sinks}_p{page}_{dtype}"
        dec = _attn("paged_decode_attention", (8, 2), 64, page, dtype, window=window, sinks=sinks)
        pre = _attn("paged_prefill_attention", (8, 2), 64, page, dtype, window=window, sinks=sinks)
        cases.append(Case(f"decode_window_{tag}", dec, "decode", KV_LENS[:6] + (300, 3000)))
        cases.append(Case(f"prefill_window_{tag}", pre, "prefill", (1, 17, 97, 300), (1, 10, 40, 300)))
    multi = _attn("paged_decode_attention", (8, 2), 64, 16, "float16")
    cases.append(Case("decode_multi_token_queries", multi, "decode", (4, 17, 54, 1200), q_len=4))
    for form, kv, ql in (("decode", (3, 17, 40, 700), ()), ("prefill", (3, 17, 40), (3, 5, 40))):
        kind = "paged_decode_attention" if form == "decode" else "paged_prefill_attention"
        spec = _attn(kind, (8, 2), 64, 8, "float16", causal=False)
        cases.append(Case(f"{form}_non_causal", spec, form, kv, ql, q_len=3 if form == "decode" else 1))
    empty = _attn("paged_decode_attention", (8, 2), 64, 16, "float16")
    cases.append(Case("decode_empty_sequence_is_zero", empty, "decode", (5, 0, 33)))
    for dtype in ("float16", "bfloat16", "float32"):
        spec = _attn("paged_decode_attention", (32, 8), 128, 16, dtype)
        cases.append(Case(f"decode_long_context_splits_{dtype}", spec, "decode", (16384,)))
        cases.append(Case(f"decode_batch_mixed_lengths_{dtype}", spec, "decode", (4096, 1, 4097, 300) * 4))
        pre = _attn("paged_prefill_attention", (32, 8), 128, 16, dtype)
        cases.append(Case(f"prefill_long_{dtype}", pre, "prefill", (1500, 700), (1500, 64)))
    unowned = _attn("paged_prefill_attention", (8, 2), 64, 8, "float16")
    cases.append(Case("prefill_rows_outside_indptr_are_zero", unowned, "prefill_unowned", (20, 0, 37), (5, 0, 12)))
    for page, dtype in itertools.product(PAGE_SIZES, ("float16", "bfloat16", "float32")):
        tag = f"p{page}_{dtype}"
        cases.append(Case(f"append_{tag}", KernelSpec("append_kv", (4, 4), 64, page, dtype), "append"))
        cases.append(Case(f"lookup_{tag}", KernelSpec("lookup_kv", (2, 2), 64, page, dtype), "lookup", (1, 15, 16, 17, 54, 97)))
        cases.append(Case(f"copy_{tag}", KernelSpec("copy_blocks", (4, 4), 128, page, dtype), "copy"))
    cases.append(Case("append_zero_tokens", KernelSpec("append_kv", (2, 2), 64, 16, "float16"), "append_empty"))
    for page, dtype in itertools.product((1, 16), ("float16", "bfloat16", "float32", "int8", "float8_e4m3fn")):
        cases.append(Case(f"slots_p{page}_{dtype}", KernelSpec("copy_slots", (4, 2), 64, page, dtype), "slots"))
    return cases


def _mma_prefill_cases() -> list[Case]:
    """The opt-in tensor-core prefill (``cuda_prefill_mma``) on the CUDA-core prefill's grid:
    fp16 / bf16, head_dim 64 / 128, MHA / GQA / MQA, pages 1 and 16, chunked and whole prompts,
    windows with sinks, non-causal, long prompts, empty sequences and unowned rows."""
    kind = "paged_prefill_attention_mma"
    cases: list[Case] = []
    chunk_q = tuple(min(n, q) for n, q in zip(KV_LENS, (1, 3, 16, 5, 17, 1, 33, 9)))
    for page, dim, heads, dtype in itertools.product((1, 16), HEAD_DIMS, HEADS, DTYPES):
        tag = f"p{page}_d{dim}_h{heads[0]}x{heads[1]}_{dtype}"
        cases.append(Case(f"prefill_mma_chunked_{tag}", _attn(kind, heads, dim, page, dtype), "prefill", KV_LENS, chunk_q))
    whole = (1, 15, 16, 17, 54, 97, 130)
    for heads, dtype in itertools.product(HEADS, DTYPES):
        spec = _attn(kind, heads, 128, 16, dtype)
        cases.append(Case(f"prefill_mma_whole_h{heads[0]}x{heads[1]}_{dtype}", spec, "prefill", whole, whole))
    for window, sinks, page, dtype in ((8, 0, 16, "float16"), (8, 4, 1, "bfloat16"), (33, 4, 8, "float16"),
                                       (64, 16, 32, "bfloat16"), (1, 1, 16, "float16"), (100, 4, 16, "float16")):
        spec = _attn(kind, (8, 2), 64, page, dtype, window=window, sinks=sinks)
        cases.append(Case(f"prefill_mma_window_w{window}_s{sinks}_p{page}_{dtype}", spec, "prefill",
                          (1, 17, 97, 300), (1, 10, 40, 300)))
    cases.append(Case("prefill_mma_non_causal", _attn(kind, (8, 2), 64, 8, "float16", causal=False), "prefill",
                      (3, 17, 40, 130), (3, 5, 40, 130)))
    for dtype in DTYPES:
        spec = _attn(kind, (32, 8), 128, 16, dtype)
        cases.append(Case(f"prefill_mma_long_{dtype}", spec, "prefill", (1500, 700, 2048), (1500, 64, 2048)))
    cases.append(Case("prefill_mma_rows_outside_indptr_are_zero", _attn(kind, (8, 2), 64, 8, "float16"),
                      "prefill_unowned", (20, 0, 37), (5, 0, 12)))
    return cases


#: Every GPU test case.
CASES: tuple[Case, ...] = tuple(_cases() + _mma_prefill_cases())
#: Kernel kinds that exist for CUDA only (a CPU rehearsal build leaves their cases out).
CUDA_ONLY_KINDS = ("paged_prefill_attention_mma",)


def _quant_cases() -> list[Case]:
    """Quantized pools (int8, float8_e4m3fn; float32 queries and K/V): attention and cache ops."""
    cases: list[Case] = []
    for dtype in ("int8", "float8_e4m3fn"):
        for page, dim, heads in ((16, 64, (9, 3)), (8, 128, (32, 4)), (1, 64, (8, 1))):
            tag = f"p{page}_d{dim}_h{heads[0]}x{heads[1]}_{dtype}"
            cases.append(Case(f"quant_decode_{tag}", _attn("paged_decode_attention", heads, dim, page, dtype), "qdecode", KV_LENS))
            cases.append(Case(f"quant_prefill_{tag}", _attn("paged_prefill_attention", heads, dim, page, dtype), "qprefill",
                              (1, 17, 97, 300), (1, 10, 40, 300)))
        spec = _attn("paged_decode_attention", (32, 8), 128, 16, dtype)
        cases.append(Case(f"quant_decode_long_context_{dtype}", spec, "qdecode", (16384, 5, 4097)))
        for page in (1, 16):
            cases.append(Case(f"quant_append_p{page}_{dtype}", KernelSpec("append_kv", (4, 4), 64, page, dtype), "qappend"))
            cases.append(Case(f"quant_lookup_p{page}_{dtype}", KernelSpec("lookup_kv", (2, 2), 64, page, dtype), "qlookup",
                              (1, 15, 16, 17, 54, 97)))
            cases.append(Case(f"quant_copy_p{page}_{dtype}", KernelSpec("copy_blocks", (4, 4), 128, page, dtype), "qcopy"))
    return cases


def _quant_mma_cases() -> list[Case]:
    """The opt-in tensor-core prefill on quantized pools: float16 / bfloat16 queries and output,
    int8 / float8_e4m3fn pools dequantized into the tiles (form ``qprefill_mma``)."""
    cases = []
    for dtype, compute in (("int8", "float16"), ("float8_e4m3fn", "bfloat16"), ("int8", "bfloat16")):
        for page, dim, heads, window, sinks in ((16, 64, (9, 3), 0, 0), (8, 128, (32, 4), 0, 0), (16, 64, (8, 2), 33, 4)):
            spec = KernelSpec("paged_prefill_attention_mma", heads, dim, page, dtype, True, window, sinks, compute)
            tag = f"p{page}_d{dim}_h{heads[0]}x{heads[1]}_w{window}_{dtype}_{compute}"
            cases.append(Case(f"quant_prefill_mma_{tag}", spec, "qprefill_mma", (1, 17, 97, 300), (1, 10, 40, 300)))
    return cases


#: GPU cases of quantized pools (``test_gpu_quant_kernels.py``).
QUANT_CASES: tuple[Case, ...] = tuple(_quant_cases() + _quant_mma_cases())
