"""Paged attention kernels for LLVM CPU targets: decode (uniform queries) and ragged prefill.

Semantics (shared by every form and target):
- the pool of one layer is ``[num_blocks, 2, num_kv_heads, block_size, head_dim]`` (plane 0 = K,
  1 = V), or a latent pool ``[num_blocks, 1, num_kv_heads, block_size, head_dim]`` whose V is the
  first ``latent_v_dim`` columns of each K row (MLA); output columns past ``latent_v_dim`` are zero;
  ``block_table[b, i]`` names the pool block holding positions ``[i*block_size, (i+1)*block_size)``
  of sequence ``b``; ``seq_lens[b]`` is its KV length including the new tokens;
- query ``j`` of a sequence with ``q_len`` new tokens sits at position ``seq_len - q_len + j``;
  causal queries see KV positions ``<= pos``; with a window ``W`` and ``S`` sinks they see
  ``(pos - W, pos]`` plus ``[0, S)``; a query that sees nothing returns zeros;
- softmax runs in fp32 with an online (running max) update, one KV chunk at a time.

Work split (prefill): a task of the parallel loop is a *tile* of consecutive query rows of one
sequence times one KV head; its query vectors are ``rows x group_size`` (the query heads that
share the KV head). The query vectors lie along the vector lanes (the query is transposed once
per tile); per chunk of ``KV_CHUNK`` positions each key's scores are broadcasts of its K elements
times the transposed query, straight from the pool, the online softmax runs down the lanes, and V
rows accumulate along head_dim. Each K/V row is thus read once per tile. Decode: a task is one query row times :func:`decode_heads_per_task` KV heads, reading
K/V rows straight from the pool (see :func:`_decode_body`). Only slots below ``seq_len`` are
ever read: unused slots may hold anything.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .cache_ops import SERIAL_BELOW_ROWS
from .config import AttentionConfig, element_bytes
from .fast_math import exp_nonpositive
from .score_mods import head_value, modify_score, sink_weight
from .kv_quant import FP8_UNSCALED_FACTOR, element, element_flat, row_scale, row_scale_bits_flat, scale_bits_to_float
from .lowering import mark_exact_scratch
from .vector_reduce import butterfly_indices, butterfly_macro, lanes_max

#: KV positions per online-softmax step: one fp32 vector of scores per query vector.
KV_CHUNK = 16
#: KV positions per online-softmax step of the decode kernel (its per-step bookkeeping is amortised over them).
DECODE_CHUNK = 16
#: How many KV chunks ahead the decode kernel prefetches (latency of a run / time per chunk).
PREFETCH_CHUNKS = 4
#: Key positions x KV heads of a row from which the decode kernel of a few rows (batch-1 decode) runs its
#: heads on the thread pool: a launch costs a few microseconds, the attention of ~1000 keys about as much.
#: At 2000 tokens of context SmolLM2-135M's serial attention took 7.6 ms of a 25 ms decode step.
PARALLEL_DECODE_KEYS = 1024
#: Upper bound on query vectors (rows x group heads) per task, keeping its fp32 state in L1.
MAX_QUERY_VECTORS = 32
#: Bytes of contiguous K rows a decode task should read per block (see :func:`decode_heads_per_task`).
MIN_DECODE_RUN_BYTES = 2048
_NEG_INF = -3.0e38


#: fp32 lanes and vector registers the kernels assume when not told the target's
#: (``llmir_tvm.target.vector_shape``: AVX-512 16 x 32, AVX2 8 x 16, NEON 4 x 32).
DEFAULT_LANES, DEFAULT_REGISTERS = 16, 32


def _vector_lanes(head_dim: int, max_lanes: int = DEFAULT_LANES) -> int:
    """fp32 lanes of the decode kernel's partial dot products: the widest power of two up to the
    target's vector (``max_lanes``) dividing head_dim."""
    return next(v for v in (16, 8, 4, 2, 1) if v <= max_lanes and head_dim % v == 0)


def rows_per_tile(cfg: AttentionConfig) -> int:
    """Query rows per task: as many as fit ``MAX_QUERY_VECTORS`` with the group's heads."""
    return max(1, MAX_QUERY_VECTORS // cfg.group_size)


def _visible_low(W: int, first_pos):
    """The first position rows from ``first_pos`` on may see past the sinks: the sliding window's
    start (``W > 0``), else 0. With :func:`_sink_count` and :func:`_visible_count`: the virtual
    index ``t`` of ``[0, n_visible)`` is position ``t`` while ``t < n_sink`` (sink tokens), then
    ``lo + t - n_sink``: sinks ``[0, n_sink)`` followed by ``[lo, hi)``. Three expressions, each
    bound with ``T.let`` by the kernels (a tuple assigned in TVMScript becomes heap scalars)."""
    return T.max(first_pos - W + 1, T.int64(0)) if W > 0 else T.int64(0)


def _sink_count(W: int, S: int, lo):
    """Sink tokens visible before the window that starts at ``lo`` (:func:`_visible_low`)."""
    return T.min(T.int64(S), lo) if W > 0 else T.int64(0)


def _visible_count(causal: bool, last_pos, seq_len, lo, n_sink):
    """Positions rows up to ``last_pos`` may see in all: the sinks and ``[lo, hi)`` (:func:`_visible_low`)."""
    hi = T.min(last_pos + 1, seq_len) if causal else seq_len
    return n_sink + T.max(hi - lo, T.int64(0))


def cpu_has_int16_dot(target) -> bool:
    """Whether LLVM ``target`` has AVX512-VNNI (``vpdpwssd``), used by the int8 decode kernel."""
    from tvm.target import Target, codegen

    if target is None:
        return False
    target = target if isinstance(target, Target) else Target(target)
    try:
        return target.kind.name == "llvm" and bool(codegen.target_has_features("avx512vnni", target))
    except tvm.error.TVMError:  # a CPU LLVM does not know (another architecture): the float path
        return False


def prefetch(address):
    """Hint the CPU to bring the cache line holding ``address`` towards the core (a read, low locality:
    ``prefetcht2``, into L2 rather than L1).

    Decode keeps several chunks of K/V runs in flight; as L1 prefetches they exhaust L1's few miss
    buffers and stall. Measured on Zen 4 (batch 8, 32768 tokens, float16 pool): L2 prefetches make
    the kernel 1.4x faster than L1 ones.
    """
    return T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", address, T.int32(0), T.int32(1), T.int32(1)))


def _prefetch_macros(cfg: AttentionConfig, CH: int):
    """T.macros ``prefetch_chunk(c, n_sink, lo, n_vis, cache_fb, block_table, b, hk0)`` (the K and V
    rows of KV chunk ``c``, nothing past ``n_vis``) and ``prefetch_key(t, n_sink, lo, cache_fb,
    block_table, b, hk0)`` (those of virtual position ``t``), for the ``HT`` heads from ``hk0``:
    one prefetch per 64 bytes of each row.

    Decode reads a block's rows of a task's heads as two runs (K, V) at random pool offsets;
    hardware prefetchers do not see across runs, so without this the kernel is bound by memory
    latency rather than bandwidth, and a smaller (quantized) row buys little. The decode loop
    prefetches one key per key it computes rather than a chunk at a time: bursts of 64-192
    prefetches overran the miss buffers (float16 at 32768 tokens: 1.34x faster spread out).
    """
    lay = cfg.layout
    BS, H, HT, P = lay.block_size, lay.num_kv_heads, decode_heads_per_task(cfg), lay.kv_planes
    RB = lay.row_elems * element_bytes(lay.dtype)  # bytes per pool row
    NL = (RB + 63) // 64  # offsets 0, 64, ...: consecutive rows of a block cover each other's tails

    @T.macro
    def prefetch_key(t, n_sink, lo, cache_fb, block_table, b, hk0):
        p: T.let[T.int64] = T.if_then_else(t < n_sink, t, lo + t - n_sink)
        row: T.let[T.int64] = ((T.Cast("int64", block_table[b, p // BS]) * P * H + hk0) * BS + p % BS) * RB
        for kv in range(P):
            for h in T.unroll(HT):
                for j in T.unroll(NL):
                    prefetch(T.address_of(cache_fb[row + (kv * H + h) * BS * RB + j * 64]))

    @T.macro
    def prefetch_chunk(c, n_sink, lo, n_vis, cache_fb, block_table, b, hk0):
        for i in range(T.max(T.min(T.int64(CH), n_vis - c * CH), T.int64(0))):
            prefetch_key(c * CH + i, n_sink, lo, cache_fb, block_table, b, hk0)

    return prefetch_chunk, prefetch_key


def _float_key_dots_macro(cfg: AttentionConfig, max_lanes: int = DEFAULT_LANES):
    """T.macro ``(part, qf, qi, kw, cache_f, cache_fb, row, i, h)``: ``part[h * G + g, i, :]`` = the
    ``VL`` partial sums of query vector ``h * G + g``'s dot product with the key row at flat index
    ``row`` (float FMAs on converted elements; float8 elements unscaled, see :func:`_decode_body`)."""
    G, D, dt = cfg.group_size, cfg.layout.head_dim, cfg.layout.dtype
    VL = _vector_lanes(D, max_lanes)

    @T.macro
    def key_dots(part, qf, qi, kw, cache_f, cache_fb, row, i, h):
        for g in range(G):
            for v in T.vectorized(VL):
                part[h * G + g, i, v] = T.float32(0)
        for do in range(D // VL):
            for g in range(G):
                for v in T.vectorized(VL):
                    part[h * G + g, i, v] = part[h * G + g, i, v] + qf[h * G + g, do * VL + v] * element_flat(
                        dt, cache_f, cache_fb, row + do * VL + v, unscaled=True
                    )

    return key_dots


def _int_key_dots_macro(cfg: AttentionConfig):
    """T.macro like :func:`_float_key_dots_macro` for int8 rows and the int16 query ``qi``:
    ``part[h * G + g, i, :]`` = 16 int32 partial sums, two ``vpdpwssd`` per 32 elements and head."""
    G, D = cfg.group_size, cfg.layout.head_dim

    @T.macro
    def key_dots(part, qf, qi, kw, cache_f, cache_fb, row, i, h):
        for g in range(G):
            for v in T.vectorized(16):
                part[h * G + g, i, v] = T.int32(0)
        for do in range(D // 32):
            for e in T.vectorized(32):
                kw[e] = T.Cast("int16", cache_f[row + do * 32 + e])
            for g in range(G):
                part[h * G + g, i, T.Ramp(0, 1, 16)] = T.call_llvm_pure_intrin(
                    "int32x16", _VPDPWSSD, part[h * G + g, i, T.Ramp(0, 1, 16)], qi[h * G + g, T.Ramp(do * 32, 1, 32)],
                    kw[T.Ramp(0, 1, 32)],
                )

    return key_dots


#: int16 x int16 -> int32 pair dot products accumulated (AVX512-VNNI ``vpdpwssd``): 32 lanes in, 16 out.
_VPDPWSSD = "llvm.x86.avx512.vpdpwssd.512"
_Q_INT16_MAX = 32767.0


def _int_dot_keys(cfg: AttentionConfig, int_dot: bool) -> bool:
    """Whether decode computes int8 keys' dot products in integers (see :func:`_decode_body`)."""
    return int_dot and cfg.layout.dtype == "int8" and cfg.layout.head_dim % 32 == 0


def decode_heads_per_task(cfg: AttentionConfig) -> int:
    """KV heads one decode task attends together: the fewest (a divisor of num_kv_heads) whose K rows
    of one block span ``MIN_DECODE_RUN_BYTES``, as long as the task's ``heads x group_size`` query
    vectors stay within ``MAX_QUERY_VECTORS`` and 8 KiB of fp32 per state array.

    A block stores its heads' K rows next to each other (then their V rows), so a task over
    several heads reads each block as two longer runs. Long-context decode pays per separate run
    it fetches as well as per byte: quantized rows make one head's run short (1 KiB for int8,
    head_dim 64, 16-token blocks), and taking three heads at once made the int8 kernel 1.15x and
    the float8 one 1.2-1.3x faster at 32768 tokens (Zen 4). Runs already 2 KiB long gained
    nothing (float16 got slower at 8192 tokens), and fewer heads per task leave more tasks for
    threads: hence the fewest heads that reach the threshold.
    """
    lay, G = cfg.layout, cfg.group_size
    H, D = lay.num_kv_heads, lay.head_dim
    run = lay.block_size * lay.row_elems * element_bytes(lay.dtype)  # bytes of one head's K rows in a block
    fits = [ht for ht in range(1, H + 1) if H % ht == 0 and (ht == 1 or (ht * G <= MAX_QUERY_VECTORS and ht * G * D <= 2048))]
    return next((ht for ht in fits if ht * run >= MIN_DECODE_RUN_BYTES), fits[-1])


def _decode_body(cfg: AttentionConfig, int_dot: bool = False, max_lanes: int = DEFAULT_LANES):
    """The T.macro attending ONE query row with the ``HT * group_size`` query heads of KV heads
    ``hk0 .. hk0 + HT`` (``HT`` = :func:`decode_heads_per_task`).

    Memory-bound: every K/V row is read once and used straight from the pool. Per chunk of
    ``KV_CHUNK`` keys, each (head, key) dot product is first a vector of ``VL`` partial sums along
    head_dim; a butterfly of shuffles (:func:`~.vector_reduce.butterfly_indices`) then reduces ``VL`` keys'
    vectors at once into one vector of their scores (``VL - 1`` vector adds instead of ``VL``
    horizontal sums). Quantized pools: the K row scale multiplies the score vector, the V row
    scale the probability, so elements are only converted, never scaled. float8 elements are
    decoded ``2**120`` too small (:func:`~.kv_quant.decode_fp8_e4m3_unscaled`); half of that
    factor rides on the query and the output, half on the row scales (no fp32 overflow for
    ``|q| < 2**60`` and any float16 scale).

    ``int_dot`` (int8 pools, head_dim a multiple of 32, x86 with AVX512-VNNI): the query is
    quantized once per task to int16 (per head, absmax scale; relative error <= 2**-16 of its
    largest element) and each key's dot products are ``vpdpwssd`` integer pair-dot accumulations
    of the int8 row widened to int16: two instructions per 32 elements and head instead of the
    float path's conversions and FMAs. Exact in int32 up to head_dim 512; the butterfly then
    reduces int32 partial sums and scores become float once per 16 keys.
    """
    lay = cfg.layout
    G, D, BS, CH = cfg.group_size, lay.head_dim, lay.block_size, DECODE_CHUNK
    HT = decode_heads_per_task(cfg)
    NG = HT * G  # query vectors of a task
    VL = _vector_lanes(D, max_lanes)
    NGRP = CH // VL  # butterflies per chunk (VL divides DECODE_CHUNK)
    butterfly = butterfly_macro(butterfly_indices(VL), VL, VL // 2)
    causal, W, S, scale = cfg.causal, cfg.sliding_window, cfg.sink_tokens, float(cfg.scale)
    dt, quant = lay.dtype, lay.quantized
    prefetch_chunk, prefetch_key = _prefetch_macros(cfg, CH)
    H, RW, P = lay.num_kv_heads, lay.row_elems, lay.kv_planes
    HOFF = BS * RW  # the next head's row sits this many pool elements further
    VOFF = 0 if lay.latent else H * HOFF  # a V row sits this many pool elements after its K row (latent: it is the K row)
    DV = cfg.latent_v_dim or D  # V columns accumulated (latent: a prefix of the K row; the rest stay zero)
    HALF = FP8_UNSCALED_FACTOR**0.5 if dt == "float8_e4m3fn" else 1.0  # see the docstring
    IDOT = _int_dot_keys(cfg, int_dot)
    PART = "int32" if IDOT else "float32"  # dtype of the partial dot products
    key_dots = _int_key_dots_macro(cfg) if IDOT else _float_key_dots_macro(cfg, max_lanes)
    ALIBI, SINKS = bool(cfg.alibi_slopes), bool(cfg.sink_logits)  # score modifiers (see score_mods)

    @T.macro
    def body(q_rows, out_rows, row, pos, seq_len, cache_f, cache_fb, block_table, b, hk0):
        slope = T.alloc_buffer((NG,), "float32")  # ALiBi slope / sink logit per query vector
        sink = T.alloc_buffer((NG,), "float32")
        for g in range(NG):
            slope[g] = head_value(cfg.alibi_slopes, hk0 * G + g) if ALIBI else T.float32(0)
            sink[g] = head_value(cfg.sink_logits, hk0 * G + g) if SINKS else T.float32(0)
        qf = T.alloc_buffer((NG, D), "float32")
        acc = T.alloc_buffer((NG, D), "float32")
        part = T.alloc_buffer((NG, CH, VL), PART)  # per key: VL partial sums of its dot product
        qi = T.alloc_buffer((NG, D), "int16")  # int_dot: the query in int16 ...
        qsc = T.alloc_buffer((NG,), "float32")  # ... and its scale per head
        kw = T.alloc_buffer((32,), "int16")  # int_dot: 32 key elements widened
        score = T.alloc_buffer((NG, CH), "float32")
        mx = T.alloc_buffer((NG,), "float32")
        den = T.alloc_buffer((NG, CH), "float32")  # per-lane partial denominators
        fix = T.alloc_buffer((NG,), "float32")
        rk = T.alloc_buffer((CH,), "int64")  # flat pool index of each key's K row (head hk0)
        ksc = T.alloc_buffer((HT, CH), "float32")  # row scales (quantized pools only) ...
        vsc = T.alloc_buffer((HT, CH), "float32")
        ksw = T.alloc_buffer((HT, CH), "uint16")  # ... staged as float16 bits, converted 16 at once
        vsw = T.alloc_buffer((HT, CH), "uint16")
        for h in range(HT):
            for i in T.vectorized(CH):
                ksw[h, i] = T.uint16(0)
                vsw[h, i] = T.uint16(0)
        for g in range(NG):
            for d in T.vectorized(D):
                qf[g, d] = T.Cast("float32", q_rows[row, hk0 * G + g, d]) * T.float32(scale * HALF)
                acc[g, d] = T.float32(0)
            for i in T.vectorized(CH):
                den[g, i] = T.float32(0)
            mx[g] = T.float32(_NEG_INF)
            if IDOT:
                qsc[g] = T.float32(0)
                for d in range(D):
                    qsc[g] = T.max(qsc[g], T.fabs(qf[g, d]))
                qsc[g] = T.if_then_else(qsc[g] > T.float32(0), qsc[g] / T.float32(_Q_INT16_MAX), T.float32(1))
                for d in T.vectorized(D):
                    qi[g, d] = T.Cast("int16", T.round(qf[g, d] / qsc[g]))
        lo: T.let[T.int64] = _visible_low(W, pos)
        n_sink: T.let[T.int64] = _sink_count(W, S, lo)
        n_vis: T.let[T.int64] = _visible_count(causal, pos, seq_len, lo, n_sink)
        for c in range(PREFETCH_CHUNKS):
            prefetch_chunk(T.int64(c), n_sink, lo, n_vis, cache_fb, block_table, b, hk0)
        for c in range((n_vis + CH - 1) // CH):
            cnt: T.let[T.int64] = T.min(T.int64(CH), n_vis - c * CH)
            for i in range(cnt):
                t: T.let[T.int64] = c * CH + i
                p: T.let[T.int64] = T.if_then_else(t < n_sink, t, lo + t - n_sink)
                rk[i] = ((T.Cast("int64", block_table[b, p // BS]) * P * H + hk0) * BS + p % BS) * RW
                if quant:
                    for h in range(HT):
                        ksw[h, i] = row_scale_bits_flat(cache_fb, rk[i] + h * HOFF, D)
                        vsw[h, i] = row_scale_bits_flat(cache_fb, rk[i] + h * HOFF + VOFF, D)
            if quant:  # lanes past cnt hold earlier chunks' (or initial zero) bits: masked below
                for h in range(HT):
                    for i in T.vectorized(CH):
                        ksc[h, i] = scale_bits_to_float(ksw[h, i]) * T.float32(HALF)
                        vsc[h, i] = scale_bits_to_float(vsw[h, i]) * T.float32(HALF)
            for i in range(cnt):  # one key PREFETCH_CHUNKS chunks ahead per key computed
                if (c + PREFETCH_CHUNKS) * CH + i < n_vis:
                    prefetch_key((c + PREFETCH_CHUNKS) * CH + i, n_sink, lo, cache_fb, block_table, b, hk0)
                for h in range(HT):
                    key_dots(part, qf, qi, kw, cache_f, cache_fb, rk[i] + h * HOFF, i, h)
            for i in range(cnt, T.int64(CH)):  # key slots past the sequence: defined, masked below
                for g in range(NG):
                    for v in T.vectorized(VL):
                        part[g, i, v] = T.Cast(PART, 0)
            for g in range(NG):
                for grp in range(NGRP):
                    butterfly(part, g, grp * VL)
                    if VL > 1:
                        score[g, T.Ramp(grp * VL, 1, VL)] = T.Cast(f"float32x{VL}", part[g, grp * VL, T.Ramp(0, 1, VL)])
                    else:
                        score[g, grp] = T.Cast("float32", part[g, grp, 0])
            for g in range(NG):
                for i in T.vectorized(T.int64(CH)):  # Select, not if_then_else: a lane-wise condition
                    score[g, i] = T.Select(  # in if_then_else makes TVM scalarize the loop into branches
                        i < cnt,
                        modify_score(
                            cfg,
                            score[g, i] * (ksc[g // G, i] if quant else T.float32(1)) * (qsc[g] if IDOT else T.float32(1)),
                            slope[g],
                            T.Select(c * CH + i < n_sink, c * CH + i, lo + c * CH + i - n_sink),
                            pos,
                        ),
                        T.float32(_NEG_INF),
                    )
                fix[g] = lanes_max(score[g, T.Ramp(0, 1, CH)], CH)  # the chunk's max, in registers
                if fix[g] > mx[g]:  # the running max grew: rescale (rare once a long context is under way)
                    m_new: T.let[T.float32] = fix[g]
                    fix[g] = exp_nonpositive(mx[g] - m_new)
                    mx[g] = m_new
                    for i in T.vectorized(CH):
                        den[g, i] = den[g, i] * fix[g]
                    for d in T.vectorized(D):
                        acc[g, d] = acc[g, d] * fix[g]
                for i in T.vectorized(CH):  # masked keys: exp of ~-3e38 is exactly 0
                    score[g, i] = exp_nonpositive(score[g, i] - mx[g])
                    den[g, i] = den[g, i] + score[g, i]
                if quant:
                    for i in T.vectorized(CH):
                        score[g, i] = score[g, i] * vsc[g // G, i]
            for h in range(HT):  # per head, so that its G x D accumulators stay in registers over the chunk
                for i in range(cnt):
                    for g in range(G):
                        for d in T.vectorized(DV):
                            acc[h * G + g, d] = acc[h * G + g, d] + score[h * G + g, i] * element_flat(
                                dt, cache_f, cache_fb, rk[i] + h * HOFF + VOFF + d, unscaled=True
                            )
        for g in range(NG):
            fix[g] = T.float32(0)
            for i in range(CH):
                fix[g] = fix[g] + den[g, i]
            if SINKS:
                fix[g] = fix[g] + sink_weight(sink[g], mx[g])
            for d in T.vectorized(D):
                out_rows[row, hk0 * G + g, d] = T.Cast(
                    out_rows.dtype,
                    T.if_then_else(fix[g] > T.float32(0), acc[g, d] * T.float32(HALF) / fix[g], T.float32(0)),
                )

    return body


def _qk_keys(vectors: int, registers: int) -> int:
    """Keys whose scores one QK register tile computes: ``keys x vectors`` accumulators, the
    ``vectors`` query vectors of one ``d`` and a broadcast key element in the target's registers."""
    return next((u for u in (8, 4, 2) if KV_CHUNK % u == 0 and u * vectors + vectors + 1 <= registers), 1)


def _tile_body(cfg: AttentionConfig, lanes: int = DEFAULT_LANES, registers: int = DEFAULT_REGISTERS):
    """The T.macro attending rows ``[row0, row0 + nrows)`` of sequence ``b`` with KV head ``hk``.

    Compute-bound. The tile's query vectors (rows x group heads) lie along the vector lanes: the
    query is transposed once per tile into ``qT [head_dim, vectors]``, and a chunk's scores are
    ``sc [KV_CHUNK, vectors]``, each key's row a broadcast of its K elements times ``qT`` (FMAs on
    ``UK`` keys x the lanes' vectors at a time, K read straight from the pool: no per-chunk
    transpose). The online softmax then runs down the lanes (running max, denominators and
    masks per query vector are vectors; no horizontal reductions), and V rows accumulate along
    head_dim into every query vector of the tile.
    """
    lay = cfg.layout
    G, D, BS, CH, L = cfg.group_size, lay.head_dim, lay.block_size, KV_CHUNK, lanes
    NV = rows_per_tile(cfg) * G
    VW = -(-NV // L)  # vectors of query-vector lanes
    NVP = VW * L
    UK = _qk_keys(VW, registers)
    causal, W, S, scale = cfg.causal, cfg.sliding_window, cfg.sink_tokens, float(cfg.scale)
    dt, quant = lay.dtype, lay.quantized
    ALIBI, SINKS = bool(cfg.alibi_slopes), bool(cfg.sink_logits)  # score modifiers (see score_mods)
    MODS = quant or bool(cfg.logit_softcap or ALIBI)  # scores change after the QK products
    VP, DV = (0, cfg.latent_v_dim) if lay.latent else (1, D)  # the plane V is read from, and its columns

    @T.macro
    def body(q_rows, out_rows, row0, nrows, pos0, seq_len, cache, cache_b, block_table, b, hk):
        slope = T.alloc_buffer((NVP,), "float32")  # ALiBi slope per query vector
        sink = T.alloc_buffer((G,), "float32")  # sink logit per group head
        qt = T.alloc_buffer((D, NVP), "float32")
        acc = T.alloc_buffer((NV, D), "float32")
        sc = T.alloc_buffer((CH, NVP), "float32")  # a chunk's scores, then probabilities
        sacc = T.alloc_buffer((UK * VW,), f"float32x{L}")
        mx = T.alloc_buffer((NVP,), "float32")
        den = T.alloc_buffer((NVP,), "float32")
        fix = T.alloc_buffer((NVP,), "float32")
        top = T.alloc_buffer((NVP,), "float32")
        vpos = T.alloc_buffer((NVP,), "int32")  # query position per vector (-1: padding)
        blk = T.alloc_buffer((CH,), "int64")
        off = T.alloc_buffer((CH,), "int64")
        kpos = T.alloc_buffer((CH,), "int32")  # key position (-1: past the visible range)
        ksc = T.alloc_buffer((CH,), "float32")  # K / V row scales (quantized pools only)
        vsc = T.alloc_buffer((CH,), "float32")
        nv: T.let[T.int64] = nrows * G
        for g in range(G):
            sink[g] = head_value(cfg.sink_logits, hk * G + g) if SINKS else T.float32(0)
        for v in range(T.int64(NVP)):
            slope[v] = head_value(cfg.alibi_slopes, hk * G + v % G) if ALIBI else T.float32(0)
            vpos[v] = T.if_then_else(v < nv, T.Cast("int32", pos0 + v // G), T.int32(-1))
            mx[v] = T.float32(_NEG_INF)
            den[v] = T.float32(0)
        for r in range(nrows):  # query vector r * G + g (row r, group head g) becomes lane column v of qt
            for g in range(G):
                for d in range(D):
                    qt[d, r * G + g] = T.Cast("float32", q_rows[row0 + r, hk * G + g, d]) * T.float32(scale)
        for v in range(nv, T.int64(NVP)):  # lanes past the tile's vectors score zeros (never used)
            for d in range(D):
                qt[d, v] = T.float32(0)
        for v in range(nv):
            for d in T.vectorized(D):
                acc[v, d] = T.float32(0)
        lo: T.let[T.int64] = _visible_low(W, pos0)
        n_sink: T.let[T.int64] = _sink_count(W, S, lo)
        n_vis: T.let[T.int64] = _visible_count(causal, pos0 + nrows - 1, seq_len, lo, n_sink)
        for c in range((n_vis + CH - 1) // CH):
            cnt: T.let[T.int64] = T.min(T.int64(CH), n_vis - c * CH)
            for i in range(T.int64(CH)):  # keys past cnt read key 0's row (defined) and are masked
                t: T.let[T.int64] = c * CH + T.if_then_else(i < cnt, i, T.int64(0))
                p: T.let[T.int64] = T.if_then_else(t < n_sink, t, lo + t - n_sink)
                kpos[i] = T.if_then_else(i < cnt, T.Cast("int32", p), T.int32(-1))
                blk[i] = T.Cast("int64", block_table[b, p // BS])
                off[i] = p % BS
                if quant:
                    ksc[i] = row_scale(cache_b, blk[i], 0, hk, off[i], D)
                    vsc[i] = row_scale(cache_b, blk[i], 1, hk, off[i], D)
            for ig in range((cnt + UK - 1) // UK):
                for u in T.unroll(UK * VW):
                    sacc[u] = T.Broadcast(T.float32(0), L)
                for d in range(D):
                    for uk in T.unroll(UK):
                        for w in T.unroll(VW):
                            sacc[uk * VW + w] = sacc[uk * VW + w] + T.Broadcast(
                                element(dt, cache, cache_b, blk[ig * UK + uk], 0, hk, off[ig * UK + uk], d), L
                            ) * qt[d, T.Ramp(w * L, 1, L)]
                for uk in T.unroll(UK):
                    for w in T.unroll(VW):
                        sc[ig * UK + uk, T.Ramp(w * L, 1, L)] = sacc[uk * VW + w]
            if W == 0 and cnt == CH and (not causal or T.Cast("int64", kpos[CH - 1]) <= pos0):
                if MODS:  # every row sees every key of the chunk: no masks
                    for i in range(T.int64(CH)):
                        for v in T.vectorized(NVP):
                            sc[i, v] = modify_score(cfg, sc[i, v] * (ksc[i] if quant else T.float32(1)), slope[v], kpos[i], vpos[v])
            else:
                for i in range(cnt):
                    for v in T.vectorized(NVP):  # Select, not if_then_else: a lane-wise condition in
                        sc[i, v] = T.Select(  # if_then_else makes TVM scalarize the loop into branches
                            (not causal or vpos[v] >= kpos[i]) and (W == 0 or vpos[v] - W < kpos[i] or kpos[i] < S),
                            modify_score(cfg, sc[i, v] * (ksc[i] if quant else T.float32(1)), slope[v], kpos[i], vpos[v]),
                            T.float32(_NEG_INF),
                        )
                for i in range(cnt, T.int64(CH)):  # keys past the visible range
                    for v in T.vectorized(NVP):
                        sc[i, v] = T.float32(_NEG_INF)
            for v in T.vectorized(NVP):  # the chunk's max per query vector, then the running max
                top[v] = mx[v]
            for i in range(T.int64(CH)):
                for v in T.vectorized(NVP):
                    top[v] = T.max(top[v], sc[i, v])
            for v in T.vectorized(NVP):
                fix[v] = exp_nonpositive(mx[v] - top[v])
                mx[v] = top[v]
                den[v] = den[v] * fix[v]
            for i in range(T.int64(CH)):  # masked keys (a row may see none of the chunk yet) weigh 0
                for v in T.vectorized(NVP):
                    sc[i, v] = T.Select(sc[i, v] > T.float32(_NEG_INF), exp_nonpositive(sc[i, v] - mx[v]), T.float32(0))
                    den[v] = den[v] + sc[i, v]
            for v in range(nv):  # the running max grew: rescale (rare once a long context is under way)
                if fix[v] < T.float32(1):
                    for d in T.vectorized(D):
                        acc[v, d] = acc[v, d] * fix[v]
            if quant:
                for i in range(cnt):
                    for v in T.vectorized(NVP):
                        sc[i, v] = sc[i, v] * vsc[i]
            for v in range(nv):
                for i in range(cnt):
                    for d in T.vectorized(DV):
                        acc[v, d] = acc[v, d] + sc[i, v] * element(dt, cache, cache_b, blk[i], VP, hk, off[i], d)
        for v in range(nv):
            total: T.let[T.float32] = den[v] + (sink_weight(sink[v % G], mx[v]) if SINKS else T.float32(0))
            for d in T.vectorized(D):
                out_rows[row0 + v // G, hk * G + v % G, d] = T.Cast(
                    out_rows.dtype, T.if_then_else(total > T.float32(0), acc[v, d] / total, T.float32(0))
                )

    return body


def paged_decode_attention(cfg: AttentionConfig, int_dot: bool = False, lanes: int = DEFAULT_LANES) -> tvm.tirx.PrimFunc:
    """Paged attention for uniform queries ``q [batch, q_len, num_qo_heads, head_dim]``.

    ``q_len`` is symbolic (1 for decode). Signature:
    ``(q, cache, block_table, seq_lens, out)`` with ``out`` shaped like ``q``. ``int_dot``: int8
    keys' dot products in integers (needs AVX512-VNNI: see :func:`cpu_has_int16_dot`). ``lanes``:
    the target's fp32 vector lanes (partial dot products are at most that wide).
    """
    lay = cfg.layout
    H, Hq, D, BS, dtype = lay.num_kv_heads, cfg.num_qo_heads, lay.head_dim, lay.block_size, lay.compute_dtype
    ALIGN = element_bytes(dtype)  # no 64-byte alignment assumed: callers pass any numpy array
    cdtype, RW, CA, P = lay.dtype, lay.row_elems, element_bytes(lay.dtype), lay.kv_planes  # the pool's storage
    body = _decode_body(cfg, int_dot, lanes)

    HT = decode_heads_per_task(cfg)
    NHT = H // HT  # tasks per query row

    @T.macro
    def decode_task(task, L, q_rows, out_rows, seq_lens, cache_f, cache_fb, block_table):
        b: T.let[T.int64] = task // (L * NHT)
        j: T.let[T.int64] = task // NHT % L
        seq_len: T.let[T.int64] = T.Cast("int64", seq_lens[b])
        hk0: T.let[T.int64] = task % NHT * HT
        body(q_rows, out_rows, task // NHT, seq_len - L + j, seq_len, cache_f, cache_fb, block_table, b, hk0)

    @T.prim_func
    def paged_decode(q_h: T.handle, cache_h: T.handle, table_h: T.handle, lens_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "global_symbol": "llmir_paged_decode"})
        B = T.int64()
        L = T.int64()
        NB = T.int64()
        MB = T.int64()
        q = T.match_buffer(q_h, (B, L, Hq, D), dtype, align=ALIGN)
        cache = T.match_buffer(cache_h, (NB, P, H, BS, RW), cdtype, align=CA)
        block_table = T.match_buffer(table_h, (B, MB), "int32", align=4)
        seq_lens = T.match_buffer(lens_h, (B,), "int32", align=4)
        out = T.match_buffer(out_h, (B, L, Hq, D), dtype, align=ALIGN)
        q_rows = T.decl_buffer((B * L, Hq, D), dtype, data=q.data, align=ALIGN)
        out_rows = T.decl_buffer((B * L, Hq, D), dtype, data=out.data, align=ALIGN)
        cache_f = T.decl_buffer((NB * P * H * BS * RW,), cdtype, data=cache.data, align=CA)  # flat views
        cache_fb = T.decl_buffer((NB * P * H * BS * RW * CA,), "uint8", data=cache.data, align=1)
        # A few rows of short sequences (batch-1 decode) cost less than a thread-pool launch; the first
        # sequence's length stands for the others' there (at most SERIAL_BELOW_ROWS - 1 rows).
        first_len: T.let[T.int64] = T.if_then_else(B > 0, T.Cast("int64", seq_lens[0]), T.int64(0))
        if B * L >= SERIAL_BELOW_ROWS or first_len * H >= PARALLEL_DECODE_KEYS:
            for task in T.parallel(B * L * NHT):
                decode_task(task, L, q_rows, out_rows, seq_lens, cache_f, cache_fb, block_table)
        else:
            for task in T.serial(B * L * NHT):
                decode_task(task, L, q_rows, out_rows, seq_lens, cache_f, cache_fb, block_table)

    return mark_exact_scratch(paged_decode)


def paged_prefill_attention(cfg: AttentionConfig, lanes: int = DEFAULT_LANES,
                            registers: int = DEFAULT_REGISTERS) -> tvm.tirx.PrimFunc:
    """Paged attention for ragged queries ``q [total_q, num_qo_heads, head_dim]``.

    Sequence ``b`` owns query rows ``[q_indptr[b], q_indptr[b+1])`` (chunked prefill, mixed
    prefill + decode batches). Signature: ``(q, cache, block_table, seq_lens, q_indptr, out)``.
    A task takes ``rows_per_tile`` consecutive rows; where they span sequences it handles
    each sequence's share in turn. Rows owned by no sequence are zero. ``lanes`` / ``registers``:
    the target's fp32 vector lanes and vector registers (how many score vectors stay in registers).
    """
    lay = cfg.layout
    H, Hq, D, BS, dtype = lay.num_kv_heads, cfg.num_qo_heads, lay.head_dim, lay.block_size, lay.compute_dtype
    ALIGN = element_bytes(dtype)  # no 64-byte alignment assumed: callers pass any numpy array
    cdtype, RW, CA, P = lay.dtype, lay.row_elems, element_bytes(lay.dtype), lay.kv_planes  # the pool's storage
    QT = rows_per_tile(cfg)
    body = _tile_body(cfg, lanes, registers)

    @T.prim_func
    def paged_prefill(
        q_h: T.handle, cache_h: T.handle, table_h: T.handle, lens_h: T.handle, indptr_h: T.handle, out_h: T.handle
    ):
        T.func_attr({"tirx.noalias": True, "global_symbol": "llmir_paged_prefill"})
        NQ = T.int64()
        B = T.int64()
        NB = T.int64()
        MB = T.int64()
        B1 = T.int64()
        q = T.match_buffer(q_h, (NQ, Hq, D), dtype, align=ALIGN)
        cache = T.match_buffer(cache_h, (NB, P, H, BS, RW), cdtype, align=CA)
        block_table = T.match_buffer(table_h, (B, MB), "int32", align=4)
        seq_lens = T.match_buffer(lens_h, (B,), "int32", align=4)
        q_indptr = T.match_buffer(indptr_h, (B1,), "int32", align=4)
        out = T.match_buffer(out_h, (NQ, Hq, D), dtype, align=ALIGN)
        cache_b = T.decl_buffer((NB, P, H, BS, RW * CA), "uint8", data=cache.data, align=1)
        NT: T.let[T.int64] = (NQ + QT - 1) // QT * H
        for task in T.parallel(NT):
            # Causal tiles cost more the later they are and the pool hands each thread one contiguous
            # range of tasks: interleave first and last tiles (0, n-1, 1, n-2, ...) to balance them.
            tile: T.let[T.int64] = T.if_then_else(task % 2 == 0, task // 2, NT - 1 - task // 2)
            t0: T.let[T.int64] = tile // H * QT
            t1: T.let[T.int64] = T.min(t0 + QT, NQ)
            hk: T.let[T.int64] = tile % H
            for r in range(t0, t1):  # rows outside every sequence stay zero
                for g in range(Hq // H):
                    for d in T.vectorized(D):
                        out[r, hk * (Hq // H) + g, d] = T.Cast(dtype, T.float32(0))
            for b in range(B):
                s0: T.let[T.int64] = T.max(T.Cast("int64", q_indptr[b]), t0)
                s1: T.let[T.int64] = T.min(T.Cast("int64", q_indptr[b + 1]), t1)
                if s0 < s1:
                    seq_len: T.let[T.int64] = T.Cast("int64", seq_lens[b])
                    first_pos: T.let[T.int64] = seq_len - T.Cast("int64", q_indptr[b + 1] - q_indptr[b])
                    body(q, out, s0, s1 - s0, first_pos + s0 - T.Cast("int64", q_indptr[b]), seq_len,
                         cache, cache_b, block_table, b, hk)

    return mark_exact_scratch(paged_prefill)
