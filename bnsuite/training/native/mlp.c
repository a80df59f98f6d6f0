/* bnsuite's fused training step for fully connected networks: forward, loss, backward and SGD with momentum of S
 * models over a run of consecutive batches, in one call (bnsuite/training/fused.py builds, loads and drives it).
 *
 * Each model is stepped by one thread at a time, in order (the models are spread over the threads, a model cut
 * between two where the threads do not divide them: bn_train_steps), and every matrix product is one single-threaded BLAS call on that model's own tensors, with the same shapes,
 * strides and alignment whatever the other models: so a model's arithmetic never depends on the group it trains
 * in, nor on the thread count. Everything between the products (bias, batch/ghost/layer normalization, ReLU,
 * dropout, softmax cross-entropy, the update) runs in one pass over the data it touches, with no allocation.
 *
 * The matrix products come from the BLAS library torch itself uses (its sgemm, or dgemm, and its thread-count
 * switch, handed over by bn_set_blas), so no BLAS is linked here and the library builds with a C compiler alone.
 *
 * Layouts (row-major, `real`: float32, or float64 in the tests' build): a layer's weight is (out, in) as nn.Linear keeps it, activations are (rows, width).
 * Per model, each tensor is found at base + model * stride (in elements).
 */
#include "common.h"

#define MAX_LAYERS 24

typedef struct {
    int models, layers, threads, classes;
    int batch_size, train_size;  /* an epoch's batches: train_size rows, the last batch shorter */
    int first_step;              /* momentum buffers not yet written: the first SGD step copies the gradient */
    real momentum, eps, norm_momentum, keep;  /* keep: 1 - dropout probability (1: no dropout) */
    real weight_decay;           /* torch's L2 decay of every parameter (0: none) */
    int widths[MAX_LAYERS + 1];
    int norm[MAX_LAYERS];        /* per hidden layer */
    int ghost[MAX_LAYERS];       /* images per batch statistic (NORM_BATCH); the whole batch where >= batch_size */
    int after_relu[MAX_LAYERS];  /* normalize the ReLU's output (bn-after-relu's placement) rather than its input */
    int renorm[MAX_LAYERS];      /* NORM_BATCH with Batch Renormalization's r and d (bnsuite.batchnorm.BatchRenorm1d) */
    double renorm_schedule[4];   /* warm-up steps, ramp steps, final r_max, final d_max (bnsuite.batchnorm's) */
    int sigmoid;                 /* the hidden layers' nonlinearity: the sigmoid (Ioffe & Szegedy's MNIST network), else ReLU */
    const real* lr;             /* (S) */
    const real* images; const int64_t* labels;  /* the training set: (N, in) and (N) */
    const int64_t* order; int64_t order_stride;  /* this epoch's order per model: (train_size) indices */
    real* batch; int64_t batch_stride;           /* per model: the batch's images, gathered (batch_size + 1, in) */
    int64_t* batch_labels; int64_t batch_labels_stride;
    real* weight[MAX_LAYERS]; real* bias[MAX_LAYERS];
    real* weight_momentum[MAX_LAYERS]; real* bias_momentum[MAX_LAYERS];
    real* gamma[MAX_LAYERS]; real* beta[MAX_LAYERS];
    real* gamma_momentum[MAX_LAYERS]; real* beta_momentum[MAX_LAYERS];
    real* running_mean[MAX_LAYERS]; real* running_var[MAX_LAYERS];
    int64_t* batches_tracked[MAX_LAYERS];  /* per normalized hidden layer: (S), or null */
    const real* masks[MAX_LAYERS]; int64_t masks_stride[MAX_LAYERS]; int64_t masks_step[MAX_LAYERS];  /* 0/1 draws */
    /* Noisy BN's draws (NoisyBatchNorm1d), per model and step of the call: scale (F), shift (F), then each image's
     * noise (batch_size, F), already scaled as the module scales them; null where the layer adds no noise. */
    const real* noise[MAX_LAYERS]; int64_t noise_stride[MAX_LAYERS]; int64_t noise_step[MAX_LAYERS];
    real* normalized[MAX_LAYERS]; real* activation[MAX_LAYERS]; real* gradient[MAX_LAYERS];
    real* relu_out[MAX_LAYERS];   /* after_relu: the ReLU's output, kept for its backward; else null */
    real* correction[MAX_LAYERS]; /* renorm: each ghost batch's r (F), then each one's d (F); else null */
    int64_t activation_stride[MAX_LAYERS];
    real* invstd[MAX_LAYERS]; int64_t invstd_stride[MAX_LAYERS];
    real* logits; int64_t logits_stride;
    real* scratch; int64_t scratch_stride;  /* 8 x the widest layer, per model */
    real* losses; int64_t losses_stride;    /* (S, steps of an epoch): written at each step's index */
    int64_t* correct;                         /* (S): training predictions that hit, added to */
} Step;

/* Batch Renormalization's bounds (1 / r_max, r_max, d_max) after `step` earlier steps: computed in double and
 * rounded once, as bnsuite.batchnorm._renorm_bounds_of computes them. */
static void renorm_bounds(const Step* s, int64_t step, real* r_min, real* r_max, real* d_max) {
    const double* k = s->renorm_schedule;
    double progress = ((double)step - k[0]) > 0 ? ((double)step - k[0]) / k[1] : 0.0;
    if (progress > 1.0) progress = 1.0;
    const double top = 1.0 + (k[2] - 1.0) * progress;
    *r_min = (real)(1.0 / top);
    *r_max = (real)top;
    *d_max = (real)(k[3] * progress);
}

static inline real clamp(real x, real low, real high) { return x < low ? low : (x > high ? high : x); }

/* Hidden layer l after its product and bias: (after_relu: ReLU first) normalize, scale and shift (renorm: with r
 * and d), noise (noisy BN, in training), ReLU (unless it came first) or the sigmoid, dropout. TRAIN: with the batch's
 * statistics, which the running estimates follow, and dropout and noise; BATCH_STATISTICS: the same, changing
 * nothing and without dropout or noise (what training computes, on held-out images); RUNNING: with the running
 * estimates (eval). */
static void hidden_forward(const Step* s, int l, int m, int rows, int step_in_chunk, int mode,
                           real* restrict scratch) {
    const int F = s->widths[l + 1];
    real* h = s->normalized[l] + m * s->activation_stride[l];
    real* a = s->activation[l] + m * s->activation_stride[l];
    const int64_t n = (int64_t)rows * F;
    const int after_relu = s->after_relu[l];
    if (after_relu) {
        real* kept = s->relu_out[l] + m * s->activation_stride[l];
        for (int64_t i = 0; i < n; i++) { h[i] = h[i] > 0 ? h[i] : 0; kept[i] = h[i]; }
    }
    if (s->norm[l] == NORM_BATCH || s->norm[l] == NORM_LAYER) {
        const real* gamma = s->gamma[l] + (int64_t)m * F;
        const real* beta = s->beta[l] + (int64_t)m * F;
        real* inv = s->invstd[l] + m * s->invstd_stride[l];
        int starts[1024], sizes[1024];
        int count = 1;
        const real* rd = 0;  /* renorm: r then d per ghost batch */
        if (s->norm[l] == NORM_BATCH && mode == RUNNING) {
            const real* rm = s->running_mean[l] + (int64_t)m * F;
            const real* rv = s->running_var[l] + (int64_t)m * F;
            for (int f = 0; f < F; f++) inv[f] = 1 / SQRT(rv[f] + s->eps);
            for (int r = 0; r < rows; r++) {
                real* row = h + (int64_t)r * F;
                for (int f = 0; f < F; f++) row[f] = (row[f] - rm[f]) * inv[f];
            }
        } else if (s->norm[l] == NORM_BATCH) {
            count = ghost_batches(rows, s->ghost[l], starts, sizes);
            real* mean = scratch;
            real* var = scratch + F;
            real* rm = s->running_mean[l] + (int64_t)m * F;
            real* rv = s->running_var[l] + (int64_t)m * F;
            real* sigma = scratch + 2 * F;     /* renorm: the running estimates as they were before this batch */
            real* old_mean = scratch + 3 * F;
            real* correction = s->correction[l] + m * s->activation_stride[l];
            real r_min = 1, r_max = 1, d_max = 0;
            if (s->renorm[l]) {
                renorm_bounds(s, s->batches_tracked[l][m], &r_min, &r_max, &d_max);
                for (int f = 0; f < F; f++) { sigma[f] = SQRT(rv[f] + s->eps); old_mean[f] = rm[f]; }
                rd = correction;
            }
            for (int q = 0; q < count; q++) {
                batch_norm_forward(h, F, starts[q], sizes[q], s->eps, inv + (int64_t)q * F, mean, var);
                if (s->renorm[l])  /* held constant in the backward pass (Ioffe 2017, Algorithm 1) */
                    for (int f = 0; f < F; f++) {
                        correction[(int64_t)q * F + f] = clamp(SQRT(var[f] + s->eps) / sigma[f], r_min, r_max);
                        correction[(int64_t)(count + q) * F + f] = clamp((mean[f] - old_mean[f]) / sigma[f], -d_max,
                                                                         d_max);
                    }
                if (q == 0 && mode == TRAIN) {  /* the running estimates follow the first (ghost) batch, with its unbiased variance */
                    const real unbias = (real)sizes[0] / (real)(sizes[0] - 1);
                    for (int f = 0; f < F; f++) {
                        rm[f] += s->norm_momentum * (mean[f] - rm[f]);
                        rv[f] += s->norm_momentum * (var[f] * unbias - rv[f]);
                    }
                }
            }
        } else {
            for (int r = 0; r < rows; r++) {  /* each image over its own features */
                real* row = h + (int64_t)r * F;
                real mean = 0, var = 0;
                for (int f = 0; f < F; f++) mean += row[f];
                mean /= (real)F;
                for (int f = 0; f < F; f++) { const real d = row[f] - mean; var += d * d; }
                const real rstd = 1 / SQRT(var / (real)F + s->eps);
                inv[r] = rstd;
                for (int f = 0; f < F; f++) row[f] = (row[f] - mean) * rstd;
            }
        }
        const real* noise = s->noise[l] && mode == TRAIN
            ? s->noise[l] + m * s->noise_stride[l] + (int64_t)step_in_chunk * s->noise_step[l] : 0;
        if (!rd) { starts[0] = 0; sizes[0] = rows; count = 1; }
        for (int q = 0; q < count; q++) {
            const real* r_q = rd ? rd + (int64_t)q * F : 0;
            const real* d_q = rd ? rd + (int64_t)(count + q) * F : 0;
            for (int r = starts[q]; r < starts[q] + sizes[q]; r++) {
                const real* xr = h + (int64_t)r * F;
                real* ar = a + (int64_t)r * F;
                if (r_q)
                    for (int f = 0; f < F; f++) ar[f] = gamma[f] * (xr[f] * r_q[f] + d_q[f]) + beta[f];
                else
                    for (int f = 0; f < F; f++) ar[f] = gamma[f] * xr[f] + beta[f];
                if (noise) {
                    const real* e = noise + 2 * F + (int64_t)r * F;
                    for (int f = 0; f < F; f++) ar[f] = ar[f] * noise[f] + noise[F + f] + e[f];
                }
                if (s->sigmoid)
                    for (int f = 0; f < F; f++) ar[f] = 1 / (1 + EXP(-ar[f]));
                else if (!after_relu)
                    for (int f = 0; f < F; f++) ar[f] = ar[f] > 0 ? ar[f] : 0;
            }
        }
    } else if (s->sigmoid) {
        for (int64_t i = 0; i < n; i++) a[i] = 1 / (1 + EXP(-h[i]));
    } else {
        for (int64_t i = 0; i < n; i++) a[i] = h[i] > 0 ? h[i] : 0;
    }
    if (s->keep < 1 && mode == TRAIN) {
        const real* mask = s->masks[l] + m * s->masks_stride[l] + (int64_t)step_in_chunk * s->masks_step[l];
        const real scale = 1 / s->keep;
        for (int64_t i = 0; i < n; i++) a[i] *= mask[i] * scale;
    }
}

/* The forward pass of model m on `rows` images x (rows, in): the logits, in s->logits' block. With `sums` (per
 * hidden layer: F sums, then F sums of squares, in double), each batch-normalized layer's input is added to them,
 * as precise BN takes it (bn_precise). */
static void forward_summing(const Step* s, int m, const real* x, int rows, int step_in_chunk, int mode,
                            real* scratch, double* const* sums) {
    const int L = s->layers;
    const real* in = x;
    for (int l = 0; l < L; l++) {
        const int fin = s->widths[l], fout = s->widths[l + 1];
        const real* w = s->weight[l] + (int64_t)m * fin * fout;
        const real* b = s->bias[l] + (int64_t)m * fout;
        real* out = l < L - 1 ? s->normalized[l] + m * s->activation_stride[l] : s->logits + m * s->logits_stride;
        gemm(0, 1, rows, fout, fin, in, fin, w, fin, 0, out, fout);
        for (int r = 0; r < rows; r++) {
            real* row = out + (int64_t)r * fout;
            for (int f = 0; f < fout; f++) row[f] += b[f];
        }
        if (l == L - 1) break;
        if (sums && s->norm[l] == NORM_BATCH) {  /* the normalization's input: after the ReLU where it comes first */
            double* sum = sums[l];
            double* square = sums[l] + fout;
            for (int r = 0; r < rows; r++) {
                const real* row = out + (int64_t)r * fout;
                for (int f = 0; f < fout; f++) {
                    const double v = s->after_relu[l] && row[f] < 0 ? 0.0 : (double)row[f];
                    sum[f] += v;
                    square[f] += v * v;
                }
            }
        }
        hidden_forward(s, l, m, rows, step_in_chunk, mode, scratch);
        in = s->activation[l] + m * s->activation_stride[l];
    }
}

static void forward(const Step* s, int m, const real* x, int rows, int step_in_chunk, int mode, real* scratch) {
    forward_summing(s, m, x, rows, step_in_chunk, mode, scratch, 0);
}

/* The gradient at hidden layer l's product output, in place of g (the gradient at its activation): dropout,
 * ReLU (where the activation is 0, nothing flows) or the sigmoid (a (1 - a)), noise's scale, then the normalization's backward, whose scale
 * and shift take their SGD step here (after_relu: the normalization's backward, then the ReLU's). */
static void hidden_backward(const Step* s, int l, int m, int rows, int step_in_chunk, real* restrict g,
                            real lr, int first, real* restrict scratch) {
    const int F = s->widths[l + 1];
    const real* a = s->activation[l] + m * s->activation_stride[l];
    const int64_t n = (int64_t)rows * F;
    if (s->keep < 1) {
        const real* mask = s->masks[l] + m * s->masks_stride[l] + (int64_t)step_in_chunk * s->masks_step[l];
        const real scale = 1 / s->keep;
        for (int64_t i = 0; i < n; i++) g[i] = a[i] > 0 ? g[i] * (mask[i] * scale) : 0;
    } else if (s->sigmoid) {
        for (int64_t i = 0; i < n; i++) g[i] *= a[i] * (1 - a[i]);
    } else if (!s->after_relu[l]) {
        for (int64_t i = 0; i < n; i++) g[i] = a[i] > 0 ? g[i] : 0;
    }
    if (s->noise[l]) {  /* y * scale + shift + noise: the gradient at y is the scale's */
        const real* scale = s->noise[l] + m * s->noise_stride[l] + (int64_t)step_in_chunk * s->noise_step[l];
        for (int r = 0; r < rows; r++) {
            real* gr = g + (int64_t)r * F;
            for (int f = 0; f < F; f++) gr[f] *= scale[f];
        }
    }
    if (s->norm[l] == NORM_NONE) return;
    const real* xh = s->normalized[l] + m * s->activation_stride[l];
    const real* inv = s->invstd[l] + m * s->invstd_stride[l];
    real* gamma = s->gamma[l] + (int64_t)m * F;
    real* beta = s->beta[l] + (int64_t)m * F;
    real* dgamma = scratch;
    real* dbeta = scratch + F;
    for (int f = 0; f < F; f++) { dgamma[f] = 0; dbeta[f] = 0; }
    if (s->norm[l] == NORM_BATCH) {
        int starts[1024], sizes[1024];
        const int count = ghost_batches(rows, s->ghost[l], starts, sizes);
        const real* rd = s->renorm[l] ? s->correction[l] + m * s->activation_stride[l] : 0;
        for (int q = 0; q < count; q++) {
            if (!rd) {
                batch_norm_backward(g, xh, gamma, inv + (int64_t)q * F, F, starts[q], sizes[q], scratch + 2 * F,
                                    scratch + 3 * F, dgamma, dbeta);
                continue;
            }
            /* y = x_hat r + d, r and d constants: x_hat's gradient is gamma r g, and gamma's is the sum of g y */
            const real* r_q = rd + (int64_t)q * F;
            const real* d_q = rd + (int64_t)(count + q) * F;
            real* scaled = scratch + 4 * F;
            real* sums = scratch + 5 * F;
            real* sums_x = scratch + 6 * F;
            for (int f = 0; f < F; f++) { scaled[f] = gamma[f] * r_q[f]; sums[f] = 0; sums_x[f] = 0; }
            batch_norm_backward(g, xh, scaled, inv + (int64_t)q * F, F, starts[q], sizes[q], scratch + 2 * F,
                                scratch + 3 * F, sums_x, sums);
            for (int f = 0; f < F; f++) {
                dgamma[f] += r_q[f] * sums_x[f] + d_q[f] * sums[f];
                dbeta[f] += sums[f];
            }
        }
    } else {
        for (int r = 0; r < rows; r++) {
            real* gr = g + (int64_t)r * F;
            const real* xr = xh + (int64_t)r * F;
            real sg = 0, sgx = 0;
            for (int f = 0; f < F; f++) {
                dgamma[f] += gr[f] * xr[f];
                dbeta[f] += gr[f];
                const real t = gr[f] * gamma[f];
                sg += t;
                sgx += t * xr[f];
            }
            sg /= (real)F;
            sgx /= (real)F;
            for (int f = 0; f < F; f++) gr[f] = inv[r] * (gr[f] * gamma[f] - sg - xr[f] * sgx);
        }
    }
    sgd(gamma, s->gamma_momentum[l] + (int64_t)m * F, dgamma, F, lr, s->momentum, s->weight_decay, first);
    sgd(beta, s->beta_momentum[l] + (int64_t)m * F, dbeta, F, lr, s->momentum, s->weight_decay, first);
    if (s->after_relu[l]) {
        const real* kept = s->relu_out[l] + m * s->activation_stride[l];
        for (int64_t i = 0; i < n; i++) g[i] = kept[i] > 0 ? g[i] : 0;
    }
}

/* One SGD step of model m on its epoch's batch `step` (its images gathered through the epoch's order); its loss
 * goes to losses[m, step]. */
static void model_step(const Step* s, int m, int step, int step_in_chunk, int first) {
    const int L = s->layers, C = s->classes, in = s->widths[0];
    const int start = step * s->batch_size;
    const int rows = s->train_size - start < s->batch_size ? s->train_size - start : s->batch_size;
    const real lr = s->lr[m];
    real* scratch = s->scratch + m * s->scratch_stride;
    real* x = s->batch + m * s->batch_stride;
    int64_t* y = s->batch_labels + m * s->batch_labels_stride;
    const int64_t* order = s->order + m * s->order_stride + start;
    for (int r = 0; r < rows; r++) {
        const real* image = s->images + order[r] * in;
        for (int i = 0; i < in; i++) x[(int64_t)r * in + i] = image[i];
        y[r] = s->labels[order[r]];
    }
    real* z = s->logits + m * s->logits_stride;
    forward(s, m, x, rows, step_in_chunk, TRAIN, scratch);
    for (int l = 0; l < L - 1; l++)
        if (s->batches_tracked[l]) s->batches_tracked[l][m] += 1;
    int64_t hits = 0;
    s->losses[m * s->losses_stride + step] = (real)(cross_entropy(z, y, rows, C, 1, &hits) / rows);
    s->correct[m] += hits;

    real* g = z;
    for (int l = L - 1; l >= 0; l--) {
        const int fin = s->widths[l], fout = s->widths[l + 1];
        real* w = s->weight[l] + (int64_t)m * fin * fout;
        real* b = s->bias[l] + (int64_t)m * fout;
        real* velocity = s->weight_momentum[l] + (int64_t)m * fin * fout;
        const real* layer_in = l == 0 ? x : s->activation[l - 1] + m * s->activation_stride[l - 1];
        /* The weight's momentum buffer takes the gradient straight from the product: v = g^T in + momentum v. */
        gemm(1, 0, fout, fin, rows, g, fout, layer_in, fin, first ? 0 : s->momentum, velocity, fin);
        if (s->weight_decay != 0)  /* the decay joins the velocity as torch's joins the gradient */
            for (int64_t i = 0; i < (int64_t)fin * fout; i++) velocity[i] += s->weight_decay * w[i];
        real* grad_in = 0;
        if (l > 0) {  /* with the weight as it was in the forward pass */
            grad_in = s->gradient[l - 1] + m * s->activation_stride[l - 1];
            gemm(0, 0, rows, fin, fout, g, fout, w, fin, 0, grad_in, fin);
        }
        for (int64_t i = 0; i < (int64_t)fin * fout; i++) w[i] -= lr * velocity[i];
        column_sums(g, rows, fout, scratch);
        sgd(b, s->bias_momentum[l] + (int64_t)m * fout, scratch, fout, lr, s->momentum, s->weight_decay, first);
        if (l == 0) break;
        hidden_backward(s, l - 1, m, rows, step_in_chunk, grad_in, lr, first, scratch);
        g = grad_in;
    }
}

/* Steps [from, to) of the call (of `first_step_index` on) for model m, on this thread (spread_steps's task). */
static void model_steps(const void* step, int m, int first_step_index, int from, int to) {
    const Step* s = step;
    for (int k = from; k < to; k++)
        model_step(s, m, first_step_index + k, k, s->first_step && k == 0);
}

/* Steps [first_step_index, first_step_index + steps) of the epoch for every model. */
void bn_train_steps(const Step* s, int first_step_index, int steps) {
    spread_steps(s, s->models, s->threads, first_step_index, steps, model_steps);
}

enum { MOVING_ESTIMATES = 2 };

/* Model m on `n` images (n, in) with labels, on this thread: the summed cross-entropy, its hits added to *correct.
 * With `batch_statistics`, in consecutive batches of `batch_size` normalized by their own statistics (a last batch
 * of a single image joins the one before), as training normalizes, changing nothing; with MOVING_ESTIMATES, so too,
 * the running estimates and step counts following batch after batch as in training (Batch Renorm's r and d read
 * them): `s` must then point at copies of them, which the call moves; else with the running estimates `s` points
 * at, in blocks of `batch_size` images (each image's figures do not depend on its block). */
static double evaluate_model(const Step* s, int m, const real* images, const int64_t* labels, int64_t n,
                             int batch_statistics, int64_t* correct) {
    const int mode = batch_statistics == MOVING_ESTIMATES ? TRAIN : batch_statistics ? BATCH_STATISTICS : RUNNING;
    real* scratch = s->scratch + m * s->scratch_stride;
    double loss = 0.0;
    for (int64_t start = 0; start < n;) {
        int64_t rows = n - start < s->batch_size ? n - start : s->batch_size;
        if (batch_statistics && n - start - rows == 1) rows += 1;
        forward(s, m, images + start * s->widths[0], (int)rows, 0, mode, scratch);
        if (mode == TRAIN)
            for (int l = 0; l < s->layers - 1; l++)
                if (s->batches_tracked[l]) s->batches_tracked[l][m] += 1;
        loss += cross_entropy(s->logits + m * s->logits_stride, labels + start, (int)rows, s->classes, 0, correct);
        start += rows;
    }
    return loss;
}

/* Every model on `n` images (evaluate_model), each on one thread: the summed cross-entropy and the hits per model. */
void bn_evaluate(const Step* s, const real* images, const int64_t* labels, int64_t n, int batch_statistics,
                 double* loss_sums, int64_t* hits) {
    #pragma omp parallel for schedule(dynamic, 1) num_threads(s->threads)
    for (int m = 0; m < s->models; m++) {
        const int before = local_threads(1);
        int64_t correct = 0;
        loss_sums[m] = evaluate_model(s, m, images, labels, n, batch_statistics, &correct);
        hits[m] = correct;
        local_threads(before);
    }
}

/* Precise BN (bnsuite.precise) for every model at once: each batch-normalized layer's population mean and biased
 * variance over `n` training images (n, in) in consecutive batches of `batch_size`, each normalized by its own
 * statistics as training normalizes (a last batch of a single image joins the one before; no dropout, no noise),
 * summed in double; then the `held_n` held-out images evaluated with those statistics in place of the running
 * estimates: `hits` per model. `statistics` receives them, per hidden layer l at l * 2 * models * widest: the
 * models' means (models, F), then at (l * 2 + 1) * models * widest their variances. `sums`: per model
 * layers * 2 * widest doubles of room. The models change in nothing. Batch Renorm and noisy BN are not taken (their
 * batch-statistics forward moves state or draws noise: bnsuite.fused.FusedStep.precise leaves them to the module). */
void bn_precise(const Step* s, const real* images, int64_t n, const real* held, const int64_t* held_labels,
                int64_t held_n, int widest, double* sums, real* statistics, int64_t* hits) {
    Step precise = *s;  /* the same step, its running estimates read from `statistics` */
    const int64_t block = (int64_t)s->models * widest;
    for (int l = 0; l < s->layers - 1; l++) {
        precise.running_mean[l] = statistics + 2 * l * block;
        precise.running_var[l] = statistics + (2 * l + 1) * block;
    }
    #pragma omp parallel for schedule(dynamic, 1) num_threads(s->threads)
    for (int m = 0; m < s->models; m++) {
        const int before = local_threads(1);
        real* scratch = s->scratch + m * s->scratch_stride;
        double* mine[MAX_LAYERS];
        for (int l = 0; l < s->layers - 1; l++) {
            mine[l] = sums + ((int64_t)m * (s->layers - 1) + l) * 2 * widest;
            for (int f = 0; f < 2 * widest; f++) mine[l][f] = 0;
        }
        for (int64_t start = 0; start < n;) {
            int64_t rows = n - start < s->batch_size ? n - start : s->batch_size;
            if (n - start - rows == 1) rows += 1;
            forward_summing(s, m, images + start * s->widths[0], (int)rows, 0, BATCH_STATISTICS, scratch, mine);
            start += rows;
        }
        for (int l = 0; l < s->layers - 1; l++) {
            const int F = s->widths[l + 1];
            for (int f = 0; f < F; f++) {
                const double mean = mine[l][f] / (double)n, var = mine[l][F + f] / (double)n - mean * mean;
                precise.running_mean[l][(int64_t)m * F + f] = (real)mean;
                precise.running_var[l][(int64_t)m * F + f] = (real)(var > 0 ? var : 0);
            }
        }
        int64_t correct = 0;
        evaluate_model(&precise, m, held, held_labels, held_n, 0, &correct);
        hits[m] = correct;
        local_threads(before);
    }
}

/* The matrix products of `steps` training steps, and with `update` the weights' update, alone, as bn_train_steps
 * runs them (each model on one thread, the same shapes, the same buffers): what a step of these shapes costs with
 * nothing else in it. For the speed benchmark only: the numbers it leaves in the buffers mean nothing. */
void bn_time_products(const Step* s, int steps, int update) {
    #pragma omp parallel for schedule(dynamic, 1) num_threads(s->threads)
    for (int m = 0; m < s->models; m++) {
        const int before = local_threads(1);
        const int rows = s->batch_size, L = s->layers;
        const real* x = s->batch + m * s->batch_stride;
        for (int k = 0; k < steps; k++) {
            const real* in = x;
            for (int l = 0; l < L; l++) {
                const int fin = s->widths[l], fout = s->widths[l + 1];
                real* out = l < L - 1 ? s->normalized[l] + m * s->activation_stride[l]
                                      : s->logits + m * s->logits_stride;
                gemm(0, 1, rows, fout, fin, in, fin, s->weight[l] + (int64_t)m * fin * fout, fin, 0, out, fout);
                if (l < L - 1) in = s->activation[l] + m * s->activation_stride[l];
            }
            const real* g = s->logits + m * s->logits_stride;
            for (int l = L - 1; l >= 0; l--) {
                const int fin = s->widths[l], fout = s->widths[l + 1];
                real* w = s->weight[l] + (int64_t)m * fin * fout;
                real* velocity = s->weight_momentum[l] + (int64_t)m * fin * fout;
                const real* layer_in = l == 0 ? x : s->activation[l - 1] + m * s->activation_stride[l - 1];
                gemm(1, 0, fout, fin, rows, g, fout, layer_in, fin, s->momentum, velocity, fin);
                if (l > 0) {
                    real* grad_in = s->gradient[l - 1] + m * s->activation_stride[l - 1];
                    gemm(0, 0, rows, fin, fout, g, fout, w, fin, 0, grad_in, fin);
                    g = grad_in;
                }
                if (update)
                    for (int64_t i = 0; i < (int64_t)fin * fout; i++) w[i] -= s->lr[m] * velocity[i];
            }
        }
        local_threads(before);
    }
}
