/*
 * Blockwise 4-bit (NF4/FP4) dequantization into a caller-owned buffer, for the CPU compute path.
 *
 * Why a kernel of our own: bitsandbytes' public CPU function allocates a fresh output per call and decodes
 * a double-quantized absmax into a full-size temporary; that allocation, not the arithmetic, is most of
 * the time. This kernel writes into `out`, decodes each block's scale on the fly, and splits the blocks
 * over a few threads.
 *
 * Arithmetic (kept identical to bitsandbytes' reference path, value for value):
 *   scale_b = absmax[b]                                    (float32 absmax)
 *   scale_b = nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize] + offset
 *                                                          (double quant: a float32 product, then a float32 sum)
 *   out[i]  = convert(code[nibble_i] * scale_b)            (float32 product, rounded once to the output type)
 * Values are packed two per byte, the first in the high nibble; blocks run over the flat index
 * (b = i / blocksize), as quantize_4bit lays them out. Each block first builds a 16-entry table of its
 * final output values (the same product and rounding as per element), then the bytes are expanded through
 * that table, with AVX-512 or AVX2 permutes where the compiler targets them. Build with
 * -ffp-contract=off: a fused multiply-add would change the scale's rounding.
 *
 * No global state: every call works on its arguments only, so concurrent calls are safe.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(LQ_NO_SIMD)
#include <immintrin.h>
#define LQ_AVX512 1
#elif defined(__AVX2__) && !defined(LQ_NO_SIMD)
#include <immintrin.h>
#define LQ_AVX2 1
#endif

#define LQ_ABI_VERSION 1
#define LQ_MAX_THREADS 256

enum { LQ_OUT_F32 = 0, LQ_OUT_BF16 = 1, LQ_OUT_F16 = 2 };

int lq_abi_version(void) { return LQ_ABI_VERSION; }

/* Which inner loop this build uses: 0 portable C, 1 AVX2, 2 AVX-512 (reported in logs and benchmarks). */
int lq_simd_level(void) {
#if defined(LQ_AVX512)
    return 2;
#elif defined(LQ_AVX2)
    return 1;
#else
    return 0;
#endif
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, as torch's float -> bfloat16 (NaN becomes the canonical quiet NaN 0x7FC0). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
        return 0x7FC0;
    }
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Round to nearest even with subnormals, as torch's float -> float16 (the FP16 library's algorithm). */
static inline uint16_t f32_to_f16(float f) {
    const float scale_to_inf = bits_f32(0x77800000u);  /* 2^112 */
    const float scale_to_zero = bits_f32(0x08800000u); /* 2^-110 */
    float base = (bits_f32(f32_bits(f) & 0x7FFFFFFFu) * scale_to_inf) * scale_to_zero;
    const uint32_t w = f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) {
        bias = 0x71000000u;
    }
    base = bits_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

typedef struct {
    const uint8_t* packed;
    const float* code;
    const float* absmax_f32;   /* NULL when double-quantized */
    const uint8_t* absmax_u8;  /* NULL unless double-quantized */
    const float* nested_code;
    const float* nested_absmax;
    long long nested_blocksize;
    float offset;
    long long blocksize;
    long long n;
    void* out;
    int out_kind;
    long long block_begin;
    long long block_end;
} lq_job;

static inline float block_scale(const lq_job* job, long long b, long long nested_index) {
    if (job->absmax_f32 != NULL) {
        return job->absmax_f32[b];
    }
    /* Two statements: a float32 product rounded first, then the float32 sum (no fused multiply-add). */
    volatile float product = job->nested_code[job->absmax_u8[b]] * job->nested_absmax[nested_index];
    return product + job->offset;
}

/* The 16 final values of one block, as raw bits: 32-bit entries for float32 output, 16-bit otherwise.
 * The vector versions do the same IEEE operations as the scalar ones (one float32 product, then the same
 * round-to-nearest-even conversion), so every build gives the same bits. */
static inline void build_table32(const float* code, float scale, uint32_t* table) {
#if defined(LQ_AVX512)
    _mm512_storeu_ps((float*)table, _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale)));
#elif defined(LQ_AVX2)
    const __m256 s = _mm256_set1_ps(scale);
    _mm256_storeu_ps((float*)table, _mm256_mul_ps(_mm256_loadu_ps(code), s));
    _mm256_storeu_ps((float*)table + 8, _mm256_mul_ps(_mm256_loadu_ps(code + 8), s));
#else
    for (int j = 0; j < 16; ++j) {
        table[j] = f32_bits(code[j] * scale);
    }
#endif
}

#if defined(LQ_AVX512)
static inline __m256i bf16_round_avx512(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 is_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(is_nan, r, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}
#elif defined(LQ_AVX2)
static inline __m128i bf16_round_avx2(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), is_nan);
    /* values are below 2^16: pack the 8 lanes to 16 bits without saturation effects */
    const __m128i lo = _mm256_castsi256_si128(r);
    const __m128i hi = _mm256_extracti128_si256(r, 1);
    return _mm_packus_epi32(lo, hi);
}
#endif

static inline void build_table16(const float* code, float scale, int kind, uint16_t* table) {
#if defined(LQ_AVX512)
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
    const __m256i h = kind == LQ_OUT_BF16 ? bf16_round_avx512(v)
                                          : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256((__m256i*)table, h);
#elif defined(LQ_AVX2) && defined(__F16C__)
    const __m256 s = _mm256_set1_ps(scale);
    for (int half = 0; half < 2; ++half) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(code + 8 * half), s);
        const __m128i h = kind == LQ_OUT_BF16 ? bf16_round_avx2(v)
                                              : _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i*)(table + 8 * half), h);
    }
#else
    for (int j = 0; j < 16; ++j) {
        const float v = code[j] * scale;
        table[j] = kind == LQ_OUT_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
    }
#endif
}

#if defined(LQ_AVX2)
/* AVX2 expansion of a multiple of 16 bytes, the table in registers: entries 0-7 and 8-15 (32-bit). */
static inline __attribute__((always_inline)) void expand32_ymm(
    const uint8_t* a, __m256i tab_lo, __m256i tab_hi, uint32_t* o, long long nbytes
) {
    const __m128i mask4 = _mm_set1_epi8(0x0F);
    for (long long i = 0; i < nbytes; i += 16) {
        const __m128i raw = _mm_loadu_si128((const __m128i*)(a + i));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask4);
        const __m128i lo = _mm_and_si128(raw, mask4);
        const __m128i n0 = _mm_unpacklo_epi8(hi, lo);
        const __m128i n1 = _mm_unpackhi_epi8(hi, lo);
        const __m128i parts[4] = {n0, _mm_srli_si128(n0, 8), n1, _mm_srli_si128(n1, 8)};
        for (int p = 0; p < 4; ++p) {
            const __m256i idx = _mm256_cvtepu8_epi32(parts[p]);
            const __m256i from_lo = _mm256_permutevar8x32_epi32(tab_lo, idx);
            const __m256i from_hi = _mm256_permutevar8x32_epi32(tab_hi, idx);
            /* bit 3 of the index picks the upper half of the table */
            const __m256i use_hi = _mm256_slli_epi32(idx, 28);
            const __m256i v = _mm256_castps_si256(_mm256_blendv_ps(
                _mm256_castsi256_ps(from_lo), _mm256_castsi256_ps(from_hi), _mm256_castsi256_ps(use_hi)));
            _mm256_storeu_si256((__m256i*)(o + 2 * i + 8 * p), v);
        }
    }
}

/* The same for 16-bit entries (h0: entries 0-7, h1: 8-15): pshufb looks up 16 bytes, so one lookup takes
 * the low bytes of the entries and one the high bytes. */
static inline __attribute__((always_inline)) void expand16_ymm(
    const uint8_t* a, __m128i h0, __m128i h1, uint16_t* o, long long nbytes
) {
    const __m128i byte_mask = _mm_set1_epi16(0x00FF);
    const __m256i tab_low = _mm256_broadcastsi128_si256(
        _mm_packus_epi16(_mm_and_si128(h0, byte_mask), _mm_and_si128(h1, byte_mask)));
    const __m256i tab_high =
        _mm256_broadcastsi128_si256(_mm_packus_epi16(_mm_srli_epi16(h0, 8), _mm_srli_epi16(h1, 8)));
    const __m128i mask4 = _mm_set1_epi8(0x0F);
    for (long long i = 0; i < nbytes; i += 16) {
        const __m128i raw = _mm_loadu_si128((const __m128i*)(a + i));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask4);
        const __m128i lo = _mm_and_si128(raw, mask4);
        /* lane 0: values 0..15, lane 1: values 16..31 */
        const __m256i idx =
            _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(hi, lo)), _mm_unpackhi_epi8(hi, lo), 1);
        const __m256i low = _mm256_shuffle_epi8(tab_low, idx);
        const __m256i high = _mm256_shuffle_epi8(tab_high, idx);
        const __m256i words_a = _mm256_unpacklo_epi8(low, high); /* values 0..7 | 16..23 */
        const __m256i words_b = _mm256_unpackhi_epi8(low, high); /* values 8..15 | 24..31 */
        _mm256_storeu_si256((__m256i*)(o + 2 * i), _mm256_permute2x128_si256(words_a, words_b, 0x20));
        _mm256_storeu_si256((__m256i*)(o + 2 * i + 16), _mm256_permute2x128_si256(words_a, words_b, 0x31));
    }
}
#endif

/* Expand `nbytes` packed bytes into 2 * nbytes 32-bit values through a 16-entry table. */
static inline __attribute__((always_inline)) void expand32(const uint8_t* a, const uint32_t* table, uint32_t* o, long long nbytes) {
    long long i = 0;
#if defined(LQ_AVX512)
    const __m512i tab = _mm512_loadu_si512((const void*)table);
    const __m128i mask4 = _mm_set1_epi8(0x0F);
    for (; i + 16 <= nbytes; i += 16) {
        const __m128i raw = _mm_loadu_si128((const __m128i*)(a + i));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask4);
        const __m128i lo = _mm_and_si128(raw, mask4);
        const __m512i idx0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
        const __m512i idx1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));
        _mm512_storeu_si512((void*)(o + 2 * i), _mm512_permutexvar_epi32(idx0, tab));
        _mm512_storeu_si512((void*)(o + 2 * i + 16), _mm512_permutexvar_epi32(idx1, tab));
    }
#elif defined(LQ_AVX2)
    i = nbytes & ~15LL;
    expand32_ymm(a, _mm256_loadu_si256((const __m256i*)table), _mm256_loadu_si256((const __m256i*)(table + 8)), o, i);
#endif
    for (; i < nbytes; ++i) {
        const uint8_t byte = a[i];
        o[2 * i] = table[byte >> 4];
        o[2 * i + 1] = table[byte & 0x0F];
    }
}

/* Expand `nbytes` packed bytes into 2 * nbytes 16-bit values through a 16-entry table. */
static inline __attribute__((always_inline)) void expand16(const uint8_t* a, const uint16_t* table, uint16_t* o, long long nbytes) {
    long long i = 0;
#if defined(LQ_AVX512)
    const __m512i tab = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)table));
    const __m128i mask4 = _mm_set1_epi8(0x0F);
    for (; i + 16 <= nbytes; i += 16) {
        const __m128i raw = _mm_loadu_si128((const __m128i*)(a + i));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask4);
        const __m128i lo = _mm_and_si128(raw, mask4);
        const __m256i nibbles =
            _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(hi, lo)), _mm_unpackhi_epi8(hi, lo), 1);
        const __m512i idx = _mm512_cvtepu8_epi16(nibbles);
        _mm512_storeu_si512((void*)(o + 2 * i), _mm512_permutexvar_epi16(idx, tab));
    }
#elif defined(LQ_AVX2)
    i = nbytes & ~15LL;
    const __m128i h0 = _mm_loadu_si128((const __m128i*)table);
    const __m128i h1 = _mm_loadu_si128((const __m128i*)(table + 8));
    expand16_ymm(a, h0, h1, o, i);
#endif
    for (; i < nbytes; ++i) {
        const uint8_t byte = a[i];
        o[2 * i] = table[byte >> 4];
        o[2 * i + 1] = table[byte & 0x0F];
    }
}

#if defined(LQ_AVX512)
/* Whole blocks whose byte count is a multiple of 16 (the usual case): the table stays in a register and
 * there is no tail to handle, which keeps the per-block cost small next to a 64-value block's stores. */
static inline __attribute__((always_inline)) void expand32_zmm(
    const uint8_t* a, __m512i tab, uint32_t* o, long long nbytes
) {
    const __m128i mask4 = _mm_set1_epi8(0x0F);
    for (long long i = 0; i < nbytes; i += 16) {
        const __m128i raw = _mm_loadu_si128((const __m128i*)(a + i));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask4);
        const __m128i lo = _mm_and_si128(raw, mask4);
        _mm512_storeu_si512((void*)(o + 2 * i), _mm512_permutexvar_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), tab));
        _mm512_storeu_si512((void*)(o + 2 * i + 16), _mm512_permutexvar_epi32(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)), tab));
    }
}

static inline __attribute__((always_inline)) void expand16_zmm(
    const uint8_t* a, __m512i tab, uint16_t* o, long long nbytes
) {
    const __m128i mask4 = _mm_set1_epi8(0x0F);
    for (long long i = 0; i < nbytes; i += 16) {
        const __m128i raw = _mm_loadu_si128((const __m128i*)(a + i));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask4);
        const __m128i lo = _mm_and_si128(raw, mask4);
        const __m256i nibbles =
            _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(hi, lo)), _mm_unpackhi_epi8(hi, lo), 1);
        _mm512_storeu_si512((void*)(o + 2 * i), _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(nibbles), tab));
    }
}

static inline __attribute__((always_inline)) void run_whole_block_avx512(
    const lq_job* job, __m512 codev, long long b, float scale
) {
    const long long bs = job->blocksize;
    const uint8_t* a = job->packed + b * (bs / 2);
    const __m512 v = _mm512_mul_ps(codev, _mm512_set1_ps(scale));
    if (job->out_kind == LQ_OUT_F32) {
        expand32_zmm(a, _mm512_castps_si512(v), (uint32_t*)job->out + b * bs, bs / 2);
    } else {
        const __m256i h = job->out_kind == LQ_OUT_BF16
                              ? bf16_round_avx512(v)
                              : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        expand16_zmm(a, _mm512_castsi256_si512(h), (uint16_t*)job->out + b * bs, bs / 2);
    }
}
#elif defined(LQ_AVX2) && defined(__F16C__)
#define LQ_WHOLE_BLOCKS_AVX2 1
static inline __attribute__((always_inline)) void run_whole_block_avx2(
    const lq_job* job, __m256 code_lo, __m256 code_hi, long long b, float scale
) {
    const long long bs = job->blocksize;
    const uint8_t* a = job->packed + b * (bs / 2);
    const __m256 s = _mm256_set1_ps(scale);
    const __m256 v0 = _mm256_mul_ps(code_lo, s);
    const __m256 v1 = _mm256_mul_ps(code_hi, s);
    if (job->out_kind == LQ_OUT_F32) {
        expand32_ymm(a, _mm256_castps_si256(v0), _mm256_castps_si256(v1), (uint32_t*)job->out + b * bs, bs / 2);
    } else if (job->out_kind == LQ_OUT_BF16) {
        expand16_ymm(a, bf16_round_avx2(v0), bf16_round_avx2(v1), (uint16_t*)job->out + b * bs, bs / 2);
    } else {
#define LQ_RNE (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
        expand16_ymm(a, _mm256_cvtps_ph(v0, LQ_RNE), _mm256_cvtps_ph(v1, LQ_RNE), (uint16_t*)job->out + b * bs,
                     bs / 2);
#undef LQ_RNE
    }
}
#endif

static void run_blocks(const lq_job* job) {
    const long long bs = job->blocksize;
    /* the second-level block of block b, advanced as b grows (no division per block) */
    const long long nbs = job->absmax_f32 != NULL ? 1 : job->nested_blocksize;
    long long nested_index = job->block_begin / nbs;
    long long nested_end = (nested_index + 1) * nbs;
#if defined(LQ_AVX512) || defined(LQ_WHOLE_BLOCKS_AVX2)
    const long long whole_end = bs % 32 == 0 ? job->n / bs : 0; /* blocks before this one are whole */
#endif
#if defined(LQ_AVX512)
    const __m512 codev = _mm512_loadu_ps(job->code);
#elif defined(LQ_WHOLE_BLOCKS_AVX2)
    const __m256 code_lo = _mm256_loadu_ps(job->code);
    const __m256 code_hi = _mm256_loadu_ps(job->code + 8);
#endif
    for (long long b = job->block_begin; b < job->block_end; ++b) {
        if (b == nested_end) {
            ++nested_index;
            nested_end += nbs;
        }
#if defined(LQ_AVX512)
        if (b < whole_end) {
            run_whole_block_avx512(job, codev, b, block_scale(job, b, nested_index));
            continue;
        }
#endif
#if defined(LQ_WHOLE_BLOCKS_AVX2)
        if (b < whole_end) {
            run_whole_block_avx2(job, code_lo, code_hi, b, block_scale(job, b, nested_index));
            continue;
        }
#endif
        const long long first = b * bs; /* bs is even, so a block starts on a byte boundary */
        long long count = job->n - first;
        if (count > bs) {
            count = bs;
        }
        const long long pairs = count / 2;
        const int odd_tail = (int)(count & 1); /* only the very last value of an odd-sized tensor */
        const uint8_t* a = job->packed + first / 2;
        const float scale = block_scale(job, b, nested_index);
        if (job->out_kind == LQ_OUT_F32) {
            uint32_t table[16];
            build_table32(job->code, scale, table);
            uint32_t* o = (uint32_t*)job->out + first;
            expand32(a, table, o, pairs);
            if (odd_tail) {
                o[2 * pairs] = table[a[pairs] >> 4];
            }
        } else {
            uint16_t table[16];
            build_table16(job->code, scale, job->out_kind, table);
            uint16_t* o = (uint16_t*)job->out + first;
            expand16(a, table, o, pairs);
            if (odd_tail) {
                o[2 * pairs] = table[a[pairs] >> 4];
            }
        }
    }
}

static void* run_blocks_thread(void* arg) {
    run_blocks((const lq_job*)arg);
    return NULL;
}

/*
 * Dequantize n values. absmax_f32 (one float per block) or absmax_u8 + nested_code[256] +
 * nested_absmax (double quant) must be given. out_kind: 0 float32, 1 bfloat16, 2 float16.
 * Returns 0, or a negative number for arguments it cannot use (the Python wrapper checks them first).
 */
int lq_dequantize_4bit(
    const uint8_t* packed,
    const float* code,
    const float* absmax_f32,
    const uint8_t* absmax_u8,
    const float* nested_code,
    const float* nested_absmax,
    long long nested_blocksize,
    float offset,
    long long blocksize,
    long long n,
    void* out,
    int out_kind,
    int num_threads
) {
    if (packed == NULL || code == NULL || out == NULL || n < 0 || blocksize <= 0 || (blocksize & 1)) {
        return -1;
    }
    if (absmax_f32 == NULL && (absmax_u8 == NULL || nested_code == NULL || nested_absmax == NULL ||
                               nested_blocksize <= 0)) {
        return -2;
    }
    if (out_kind != LQ_OUT_F32 && out_kind != LQ_OUT_BF16 && out_kind != LQ_OUT_F16) {
        return -3;
    }
    if (n == 0) {
        return 0;
    }
    const long long nblocks = (n + blocksize - 1) / blocksize;
    if (num_threads < 1) {
        num_threads = 1;
    }
    if (num_threads > LQ_MAX_THREADS) {
        num_threads = LQ_MAX_THREADS;
    }
    if (num_threads > nblocks) {
        num_threads = (int)nblocks;
    }
    lq_job jobs[LQ_MAX_THREADS];
    pthread_t threads[LQ_MAX_THREADS];
    int started[LQ_MAX_THREADS];
    for (int t = 0; t < num_threads; ++t) {
        lq_job* job = &jobs[t];
        job->packed = packed;
        job->code = code;
        job->absmax_f32 = absmax_f32;
        job->absmax_u8 = absmax_u8;
        job->nested_code = nested_code;
        job->nested_absmax = nested_absmax;
        job->nested_blocksize = nested_blocksize;
        job->offset = offset;
        job->blocksize = blocksize;
        job->n = n;
        job->out = out;
        job->out_kind = out_kind;
        job->block_begin = nblocks * t / num_threads;
        job->block_end = nblocks * (t + 1) / num_threads;
        started[t] = 0;
    }
    /* Threads 1.. run beside the caller, which does chunk 0; a thread that cannot start runs here. */
    for (int t = 1; t < num_threads; ++t) {
        started[t] = pthread_create(&threads[t], NULL, run_blocks_thread, &jobs[t]) == 0;
    }
    run_blocks(&jobs[0]);
    for (int t = 1; t < num_threads; ++t) {
        if (started[t]) {
            pthread_join(threads[t], NULL);
        } else {
            run_blocks(&jobs[t]);
        }
    }
    return 0;
}
