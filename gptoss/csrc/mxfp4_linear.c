/* y = x W^T + b with W held as MXFP4 (gpt-oss expert layout), for a few tokens at a time.
 * Entry points (loaded by gptoss/mxfp4_linear.py through ctypes): mxfp4_linear (one projection),
 * mxfp4_experts (a layer's experts: gate_up, clamped SwiGLU, down), mxfp4_dequantize.
 *
 * W [rows, nblocks * 32]: blocks [rows, nblocks, 16] uint8 (low nibble = element 2j, high nibble =
 * element 2j+1, E2M1 codes), scales [rows, nblocks] uint8 (E8M0, multiplier 2^(s - 127)).
 * x arrives deinterleaved per block: xd [tokens, nblocks, 2, 16] float32 (the 16 even elements of
 * the block, then the 16 odd ones), so that the low and the high nibbles of 16 bytes each meet 16
 * consecutive floats. Every weight is decoded once per group of up to 4 tokens, in registers: no
 * dequantized copy of W is ever written. SIMD paths: AVX-512 (a 16-entry table lookup per 16 codes),
 * AVX2 + FMA (8 entries per 8 codes, sign apart); plain C elsewhere. Products are exact in float32; sums are float32 (their
 * order differs from a dequantize-then-GEMM, so results agree to float32 rounding, not bit for bit).
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

static const float FP4_VALUES[16] = {+0.0f, +0.5f, +1.0f, +1.5f, +2.0f, +3.0f, +4.0f, +6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

#define TOKEN_TILE 4

int mxfp4_linear_simd(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__) && defined(__FMA__)
    return 256;
#else
    return 0;
#endif
}

#if defined(__AVX512F__)
/* Four rows by NT <= 4 tokens (NT a constant once inlined, so the 16 sums stay in registers): each
 * decoded block serves NT tokens and each loaded x vector four rows. */
static inline __attribute__((always_inline)) void tile4_avx512(
        const uint8_t *blocks, const uint8_t *scales, const float *xd, const float *bias, float *out,
        int64_t rows, int64_t nblocks, int64_t r, int64_t t0, const int NT, const float *multiplier) {
    const __m512 lut = _mm512_loadu_ps(FP4_VALUES);
    const __m512i low4 = _mm512_set1_epi32(0x0F);
    const int64_t in_features = nblocks * 32;
    __m512 acc[4][TOKEN_TILE];
    for (int i = 0; i < 4; i++)
        for (int t = 0; t < NT; t++) acc[i][t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < nblocks; g++) {
        __m512 even[4], odd[4];
        for (int i = 0; i < 4; i++) {
            const int64_t at = (r + i) * nblocks + g;
            const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blocks + at * 16)));
            const __m512 scale = _mm512_set1_ps(multiplier[scales[at]]);
            even[i] = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(codes, low4), lut), scale);
            odd[i] = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), lut), scale);
        }
        for (int t = 0; t < NT; t++) {
            const float *xg = xd + (t0 + t) * in_features + g * 32;
            const __m512 xe = _mm512_loadu_ps(xg), xo = _mm512_loadu_ps(xg + 16);
            for (int i = 0; i < 4; i++) acc[i][t] = _mm512_fmadd_ps(odd[i], xo, _mm512_fmadd_ps(even[i], xe, acc[i][t]));
        }
    }
    for (int i = 0; i < 4; i++)
        for (int t = 0; t < NT; t++)
            out[(t0 + t) * rows + r + i] = _mm512_reduce_add_ps(acc[i][t]) + (bias ? bias[r + i] : 0.0f);
}
#elif defined(__AVX2__) && defined(__FMA__)
/* One block's 32 weights as w[0..3]: the low-nibble (even) elements of bytes 0-7 and 8-15, then the
 * high-nibble (odd) ones, i.e. in xd's order. AVX2 looks up 8 entries, not 16: the table holds the
 * eight magnitudes already times the block's scale (exact: a power of two), and bit 3 of a code is
 * its sign, moved to bit 31 and xor-ed in. */
static inline __attribute__((always_inline)) void decode_block_avx2(const uint8_t *codes, float scale, __m256 w[4]) {
    const __m256 lut = _mm256_mul_ps(_mm256_loadu_ps(FP4_VALUES), _mm256_set1_ps(scale));
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
    for (int half = 0; half < 2; half++) {
        const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + 8 * half)));
        /* vpermps reads only the low 3 bits of each index: the low nibble needs no mask. */
        w[half] = _mm256_xor_ps(_mm256_permutevar8x32_ps(lut, c),
                                _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(c, 28), sign)));
        w[2 + half] = _mm256_xor_ps(_mm256_permutevar8x32_ps(lut, _mm256_srli_epi32(c, 4)),
                                    _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(c, 24), sign)));
    }
}

static inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* NR rows by NT tokens, NR * NT <= 8 (AVX2 has 16 vector registers: the sums, one row's decoded
 * block and the table must fit): each decoded block serves NT tokens. */
static inline __attribute__((always_inline)) void tile_avx2(
        const uint8_t *blocks, const uint8_t *scales, const float *xd, const float *bias, float *out,
        int64_t rows, int64_t nblocks, int64_t r, int64_t t0, const int NR, const int NT, const float *multiplier) {
    const int64_t in_features = nblocks * 32;
    __m256 acc[4][TOKEN_TILE];
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < NT; t++) acc[i][t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < nblocks; g++) {
        for (int i = 0; i < NR; i++) {
            const int64_t at = (r + i) * nblocks + g;
            __m256 w[4];
            decode_block_avx2(blocks + at * 16, multiplier[scales[at]], w);
            for (int t = 0; t < NT; t++) {
                const float *xg = xd + (t0 + t) * in_features + g * 32;
                __m256 a = acc[i][t];
                for (int k = 0; k < 4; k++) a = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xg + 8 * k), a);
                acc[i][t] = a;
            }
        }
    }
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < NT; t++)
            out[(t0 + t) * rows + r + i] = hsum_avx2(acc[i][t]) + (bias ? bias[r + i] : 0.0f);
}
#endif

static void rows_range(const uint8_t *blocks, const uint8_t *scales, const float *xd, const float *bias,
                       float *out, int64_t tokens, int64_t rows, int64_t nblocks, int64_t r0, int64_t r1) {
    float multiplier[256];
    for (int s = 0; s < 256; s++) multiplier[s] = ldexpf(1.0f, s - 127);
    const int64_t in_features = nblocks * 32;
#if defined(__AVX512F__)
    for (; r0 + 4 <= r1; r0 += 4) {
        for (int64_t t0 = 0; t0 < tokens; t0 += TOKEN_TILE) {
            switch (tokens - t0 < TOKEN_TILE ? (int)(tokens - t0) : TOKEN_TILE) {
            case 1: tile4_avx512(blocks, scales, xd, bias, out, rows, nblocks, r0, t0, 1, multiplier); break;
            case 2: tile4_avx512(blocks, scales, xd, bias, out, rows, nblocks, r0, t0, 2, multiplier); break;
            case 3: tile4_avx512(blocks, scales, xd, bias, out, rows, nblocks, r0, t0, 3, multiplier); break;
            default: tile4_avx512(blocks, scales, xd, bias, out, rows, nblocks, r0, t0, 4, multiplier); break;
            }
        }
    }
#elif defined(__AVX2__) && defined(__FMA__)
    for (; r0 + 4 <= r1; r0 += 4) {
        for (int64_t t0 = 0; t0 < tokens; t0 += TOKEN_TILE) {
            switch (tokens - t0 < TOKEN_TILE ? (int)(tokens - t0) : TOKEN_TILE) {
            case 1: tile_avx2(blocks, scales, xd, bias, out, rows, nblocks, r0, t0, 4, 1, multiplier); break;
            case 2: tile_avx2(blocks, scales, xd, bias, out, rows, nblocks, r0, t0, 4, 2, multiplier); break;
            case 3:
                tile_avx2(blocks, scales, xd, bias, out, rows, nblocks, r0, t0, 2, 3, multiplier);
                tile_avx2(blocks, scales, xd, bias, out, rows, nblocks, r0 + 2, t0, 2, 3, multiplier);
                break;
            default:
                tile_avx2(blocks, scales, xd, bias, out, rows, nblocks, r0, t0, 2, 4, multiplier);
                tile_avx2(blocks, scales, xd, bias, out, rows, nblocks, r0 + 2, t0, 2, 4, multiplier);
                break;
            }
        }
    }
#endif
    for (int64_t r = r0; r < r1; r++) {  /* single rows: the rest, or every row without AVX-512/AVX2 */
        const uint8_t *row_blocks = blocks + r * nblocks * 16;
        const uint8_t *row_scales = scales + r * nblocks;
        const float b = bias ? bias[r] : 0.0f;
        for (int64_t t0 = 0; t0 < tokens; t0 += TOKEN_TILE) {
            const int nt = (int)((tokens - t0) < TOKEN_TILE ? (tokens - t0) : TOKEN_TILE);
#if defined(__AVX512F__)
            const __m512 lut = _mm512_loadu_ps(FP4_VALUES);
            const __m512i low4 = _mm512_set1_epi32(0x0F);
            /* Separate sums for even and odd elements: one FMA chain per token would wait on its own
             * latency at every block. */
            __m512 acc_even[TOKEN_TILE], acc_odd[TOKEN_TILE];
            for (int t = 0; t < TOKEN_TILE; t++) acc_even[t] = acc_odd[t] = _mm512_setzero_ps();
            for (int64_t g = 0; g < nblocks; g++) {
                const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row_blocks + g * 16)));
                const __m512 scale = _mm512_set1_ps(multiplier[row_scales[g]]);
                const __m512 even = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(codes, low4), lut), scale);
                const __m512 odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), lut), scale);
                for (int t = 0; t < nt; t++) {
                    const float *xg = xd + (t0 + t) * in_features + g * 32;
                    acc_even[t] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xg), acc_even[t]);
                    acc_odd[t] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xg + 16), acc_odd[t]);
                }
            }
            for (int t = 0; t < nt; t++)
                out[(t0 + t) * rows + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc_even[t], acc_odd[t])) + b;
#else
            float acc[TOKEN_TILE][16];
            memset(acc, 0, sizeof(acc));
            for (int64_t g = 0; g < nblocks; g++) {
                const uint8_t *codes = row_blocks + g * 16;
                const float scale = multiplier[row_scales[g]];
                float even[16], odd[16];
                for (int j = 0; j < 16; j++) {
                    even[j] = FP4_VALUES[codes[j] & 0x0F] * scale;
                    odd[j] = FP4_VALUES[codes[j] >> 4] * scale;
                }
                for (int t = 0; t < nt; t++) {
                    const float *xg = xd + (t0 + t) * in_features + g * 32;
                    for (int j = 0; j < 16; j++) acc[t][j] += even[j] * xg[j] + odd[j] * xg[16 + j];
                }
            }
            for (int t = 0; t < nt; t++) {
                float sum = 0.0f;
                for (int j = 0; j < 16; j++) sum += acc[t][j];
                out[(t0 + t) * rows + r] = sum + b;
            }
#endif
        }
    }
}

/* One row range of `rows` split into whole tiles of four over the calling team of threads. */
static void split_rows(int64_t rows, int64_t *r0, int64_t *r1) {
#ifdef _OPENMP
    extern int omp_get_thread_num(void);
    extern int omp_get_num_threads(void);
    const int64_t n = omp_get_num_threads(), i = omp_get_thread_num();
#else
    const int64_t n = 1, i = 0;
#endif
    const int64_t per = ((rows + n - 1) / n + 3) / 4 * 4;
    *r0 = i * per < rows ? i * per : rows;
    *r1 = *r0 + per < rows ? *r0 + per : rows;
}

/* out [tokens, rows] float32. Rows are split over `num_threads` OpenMP threads. */
void mxfp4_linear(const uint8_t *blocks, const uint8_t *scales, const float *xd, const float *bias, float *out,
                  int64_t tokens, int64_t rows, int64_t nblocks, int num_threads) {
    if (num_threads < 1) num_threads = 1;
#pragma omp parallel num_threads(num_threads)
    {
        int64_t r0, r1;
        split_rows(rows, &r0, &r1);
        if (r0 < r1) rows_range(blocks, scales, xd, bias, out, tokens, rows, nblocks, r0, r1);
    }
}

/* out [nblocks * 32] float32 (out_bf16 = 0) or bfloat16 (out_bf16 = 1): the values of `nblocks` blocks
 * in element order. Every value is a code times a power of two, exact in bf16 (within its range): the
 * upper half of its float32 is its bfloat16. Blocks are split over `num_threads` OpenMP threads. */
void mxfp4_dequantize(const uint8_t *blocks, const uint8_t *scales, void *out, int64_t nblocks, int out_bf16,
                      int num_threads) {
    float multiplier[256];
    for (int s = 0; s < 256; s++) multiplier[s] = ldexpf(1.0f, s - 127);
    if (num_threads < 1) num_threads = 1;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t g = 0; g < nblocks; g++) {
        float values[32];
#if defined(__AVX512F__)
        const __m512 lut = _mm512_loadu_ps(FP4_VALUES);
        const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blocks + g * 16)));
        const __m512 scale = _mm512_set1_ps(multiplier[scales[g]]);
        const __m512 even = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(codes, _mm512_set1_epi32(0x0F)), lut), scale);
        const __m512 odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), lut), scale);
        /* Interleave: element 2j from the low nibble of byte j, 2j+1 from its high nibble. */
        const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
        _mm512_storeu_ps(values, _mm512_permutex2var_ps(even, first, odd));
        _mm512_storeu_ps(values + 16, _mm512_permutex2var_ps(even, second, odd));
#elif defined(__AVX2__) && defined(__FMA__)
        __m256 w[4];
        decode_block_avx2(blocks + g * 16, multiplier[scales[g]], w);
        for (int half = 0; half < 2; half++) {  /* interleave the even and odd elements of 8 bytes */
            const __m256 lo = _mm256_unpacklo_ps(w[half], w[2 + half]), hi = _mm256_unpackhi_ps(w[half], w[2 + half]);
            _mm256_storeu_ps(values + 16 * half, _mm256_permute2f128_ps(lo, hi, 0x20));
            _mm256_storeu_ps(values + 16 * half + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
        }
#else
        const float scale = multiplier[scales[g]];
        for (int j = 0; j < 16; j++) {
            values[2 * j] = FP4_VALUES[blocks[g * 16 + j] & 0x0F] * scale;
            values[2 * j + 1] = FP4_VALUES[blocks[g * 16 + j] >> 4] * scale;
        }
#endif
        if (out_bf16) {
            uint16_t *dst = (uint16_t *)out + g * 32;
            for (int j = 0; j < 32; j++) {
                uint32_t bits;
                memcpy(&bits, &values[j], 4);
                dst[j] = (uint16_t)(bits >> 16);
            }
        } else {
            memcpy((float *)out + g * 32, values, sizeof(values));
        }
    }
}

/* dst [32] = src's 16 even elements, then its 16 odd ones (see xd above). */
static inline void deinterleave32(const float *src, float *dst) {
    for (int k = 0; k < 16; k++) {
        dst[k] = src[2 * k];
        dst[16 + k] = src[2 * k + 1];
    }
}

/* A layer's experts in one call: x [N, H] float32 sorted by expert, counts[e] rows for expert e, each
 * row through its expert's gate_up projection, the clamped SwiGLU (gate at even, linear at odd
 * columns, +1 on the linear part) and the down projection -> out [N, H]. Experts with more than
 * max_tokens rows are skipped (their rows of out are left as they are). Weights [E, out, in/32, 16]
 * and [E, out, in/32], biases [E, out] float32. workspace: (the most rows run) * (H + 3 * I) floats. */
void mxfp4_experts(const uint8_t *gu_blocks, const uint8_t *gu_scales, const float *gu_bias,
                   const uint8_t *dn_blocks, const uint8_t *dn_scales, const float *dn_bias,
                   const float *x, const int64_t *counts, float *out, float *workspace,
                   int64_t num_experts, int64_t hidden, int64_t inter, float alpha, float limit, int64_t max_tokens,
                   int num_threads) {
    const int64_t gh = hidden / 32, gi = inter / 32;
    int64_t most = 0;
    for (int64_t e = 0; e < num_experts; e++) most = counts[e] > most && counts[e] <= max_tokens ? counts[e] : most;
    float *xd = workspace, *h = xd + most * hidden, *ad = h + most * 2 * inter;
    if (num_threads < 1) num_threads = 1;
#pragma omp parallel num_threads(num_threads)
    {
        int64_t start = 0;
        for (int64_t e = 0; e < num_experts; e++) {
            const int64_t n = counts[e];
            if (n == 0) continue;
            if (n > max_tokens) {
                start += n;
                continue;
            }
            int64_t r0, r1;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < n * gh; i++) deinterleave32(x + start * hidden + i * 32, xd + i * 32);
            split_rows(2 * inter, &r0, &r1);
            rows_range(gu_blocks + e * 2 * inter * gh * 16, gu_scales + e * 2 * inter * gh, xd, gu_bias + e * 2 * inter,
                       h, n, 2 * inter, gh, r0, r1);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t i = 0; i < n * gi; i++) {
                const float *hb = h + (i / gi) * 2 * inter + (i % gi) * 64;  /* 32 (gate, linear) pairs */
                float a[32];
                for (int k = 0; k < 32; k++) {
                    const float glu = hb[2 * k] < limit ? hb[2 * k] : limit;
                    const float lin = hb[2 * k + 1] < -limit ? -limit : (hb[2 * k + 1] > limit ? limit : hb[2 * k + 1]);
                    a[k] = glu * (1.0f / (1.0f + expf(-alpha * glu))) * (lin + 1.0f);
                }
                deinterleave32(a, ad + i * 32);
            }
            split_rows(hidden, &r0, &r1);
            rows_range(dn_blocks + e * hidden * gi * 16, dn_scales + e * hidden * gi, ad, dn_bias + e * hidden,
                       out + start * hidden, n, hidden, gi, r0, r1);
#pragma omp barrier
            start += n;
        }
    }
}
