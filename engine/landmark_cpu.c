/* Fused row kernels of the vectorized landmark attention on CPU (engine/attention.py).
 *
 * The torch path touches each (rows x keys) score tile in about five separate passes
 * (mask, exp, sum, scale; in the backward multiply, sum, subtract) over tiles larger than
 * the L2 cache. These two functions do the same arithmetic row by row while the row is in
 * L1: the score tile is read and written twice in the forward and twice in the backward.
 * The matrix products stay in torch (BLAS). Built and loaded by engine/cpu_kernels.py.
 *
 * Layout (both functions): n_mat matrices of R = G*C rows and Kc = nb*L columns, row
 * r of a matrix being query row c = r % C (rows are head-major: G heads of C rows each),
 * at key position p0 + c. Column j is key position j, in block j / L; slot L-1 of every
 * block is its landmark. present: NULL or (n_mat, present_stride) bytes, 0 for a block
 * that is absent (padding); only earlier blocks are affected, as in the torch path.
 *
 * Forward, in place: raw scores x -> final weights P, and g (n_mat, R, nb) the group-0
 * weights (the paper's softmax over the landmarks of earlier blocks and the own block's
 * mass). Backward, in place: dP -> dS, the gradient wrt the raw scores, given P, g and
 * delta = rowsum(dO * O) (n_mat * R). See the comments in engine/attention.py for the
 * formulas; the per-block maximum is always subtracted before exp.
 *
 * The third, folio_max_dot (at the end), is the landmark index's exact max-aggregated
 * search (memory_store/max_scores.py), registered there by engine/cpu_kernels.py.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float *x;           /* forward: scores -> P; backward: dP -> dS */
    const float *p;     /* backward: P */
    float *g;           /* (rows, nb) */
    const float *delta; /* backward: (rows) */
    const uint8_t *present;
    long present_stride, R, C, nb, L, p0;
} job_t;

/* exp for x <= 80 (scores minus their block max, clamped): Cephes' expf (range reduction
 * by n*ln2 in two parts, degree-6 polynomial; about 1 ulp) written inline so that gcc
 * vectorizes the whole loop, where libmvec's vector expf would cost a call per vector. Inputs below -86 give exp(-86) ~ 4e-38 (a normal float) instead of a
 * smaller value: negligible next to the block's largest weight, 1. */
static inline float exp_inline(float x) {
    x = fmaxf(x, -86.f);
    const float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.f;
    uint32_t bits;
    memcpy(&bits, &p, sizeof bits);
    bits += (uint32_t)(int32_t)n << 23; /* times 2^n: n in [-124, 115], the result stays normal */
    memcpy(&p, &bits, sizeof p);
    return p;
}

static inline long n_allowed(long b, long own, long p, long L) {
    if (b < own) return L - 1;
    if (b > own) return 0;
    long k = p % L + 1; /* own block: keys up to p, never its landmark */
    return k < L - 1 ? k : L - 1;
}

/* One row of the forward; L is a parameter so that the dispatch below can inline it with
 * L = 64 as a constant (the usual block: fixed-length loops, fully vectorized, no
 * remainder loops), and once more for any other L. */
static inline __attribute__((always_inline)) void fwd_row(job_t *a, long r, float *a0, float *sums, const long L) {
    const long nb = a->nb, Kc = nb * L;
    const long mat = r / a->R, c = (r % a->R) % a->C, p = a->p0 + c, own = p / L;
    const uint8_t *pres = a->present ? a->present + mat * a->present_stride : NULL;
    float *xr = a->x + r * Kc, *gr = a->g + r * nb;
    float amax = -FLT_MAX;
    for (long b = 0; b < nb; b++) {
        const long n = n_allowed(b, own, p, L);
        /* sums[b] == 0 marks a block outside group 0 (built with -ffast-math: no infinities) */
        if (n == 0 || (b < own && pres && !pres[b])) { a0[b] = -FLT_MAX; sums[b] = 0.f; continue; }
        float *xb = xr + b * L;
        const float lm = xb[L - 1];
        float m = -FLT_MAX, s = 0.f;
        /* whole-block loops (masked by j < n) rather than loops of n: fixed trip counts */
        for (long j = 0; j < L; j++) m = fmaxf(m, j < n ? xb[j] : -FLT_MAX);
        for (long j = 0; j < L; j++) {
            const float e = exp_inline(fminf(xb[j] - m, 80.f));
            xb[j] = j < n ? e : 0.f;
            s += xb[j];
        }
        sums[b] = s;
        a0[b] = b < own ? lm : m; /* the own block's log mass is added below: one log per row */
        if (b == own) a0[b] += logf(s);
        if (a0[b] > amax) amax = a0[b];
    }
    float z = 0.f;
    for (long b = 0; b < nb; b++) {
        const float e = sums[b] > 0.f ? expf(a0[b] - amax) : 0.f;
        gr[b] = e; z += e;
    }
    const float iz = 1.f / z;
    for (long b = 0; b < nb; b++) {
        float *xb = xr + b * L;
        const float gb = gr[b] * iz;
        gr[b] = gb;
        const float sc = sums[b] > 0.f ? gb / sums[b] : 0.f;
        for (long j = 0; j < L; j++) xb[j] *= sc; /* not-allowed slots are 0 already */
    }
}

static void fwd_rows(job_t *a, long r, float *a0, float *sums) {
    if (a->L == 64) fwd_row(a, r, a0, sums, 64);
    else fwd_row(a, r, a0, sums, a->L);
}

static inline __attribute__((always_inline)) void bwd_row(job_t *a, long r, const long L) {
    const long nb = a->nb, Kc = nb * L;
    const long mat = r / a->R, c = (r % a->R) % a->C, p = a->p0 + c, own = p / L;
    const uint8_t *pres = a->present ? a->present + mat * a->present_stride : NULL;
    const float *pr = a->p + r * Kc, *gr = a->g + r * nb;
    float *dr = a->x + r * Kc;
    const float d = a->delta[r];
    for (long b = 0; b < nb; b++) {
        const float *pb = pr + b * L;
        float *db = dr + b * L;
        if (b > own) { memset(db, 0, sizeof(float) * (size_t)L); continue; }
        const int earlier = b < own && (!pres || pres[b]);
        float w = 0.f;
        for (long j = 0; j < L; j++) w += pb[j] * db[j]; /* P of the landmark slot is 0 */
        const float gb = gr[b];
        const float mu = earlier ? w / fmaxf(gb, FLT_MIN) : (b == own ? d : 0.f);
        for (long j = 0; j < L; j++) db[j] = pb[j] * (db[j] - mu);
        db[L - 1] = earlier ? w - gb * d : 0.f;
    }
}

static void bwd_rows(job_t *a, long r) {
    if (a->L == 64) bwd_row(a, r, 64);
    else bwd_row(a, r, a->L);
}

/* Rows are split over `threads` OpenMP threads. Loaded into a process that has torch,
 * libgomp.so.1 resolves to torch's own copy, so this is torch's thread pool (no second
 * pool spinning on the same cores). Returns 0, or -1 if scratch memory ran out. */
int folio_landmark_fwd(float *x, float *g, const uint8_t *present, long present_stride,
                       long n_mat, long R, long C, long nb, long L, long p0, int threads) {
    job_t a = {x, NULL, g, NULL, present, present_stride, R, C, nb, L, p0};
    const long rows = n_mat * R;
    int failed = 0;
    if (threads < 1 || rows < 256) threads = 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *buf = (float *)malloc(sizeof(float) * 2 * (size_t)nb);
        if (!buf) failed = 1;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++)
            if (buf) fwd_rows(&a, r, buf, buf + nb);
        free(buf);
    }
    return failed ? -1 : 0;
}

int folio_landmark_bwd(float *dp, const float *p, const float *g, const float *delta,
                       const uint8_t *present, long present_stride,
                       long n_mat, long R, long C, long nb, long L, long p0, int threads) {
    job_t a = {dp, p, (float *)g, delta, present, present_stride, R, C, nb, L, p0};
    const long rows = n_mat * R;
    if (threads < 1 || rows < 256) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) bwd_rows(&a, r);
    return 0;
}

/* ---- Max-aggregated dot products (the landmark index's exact search_max) ----------------
 *
 * best[b, n] = max over q of <queries[b, q, :], keys[b, n, :]>, for n_b batches (KV heads,
 * or lanes x heads) of Q queries and N keys of D floats. Within a batch the queries and the
 * keys are contiguous rows of D floats; batches are q_bs / k_bs / o_bs floats apart (so a
 * key tile of a larger matrix is read in place). torch computes the same as a bmm of the
 * (N x Q) scores followed by a max over Q; this never writes the scores. Keys are taken in
 * tiles of MD_TILE = 4 vectors of 16, transposed into (D, MD_TILE) scratch, and two queries
 * at a time are scored against the whole tile: 8 vector accumulators written with gcc's
 * vector extensions, so that they stay in registers (the plain loop over the tile's 64
 * lanes kept them in memory and ran at about half the speed; clang and gcc on any target
 * lower the 16-float vectors to what the CPU has). The running max is kept per lane. Jobs
 * (batch, tile) are split over `threads` OpenMP threads. Returns 0, or -1 if scratch memory
 * ran out. */
typedef float md_v16 __attribute__((vector_size(64)));
typedef int md_i16 __attribute__((vector_size(64)));
#define MD_NV 4
#define MD_TILE (16 * MD_NV)

static inline md_v16 md_max(md_v16 a, md_v16 b) {
    const md_i16 m = a > b;
    return (md_v16)(((md_i16)a & m) | ((md_i16)b & ~m));
}

static void max_dot_tile(const float *restrict q, const float *restrict k, float *restrict best,
                         long Q, long D, long nk, md_v16 *restrict kt) {
    float *ktf = (float *)kt;
    for (long d = 0; d < D; d++)
        for (long j = 0; j < MD_TILE; j++) ktf[d * MD_TILE + j] = j < nk ? k[j * D + d] : 0.0f;
    md_v16 m[MD_NV];
    for (int v = 0; v < MD_NV; v++) m[v] = (md_v16){0} - FLT_MAX;
    long i = 0;
    for (; i + 1 < Q; i += 2) {
        const float *q0 = q + i * D, *q1 = q0 + D;
        md_v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        for (long d = 0; d < D; d++) {
            const float a = q0[d], b = q1[d];
            const md_v16 *kr = kt + d * MD_NV;
            a0 += a * kr[0]; a1 += a * kr[1]; a2 += a * kr[2]; a3 += a * kr[3];
            b0 += b * kr[0]; b1 += b * kr[1]; b2 += b * kr[2]; b3 += b * kr[3];
        }
        m[0] = md_max(m[0], md_max(a0, b0));
        m[1] = md_max(m[1], md_max(a1, b1));
        m[2] = md_max(m[2], md_max(a2, b2));
        m[3] = md_max(m[3], md_max(a3, b3));
    }
    if (i < Q) {
        const float *q0 = q + i * D;
        md_v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (long d = 0; d < D; d++) {
            const float a = q0[d];
            const md_v16 *kr = kt + d * MD_NV;
            a0 += a * kr[0]; a1 += a * kr[1]; a2 += a * kr[2]; a3 += a * kr[3];
        }
        m[0] = md_max(m[0], a0);
        m[1] = md_max(m[1], a1);
        m[2] = md_max(m[2], a2);
        m[3] = md_max(m[3], a3);
    }
    const float *mf = (const float *)m;
    for (long j = 0; j < nk; j++) best[j] = mf[j];
}

int folio_max_dot(const float *q, const float *k, float *best, long n_b, long Q, long N, long D,
                  long q_bs, long k_bs, long o_bs, int threads) {
    const long tiles = (N + MD_TILE - 1) / MD_TILE, jobs = n_b * tiles;
    int failed = 0;
    if (N <= 0 || Q <= 0) return 0;
    if (threads < 1 || jobs < 2 || Q * N * D < (1L << 16)) threads = 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        md_v16 *kt = (md_v16 *)aligned_alloc(64, sizeof(float) * MD_TILE * (size_t)D);
        if (!kt) failed = 1;
#pragma omp for schedule(static)
        for (long jb = 0; jb < jobs; jb++) {
            if (!kt) continue;
            const long b = jb / tiles, n0 = (jb % tiles) * MD_TILE;
            const long nk = N - n0 < MD_TILE ? N - n0 : MD_TILE;
            max_dot_tile(q + b * q_bs, k + b * k_bs + n0 * D, best + b * o_bs + n0, Q, D, nk, kt);
        }
        free(kt);
    }
    return failed ? -1 : 0;
}
