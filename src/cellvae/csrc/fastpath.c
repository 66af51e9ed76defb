/*
 * cellvae native training kernels (optional; see cellvae/native.py, which compiles this file on first use and
 * falls back to the PyTorch code when no C compiler is found).
 *
 * 1. cv_nb_loglik: the per-cell negative-binomial / zero-inflated NB log-likelihood of integer counts under the
 *    scVI decoder, from the decoder's pre-softmax logits a (n, G) and the log library size L (n,):
 *        log mu = L + a - logsumexp(a),  NB(mu, theta),  ZINB(mu, theta, zi),
 *    with every derivative the training step needs, in one pass over the (n, G) parameters. The element-wise
 *    algebra is that of cellvae.distributions._NBSparse (d = log mu - log theta, A = log NB(0) = -theta
 *    softplus(d)); the lgamma terms of the non-zero counts, lgamma(x + theta) - lgamma(theta) - lgamma(x + 1),
 *    come from a product of (theta + j) for small counts and from lgamma / digamma above.
 *    References: Lopez et al. 2018 (Nat. Methods 15:1053), Methods; the ZINB form of scvi-tools'
 *    log_zinb_positive.
 * 2. cv_csr_linear / cv_csr_linear_wgrad: y = X W^T + b and dW^T = X^T g for a CSR matrix X of counts
 *    (the first encoder layer on sparse minibatches), work in proportion to the non-zeros of X.
 *
 * Everything is float32 with float64 accumulation where sums run over genes; indices are int64. The loops over
 * genes are written branch-free (exp and log1p below are polynomial) so that the compiler vectorises them
 * (OpenMP SIMD pragmas, compiled with -fopenmp-simd; no OpenMP runtime is used and no thread is started).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define RESTRICT __restrict__

static inline float bits_to_float(int32_t i) { float f; memcpy(&f, &i, 4); return f; }
static inline int32_t float_to_bits(float f) { int32_t i; memcpy(&i, &f, 4); return i; }

/* e^x for x <= 0 (relative error ~1e-7; 0 below -87; NaN stays NaN). Cody-Waite reduction x = n ln2 + r,
 * |r| <= ln2 / 2, then a degree-7 Taylor polynomial for e^r (truncation < 5e-9) times 2^n. */
static inline float exp_nonpos(float x) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float xc = x < -87.0f ? -87.0f : x;
    float t = xc * 1.44269504088896341f + magic;
    float n = t - magic;
    int32_t ni = float_to_bits(t) - float_to_bits(magic);
    float r = xc - n * 0.693145751953125f;
    r = r - n * 1.42860682030941723e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    float y = p * bits_to_float((ni + 127) << 23);
    return x < -87.0f ? 0.0f : y;
}

/* log(1 + e) for e in [0, 1]: e p(e), with p the degree-9 Chebyshev fit of log(1 + e) / e on [0, 1] in the
 * power basis (fit error < 5e-9 relative, below float rounding; no division, accurate for tiny e too). */
static inline float log1p_01(float e) {
    float p = -3.2563784792e-03f;
    p = p * e + 1.9907160952e-02f;
    p = p * e - 5.7064200808e-02f;
    p = p * e + 1.0614264691e-01f;
    p = p * e - 1.5311863105e-01f;
    p = p * e + 1.9678117257e-01f;
    p = p * e - 2.4954558871e-01f;
    p = p * e + 3.3330004035e-01f;
    p = p * e - 4.9999903993e-01f;
    p = p * e + 9.9999999538e-01f;
    return e * p;
}

/* log(y) for a positive normal float y: y = 2^k m with m in [sqrt(1/2), sqrt(2)), f = m - 1,
 * log(m) = 2 atanh(s) with s = f / (2 + f), |s| < 0.172 (series to s^11, truncation < 1e-10 relative). */
static inline float log_pos(float y) {
    int32_t b = float_to_bits(y);
    int32_t k = ((b >> 23) & 0xff) - 127;
    float m = bits_to_float((b & 0x007fffff) | 0x3f800000); /* in [1, 2) */
    int big = m > 1.41421356f;
    m = big ? 0.5f * m : m;
    k = big ? k + 1 : k;
    float f = m - 1.0f;
    float s = f / (2.0f + f);
    float s2 = s * s;
    float p = 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return (float)k * 0.693147180559945f + 2.0f * s * p;
}

/* softplus(x) = log(1 + e^x), sigmoid(x) and sigmoid(-x), sharing one exponential. */
static inline void softplus_sigmoid(float x, float *sp, float *sig, float *sig_neg) {
    float e = exp_nonpos(-fabsf(x));
    float r = 1.0f / (1.0f + e);
    *sp = (x > 0.0f ? x : 0.0f) + log1p_01(e);
    *sig = x >= 0.0f ? r : e * r;
    *sig_neg = x >= 0.0f ? e * r : r;
}

static inline float softplus(float x) {
    return (x > 0.0f ? x : 0.0f) + log1p_01(exp_nonpos(-fabsf(x)));
}

/* digamma(y) for y > 0: recurrence up to y >= 8, then the asymptotic series. */
static double digamma_pos(double y) {
    double acc = 0.0;
    while (y < 8.0) { acc -= 1.0 / y; y += 1.0; }
    double i2 = 1.0 / (y * y);
    return acc + log(y) - 0.5 / y
           - i2 * (1.0 / 12 - i2 * (1.0 / 120 - i2 * (1.0 / 252 - i2 * (1.0 / 240 - i2 * (1.0 / 132)))));
}

#define SMALL_COUNT 32 /* counts up to this use the product of (theta + j); lgamma / digamma above */

static double log_factorial[SMALL_COUNT + 1];
static int log_factorial_ready = 0;

/* T = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) for an integer count x >= 1 and
 * *dT = d T / d log theta = theta (digamma(x + theta) - digamma(theta)). For x <= SMALL_COUNT,
 * lgamma(x + theta) - lgamma(theta) = log prod_{j<x} (theta + j), with a log taken every 8 factors (no overflow
 * for any float theta), and the digamma difference is sum_{j<x} 1 / (theta + j). */
static inline double count_term(double x, double theta, double *dT) {
    if (x <= SMALL_COUNT) {
        const int k = (int)x;
        double prod = 1.0, logs = 0.0, inv = 0.0;
        for (int j = 0; j < k; ++j) {
            const double v = theta + j;
            prod *= v;
            inv += 1.0 / v;
            if ((j & 7) == 7) { logs += log(prod); prod = 1.0; }
        }
        *dT = theta * inv;
        return logs + log(prod) - log_factorial[k];
    }
    if (theta > 1e8) {
        /* lgamma(x + theta) - lgamma(theta) = x log theta + sum_{j<x} log1p(j / theta): the lgamma difference
         * cancels in double here, so use the power sums S1..S3 of j (error O(x (x / theta)^4)). */
        const double s1 = x * (x - 1.0) / 2.0, s2 = (x - 1.0) * x * (2.0 * x - 1.0) / 6.0, s3 = s1 * s1;
        const double u = 1.0 / theta;
        *dT = x - u * (s1 - u * (s2 - u * s3));
        return x * log(theta) + u * (s1 - u * (s2 / 2.0 - u * s3 / 3.0)) - lgamma(x + 1.0);
    }
    *dT = theta * (digamma_pos(x + theta) - digamma_pos(theta));
    return lgamma(x + theta) - lgamma(theta) - lgamma(x + 1.0);
}

#define TABLE_COUNT 8     /* counts up to this come from a per-(theta row, gene) table built once per call */
#define TABLE_MAX_ROWS 16 /* ... when theta has at most this many rows (genes x batches) */

/* tab[(r * (TABLE_COUNT + 1) + k) * G + g] = T and dtab[...] = dT of count_term for count k, theta[r, g], built
 * with float arithmetic vectorised over genes (T is a sum of k logs: error ~k float roundings). */
static void build_count_table(int64_t R, int64_t G, const float *theta, float *tab, float *dtab) {
    for (int64_t r = 0; r < R; ++r) {
        const float *th = theta + r * G;
        float *t0 = tab + r * (TABLE_COUNT + 1) * G, *d0 = dtab + r * (TABLE_COUNT + 1) * G;
        memset(t0, 0, G * sizeof(float));
        memset(d0, 0, G * sizeof(float));
        for (int k = 1; k <= TABLE_COUNT; ++k) {
            const float *tp = t0 + (k - 1) * G, *dp = d0 + (k - 1) * G;
            float *tk = t0 + k * G, *dk = d0 + k * G;
            const float j = (float)(k - 1), logk = (float)log((double)k);
#pragma omp simd
            for (int64_t g = 0; g < G; ++g) {
                const float v = fmaxf(th[g] + j, 1.17549435e-38f); /* a normal float: log_pos needs one */
                tk[g] = tp[g] + (log_pos(v) - logk);
                dk[g] = dp[g] + th[g] / v;
            }
        }
    }
}

/*
 * Per-cell NB (zi == NULL) or ZINB log-likelihood, nats: ll[i] = sum_g log p(x_ig | mu_ig, theta_g[, zi_ig]),
 * log mu_ig = loglib[i] + a_ig - logsumexp_g(a_i.).
 *
 * n, G          cells, genes
 * a             (n, G) decoder logits (pre-softmax)
 * loglib        (n,) log library size
 * theta         (R, G) inverse dispersion, log_theta its log; theta_rows (n,) row of each cell, or NULL (R = 1)
 * zi            (n, G) zero-inflation logits, or NULL for NB
 * crow, col, xv CSR counts (n + 1, nnz, nnz; sorted or not, no stored zeros) when xdense == NULL;
 * xdense        (n, G) dense counts otherwise
 * ll            (n,) output
 * ga, gth, gzi, glib   NULL (no derivatives) or outputs: d ll_i / d a_ig (n, G), d ll_i / d log theta at (i, g)
 *               (n, G), d ll_i / d zi_ig (n, G; only with zi), d ll_i / d loglib_i (n,)
 * R             rows of theta
 * work          scratch: 2 G floats, plus 2 R (TABLE_COUNT + 1) G when R <= TABLE_MAX_ROWS
 */
static inline __attribute__((always_inline)) void nb_row(
    int64_t G, const float *RESTRICT a, float loglib, const float *RESTRICT theta, const float *RESTRICT lt,
    const float *RESTRICT zi, const float *RESTRICT x, double *ll_out, float *RESTRICT ga,
    float *RESTRICT gth, float *RESTRICT gzi, double *glib_out, float *RESTRICT gmu, const int zinb,
    const int grad) {
    /* pass 1: logsumexp of the logits; with derivatives, e^(a - max) is kept in ga for the softmax */
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t g = 0; g < G; ++g) m = a[g] > m ? a[g] : m;
    if (!(m > -INFINITY)) m = 0.0f; /* all -inf (or NaN): let the NaN / -inf propagate below */
    double S = 0.0;
#pragma omp simd reduction(+ : S)
    for (int64_t g = 0; g < G; ++g) {
        float e = exp_nonpos(a[g] - m);
        if (grad) ga[g] = e;
        S += e;
    }
    const float shift = loglib - (m + (float)log(S));
    /* pass 2: every entry */
    double ll = 0.0, gsum = 0.0;
#pragma omp simd reduction(+ : ll, gsum)
    for (int64_t g = 0; g < G; ++g) {
        float xg = x[g];
        float d = a[g] + shift - lt[g];
        float th = theta[g];
        float spd, q, q_neg;
        softplus_sigmoid(d, &spd, &q, &q_neg);
        float A = -th * spd;
        float term = A + xg * (d - spd);
        float vz = 0.0f, sz = 0.0f;
        if (zinb) {
            float zf = xg == 0.0f ? 1.0f : 0.0f;
            float t = zi[g] - A;
            float spt, v, v_neg;
            softplus_sigmoid(t, &spt, &v, &v_neg);
            float spz, sz_neg;
            softplus_sigmoid(zi[g], &spz, &sz, &sz_neg);
            term += zf * spt - spz;
            vz = zf * v;
        }
        ll += term;
        if (grad) {
            float tq = th * q, xq = xg * q_neg, keep = 1.0f - vz;
            float dmu = xq - keep * tq;
            gmu[g] = dmu;
            gsum += dmu;
            gth[g] = keep * (A + tq) - xq;
            if (zinb) gzi[g] = vz - sz;
        }
    }
    if (grad) {
        /* pass 3: through the log-softmax, d/da_g = gmu_g - softmax_g * sum(gmu) */
        const float c = (float)(gsum / S);
#pragma omp simd
        for (int64_t g = 0; g < G; ++g) ga[g] = gmu[g] - ga[g] * c;
        *glib_out = gsum;
    }
    *ll_out = ll;
}

/* Floats of scratch cv_nb_loglik needs for G genes and R theta rows (its `work` argument). */
int64_t cv_nb_work_size(int64_t G, int64_t R) {
    return G * (2 + (R <= TABLE_MAX_ROWS ? 2 * R * (TABLE_COUNT + 1) : 0));
}

void cv_nb_loglik(int64_t n, int64_t G, int64_t R, const float *a, const float *loglib, const float *theta,
                  const float *log_theta, const int64_t *theta_rows, const float *zi, const int64_t *crow,
                  const int64_t *col, const float *xv, const float *xdense, float *ll, float *ga, float *gth,
                  float *gzi, float *glib, float *work) {
    const int grad = ga != NULL;
    float *xrow = work, *gmu = work + G;
    const int use_table = R <= TABLE_MAX_ROWS;
    float *tab = work + 2 * G, *dtab = tab + R * (TABLE_COUNT + 1) * G;
    if (use_table) build_count_table(R, G, theta, tab, dtab);
    if (!log_factorial_ready) { /* idempotent: concurrent first calls write the same values */
        for (int k = 0; k <= SMALL_COUNT; ++k) log_factorial[k] = lgamma(k + 1.0);
        log_factorial_ready = 1;
    }
    for (int64_t i = 0; i < n; ++i) {
        const int64_t r = theta_rows ? theta_rows[i] : 0;
        const float *th = theta + r * G, *lt = log_theta + r * G;
        const float *x;
        if (xdense) {
            x = xdense + i * G;
        } else {
            memset(xrow, 0, G * sizeof(float));
            for (int64_t k = crow[i]; k < crow[i + 1]; ++k) xrow[col[k]] = xv[k];
            x = xrow;
        }
        const int64_t o = i * G;
        double lli = 0.0, glibi = 0.0;
        const float *zr = zi ? zi + o : NULL;
        float *gar = grad ? ga + o : NULL, *gthr = grad ? gth + o : NULL, *gzr = (grad && zi) ? gzi + o : NULL;
        if (zi && grad) nb_row(G, a + o, loglib[i], th, lt, zr, x, &lli, gar, gthr, gzr, &glibi, gmu, 1, 1);
        else if (zi) nb_row(G, a + o, loglib[i], th, lt, zr, x, &lli, NULL, NULL, NULL, &glibi, gmu, 1, 0);
        else if (grad) nb_row(G, a + o, loglib[i], th, lt, NULL, x, &lli, gar, gthr, NULL, &glibi, gmu, 0, 1);
        else nb_row(G, a + o, loglib[i], th, lt, NULL, x, &lli, NULL, NULL, NULL, &glibi, gmu, 0, 0);
        /* the lgamma terms of the non-zero counts */
        const float *tabr = tab + r * (TABLE_COUNT + 1) * G, *dtabr = dtab + r * (TABLE_COUNT + 1) * G;
        const int64_t k0 = xdense ? 0 : crow[i], k1 = xdense ? G : crow[i + 1];
        for (int64_t k = k0; k < k1; ++k) {
            const int64_t g = xdense ? k : col[k];
            const float xg = xdense ? x[g] : xv[k];
            if (xg == 0.0f) continue;
            double T, dT;
            if (use_table && xg <= TABLE_COUNT) {
                const int64_t at = (int64_t)xg * G + g;
                T = tabr[at];
                dT = dtabr[at];
            } else {
                T = count_term(xg, th[g], &dT);
            }
            lli += T;
            if (grad) gthr[g] += (float)dT;
        }
        ll[i] = (float)lli;
        if (grad) glib[i] = (float)glibi;
    }
}

/* y (n, n_out) = X W^T + b for CSR X (n, n_in); wt = W^T, (n_in, n_out) row-major; b (n_out,) or NULL. */
void cv_csr_linear(int64_t n, int64_t n_out, const int64_t *crow, const int64_t *col, const float *val,
                   const float *wt, const float *b, float *y) {
    for (int64_t i = 0; i < n; ++i) {
        float *RESTRICT yi = y + i * n_out;
        if (b) memcpy(yi, b, n_out * sizeof(float));
        else memset(yi, 0, n_out * sizeof(float));
        for (int64_t k = crow[i]; k < crow[i + 1]; ++k) {
            const float v = val[k];
            const float *RESTRICT w = wt + col[k] * n_out;
#pragma omp simd
            for (int64_t o = 0; o < n_out; ++o) yi[o] += v * w[o];
        }
    }
}

/* dwt (n_in, n_out) = X^T g for CSR X (n, n_in) and g (n, n_out): the gradient of W^T in cv_csr_linear. */
void cv_csr_linear_wgrad(int64_t n, int64_t n_in, int64_t n_out, const int64_t *crow, const int64_t *col,
                         const float *val, const float *gr, float *dwt) {
    memset(dwt, 0, n_in * n_out * sizeof(float));
    for (int64_t i = 0; i < n; ++i) {
        const float *RESTRICT gi = gr + i * n_out;
        for (int64_t k = crow[i]; k < crow[i + 1]; ++k) {
            const float v = val[k];
            float *RESTRICT d = dwt + col[k] * n_out;
#pragma omp simd
            for (int64_t o = 0; o < n_out; ++o) d[o] += v * gi[o];
        }
    }
}
