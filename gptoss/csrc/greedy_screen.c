/* Exact greedy tokens without the full float32 unembedding (loaded by gptoss/greedy_unembedding.py).
 *
 * For each hidden row h [K] the wanted token is argmax_i h.w_i over the vocabulary (V rows w_i). A
 * cheap 7-bit integer product screens all rows; only the rows that the screen cannot rule out are
 * then scored exactly (in double: the products of float32 values are exact, the sums nearly so). A
 * bfloat16 unembedding's logits are bfloat16: there the scores are rounded so, and the argmax is the
 * lowest index among the largest rounded ones (see relaxed()).
 *
 * Weights: wq [V, Kp] int8 in [-64, 64] with w_i ~ sw[i] * wq[i] (Kp = K padded to 64 with zeros),
 * rowsum[i] = sum_k wq[i, k], wnorm[i] >= ||w_i||, werr[i] >= ||w_i - sw[i] wq[i]|| (doubles).
 * Activations: q = round(h / sa) in [-63, 63] with sa = max|h| / 63, stored as u = q + 64 (so that
 * vpmaddubsw, unsigned x signed, sums two products of at most 127 * 64 and then two such pairs in 16
 * bits without overflow). Then sum_k u_k wq_ik = sum_k q_k wq_ik + 64 rowsum[i] exactly, and
 *   |h.w_i - sa sw[i] sum_k q_k wq_ik| <= ||h - h^|| ||w_i|| + ||h^|| ||w_i - w^_i||  (Cauchy-Schwarz)
 * with h^ = sa q. A row whose upper bound falls below some row's lower bound cannot be the argmax:
 * the candidates are the rows whose upper bound reaches the largest lower bound. Each thread keeps,
 * per hidden row, the candidates that reached its running largest lower bound (compacted when its
 * pool fills); a row whose pool holds more than POOL live candidates is left undecided (-1) for the
 * caller's full unembedding (nothing is screened out when h is zero, for instance).
 *
 * Scales, norms and bounds are doubles: products of float scales underflow to zero (tiny weights and
 * activations) or overflow to inf (huge ones) in float, and a bound that is 0 or NaN there would rule
 * out the true argmax; in double neither can happen for finite float inputs. A bound that is still not
 * a number keeps its row (a candidate is never dropped for want of a comparison).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define ACT_MAX 63
#define ACT_ZERO 64
#define POOL 2048
#define ROW_TILE 2
#define TOKEN_TILE 3
#define VOCAB_BLOCK 64 /* rows whose int8 weights (64 x Kp bytes) serve every hidden row from cache */

int greedy_screen_simd(void) {
#if defined(__AVX2__)
    return 256;
#else
    return 0;
#endif
}

typedef struct {
    int32_t *index;
    double *upper;
    int n, overflow, bf16;
    double max_lower;
    double reach; /* what an upper bound must reach to stay a candidate: see relaxed() */
} Pool;

/* The threshold for a largest lower bound x. Exact argmax: x itself. Argmax of the logits rounded to
 * bfloat16 (ties to the lowest index): every row whose rounded logit equals the rounded maximum must
 * stay, and such a row's logit is at least x less one bfloat16 ulp of x (<= 2^-7 |x|; 2^-6 is taken),
 * less float's smallest normal for the logits that round to zero or to subnormals. */
static inline double relaxed(double x, int bf16) {
    return bf16 ? x - 0x1p-6 * fabs(x) - 0x1p-126 : x;
}

static inline void raise_max_lower(Pool *p, double lower) {
    if (lower > p->max_lower) {
        p->max_lower = lower;
        p->reach = relaxed(lower, p->bf16);
    }
}

static void pool_offer(Pool *p, int32_t index, double lower, double upper) {
    if (upper < p->reach || p->overflow) return; /* a NaN upper bound stays */
    raise_max_lower(p, lower);
    if (p->n == POOL) {
        int kept = 0;
        for (int j = 0; j < p->n; j++)
            if (!(p->upper[j] < p->reach)) {
                p->index[kept] = p->index[j];
                p->upper[kept++] = p->upper[j];
            }
        p->n = kept;
        if (kept == POOL) {
            p->overflow = 1;
            return;
        }
    }
    p->index[p->n] = index;
    p->upper[p->n++] = upper;
}

/* dots[(t0 + t) * VOCAB_BLOCK + r + i] = sum_k u[t0 + t, k] * wq[rb + r + i, k], for NR <= ROW_TILE rows
 * and NT <= TOKEN_TILE tokens. */
static inline __attribute__((always_inline)) void dot_tile(const int8_t *wq, const uint8_t *u, int64_t kp, int64_t rb,
                                                           int64_t r, int64_t t0, const int NR, const int NT,
                                                           int32_t *dots) {
    wq += rb * kp;
#if defined(__AVX2__)
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[ROW_TILE][TOKEN_TILE];
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < NT; t++) acc[i][t] = _mm256_setzero_si256();
    /* Unrolled: on Zen 3, 8 rows 11 -> 8.5 ms and 32 rows 28 -> 25 ms over 201088 x 512. */
#pragma GCC unroll 4
    for (int64_t k = 0; k < kp; k += 64) {
        __m256i w0[ROW_TILE], w1[ROW_TILE];
        for (int i = 0; i < NR; i++) {
            w0[i] = _mm256_loadu_si256((const __m256i *)(wq + (r + i) * kp + k));
            w1[i] = _mm256_loadu_si256((const __m256i *)(wq + (r + i) * kp + k + 32));
        }
        for (int t = 0; t < NT; t++) {
            const __m256i a0 = _mm256_loadu_si256((const __m256i *)(u + (t0 + t) * kp + k));
            const __m256i a1 = _mm256_loadu_si256((const __m256i *)(u + (t0 + t) * kp + k + 32));
            for (int i = 0; i < NR; i++) {
                const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(a0, w0[i]), _mm256_maddubs_epi16(a1, w1[i]));
                acc[i][t] = _mm256_add_epi32(acc[i][t], _mm256_madd_epi16(pairs, ones));
            }
        }
    }
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < NT; t++) {
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[i][t]), _mm256_extracti128_si256(acc[i][t], 1));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
            dots[(t0 + t) * VOCAB_BLOCK + r + i] = _mm_cvtsi128_si32(s);
        }
#else
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < NT; t++) {
            int32_t s = 0;
            for (int64_t k = 0; k < kp; k++) s += (int32_t)u[(t0 + t) * kp + k] * wq[(r + i) * kp + k];
            dots[(t0 + t) * VOCAB_BLOCK + r + i] = s;
        }
#endif
}

typedef struct {
    const int8_t *wq;
    const float *sw;
    const double *wnorm, *werr;
    const int32_t *rowsum;
    const uint8_t *u;
    const double *sa, *a_err, *a_norm;
    int64_t kp;
} Screen;

/* The bounds' own rounding (products and sums in double, a few 1e-16 relative each; the norms' sums
 * over K terms, K * 1e-16): this margin covers it many times over. */
#define BOUND_MARGIN 1e-9

/* One block of rows [rb, rb + nrows) against one token: its rows' bounds from their integer dots,
 * eight at a time; only the rows that reach the running largest lower bound go to the pool. */
static void offer_block(const Screen *s, Pool *p, const int32_t *dots, int64_t rb, int64_t nrows, int64_t tok) {
    double lower[VOCAB_BLOCK], upper[VOCAB_BLOCK];
    const double sa = s->sa[tok], a_err = s->a_err[tok], a_norm = s->a_norm[tok];
    double block_max = -INFINITY;
    int64_t j = 0;
#if defined(__AVX2__)
    const __m256d margin = _mm256_set1_pd(1 + BOUND_MARGIN), rel = _mm256_set1_pd(BOUND_MARGIN);
    const __m256d vsa = _mm256_set1_pd(sa), verr = _mm256_set1_pd(a_err), vnorm = _mm256_set1_pd(a_norm);
    const __m256d abs_mask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFLL));
    const __m128i zero = _mm_set1_epi32(ACT_ZERO);
    __m256d vmax = _mm256_set1_pd(-INFINITY);
    for (; j + 4 <= nrows; j += 4) {
        const __m128i dq = _mm_sub_epi32(_mm_loadu_si128((const __m128i *)(dots + j)),
                                         _mm_mullo_epi32(zero, _mm_loadu_si128((const __m128i *)(s->rowsum + rb + j))));
        const __m256d scale = _mm256_mul_pd(vsa, _mm256_cvtps_pd(_mm_loadu_ps(s->sw + rb + j)));
        const __m256d approx = _mm256_mul_pd(_mm256_cvtepi32_pd(dq), scale);
        __m256d bound = _mm256_fmadd_pd(verr, _mm256_loadu_pd(s->wnorm + rb + j),
                                        _mm256_mul_pd(vnorm, _mm256_loadu_pd(s->werr + rb + j)));
        bound = _mm256_fmadd_pd(bound, margin, _mm256_mul_pd(rel, _mm256_and_pd(approx, abs_mask)));
        const __m256d lo = _mm256_sub_pd(approx, bound);
        _mm256_storeu_pd(lower + j, lo);
        _mm256_storeu_pd(upper + j, _mm256_add_pd(approx, bound));
        vmax = _mm256_max_pd(lo, vmax); /* a NaN lower bound raises nothing */
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, vmax);
    for (int l = 0; l < 4; l++) block_max = fmax(block_max, lanes[l]);
#endif
    for (; j < nrows; j++) {
        const double approx = (double)(dots[j] - ACT_ZERO * s->rowsum[rb + j]) * (sa * (double)s->sw[rb + j]);
        const double bound = (a_err * s->wnorm[rb + j] + a_norm * s->werr[rb + j]) * (1 + BOUND_MARGIN)
                             + BOUND_MARGIN * fabs(approx);
        lower[j] = approx - bound;
        upper[j] = approx + bound;
        block_max = fmax(block_max, lower[j]);
    }
    raise_max_lower(p, block_max);
    j = 0;
#if defined(__AVX2__)
    const __m256d threshold = _mm256_set1_pd(p->reach);
    for (; j + 4 <= nrows; j += 4) {
        /* not below the threshold: reaching it, or a NaN */
        int reach = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(upper + j), threshold, _CMP_NLT_UQ));
        for (; reach; reach &= reach - 1) {
            const int l = __builtin_ctz(reach);
            pool_offer(p, (int32_t)(rb + j + l), lower[j + l], upper[j + l]);
        }
    }
#endif
    for (; j < nrows; j++)
        if (!(upper[j] < p->reach)) pool_offer(p, (int32_t)(rb + j), lower[j], upper[j]);
}

static void screen_rows(const Screen *s, Pool *pools, int64_t r0, int64_t r1, int64_t tokens, int32_t *dots) {
    for (int64_t rb = r0; rb < r1; rb += VOCAB_BLOCK) {
        const int64_t nrows = rb + VOCAB_BLOCK < r1 ? VOCAB_BLOCK : r1 - rb;
        for (int64_t t0 = 0; t0 < tokens; t0 += TOKEN_TILE) {
            const int64_t nt = tokens - t0 < TOKEN_TILE ? tokens - t0 : TOKEN_TILE;
            int64_t r = 0;
            for (; r + ROW_TILE <= nrows; r += ROW_TILE) {
                switch (nt) {
                    case 3: dot_tile(s->wq, s->u, s->kp, rb, r, t0, ROW_TILE, 3, dots); break;
                    case 2: dot_tile(s->wq, s->u, s->kp, rb, r, t0, ROW_TILE, 2, dots); break;
                    default: dot_tile(s->wq, s->u, s->kp, rb, r, t0, ROW_TILE, 1, dots);
                }
            }
            for (; r < nrows; r++) {
                switch (nt) {
                    case 3: dot_tile(s->wq, s->u, s->kp, rb, r, t0, 1, 3, dots); break;
                    case 2: dot_tile(s->wq, s->u, s->kp, rb, r, t0, 1, 2, dots); break;
                    default: dot_tile(s->wq, s->u, s->kp, rb, r, t0, 1, 1, dots);
                }
            }
        }
        for (int64_t t = 0; t < tokens; t++) offer_block(s, &pools[t], dots + t * VOCAB_BLOCK, rb, nrows, t);
    }
}

static inline float bf16_to_float(uint16_t v) {
    const uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Element `at` of w, float32 or bfloat16. */
static inline float weight_at(const void *w, int w_bf16, int64_t at) {
    return w_bf16 ? bf16_to_float(((const uint16_t *)w)[at]) : ((const float *)w)[at];
}

static double exact_dot_bf16(const float *h, const uint16_t *w, int64_t k) {
    double s = 0;
    int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256d acc[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    for (; j + 8 <= k; j += 8)
        for (int a = 0; a < 2; a++) {
            const __m128i bits = _mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)(w + j + 4 * a))), 16);
            acc[a] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(h + j + 4 * a)), _mm256_cvtps_pd(_mm_castsi128_ps(bits)),
                                     acc[a]);
        }
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(acc[0], acc[1]));
    s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
    for (; j < k; j++) s += (double)h[j] * (double)bf16_to_float(w[j]);
    return s;
}

/* double -> float -> bfloat16 (round to nearest even both times), back as a float. */
static inline float round_bf16(double x) {
    const float f = (float)x;
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
    float r;
    memcpy(&r, &bits, sizeof r);
    return r;
}

static double exact_dot(const float *h, const float *w, int64_t k) {
    double s = 0;
    int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
    for (; j + 16 <= k; j += 16)
        for (int a = 0; a < 4; a++)
            acc[a] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(h + j + 4 * a)), _mm256_cvtps_pd(_mm_loadu_ps(w + j + 4 * a)),
                                     acc[a]);
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3])));
    s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
    for (; j < k; j++) s += (double)h[j] * (double)w[j];
    return s;
}

/* h [tokens, k] float32, w [vocab, k] float32, or bfloat16 with w_bf16 (the unembedding itself, for
 * the exact scores) -> out[t] the argmax of row t (lowest index among equal scores; with w_bf16,
 * among the scores rounded to bfloat16, as a bfloat16 matmul's logits are) or -1 where undecided;
 * candidates[t] the number of rows scored exactly. Returns 0, or -1 if memory ran out (out then all -1). */
int greedy_screen(const int8_t *wq, const float *sw, const int32_t *rowsum, const double *wnorm, const double *werr,
                  const void *w, int w_bf16, const float *h, int64_t tokens, int64_t vocab, int64_t k, int64_t kp,
                  int64_t *out, int32_t *candidates, int num_threads) {
    for (int64_t t = 0; t < tokens; t++) out[t] = -1, candidates[t] = 0;
    if (num_threads < 1) num_threads = 1;
#if !defined(_OPENMP)
    num_threads = 1;
#endif
    uint8_t *u = aligned_alloc(64, (size_t)(tokens * kp + 64));
    double *sa = malloc(sizeof(double) * 3 * tokens);
    Pool *pools = calloc((size_t)(num_threads * tokens), sizeof(Pool));
    int32_t *index = malloc(sizeof(int32_t) * POOL * num_threads * tokens);
    double *upper = malloc(sizeof(double) * POOL * num_threads * tokens);
    int32_t *dots = malloc(sizeof(int32_t) * VOCAB_BLOCK * num_threads * tokens);
    int ok = u && sa && pools && index && upper && dots;
    if (ok) {
        double *a_err = sa + tokens, *a_norm = sa + 2 * tokens;
        for (int64_t t = 0; t < tokens; t++) {
            const float *ht = h + t * k;
            float amax = 0;
            for (int64_t j = 0; j < k; j++) amax = fmaxf(amax, fabsf(ht[j]));
            const double scale = amax > 0 ? (double)amax / ACT_MAX : 1.0;
            double err2 = 0, norm2 = 0;
            for (int64_t j = 0; j < kp; j++) {
                double q = 0;
                if (j < k) {
                    q = nearbyint((double)ht[j] / scale);
                    q = q > ACT_MAX ? ACT_MAX : (q < -ACT_MAX ? -ACT_MAX : q);
                    const double d = ht[j] - q * scale;
                    err2 += d * d;
                    norm2 += q * scale * q * scale;
                }
                u[t * kp + j] = (uint8_t)(q + ACT_ZERO);
            }
            sa[t] = scale;
            /* Rounded up: the bounds must hold. */
            a_err[t] = nextafter(sqrt(err2), INFINITY);
            a_norm[t] = nextafter(sqrt(norm2), INFINITY);
        }
        for (int64_t p = 0; p < num_threads * tokens; p++) {
            pools[p].index = index + p * POOL;
            pools[p].upper = upper + p * POOL;
            pools[p].max_lower = pools[p].reach = -INFINITY;
            pools[p].bf16 = w_bf16;
        }
        const Screen s = {wq, sw, wnorm, werr, rowsum, u, sa, a_err, a_norm, kp};
#pragma omp parallel num_threads(num_threads)
        {
#if defined(_OPENMP)
            extern int omp_get_thread_num(void);
            extern int omp_get_num_threads(void);
            const int64_t n = omp_get_num_threads(), id = omp_get_thread_num();
#else
            const int64_t n = 1, id = 0;
#endif
            const int64_t r0 = vocab * id / n, r1 = vocab * (id + 1) / n;
            screen_rows(&s, pools + id * tokens, r0, r1, tokens, dots + id * tokens * VOCAB_BLOCK);
        }
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
        for (int64_t t = 0; t < tokens; t++) {
            double max_lower = -INFINITY;
            int overflow = 0;
            for (int i = 0; i < num_threads; i++) {
                const Pool *p = &pools[i * tokens + t];
                overflow |= p->overflow;
                if (p->max_lower > max_lower) max_lower = p->max_lower;
            }
            if (overflow || !(max_lower > -INFINITY)) continue;
            const double reach = relaxed(max_lower, w_bf16);
            int64_t best = -1;
            double best_score = -INFINITY;
            int32_t scored = 0;
            for (int i = 0; i < num_threads; i++) {
                const Pool *p = &pools[i * tokens + t];
                for (int j = 0; j < p->n; j++) {
                    if (p->upper[j] < reach) continue; /* a NaN bound is scored */
                    const int64_t row = p->index[j];
                    const double exact = w_bf16 ? exact_dot_bf16(h + t * k, (const uint16_t *)w + row * k, k)
                                                : exact_dot(h + t * k, (const float *)w + row * k, k);
                    const double score = w_bf16 ? round_bf16(exact) : exact;
                    scored++;
                    if (score > best_score || (score == best_score && row < best)) best = row, best_score = score;
                }
            }
            out[t] = best;
            candidates[t] = scored;
        }
    }
    free(u);
    free(sa);
    free(pools);
    free(index);
    free(upper);
    free(dots);
    return ok ? 0 : -1;
}

/* The screen's copy of w [vocab, k] (float32, or bfloat16 with w_bf16): per row, sw = max|w| / 64
 * (1 for a zero row), wq = round(w / sw) (zero-padded to kp columns), rowsum = sum(wq), and the norms
 * wnorm >= ||w||, werr >= ||w - sw wq||, summed in double and rounded up. */
void greedy_screen_prepare(const void *w, int w_bf16, int64_t vocab, int64_t k, int64_t kp, int8_t *wq, float *sw,
                           int32_t *rowsum, double *wnorm, double *werr, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < vocab; r++) {
        float amax = 0;
        for (int64_t j = 0; j < k; j++) amax = fmaxf(amax, fabsf(weight_at(w, w_bf16, r * k + j)));
        float scale = amax > 0 ? amax / 64 : 1.0f; /* exact for normal numbers: a power-of-two division */
        if (!(scale > 0)) scale = amax; /* amax / 64 underflowed: codes in [-1, 1], werr holds the rest */
        double norm2 = 0, err2 = 0;
        int32_t sum = 0;
        for (int64_t j = 0; j < kp; j++) {
            int q = 0;
            if (j < k) {
                const float x = weight_at(w, w_bf16, r * k + j);
                q = (int)nearbyint((double)x / scale);
                q = q > 64 ? 64 : (q < -64 ? -64 : q);
                const double d = (double)x - (double)q * scale;
                norm2 += (double)x * x;
                err2 += d * d;
            }
            wq[r * kp + j] = (int8_t)q;
            sum += q;
        }
        sw[r] = scale;
        rowsum[r] = sum;
        wnorm[r] = nextafter(sqrt(norm2), INFINITY);
        werr[r] = err2 > 0 ? nextafter(sqrt(err2), INFINITY) : 0.0;
    }
}
