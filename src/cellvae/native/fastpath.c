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
 *    come from a table per theta and gene (counts up to 8), a product of (theta + j) (up to 32) and lgamma /
 *    digamma above, lgamma(x + 1) from a log-factorial table up to 4096; on deep minibatches lgamma(theta) and
 *    digamma(theta) are taken once per theta entry (count_term_large), with the same arithmetic.
 *    References: Lopez et al. 2018 (Nat. Methods 15:1053), Methods; the ZINB form of scvi-tools'
 *    log_zinb_positive.
 * 2. cv_csr_linear / cv_csr_linear_wgrad: y = X W^T + b and dW^T = X^T g for a CSR matrix X of counts
 *    (the first encoder layer on sparse minibatches), work in proportion to the non-zeros of X.
 * 3. cv_all_finite: whether every element of a list of float32 tensors is finite (the training loop's guard on
 *    the gradients before each optimizer step).
 * 4. cv_bn_relu_dropout / cv_bn_relu_dropout_backward: batch normalisation with batch statistics (Ioffe & Szegedy
 *    2015, Algorithm 1 and its backward pass; running statistics as torch.nn.BatchNorm1d), ReLU and inverted
 *    dropout (Srivastava et al. 2014) in one pass over a (n, C) hidden layer instead of six operators; the
 *    dropout mask is a counter-based hash of (seed, element index). cv_ln_relu_dropout / _backward: the same with
 *    layer normalisation over each row (no affine transform) in place of batch normalisation.
 * 5. cv_protein_mixture / cv_protein_mixture_backward: totalVI's protein NB-mixture log-likelihood and background KL
 *    of a minibatch with their derivatives (the joint RNA + protein model), one call each instead of about fifty
 *    small PyTorch operators (section 5 below).
 *
 * Everything is float32 with float64 accumulation where sums run over genes; indices are int64. The loops over
 * genes are written branch-free (exp and log1p below are polynomial) so that the compiler vectorises them
 * (OpenMP SIMD pragmas).
 *
 * Threads: cv_nb_loglik, cv_csr_linear and cv_csr_linear_wgrad take a thread count and split their independent
 * units (cells, or genes for the weight gradient) into that many contiguous ranges, one per OpenMP thread (see
 * parallel_range). Every output element is computed by the same arithmetic in the same order whatever the thread
 * count, so results are bit-identical for any number of threads. Small calls run on the caller's thread only.
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RESTRICT __restrict__

#define MAX_THREADS 64

/* fn(ctx, i0, i1, t) over [0, n) split into up to n_threads contiguous ranges of at least min_per_thread units,
 * range t on OpenMP thread t (0: the caller). Built with -fopenmp, this library uses the OpenMP runtime PyTorch has
 * loaded (the same libgomp.so.1), so the kernels run on torch's own intra-op threads, which are awake right after
 * torch's matrix products; without OpenMP everything runs on the caller's thread. */
typedef void (*range_fn)(void *ctx, int64_t i0, int64_t i1, int t);

static void parallel_range(int64_t n_threads, int64_t n, int64_t min_per_thread, range_fn fn, void *ctx) {
    int64_t T = n_threads < 1 ? 1 : (n_threads > MAX_THREADS ? MAX_THREADS : n_threads);
    if (min_per_thread < 1) min_per_thread = 1;
    if (T > n / min_per_thread) T = n / min_per_thread;
#ifdef _OPENMP
    if (T > 1) {
#pragma omp parallel num_threads((int)T)
        {
            const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
            fn(ctx, n * t / nt, n * (t + 1) / nt, (int)t);
        }
        return;
    }
#endif
    if (n > 0) fn(ctx, 0, n, 0);
}

/* Threads for a call with `work` units of about `unit_cost` simple operations each: one per ~2^17 operations
 * (a thread start costs ~10-50 us), at most n_threads. */
static int64_t threads_for(int64_t n_threads, double work) {
    const int64_t by_work = (int64_t)(work / 131072.0);
    return by_work < 1 ? 1 : (by_work < n_threads ? by_work : n_threads);
}

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
    float y = p * bits_to_float((int32_t)((uint32_t)(ni + 127) << 23)); /* unsigned: defined for NaN input too */
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
#define FACT_MAX 4096   /* lgamma(x + 1) of counts up to this from log_factorial */

static double log_factorial[FACT_MAX + 1]; /* log_factorial[k] = lgamma(k + 1), filled once (ensure_log_factorial) */
static int log_factorial_ready = 0;

static void ensure_log_factorial(void) {
    if (!log_factorial_ready) {
        for (int k = 0; k <= FACT_MAX; ++k) log_factorial[k] = lgamma(k + 1.0);
        log_factorial_ready = 1;
    }
}

/* lgamma(x + 1) of an integer count x >= 0: the table up to FACT_MAX (the same values), lgamma above. */
static inline double log_fact(double x) { return x <= FACT_MAX ? log_factorial[(int)x] : lgamma(x + 1.0); }

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
        return x * log(theta) + u * (s1 - u * (s2 / 2.0 - u * s3 / 3.0)) - log_fact(x);
    }
    *dT = theta * (digamma_pos(x + theta) - digamma_pos(theta));
    return lgamma(x + theta) - lgamma(theta) - log_fact(x);
}

/* count_term for x > SMALL_COUNT with lgamma(theta) and digamma(theta) given (computed once per theta row and gene
 * by cv_nb_loglik when many counts are large): the same double arithmetic as count_term, so the same result. */
static inline double count_term_large(double x, double theta, double lg_theta, double dg_theta, double *dT) {
    if (theta > 1e8) return count_term(x, theta, dT);
    *dT = theta * (digamma_pos(x + theta) - dg_theta);
    return lgamma(x + theta) - lg_theta - log_fact(x);
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

/* Floats of scratch cv_nb_loglik needs for G genes, R theta rows and up to n_threads threads (its `work`). */
int64_t cv_nb_work_size(int64_t G, int64_t R, int64_t n_threads) {
    const int64_t T = n_threads < 1 ? 1 : (n_threads > MAX_THREADS ? MAX_THREADS : n_threads);
    return G * (2 * T + (R <= TABLE_MAX_ROWS ? 2 * R * (TABLE_COUNT + 1) : 0));
}

typedef struct {
    int64_t G;
    const float *a, *loglib, *theta, *log_theta, *zi, *xv, *xdense, *tab, *dtab;
    const int64_t *theta_rows, *crow, *col;
    float *ll, *ga, *gth, *gzi, *glib, *scratch;
    const double *lg_theta, *dg_theta; /* (R, G) lgamma(theta), digamma(theta), or NULL */
    int use_table;
} nb_ctx;

static void nb_rows(void *p, int64_t i0, int64_t i1, int t) {
    const nb_ctx *c = (const nb_ctx *)p;
    const int64_t G = c->G;
    const int grad = c->ga != NULL;
    float *xrow = c->scratch + 2 * G * t, *gmu = xrow + G;
    const float *theta = c->theta, *log_theta = c->log_theta, *a = c->a, *zi = c->zi, *xdense = c->xdense;
    const int64_t *crow = c->crow, *col = c->col;
    for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = c->theta_rows ? c->theta_rows[i] : 0;
        const float *th = theta + r * G, *lt = log_theta + r * G;
        const float *x;
        if (xdense) {
            x = xdense + i * G;
        } else {
            memset(xrow, 0, G * sizeof(float));
            for (int64_t k = crow[i]; k < crow[i + 1]; ++k) xrow[col[k]] = c->xv[k];
            x = xrow;
        }
        const int64_t o = i * G;
        double lli = 0.0, glibi = 0.0;
        const float *zr = zi ? zi + o : NULL;
        float *gar = grad ? c->ga + o : NULL, *gthr = grad ? c->gth + o : NULL;
        float *gzr = (grad && zi) ? c->gzi + o : NULL;
        const float loglib = c->loglib[i];
        if (zi && grad) nb_row(G, a + o, loglib, th, lt, zr, x, &lli, gar, gthr, gzr, &glibi, gmu, 1, 1);
        else if (zi) nb_row(G, a + o, loglib, th, lt, zr, x, &lli, NULL, NULL, NULL, &glibi, gmu, 1, 0);
        else if (grad) nb_row(G, a + o, loglib, th, lt, NULL, x, &lli, gar, gthr, NULL, &glibi, gmu, 0, 1);
        else nb_row(G, a + o, loglib, th, lt, NULL, x, &lli, NULL, NULL, NULL, &glibi, gmu, 0, 0);
        /* the lgamma terms of the non-zero counts */
        const float *tabr = c->tab + r * (TABLE_COUNT + 1) * G, *dtabr = c->dtab + r * (TABLE_COUNT + 1) * G;
        const int64_t k0 = xdense ? 0 : crow[i], k1 = xdense ? G : crow[i + 1];
        for (int64_t k = k0; k < k1; ++k) {
            const int64_t g = xdense ? k : col[k];
            const float xg = xdense ? x[g] : c->xv[k];
            if (xg == 0.0f) continue;
            double T, dT;
            if (c->use_table && xg <= TABLE_COUNT) {
                const int64_t at = (int64_t)xg * G + g;
                T = tabr[at];
                dT = dtabr[at];
            } else if (c->lg_theta && xg > SMALL_COUNT) {
                T = count_term_large(xg, th[g], c->lg_theta[r * G + g], c->dg_theta[r * G + g], &dT);
            } else {
                T = count_term(xg, th[g], &dT);
            }
            lli += T;
            if (grad) gthr[g] += (float)dT;
        }
        c->ll[i] = (float)lli;
        if (grad) c->glib[i] = (float)glibi;
    }
}

void cv_nb_loglik(int64_t n, int64_t G, int64_t R, const float *a, const float *loglib, const float *theta,
                  const float *log_theta, const int64_t *theta_rows, const float *zi, const int64_t *crow,
                  const int64_t *col, const float *xv, const float *xdense, float *ll, float *ga, float *gth,
                  float *gzi, float *glib, float *work, int64_t n_threads) {
    const int64_t T = n_threads < 1 ? 1 : (n_threads > MAX_THREADS ? MAX_THREADS : n_threads);
    const int use_table = R <= TABLE_MAX_ROWS;
    float *tab = work + 2 * G * T, *dtab = tab + R * (TABLE_COUNT + 1) * G;
    if (use_table) build_count_table(R, G, theta, tab, dtab);
    ensure_log_factorial();
    /* Deep data (many counts above SMALL_COUNT): lgamma and digamma of each theta once, not per count. Only when
     * the large counts outnumber the theta entries (so sparse, shallow data pays nothing); without memory, the
     * per-count path. */
    double *lg = NULL;
    if (use_table) {
        int64_t n_large = 0;
        const int64_t m = xdense ? n * G : crow[n];
        const float *v = xdense ? xdense : xv;
        for (int64_t k = 0; k < m; ++k) n_large += v[k] > SMALL_COUNT;
        if (n_large > R * G) lg = (double *)malloc(sizeof(double) * (size_t)(2 * R * G));
    }
    if (lg) {
        for (int64_t j = 0; j < R * G; ++j) {
            const double th = theta[j];
            lg[j] = lgamma(th);
            lg[R * G + j] = digamma_pos(th);
        }
    }
    nb_ctx c = {G, a, loglib, theta, log_theta, zi, xv, xdense, tab, dtab, theta_rows, crow, col,
                ll, ga, gth, gzi, glib, work, lg, lg ? lg + R * G : NULL, use_table};
    parallel_range(threads_for(T, (double)n * G * (ga ? 24.0 : 12.0)), n, 1, nb_rows, &c);
    free(lg);
}

/* 16 floats as one vector (GCC / clang vector extension; the compiler maps it to the widest registers the target
 * has), and the same type with 4-byte alignment for loads and stores at any float address. */
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf16u __attribute__((vector_size(64), aligned(4)));
#define VLOAD(p) (*(const vf16u *)(p))
#define VSTORE(p, v) (*(vf16u *)(p) = (v))

/* out[0:64] = init[0:64] (or 0) + sum_k v_k rows_k[0:64], with the 64 sums in 4 vector registers: the rows are
 * read once and the output written once (no load / store of the output per term). */
static inline void axpy_block64(int64_t k0, int64_t k1, const int64_t *idx, const float *val, const float *base,
                                int64_t stride, const float *init, float *out) {
    vf16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    if (init) { a0 = VLOAD(init); a1 = VLOAD(init + 16); a2 = VLOAD(init + 32); a3 = VLOAD(init + 48); }
    for (int64_t k = k0; k < k1; ++k) {
        const float v = val[k];
        const float *r = base + idx[k] * stride;
        a0 += v * VLOAD(r);
        a1 += v * VLOAD(r + 16);
        a2 += v * VLOAD(r + 32);
        a3 += v * VLOAD(r + 48);
    }
    VSTORE(out, a0); VSTORE(out + 16, a1); VSTORE(out + 32, a2); VSTORE(out + 48, a3);
}

/* out[o0:m] = init (or 0) + sum_k v_k rows_k[o0:m]: the columns after the last whole block of 64. */
static inline void axpy_tail(int64_t k0, int64_t k1, const int64_t *idx, const float *val, const float *base,
                             int64_t stride, const float *init, int64_t o0, int64_t m, float *out) {
    for (int64_t o = o0; o < m; ++o) out[o] = init ? init[o] : 0.0f;
    for (int64_t k = k0; k < k1; ++k) {
        const float v = val[k];
        const float *RESTRICT r = base + idx[k] * stride;
        for (int64_t o = o0; o < m; ++o) out[o] += v * r[o];
    }
}

typedef struct {
    int64_t n_out, nb;
    const int64_t *crow, *col, *rows;
    const float *val, *wt, *b, *gr;
    float *y;
} lin_ctx;

static void csr_linear_rows(void *p, int64_t i0, int64_t i1, int t) {
    const lin_ctx *c = (const lin_ctx *)p;
    (void)t;
    for (int64_t i = i0; i < i1; ++i) {
        float *yi = c->y + i * c->n_out;
        for (int64_t o0 = 0; o0 < c->nb; o0 += 64)
            axpy_block64(c->crow[i], c->crow[i + 1], c->col, c->val, c->wt + o0, c->n_out, c->b ? c->b + o0 : NULL,
                         yi + o0);
        if (c->nb < c->n_out) axpy_tail(c->crow[i], c->crow[i + 1], c->col, c->val, c->wt, c->n_out, c->b, c->nb,
                                        c->n_out, yi);
    }
}

/* y (n, n_out) = X W^T + b for CSR X (n, n_in); wt = W^T, (n_in, n_out) row-major; b (n_out,) or NULL.
 * Row by row, 64 outputs at a time held in registers; rows split over n_threads threads. */
void cv_csr_linear(int64_t n, int64_t n_out, const int64_t *crow, const int64_t *col, const float *val,
                   const float *wt, const float *b, float *y, int64_t n_threads) {
    lin_ctx c = {n_out, n_out - n_out % 64, crow, col, NULL, val, wt, b, NULL, y};
    parallel_range(threads_for(n_threads, (double)crow[n] * n_out), n, 1, csr_linear_rows, &c);
}

/* Rows j0..j1 of dwt from the CSC form: cptr (ends of columns), rows, cval in c->crow, c->rows, c->val. */
static void csr_wgrad_cols(void *p, int64_t j0, int64_t j1, int t) {
    const lin_ctx *c = (const lin_ctx *)p;
    (void)t;
    for (int64_t j = j0; j < j1; ++j) {
        const int64_t k0 = j ? c->crow[j - 1] : 0, k1 = c->crow[j];
        float *d = c->y + j * c->n_out;
        for (int64_t o0 = 0; o0 < c->nb; o0 += 64) axpy_block64(k0, k1, c->rows, c->val, c->gr + o0, c->n_out, NULL,
                                                                d + o0);
        if (c->nb < c->n_out) axpy_tail(k0, k1, c->rows, c->val, c->gr, c->n_out, NULL, c->nb, c->n_out, d);
    }
}

/* dwt (n_in, n_out) = X^T g for CSR X (n, n_in) and g (n, n_out): the gradient of W^T in cv_csr_linear. X is
 * transposed to CSC first (a counting sort of its non-zeros by column, stable in the row), so that each row of dwt
 * is a sum over the cells of its column, made in registers and written once. Rows of genes without a non-zero in
 * X are 0. Falls back to accumulating row by row when the scratch cannot be allocated. */
void cv_csr_linear_wgrad(int64_t n, int64_t n_in, int64_t n_out, const int64_t *crow, const int64_t *col,
                         const float *val, const float *gr, float *dwt, int64_t n_threads) {
    const int64_t nnz = crow[n];
    int64_t *cptr = (int64_t *)malloc((n_in + 1) * sizeof(int64_t));
    int64_t *rows = (int64_t *)malloc((nnz > 0 ? nnz : 1) * sizeof(int64_t));
    float *cval = (float *)malloc((nnz > 0 ? nnz : 1) * sizeof(float));
    if (!cptr || !rows || !cval) {
        free(cptr); free(rows); free(cval);
        memset(dwt, 0, n_in * n_out * sizeof(float));
        for (int64_t i = 0; i < n; ++i) {
            const float *RESTRICT gi = gr + i * n_out;
            for (int64_t k = crow[i]; k < crow[i + 1]; ++k) {
                const float v = val[k];
                float *RESTRICT d = dwt + col[k] * n_out;
                for (int64_t o = 0; o < n_out; ++o) d[o] += v * gi[o];
            }
        }
        return;
    }
    memset(cptr, 0, (n_in + 1) * sizeof(int64_t));
    for (int64_t k = 0; k < nnz; ++k) cptr[col[k] + 1]++;
    for (int64_t j = 0; j < n_in; ++j) cptr[j + 1] += cptr[j];
    for (int64_t i = 0; i < n; ++i)
        for (int64_t k = crow[i]; k < crow[i + 1]; ++k) {
            const int64_t at = cptr[col[k]]++;
            rows[at] = i;
            cval[at] = val[k];
        }
    /* cptr[j] now holds the end of column j: its start is cptr[j - 1] (0 for j = 0); genes split over threads */
    lin_ctx c = {n_out, n_out - n_out % 64, cptr, NULL, rows, cval, NULL, NULL, gr, dwt};
    parallel_range(threads_for(n_threads, (double)nnz * n_out), n_in, 1, csr_wgrad_cols, &c);
    free(cptr); free(rows); free(cval);
}

/* The structure of a CSR matrix of n rows and n_cols columns with nnz stored values (crow: n + 1 entries, col: nnz
 * entries, both int64): 0 when crow[0] == 0, crow is non-decreasing, crow[n] == nnz and each row's column indices
 * are strictly increasing (sorted, no duplicates) in [0, n_cols). Otherwise a code (1: crow[0] != 0, 2: crow
 * decreases, 3: crow[n] != nnz, 4: a column index out of range, 5: unsorted or duplicate columns in a row) and the
 * row (crow codes) or stored value (col codes) where it was found in *where. Reads only crow[0..n] and the col
 * entries that crow points at once it is valid, so it is safe to call on any arrays of those lengths. */
int32_t cv_csr_check(int64_t n, int64_t n_cols, int64_t nnz, const int64_t *crow, const int64_t *col,
                     int64_t *where) {
    if (crow[0] != 0) { *where = 0; return 1; }
    for (int64_t i = 0; i < n; ++i)
        if (crow[i + 1] < crow[i]) { *where = i; return 2; }
    if (crow[n] != nnz) { *where = n; return 3; }
    for (int64_t i = 0; i < n; ++i) {
        int64_t prev = -1;
        for (int64_t k = crow[i]; k < crow[i + 1]; ++k) {
            const int64_t c = col[k];
            if (c < 0 || c >= n_cols) { *where = k; return 4; }
            if (c <= prev) { *where = k; return 5; }
            prev = c;
        }
    }
    return 0;
}

/* 1 when every element of the k float32 tensors (addresses as int64, sizes[t] elements each) is finite, else 0:
 * the sum of x * 0 is 0 exactly when no x is inf or NaN (no overflow can occur, unlike a sum or a norm of x). */
int32_t cv_all_finite(int64_t k, const int64_t *ptrs, const int64_t *sizes) {
    float acc = 0.0f;
    for (int64_t t = 0; t < k; ++t) {
        const float *RESTRICT x = (const float *)(intptr_t)ptrs[t];
        const int64_t n = sizes[t];
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < n; ++i) s += x[i] * 0.0f;
        acc += s;
    }
    return acc == 0.0f;
}

/* lowbias32 (C. Wellons' integer hash): a bijection of 32-bit words with full avalanche. */
static inline uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* Dropout keep flag of element j for the seed (s0, s1): kept when a hash of (j, seed), uniform on 32-bit words,
 * is >= drop_threshold = round(p 2^32) (probability 1 - p to within 2^-32). */
static inline int keep_element(uint32_t j, uint32_t s0, uint32_t s1, uint32_t drop_threshold) {
    return hash32(hash32(j ^ s0) + s1) >= drop_threshold;
}

/* Training forward of y = dropout(relu(batchnorm(x))) for x (n, C) row-major, n >= 2:
 * mean_c and the biased variance var_c over the n rows (two passes, double), invstd_c = 1 / sqrt(var_c + eps),
 * y = max(0, (x - mean) invstd w + b) * keep * scale (scale = 1 / (1 - p); keep = 1 when drop_threshold = 0).
 * Outputs y, mean, invstd (C each); running_mean / running_var (C, or NULL) are moved by `momentum` towards the
 * mean and the unbiased variance, as torch.nn.BatchNorm1d. w, b may be NULL (1, 0). */
void cv_bn_relu_dropout(int64_t n, int64_t C, const float *x, const float *w, const float *b, double eps,
                        double momentum, float *running_mean, float *running_var, uint32_t drop_threshold,
                        float scale, uint32_t s0, uint32_t s1, float *y, float *mean, float *invstd, double *work) {
    double *acc = work; /* C doubles */
    for (int64_t c = 0; c < C; ++c) acc[c] = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const float *xi = x + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) acc[c] += xi[c];
    }
    for (int64_t c = 0; c < C; ++c) { mean[c] = (float)(acc[c] / n); acc[c] = 0.0; }
    for (int64_t i = 0; i < n; ++i) {
        const float *xi = x + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) { const double d = (double)xi[c] - mean[c]; acc[c] += d * d; }
    }
    for (int64_t c = 0; c < C; ++c) {
        const double var = acc[c] / n;
        invstd[c] = (float)(1.0 / sqrt(var + eps));
        if (running_mean) running_mean[c] = (float)((1.0 - momentum) * running_mean[c] + momentum * mean[c]);
        if (running_var) running_var[c] = (float)((1.0 - momentum) * running_var[c] + momentum * acc[c] / (n - 1));
    }
    for (int64_t i = 0; i < n; ++i) {
        const float *RESTRICT xi = x + i * C;
        float *RESTRICT yi = y + i * C;
        const uint32_t j0 = (uint32_t)(i * C);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
            const float wc = w ? w[c] : 1.0f, bc = b ? b[c] : 0.0f;
            float v = (xi[c] - mean[c]) * invstd[c] * wc + bc;
            v = (v > 0.0f || v != v) ? v : 0.0f; /* ReLU that keeps NaN, as torch.relu */
            const int keep = drop_threshold == 0 || keep_element(j0 + (uint32_t)c, s0, s1, drop_threshold);
            yi[c] = keep ? v * scale : 0.0f;
        }
    }
}

/* Backward of cv_bn_relu_dropout given its input x, output y, mean, invstd and dL/dy (gy): with g = gy * scale
 * where y > 0 (else 0) and xhat = (x - mean) invstd: db_c = sum_i g, dw_c = sum_i g xhat,
 * dx = w invstd / n (n g - db - xhat dw). dx (n, C); dw, db (C) or NULL; work: 2 C doubles. */
void cv_bn_relu_dropout_backward(int64_t n, int64_t C, const float *x, const float *y, const float *gy,
                                 const float *w, const float *mean, const float *invstd, float scale, float *dx,
                                 float *dw, float *db, double *work) {
    double *sg = work, *sgx = work + C;
    for (int64_t c = 0; c < C; ++c) { sg[c] = 0.0; sgx[c] = 0.0; }
    for (int64_t i = 0; i < n; ++i) {
        const float *RESTRICT xi = x + i * C, *RESTRICT yi = y + i * C, *RESTRICT gi = gy + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
            const float g = yi[c] > 0.0f ? gi[c] * scale : 0.0f;
            sg[c] += g;
            sgx[c] += g * ((xi[c] - mean[c]) * invstd[c]);
        }
    }
    for (int64_t c = 0; c < C; ++c) {
        if (db) db[c] = (float)sg[c];
        if (dw) dw[c] = (float)sgx[c];
    }
    for (int64_t i = 0; i < n; ++i) {
        const float *RESTRICT xi = x + i * C, *RESTRICT yi = y + i * C, *RESTRICT gi = gy + i * C;
        float *RESTRICT di = dx + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
            const float g = yi[c] > 0.0f ? gi[c] * scale : 0.0f;
            const float xh = (xi[c] - mean[c]) * invstd[c];
            const float wc = w ? w[c] : 1.0f;
            di[c] = wc * invstd[c] / (float)n * ((float)n * g - (float)sg[c] - xh * (float)sgx[c]);
        }
    }
}

/* Training forward of y = dropout(relu(layernorm(x))) for x (n, C) row-major, layer normalisation over each row
 * without an affine transform (torch.nn.LayerNorm(C, elementwise_affine=False); Ba et al. 2016): mean_i and the
 * biased variance var_i of row i (double), invstd_i = 1 / sqrt(var_i + eps), y = max(0, (x - mean_i) invstd_i)
 * * keep * scale, with the keep flags of cv_bn_relu_dropout (element index i C + c). Outputs y (n, C), mean and
 * invstd (n each). */
void cv_ln_relu_dropout(int64_t n, int64_t C, const float *x, double eps, uint32_t drop_threshold, float scale,
                        uint32_t s0, uint32_t s1, float *y, float *mean, float *invstd) {
    for (int64_t i = 0; i < n; ++i) {
        const float *RESTRICT xi = x + i * C;
        float *RESTRICT yi = y + i * C;
        double s = 0.0, q = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < C; ++c) s += xi[c];
        const double mu = s / (double)C;
#pragma omp simd reduction(+ : q)
        for (int64_t c = 0; c < C; ++c) { const double d = (double)xi[c] - mu; q += d * d; }
        const float m = (float)mu, is = (float)(1.0 / sqrt(q / (double)C + eps));
        mean[i] = m;
        invstd[i] = is;
        const uint32_t j0 = (uint32_t)(i * C);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
            float v = (xi[c] - m) * is;
            v = (v > 0.0f || v != v) ? v : 0.0f; /* ReLU that keeps NaN, as torch.relu */
            const int keep = drop_threshold == 0 || keep_element(j0 + (uint32_t)c, s0, s1, drop_threshold);
            yi[c] = keep ? v * scale : 0.0f;
        }
    }
}

/* Backward of cv_ln_relu_dropout given its input x, output y, mean, invstd (n) and dL/dy (gy): with g = gy * scale
 * where y > 0 (else 0) and xhat = (x - mean_i) invstd_i, per row dx = invstd_i (g - mean_c(g) - xhat
 * mean_c(g xhat)). dx (n, C). */
void cv_ln_relu_dropout_backward(int64_t n, int64_t C, const float *x, const float *y, const float *gy,
                                 const float *mean, const float *invstd, float scale, float *dx) {
    for (int64_t i = 0; i < n; ++i) {
        const float *RESTRICT xi = x + i * C, *RESTRICT yi = y + i * C, *RESTRICT gi = gy + i * C;
        float *RESTRICT di = dx + i * C;
        const float m = mean[i], is = invstd[i];
        double sg = 0.0, sgx = 0.0;
#pragma omp simd reduction(+ : sg, sgx)
        for (int64_t c = 0; c < C; ++c) {
            const float g = yi[c] > 0.0f ? gi[c] * scale : 0.0f;
            sg += g;
            sgx += g * ((xi[c] - m) * is);
        }
        const float a = (float)(sg / (double)C), b = (float)(sgx / (double)C);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
            const float g = yi[c] > 0.0f ? gi[c] * scale : 0.0f;
            di[c] = is * (g - a - ((xi[c] - m) * is) * b);
        }
    }
}

/* The dropout keep flags of cv_bn_relu_dropout for n elements from index 0 (1 kept, 0 dropped), for tests. */
void cv_dropout_keep(int64_t n, uint32_t drop_threshold, uint32_t s0, uint32_t s1, uint8_t *keep) {
    for (int64_t j = 0; j < n; ++j) keep[j] = (uint8_t)keep_element((uint32_t)j, s0, s1, drop_threshold);
}

/* ---------------------------------------------------------------------------------------------------------------
 * 5. cv_protein_mixture: totalVI's protein part of the ELBO for one draw of log beta (Gayoso et al. 2021, Nat.
 *    Methods 18:272, Methods), the algebra of cellvae.vae.nb_mixture.protein_elbo_terms in one pass per element,
 *    in double. Per cell i (batch b = batch[i]) and protein t, with the four heads [a, s, f, w] of heads (n, 4P):
 *        sd = softplus(s) + scale_eps, log beta = a + sd eps, log alpha = log1p(softplus(f)), theta = exp(lt),
 *        d1 = log beta - lt, d2 = d1 + log alpha,
 *        A = -theta softplus(d1) - y softplus(-d1) - softplus(-w), B = the same with d2 and softplus(w),
 *        ll_i = sum_t m_bt [T(y, theta) + logaddexp(A, B)], T = lgamma(y + theta) - lgamma(theta) - lgamma(y + 1),
 *        kl_i = sum_t m_bt [pls_bt - log sd + (sd^2 + (a - pm_bt)^2) / (2 exp(2 pls_bt)) - 1/2],
 *    lt = log_theta[r, t] with r = batch[i] when R > 1 (per-batch dispersion), else row 0. It writes ll and kl
 *    (n,), and with `deriv` (n, P, PROTEIN_DERIVS) the element-wise derivatives the backward pass needs (0 where
 *    m_bt = 0): d ll / d (a, s, f, w, lt) and d kl / d (a, s, pls) (d kl / d pm = -d kl / d a). Returns 0, or
 *    before reading any table or writing any output: 1 when a batch code lies outside [0, nb) (cell *where), 2 when
 *    a count is negative, not finite or not an integer (element *where); 3 without memory. The heads' transforms
 *    (softplus, sigmoid, log alpha, log sd) are float32 as in the PyTorch path; the mixture and lgamma terms double.
 * 6. cv_protein_mixture_backward: the gradients of cv_protein_mixture's inputs from its `deriv` and the upstream
 *    gradients g_ll, g_kl (n,): g_heads (n, 4P), g_lt (R, P), g_pm and g_pls (nb, P) (sums over the cells of each
 *    row, in double). Returns 0, or 1 for a batch code outside [0, nb) (cell *where), 3 without memory. */
#define PROTEIN_DERIVS 8

/* softplus(x) = log1p(exp(x)) and sigmoid(x) = 1 / (1 + exp(-x)) from one exp, in double. */
static inline double softplus_sig(double x, double *sig) {
    const double e = exp(-fabs(x)), inv = 1.0 / (1.0 + e);
    *sig = x >= 0.0 ? inv : e * inv;
    return (x > 0.0 ? x : 0.0) + log1p(e);
}

int32_t cv_protein_mixture(int64_t n, int64_t P, int64_t R, int64_t nb, const float *y, const float *heads,
                           const float *eps, const float *log_theta, const int64_t *batch, const float *pm,
                           const float *pls, const float *mask, double scale_eps, float *ll, float *kl,
                           float *deriv, int64_t *where) {
    for (int64_t i = 0; i < n; ++i)
        if (batch[i] < 0 || batch[i] >= nb) { *where = i; return 1; }
    for (int64_t j = 0; j < n * P; ++j) {
        const float v = y[j];
        if (!(v >= 0.0f) || !isfinite(v) || v != floorf(v)) { *where = j; return 2; }
    }
    ensure_log_factorial();
    /* per (row, protein) tables: theta = exp(lt) and the prior variance; per cell, 8 float rows of length P */
    double *tab = (double *)malloc(sizeof(double) * (size_t)(R * P + nb * P));
    float *buf = (float *)malloc(sizeof(float) * (size_t)(8 * P));
    if (tab == NULL || buf == NULL) { free(tab); free(buf); return 3; }
    double *theta_tab = tab, *pbv_tab = tab + R * P;
    for (int64_t j = 0; j < R * P; ++j) theta_tab[j] = exp((double)log_theta[j]);
    for (int64_t j = 0; j < nb * P; ++j) pbv_tab[j] = exp(2.0 * (double)pls[j]);
    float *sd_ = buf, *sig_s_ = buf + P, *sp_f_ = buf + 2 * P, *sig_f_ = buf + 3 * P, *la_ = buf + 4 * P,
          *sp_w_ = buf + 5 * P, *sig_w_ = buf + 6 * P, *log_sd_ = buf + 7 * P;
    const float seps = (float)scale_eps;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t b = batch[i], r = R > 1 ? b : 0;
        const float *h = heads + i * 4 * P;
        /* the heads' transforms in float32 (as the PyTorch path), vectorised over the proteins */
#pragma omp simd
        for (int64_t t = 0; t < P; ++t) {
            float sp, sg, sn;
            softplus_sigmoid(h[P + t], &sp, &sg, &sn);
            sd_[t] = sp + seps;
            sig_s_[t] = sg;
            log_sd_[t] = log_pos(sp + seps);
            softplus_sigmoid(h[2 * P + t], &sp, &sg, &sn);
            sp_f_[t] = sp;
            sig_f_[t] = sg;
            la_[t] = sp <= 1.0f ? log1p_01(sp) : log_pos(1.0f + sp);
            softplus_sigmoid(h[3 * P + t], &sp, &sg, &sn);
            sp_w_[t] = sp;
            sig_w_[t] = sg;
        }
        double lli = 0.0, kli = 0.0;
        for (int64_t t = 0; t < P; ++t) {
            float *D = deriv ? deriv + (i * P + t) * PROTEIN_DERIVS : NULL;
            const double m = mask[b * P + t];
            if (m == 0.0) {
                if (D) for (int k = 0; k < PROTEIN_DERIVS; ++k) D[k] = 0.0f;
                continue;
            }
            const double yv = y[i * P + t], a = h[t], w = h[3 * P + t], e = eps[i * P + t];
            const double lt = log_theta[r * P + t], theta = theta_tab[r * P + t];
            const double pb_v = pbv_tab[b * P + t], diff = a - pm[b * P + t];
            const double sd = sd_[t], sp_w = sp_w_[t];
            const double d1 = (double)(float)(h[t] + sd_[t] * eps[i * P + t]) - lt, d2 = d1 + (double)la_[t];
            double sig1, sig2;
            const double sp1 = softplus_sig(d1, &sig1), sp2 = softplus_sig(d2, &sig2);
            const double A = -theta * sp1 - yv * (sp1 - d1) - (sp_w - w); /* softplus(-w) = softplus(w) - w */
            const double B = -theta * sp2 - yv * (sp2 - d2) - sp_w;
            const double ed = exp(-fabs(A - B)), inv = 1.0 / (1.0 + ed);
            double dT = 0.0;
            const double T = yv >= 1.0 ? count_term(yv, theta, &dT) : 0.0;
            const double ssq = sd * sd + diff * diff;
            lli += m * (T + (A > B ? A : B) + log1p(ed));
            kli += m * ((double)pls[b * P + t] - (double)log_sd_[t] + 0.5 * ssq / pb_v - 0.5);
            if (!D) continue;
            const double r1 = A >= B ? inv : ed * inv, r2 = 1.0 - r1; /* r1 = sigmoid(A - B) */
            const double e1 = yv - (theta + yv) * sig1, e2 = yv - (theta + yv) * sig2;
            const double g_beta = r1 * e1 + r2 * e2;
            D[0] = (float)(m * g_beta);
            D[1] = (float)(m * g_beta * e * sig_s_[t]);
            D[2] = (float)(m * r2 * e2 * sig_f_[t] / (1.0 + sp_f_[t]));
            D[3] = (float)(m * (r1 - sig_w_[t]));
            D[4] = (float)(m * (dT - (r1 * (theta * sp1 + e1) + r2 * (theta * sp2 + e2))));
            D[5] = (float)(m * diff / pb_v);
            D[6] = (float)(m * (sd / pb_v - 1.0 / sd) * sig_s_[t]);
            D[7] = (float)(m * (1.0 - ssq / pb_v));
        }
        ll[i] = (float)lli;
        kl[i] = (float)kli;
    }
    free(tab);
    free(buf);
    return 0;
}

int32_t cv_protein_mixture_backward(int64_t n, int64_t P, int64_t R, int64_t nb, const int64_t *batch,
                                    const float *deriv, const float *g_ll, const float *g_kl, float *g_heads,
                                    float *g_lt, float *g_pm, float *g_pls, int64_t *where) {
    for (int64_t i = 0; i < n; ++i)
        if (batch[i] < 0 || batch[i] >= nb) { *where = i; return 1; }
    double *acc = (double *)calloc((size_t)(R * P + 2 * nb * P), sizeof(double));
    if (acc == NULL) return 3;
    double *acc_lt = acc, *acc_pm = acc + R * P, *acc_pls = acc + R * P + nb * P;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t b = batch[i], r = R > 1 ? b : 0;
        const float gl = g_ll[i], gk = g_kl[i];
        float *gh = g_heads + i * 4 * P;
        for (int64_t t = 0; t < P; ++t) {
            const float *D = deriv + (i * P + t) * PROTEIN_DERIVS;
            gh[t] = gl * D[0] + gk * D[5];
            gh[P + t] = gl * D[1] + gk * D[6];
            gh[2 * P + t] = gl * D[2];
            gh[3 * P + t] = gl * D[3];
            acc_lt[r * P + t] += (double)gl * D[4];
            acc_pm[b * P + t] -= (double)gk * D[5];
            acc_pls[b * P + t] += (double)gk * D[7];
        }
    }
    for (int64_t j = 0; j < R * P; ++j) g_lt[j] = (float)acc_lt[j];
    for (int64_t j = 0; j < nb * P; ++j) { g_pm[j] = (float)acc_pm[j]; g_pls[j] = (float)acc_pls[j]; }
    free(acc);
    return 0;
}

/* 7. cv_joint_split: one minibatch of the joint RNA + protein model, a canonical CSR matrix x (n, G + P) of counts
 *    (genes first), taken apart in one pass (cellvae.vae.totalvi.RNAProteinModule): the genes as a CSR matrix
 *    (g_crow (n + 1), the first *nnz_genes entries of g_col, g_val), the proteins dense (y (n, P), zeros where
 *    nothing is stored), the RNA library sizes max(sum_g x_ng, 1) (lib (n,)) and the encoder's input as values
 *    on x's own sparsity structure (enc (nnz,)):
 *        genes: log1p(x * c_n), c_n = 1 (scale_mode 0, scVI), 1e4 / lib_n (1, "log1p_cp10k"),
 *               1 / (1 + lib_n / G) (2, "log1p_mean");
 *        proteins: m_bt log1p(y / (1 + mean_t(m_bt y_nt))), the mean over the measured proteins (totalVI).
 *    Returns 0, or before writing anything: the cv_csr_check code (1-5) of an invalid structure with *where, 6 when
 *    a batch code lies outside [0, nb) (cell *where). */
int32_t cv_joint_split(int64_t n, int64_t G, int64_t P, int64_t nnz, const int64_t *crow, const int64_t *col,
                       const float *val, const int64_t *batch, int64_t nb, const float *mask, int32_t scale_mode,
                       int64_t *g_crow, int64_t *g_col, float *g_val, float *y, float *lib, float *enc,
                       int64_t *nnz_genes, int64_t *where) {
    const int32_t bad = cv_csr_check(n, G + P, nnz, crow, col, where);
    if (bad) return bad;
    for (int64_t i = 0; i < n; ++i)
        if (batch[i] < 0 || batch[i] >= nb) { *where = i; return 6; }
    memset(y, 0, sizeof(float) * (size_t)(n * P));
    int64_t k_out = 0;
    g_crow[0] = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t b = batch[i];
        double s = 0.0, ys = 0.0, ms = 0.0;
        int64_t k = crow[i];
        for (; k < crow[i + 1] && col[k] < G; ++k) { /* the gene entries are a prefix of the row */
            g_col[k_out] = col[k];
            g_val[k_out++] = val[k];
            s += val[k];
        }
        const int64_t k_prot = k;
        for (; k < crow[i + 1]; ++k) y[i * P + (col[k] - G)] = val[k];
        g_crow[i + 1] = k_out;
        const double L = s > 1.0 ? s : 1.0;
        lib[i] = (float)L;
        const float c = scale_mode == 1 ? (float)(1e4 / L) : scale_mode == 2 ? (float)(1.0 / (1.0 + L / (double)G))
                                                                              : 1.0f;
        for (int64_t j = crow[i]; j < k_prot; ++j) enc[j] = log1pf(scale_mode ? val[j] * c : val[j]);
        for (int64_t t = 0; t < P; ++t) { ys += (double)(y[i * P + t] * mask[b * P + t]); ms += mask[b * P + t]; }
        const double mean = ys / (ms > 1.0 ? ms : 1.0);
        const float den = (float)(1.0 + mean);
        for (int64_t j = k_prot; j < crow[i + 1]; ++j) {
            const float m = mask[b * P + (col[j] - G)];
            enc[j] = log1pf(val[j] * m / den) * m;
        }
    }
    *nnz_genes = k_out;
    return 0;
}
