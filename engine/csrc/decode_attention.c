/* Decode attention over the paged KV cache on CPU (loaded by engine/decode_attention.py): one query
 * token per request, each reading its own keys straight from the cache's blocks, with sinks, sliding
 * window and GQA; no gathered or padded copy of K/V is made.
 *
 * q [B, Hq, D] float32; k_cache, v_cache [Hkv, num_blocks, block_size, D] float32 or bfloat16;
 * table [B, nbt] int64: request b's blocks, the first holding key position key_start[b];
 * query_pos [B]: the position of b's query (its own K/V already written); window 0: none.
 * out [B, Hq, D] float32 = softmax over [scores of the visible keys, sink] applied to V (the sink has
 * no value), with scores = (q * scale) . k. The same math as the torch path (engine/attention.py),
 * summed in another order.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

static inline float load_value(const void *base, int64_t i, int bf16) {
    if (!bf16) return ((const float *)base)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)base)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* q . row over d elements (row float32 or bf16 at element offset `at`). */
static inline float dot(const float *q, const void *base, int64_t at, int64_t d, int bf16) {
    int64_t j = 0;
    float s = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    if (bf16) {
        const uint16_t *row = (const uint16_t *)base + at;
        for (; j + 8 <= d; j += 8) {
            const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + j))), 16);
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_castsi256_ps(wide), acc);
        }
    } else {
        const float *row = (const float *)base + at;
        for (; j + 8 <= d; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(row + j), acc);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    s = _mm_cvtss_f32(h);
#endif
    for (; j < d; j++) s += q[j] * load_value(base, at + j, bf16);
    return s;
}

/* out += p * row over d elements. */
static inline void axpy(float *out, float p, const void *base, int64_t at, int64_t d, int bf16) {
    int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 vp = _mm256_set1_ps(p);
    if (bf16) {
        const uint16_t *row = (const uint16_t *)base + at;
        for (; j + 8 <= d; j += 8) {
            const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + j))), 16);
            _mm256_storeu_ps(out + j, _mm256_fmadd_ps(vp, _mm256_castsi256_ps(wide), _mm256_loadu_ps(out + j)));
        }
    } else {
        const float *row = (const float *)base + at;
        for (; j + 8 <= d; j += 8)
            _mm256_storeu_ps(out + j, _mm256_fmadd_ps(vp, _mm256_loadu_ps(row + j), _mm256_loadu_ps(out + j)));
    }
#endif
    for (; j < d; j++) out[j] += p * load_value(base, at + j, bf16);
}

/* Returns 0, or -1 if memory for the scores ran out (out is then not written). */
int decode_attention(const float *q, const void *k_cache, const void *v_cache, int kv_bf16, const int64_t *table,
                     const int64_t *query_pos, const int64_t *key_start, int64_t window, const float *sinks,
                     float scale, int64_t batch, int64_t hq, int64_t hkv, int64_t d, int64_t num_blocks,
                     int64_t block_size, int64_t nbt, float *out, int num_threads) {
    const int64_t g = hq / hkv, max_keys = nbt * block_size;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * (size_t)(max_keys > 0 ? max_keys : 1));
        float *qs = malloc(sizeof(float) * (size_t)d);
        if (!scores || !qs) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < batch * hkv; item++) {
            if (!scores || !qs) continue;
            const int64_t b = item / hkv, kh = item % hkv;
            const int64_t last = query_pos[b];
            int64_t first = key_start[b];
            if (window > 0 && last - window + 1 > first) first = last - window + 1;
            const int64_t n = last >= first ? last - first + 1 : 0;
            const int64_t head_base = kh * num_blocks * block_size;
            for (int64_t gi = 0; gi < g; gi++) {
                const int64_t h = kh * g + gi;
                for (int64_t j = 0; j < d; j++) qs[j] = q[(b * hq + h) * d + j] * scale;
                const float sink = sinks[h];
                float peak = sink;
                for (int64_t i = 0; i < n; i++) {
                    const int64_t key = first + i - key_start[b];
                    const int64_t slot = table[b * nbt + key / block_size] * block_size + key % block_size;
                    scores[i] = dot(qs, k_cache, (head_base + slot) * d, d, kv_bf16);
                    if (scores[i] > peak) peak = scores[i];
                }
                float *o = out + (b * hq + h) * d;
                memset(o, 0, sizeof(float) * (size_t)d);
                float denom = expf(sink - peak);
                for (int64_t i = 0; i < n; i++) {
                    const int64_t key = first + i - key_start[b];
                    const int64_t slot = table[b * nbt + key / block_size] * block_size + key % block_size;
                    const float p = expf(scores[i] - peak);
                    denom += p;
                    axpy(o, p, v_cache, (head_base + slot) * d, d, kv_bf16);
                }
                for (int64_t j = 0; j < d; j++) o[j] /= denom;
            }
        }
        free(scores);
        free(qs);
    }
    return failed ? -1 : 0;
}
