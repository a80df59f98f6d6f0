/* What bnsuite's fused steps share (bnsuite/training/native/mlp.c for the MLP family, cnn.c for the ConvNet): the
 * precision, torch's BLAS handed over at load time, and the loops both networks run the same way (batch
 * normalization over rows of features, ghost batches, SGD with momentum, softmax cross-entropy).
 * bnsuite.c includes this and both steps: one library, one translation unit. */
#ifndef BNSUITE_COMMON_H
#define BNSUITE_COMMON_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

/* float32 for training; built with -DBN_DOUBLE, the same code in float64, which the tests hold against autograd in
 * float64 (float32 rounding, amplified by small ghost batches, would hide an error in the arithmetic). */
#ifdef BN_DOUBLE
typedef double real;
#define SQRT sqrt
#define EXP exp
#define LOG log
#else
typedef float real;
#define SQRT sqrtf
#define EXP expf
#define LOG logf
#endif

typedef void (*gemm_fn)(const char*, const char*, const int*, const int*, const int*, const real*, const real*,
                         const int*, const real*, const int*, const real*, real*, const int*);
typedef int (*local_threads_fn)(int);
static gemm_fn blas_gemm;
static local_threads_fn local_threads;

int bn_abi_version(void) { return 7; }

void bn_set_blas(void* gemm, void* threads) {
    blas_gemm = (gemm_fn)gemm;
    local_threads = (local_threads_fn)threads;
}

/* A model's steps [from, to) of a call (of `first_step_index` on), run on the calling thread. */
typedef void (*steps_fn)(const void* step, int model, int first_step_index, int from, int to);

/* `steps` steps of each of `models` models on `threads` threads, each model's products single-threaded: a model's
 * steps run in order, on one thread at a time, so its arithmetic is what it is alone.
 *
 * Where the threads divide the models, each model is one task (dynamic: a thread the machine slows takes fewer).
 * Where they do not (7 seeds on 2 threads: 4 models on one, 3 on the other, one thread idle an eighth of the call),
 * the models' steps are laid end to end and cut into one equal share per thread (McNaughton's wrap-around): a
 * model cut between threads t and t + 1 takes its first steps on t + 1, at the start of its share, and its last
 * steps on t, at the end of its share, once t + 1 says they are done (a share is at least a model's steps, so t
 * reaches them after t + 1 is done with them in any timing but a stalled one). */
static void spread_steps(const void* step, int models, int threads, int first_step_index, int steps, steps_fn run) {
    if (threads > models) threads = models;
    if (threads <= 1 || models % threads == 0 || steps <= 0) {
        #pragma omp parallel for schedule(dynamic, 1) num_threads(threads > 0 ? threads : 1)
        for (int m = 0; m < models; m++) {
            const int before = local_threads(1);  /* each product on this thread alone */
            run(step, m, first_step_index, 0, steps);
            local_threads(before);
        }
        return;
    }
    int head_done[models];  /* a cut model's first steps are done */
    for (int m = 0; m < models; m++) head_done[m] = 0;
    #pragma omp parallel num_threads(threads)
    {
        /* The team the runtime gave (it may be smaller than asked): every thread cuts the same shares from it. */
        const int team = omp_get_num_threads(), t = omp_get_thread_num();
        const int before = local_threads(1);
        const int64_t total = (int64_t)models * steps, share = (total + team - 1) / team;
        int64_t u = t * share;
        const int64_t end = u + share < total ? u + share : total;
        if (u < end && u % steps) {  /* the first steps of the model cut at the start of this share */
            const int m = (int)(u / steps), first = (int)((int64_t)(m + 1) * steps - u);
            run(step, m, first_step_index, 0, first);
            __atomic_store_n(&head_done[m], 1, __ATOMIC_RELEASE);
            u = (int64_t)(m + 1) * steps;
        }
        for (; u + steps <= end; u += steps) run(step, (int)(u / steps), first_step_index, 0, steps);
        if (u < end) {  /* the last steps of the model cut at the end of this share, after its first */
            const int m = (int)(u / steps), last = (int)(end - u);
            while (!__atomic_load_n(&head_done[m], __ATOMIC_ACQUIRE)) {}
            run(step, m, first_step_index, steps - last, steps);
        }
        local_threads(before);
    }
}

/* Row-major C[M,N] = op(A)[M,K] op(B)[K,N] + beta C, through column-major BLAS: C^T = op(B)^T op(A)^T. */
static void gemm(int transpose_a, int transpose_b, int M, int N, int K, const real* A, int lda, const real* B,
                 int ldb, real beta, real* C, int ldc) {
    const char ta = transpose_b ? 'T' : 'N', tb = transpose_a ? 'T' : 'N';
    const real one = 1;
    blas_gemm(&ta, &tb, &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

/* The ghost batches of a batch of `rows`: whole ones of `ghost` rows, then the rest (ghost + 1 rows where a single
 * row would be left over, as bnsuite.batchnorm.ghost_parts cuts them). Returns how many. */
static int ghost_batches(int rows, int ghost, int* starts, int* sizes) {
    if (ghost >= rows) { starts[0] = 0; sizes[0] = rows; return 1; }
    int whole = rows - rows % ghost;
    if (rows - whole == 1) whole -= ghost;
    int count = 0;
    for (int r = 0; r < whole; r += ghost) { starts[count] = r; sizes[count++] = ghost; }
    if (whole < rows) { starts[count] = whole; sizes[count++] = rows - whole; }
    return count;
}

static void sgd(real* restrict w, real* restrict velocity, const real* restrict grad, int64_t n, real lr,
                real momentum, real weight_decay, int first) {
    if (weight_decay != 0) {  /* torch's L2 decay: it joins the gradient before the momentum */
        for (int64_t i = 0; i < n; i++) {
            const real d = grad[i] + weight_decay * w[i];
            velocity[i] = first ? d : momentum * velocity[i] + d;
            w[i] -= lr * velocity[i];
        }
        return;
    }
    if (first)
        for (int64_t i = 0; i < n; i++) { velocity[i] = grad[i]; w[i] -= lr * velocity[i]; }
    else
        for (int64_t i = 0; i < n; i++) { velocity[i] = momentum * velocity[i] + grad[i]; w[i] -= lr * velocity[i]; }
}

/* batch_norm_forward, batch_norm_backward and column_sums are inlined where they are called, so a caller that knows
 * F (the ConvNet's few channels) gets loops unrolled and vectorized for it. */

/* Batch norm of rows [r0, r0 + n) of h (F wide), in place: h becomes x_hat; inv gets 1/sqrt(var + eps), mean
 * and var the batch's mean and biased variance. Every loop runs over features, so each feature sums its rows
 * in row order. */
static inline __attribute__((always_inline)) void batch_norm_forward(real* restrict h, int F, int r0, int n, real eps, real* restrict inv,
                               real* restrict mean, real* restrict var) {
    for (int f = 0; f < F; f++) mean[f] = 0;
    for (int r = r0; r < r0 + n; r++) {
        const real* row = h + (int64_t)r * F;
        for (int f = 0; f < F; f++) mean[f] += row[f];
    }
    for (int f = 0; f < F; f++) { mean[f] /= (real)n; var[f] = 0; }
    for (int r = r0; r < r0 + n; r++) {
        const real* row = h + (int64_t)r * F;
        for (int f = 0; f < F; f++) { const real d = row[f] - mean[f]; var[f] += d * d; }
    }
    for (int f = 0; f < F; f++) { var[f] /= (real)n; inv[f] = 1 / SQRT(var[f] + eps); }
    for (int r = r0; r < r0 + n; r++) {
        real* row = h + (int64_t)r * F;
        for (int f = 0; f < F; f++) row[f] = (row[f] - mean[f]) * inv[f];
    }
}

/* dL/dx = gamma * inv * (g - mean(g) - x_hat * mean(g * x_hat)) over rows [r0, r0 + n), in place of g;
 * adds the rows' sum of g * x_hat to dgamma and of g to dbeta. */
static inline __attribute__((always_inline)) void batch_norm_backward(real* restrict g, const real* restrict xh, const real* restrict gamma,
                                const real* restrict inv, int F, int r0, int n, real* restrict sg,
                                real* restrict sgx, real* restrict dgamma, real* restrict dbeta) {
    for (int f = 0; f < F; f++) { sg[f] = 0; sgx[f] = 0; }
    for (int r = r0; r < r0 + n; r++) {
        const real* gr = g + (int64_t)r * F;
        const real* xr = xh + (int64_t)r * F;
        for (int f = 0; f < F; f++) { sg[f] += gr[f]; sgx[f] += gr[f] * xr[f]; }
    }
    const real scale = 1 / (real)n;
    for (int f = 0; f < F; f++) {
        dbeta[f] += sg[f];
        dgamma[f] += sgx[f];
        sg[f] *= scale;
        sgx[f] *= scale;
    }
    for (int r = r0; r < r0 + n; r++) {
        real* gr = g + (int64_t)r * F;
        const real* xr = xh + (int64_t)r * F;
        for (int f = 0; f < F; f++) gr[f] = gamma[f] * inv[f] * (gr[f] - sg[f] - xr[f] * sgx[f]);
    }
}

/* Sum over rows of a (rows, F) block, row by row (each feature in row order). */
static inline __attribute__((always_inline)) void column_sums(const real* restrict x, int rows, int F, real* restrict out) {
    for (int f = 0; f < F; f++) out[f] = 0;
    for (int r = 0; r < rows; r++) {
        const real* row = x + (int64_t)r * F;
        for (int f = 0; f < F; f++) out[f] += row[f];
    }
}

/* A hidden layer's normalization: none, batch (or ghost-batch) statistics, each row over its features (the
 * MLP's LayerNorm), each image over groups of channels (the ConvNet's GroupNorm, LayerNorm with one group). */
enum { NORM_NONE = 0, NORM_BATCH = 1, NORM_LAYER = 2, NORM_GROUP = 3 };
enum { TRAIN = 0, BATCH_STATISTICS = 1, RUNNING = 2 };  /* what a forward pass normalizes with */

/* Softmax cross-entropy of the logits z (rows, C) against y: the sum of the rows' losses (in double) and the hits
 * (arg max, the first of equal maxima, = label); with `gradient`, z becomes dL/dz of the batch's mean loss,
 * (softmax(z) - onehot(y)) / rows. */
static double cross_entropy(real* z, const int64_t* y, int rows, int C, int gradient, int64_t* hits) {
    double loss = 0.0;
    const real per_row = 1 / (real)rows;
    for (int r = 0; r < rows; r++) {
        real* zr = z + (int64_t)r * C;
        const int64_t label = y[r];
        real top = zr[0];
        int best = 0;
        for (int c = 1; c < C; c++) if (zr[c] > top) { top = zr[c]; best = c; }
        *hits += best == label;
        real sum = 0;
        for (int c = 0; c < C; c++) sum += EXP(zr[c] - top);
        const real log_sum = LOG(sum);
        loss += (double)(log_sum - (zr[label] - top));
        if (!gradient) continue;
        for (int c = 0; c < C; c++) zr[c] = EXP(zr[c] - top - log_sum) * per_row;
        zr[label] -= per_row;
    }
    return loss;
}

#endif
