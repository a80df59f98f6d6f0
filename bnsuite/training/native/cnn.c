/* bnsuite's fused training step for the ConvNet (bnsuite.models.SmallCNN): conv 3x3 (padding 1) -> normalization
 * -> ReLU -> max pool 2 -> conv 3x3 -> normalization -> ReLU -> max pool 2 -> linear. Forward, loss, backward and
 * SGD with momentum of S models over a run of batches per call, as mlp.c does for the MLP family: each model on
 * one thread from its first batch to its last, every product one single-threaded BLAS call on that model's own
 * buffers, so a model's arithmetic never depends on the group it trains in nor on the thread count.
 *
 * A convolution is a product: its input is unfolded into 3x3 patches (im2col, zero padding), one row per output
 * position and columns in (kh, kw, channel) order, which is how a channels-last weight (Cout, 3, 3, Cin) lies in
 * memory; the product with the weight gives the channels-last feature map (positions, Cout). Batch normalization
 * then sees (images x positions, channels) rows and runs common.h's loops unchanged, ghost batches being whole
 * images; group normalization takes each image's values over its group of channels. The second pooling writes
 * each image channel-major (C, H, W), the order nn.Linear's weight reads after flatten(1).
 */

#define CNN_LAYERS 2
#define CNN_MAX_GHOST_BATCHES 1024

typedef struct {
    int models, threads, classes;
    int batch_size, train_size, first_step;
    real momentum, eps, norm_momentum;
    int channels[CNN_LAYERS + 1];  /* the image's, conv1's, conv2's */
    int height, width;             /* the image's; each pooling halves them (multiples of 4) */
    int norm, ghost, groups;       /* NORM_NONE, NORM_BATCH (ghost: images per statistic) or NORM_GROUP (groups) */
    const real* lr;                /* (S) */
    const real* images; const int64_t* labels;    /* the training set: (N, C*H*W) channel-major, and (N) */
    const int64_t* order; int64_t order_stride;   /* this epoch's order per model */
    real* weight[CNN_LAYERS + 1]; real* bias[CNN_LAYERS + 1];  /* conv1, conv2, fc; each (S, ...) contiguous */
    real* weight_momentum[CNN_LAYERS + 1]; real* bias_momentum[CNN_LAYERS + 1];
    real* gamma[CNN_LAYERS]; real* beta[CNN_LAYERS];
    real* gamma_momentum[CNN_LAYERS]; real* beta_momentum[CNN_LAYERS];
    real* running_mean[CNN_LAYERS]; real* running_var[CNN_LAYERS];
    int64_t* batches_tracked[CNN_LAYERS];
    real* workspace; int64_t workspace_stride;    /* per thread: bn_cnn_workspace(s) elements */
    real* losses; int64_t losses_stride;
    int64_t* correct;
} ConvStep;

/* One thread's buffers for a batch of up to batch_size + 1 images; fc: the linear layer's weight with its columns
 * in the pooled maps' channels-last order. */
typedef struct {
    real *x, *cols[CNN_LAYERS], *h[CNN_LAYERS], *pooled[CNN_LAYERS], *logits, *fc;
    real *pooled_gradient[CNN_LAYERS], *gradient[CNN_LAYERS], *column_gradient, *inv[CNN_LAYERS], *small;
} Buffers;

static int64_t positions(const ConvStep* s, int l) { return (int64_t)(s->height >> l) * (s->width >> l); }
static int64_t weight_size(const ConvStep* s, int l) {
    if (l < CNN_LAYERS) return (int64_t)s->channels[l + 1] * 9 * s->channels[l];
    return (int64_t)s->classes * s->channels[CNN_LAYERS] * positions(s, CNN_LAYERS);
}

/* Carves one thread's buffers out of `base` (the elements needed, rounded to cache lines, are returned; with
 * base 0 only counted). */
static int64_t carve(const ConvStep* s, real* base, Buffers* b) {
    const int64_t R = s->batch_size + 1;
    int64_t used = 0;
#define TAKE(pointer, type, count) do { pointer = (type*)((uintptr_t)base + used * sizeof(real)); \
        used += (((int64_t)(count) * (int64_t)sizeof(type) + 63) / 64) * (64 / (int64_t)sizeof(real)); } while (0)
    TAKE(b->x, real, R * positions(s, 0) * s->channels[0]);
    int widest = 0;
    for (int l = 0; l < CNN_LAYERS; l++) {
        const int64_t P = positions(s, l), cin = s->channels[l], cout = s->channels[l + 1];
        if (cout > widest) widest = cout;
        TAKE(b->cols[l], real, R * P * 9 * cin);
        TAKE(b->h[l], real, R * P * cout);
        TAKE(b->gradient[l], real, R * P * cout);
        TAKE(b->pooled[l], real, R * (P / 4) * cout);
        TAKE(b->pooled_gradient[l], real, R * (P / 4) * cout);
        TAKE(b->inv[l], real, R * cout);  /* per ghost batch and channel, or per image and group */
    }
    TAKE(b->column_gradient, real, R * positions(s, 1) * 9 * s->channels[1]);
    TAKE(b->fc, real, weight_size(s, CNN_LAYERS));
    TAKE(b->logits, real, R * s->classes);
    TAKE(b->small, real, 6 * widest + 2 * s->classes);
#undef TAKE
    return used;
}

/* Elements of workspace one thread needs. */
int64_t bn_cnn_workspace(const ConvStep* s) {
    Buffers b;
    return carve(s, 0, &b);
}

/* Runs `call` with C_ standing for the channel count C: a constant where C is one of the counts the ConvNet's
 * layers have (8 or 16 maps, 10 classes), so that each copy's loops over channels are unrolled and vectorized for it;
 * the count itself otherwise (an image's 1 or 3 channels: specializing those measured no faster). */
#define WITH_CHANNELS(C, call) do { switch (C) { \
        case 8: { enum { C_ = 8 }; call; } break; \
        case 10: { enum { C_ = 10 }; call; } break; \
        case 16: { enum { C_ = 16 }; call; } break; \
        default: { const int C_ = (C); call; } } } while (0)

/* 3x3 patches of x (rows, H, W, C) with zero padding 1: cols (rows * H * W, 9 * C), columns in (kh, kw, c) order.
 * A patch's three values of one kernel row are 3 * C consecutive values of x, copied as one block. */
static inline __attribute__((always_inline)) void unfold_channels(const real* restrict x, int rows, int H, int W,
                                                                   int C, real* restrict cols) {
    const int64_t K = 9 * C;
    for (int r = 0; r < rows; r++)
        for (int y = 0; y < H; y++) {
            real* patches = cols + ((int64_t)r * H + y) * W * K;
            for (int kh = 0; kh < 3; kh++) {
                const int sy = y + kh - 1;
                const real* in = x + ((int64_t)r * H + sy) * W * C;
                for (int xx = 0; xx < W; xx++) {
                    real* out = patches + xx * K + kh * 3 * C;
                    if (sy < 0 || sy >= H) {
                        for (int i = 0; i < 3 * C; i++) out[i] = 0;
                    } else if (xx == 0) {
                        for (int i = 0; i < C; i++) out[i] = 0;
                        for (int i = 0; i < 2 * C; i++) out[C + i] = in[i];
                    } else if (xx == W - 1) {
                        const real* from = in + (int64_t)(xx - 1) * C;
                        for (int i = 0; i < 2 * C; i++) out[i] = from[i];
                        for (int i = 0; i < C; i++) out[2 * C + i] = 0;
                    } else {
                        const real* from = in + (int64_t)(xx - 1) * C;
                        for (int i = 0; i < 3 * C; i++) out[i] = from[i];
                    }
                }
            }
        }
}

/* unfold's adjoint: the patches' gradients summed back into dx (rows, H, W, C), in patch order. */
static inline __attribute__((always_inline)) void fold_channels(const real* restrict cols, int rows, int H, int W,
                                                                 int C, real* restrict dx) {
    const int64_t K = 9 * C;
    for (int64_t i = 0; i < (int64_t)rows * H * W * C; i++) dx[i] = 0;
    for (int r = 0; r < rows; r++)
        for (int y = 0; y < H; y++) {
            const real* patches = cols + ((int64_t)r * H + y) * W * K;
            for (int kh = 0; kh < 3; kh++) {
                const int sy = y + kh - 1;
                if (sy < 0 || sy >= H) continue;
                real* out = dx + ((int64_t)r * H + sy) * W * C;
                for (int xx = 0; xx < W; xx++) {
                    const real* in = patches + xx * K + kh * 3 * C;
                    if (xx == 0) {
                        for (int i = 0; i < 2 * C; i++) out[i] += in[C + i];
                    } else if (xx == W - 1) {
                        real* to = out + (int64_t)(xx - 1) * C;
                        for (int i = 0; i < 2 * C; i++) to[i] += in[i];
                    } else {
                        real* to = out + (int64_t)(xx - 1) * C;
                        for (int i = 0; i < 3 * C; i++) to[i] += in[i];
                    }
                }
            }
        }
}

static void unfold(const real* x, int rows, int H, int W, int C, real* cols) {
    WITH_CHANNELS(C, unfold_channels(x, rows, H, W, C_, cols));
}

static void fold(const real* cols, int rows, int H, int W, int C, real* dx) {
    WITH_CHANNELS(C, fold_channels(cols, rows, H, W, C_, dx));
}

/* The ReLU of layer l's scale and shift of x_hat (of its raw output without a normalization), and 2x2 max pooling,
 * in one pass over h (rows, H, W, C): out (rows, H/2, W/2, C). gamma and beta: null without a normalization. */
static inline __attribute__((always_inline)) void pool_channels(const real* restrict h, const real* restrict gamma,
                                                                const real* restrict beta, int rows, int H, int W,
                                                                int C, real* restrict out) {
    const int Wo = W / 2;
    real scale[C], shift[C];
    for (int c = 0; c < C; c++) { scale[c] = gamma ? gamma[c] : 1; shift[c] = gamma ? beta[c] : 0; }
    for (int64_t line = 0; line < (int64_t)rows * (H / 2); line++) {  /* an output row: two input rows */
        const real* upper = h + line * 2 * W * C;
        const real* lower = upper + (int64_t)W * C;
        real* o = out + line * Wo * C;
        for (int xx = 0; xx < Wo; xx++)
            for (int c = 0; c < C; c++) {
                const int left = 2 * xx * C + c, right = left + C;
                const real v0 = scale[c] * upper[left] + shift[c], v1 = scale[c] * upper[right] + shift[c];
                const real v2 = scale[c] * lower[left] + shift[c], v3 = scale[c] * lower[right] + shift[c];
                const real top = v0 > v1 ? v0 : v1, bottom = v2 > v3 ? v2 : v3;
                const real best = top >= bottom ? top : bottom;
                o[xx * C + c] = best > 0 ? best : 0;  /* the ReLU after the max: the same value */
            }
    }
}

/* pool's backward and the ReLU's before it, in place of storing which value each window kept: the window's values
 * are computed again from x_hat, and the pooled gradient goes to the first of them equal to the maximum (in (dy,
 * dx) order, the one torch's kernel keeps) where that maximum passed the ReLU; every other position gets 0 (the
 * windows tile the map: each is written once). g: (rows, H, W, C). */
static inline __attribute__((always_inline)) void unpool_channels(const real* restrict gout, const real* restrict h,
                                                                  const real* restrict gamma,
                                                                  const real* restrict beta, int rows, int H, int W,
                                                                  int C, real* restrict g) {
    const int Wo = W / 2;
    real scale[C], shift[C];
    for (int c = 0; c < C; c++) { scale[c] = gamma ? gamma[c] : 1; shift[c] = gamma ? beta[c] : 0; }
    for (int64_t line = 0; line < (int64_t)rows * (H / 2); line++) {
        const real* upper = h + line * 2 * W * C;
        const real* lower = upper + (int64_t)W * C;
        real* g_upper = g + line * 2 * W * C;
        real* g_lower = g_upper + (int64_t)W * C;
        const real* from = gout + line * Wo * C;
        for (int xx = 0; xx < Wo; xx++)
            for (int c = 0; c < C; c++) {
                const int left = 2 * xx * C + c, right = left + C;
                const real v0 = scale[c] * upper[left] + shift[c], v1 = scale[c] * upper[right] + shift[c];
                const real v2 = scale[c] * lower[left] + shift[c], v3 = scale[c] * lower[right] + shift[c];
                const real top = v0 > v1 ? v0 : v1, bottom = v2 > v3 ? v2 : v3;
                const real best = top >= bottom ? top : bottom;
                const real passed = best > 0 ? 1 : 0;  /* a factor, not a select: a masked load would not vectorize */
                real rest = from[xx * C + c] * passed;  /* the gradient not yet given to a position */
                g_upper[left] = v0 == best ? rest : 0;  /* float selects only: the loop vectorizes */
                rest = v0 == best ? 0 : rest;
                g_upper[right] = v1 == best ? rest : 0;
                rest = v1 == best ? 0 : rest;
                g_lower[left] = v2 == best ? rest : 0;
                rest = v2 == best ? 0 : rest;
                g_lower[right] = rest;
            }
    }
}

/* x (n, C) += bias (C) on every row. */
static inline __attribute__((always_inline)) void add_bias_channels(real* restrict x, int64_t n, int C,
                                                                    const real* restrict bias) {
    for (int64_t i = 0; i < n; i++)
        for (int c = 0; c < C; c++) x[i * C + c] += bias[c];
}

static void pool(const real* h, const real* gamma, const real* beta, int rows, int H, int W, int C, real* out) {
    WITH_CHANNELS(C, pool_channels(h, gamma, beta, rows, H, W, C_, out));
}

static void unpool(const real* gout, const real* h, const real* gamma, const real* beta, int rows, int H, int W,
                   int C, real* g) {
    WITH_CHANNELS(C, unpool_channels(gout, h, gamma, beta, rows, H, W, C_, g));
}

static void add_bias(real* x, int64_t n, int C, const real* bias) {
    WITH_CHANNELS(C, add_bias_channels(x, n, C_, bias));
}

static void channel_norm_forward(real* h, int C, int r0, int n, real eps, real* inv, real* mean, real* var) {
    WITH_CHANNELS(C, batch_norm_forward(h, C_, r0, n, eps, inv, mean, var));
}

static void channel_norm_backward(real* g, const real* xh, const real* gamma, const real* inv, int C, int r0, int n,
                                  real* sg, real* sgx, real* dgamma, real* dbeta) {
    WITH_CHANNELS(C, batch_norm_backward(g, xh, gamma, inv, C_, r0, n, sg, sgx, dgamma, dbeta));
}

static void channel_sums(const real* x, int rows, int C, real* out) {
    WITH_CHANNELS(C, column_sums(x, rows, C_, out));
}

/* Layer l's normalization of h (rows x P positions, C), in place: h becomes x_hat (pool applies the scale, shift
 * and ReLU). Modes as mlp.c's hidden_forward. */
static void conv_normalize(const ConvStep* s, int l, int m, int rows, int mode, const Buffers* b) {
    const int C = s->channels[l + 1];
    const int64_t P = positions(s, l);
    real* h = b->h[l];
    real* inv = b->inv[l];
    if (s->norm == NORM_NONE) return;
    if (s->norm == NORM_BATCH && mode == RUNNING) {
        const real* rm = s->running_mean[l] + (int64_t)m * C;
        const real* rv = s->running_var[l] + (int64_t)m * C;
        for (int c = 0; c < C; c++) inv[c] = 1 / SQRT(rv[c] + s->eps);
        for (int64_t i = 0; i < (int64_t)rows * P; i++)
            for (int c = 0; c < C; c++) h[i * C + c] = (h[i * C + c] - rm[c]) * inv[c];
    } else if (s->norm == NORM_BATCH) {
        int starts[CNN_MAX_GHOST_BATCHES], sizes[CNN_MAX_GHOST_BATCHES];
        const int count = ghost_batches(rows, s->ghost, starts, sizes);
        real* mean = b->small;
        real* var = b->small + C;
        for (int q = 0; q < count; q++) {
            channel_norm_forward(h, C, (int)(starts[q] * P), (int)(sizes[q] * P), s->eps, inv + (int64_t)q * C, mean,
                                 var);
            if (q == 0 && mode == TRAIN) {  /* the running estimates follow the first (ghost) batch, unbiased */
                real* rm = s->running_mean[l] + (int64_t)m * C;
                real* rv = s->running_var[l] + (int64_t)m * C;
                const real count0 = (real)(sizes[0] * P);
                const real unbias = count0 / (count0 - 1);
                for (int c = 0; c < C; c++) {
                    rm[c] += s->norm_momentum * (mean[c] - rm[c]);
                    rv[c] += s->norm_momentum * (var[c] * unbias - rv[c]);
                }
            }
        }
    } else {  /* NORM_GROUP: each image over each group's channels and every position */
        const int G = s->groups, width = C / G;
        const real count = (real)(P * width);
        for (int r = 0; r < rows; r++) {
            real* image = h + (int64_t)r * P * C;
            for (int g = 0; g < G; g++) {
                real mean = 0, var = 0;
                for (int64_t p = 0; p < P; p++)
                    for (int c = g * width; c < (g + 1) * width; c++) mean += image[p * C + c];
                mean /= count;
                for (int64_t p = 0; p < P; p++)
                    for (int c = g * width; c < (g + 1) * width; c++) {
                        const real d = image[p * C + c] - mean;
                        var += d * d;
                    }
                const real rstd = 1 / SQRT(var / count + s->eps);
                inv[r * G + g] = rstd;
                for (int64_t p = 0; p < P; p++)
                    for (int c = g * width; c < (g + 1) * width; c++) image[p * C + c] = (image[p * C + c] - mean) * rstd;
            }
        }
    }
}

/* The gradient at layer l's convolution output, in place of g (the gradient after the ReLU's backward): the
 * normalization's backward; its scale and shift take their SGD step here. */
static void conv_normalize_backward(const ConvStep* s, int l, int m, int rows, real* restrict g, const Buffers* b,
                                    real lr, int first) {
    if (s->norm == NORM_NONE) return;
    const int C = s->channels[l + 1];
    const int64_t P = positions(s, l);
    const real* xh = b->h[l];
    const real* inv = b->inv[l];
    real* gamma = s->gamma[l] + (int64_t)m * C;
    real* beta = s->beta[l] + (int64_t)m * C;
    real* dgamma = b->small;
    real* dbeta = b->small + C;
    for (int c = 0; c < C; c++) { dgamma[c] = 0; dbeta[c] = 0; }
    if (s->norm == NORM_BATCH) {
        int starts[CNN_MAX_GHOST_BATCHES], sizes[CNN_MAX_GHOST_BATCHES];
        const int count = ghost_batches(rows, s->ghost, starts, sizes);
        for (int q = 0; q < count; q++)
            channel_norm_backward(g, xh, gamma, inv + (int64_t)q * C, C, (int)(starts[q] * P), (int)(sizes[q] * P),
                                  b->small + 2 * C, b->small + 3 * C, dgamma, dbeta);
    } else {
        const int G = s->groups, width = C / G;
        const real count = (real)(P * width);
        for (int r = 0; r < rows; r++) {
            real* gi = g + (int64_t)r * P * C;
            const real* xi = xh + (int64_t)r * P * C;
            for (int q = 0; q < G; q++) {
                real sg = 0, sgx = 0;
                for (int64_t p = 0; p < P; p++)
                    for (int c = q * width; c < (q + 1) * width; c++) {
                        const real gv = gi[p * C + c], xv = xi[p * C + c];
                        dgamma[c] += gv * xv;
                        dbeta[c] += gv;
                        sg += gv * gamma[c];
                        sgx += gv * gamma[c] * xv;
                    }
                sg /= count;
                sgx /= count;
                const real rstd = inv[r * G + q];
                for (int64_t p = 0; p < P; p++)
                    for (int c = q * width; c < (q + 1) * width; c++)
                        gi[p * C + c] = rstd * (gi[p * C + c] * gamma[c] - sg - xi[p * C + c] * sgx);
            }
        }
    }
    sgd(gamma, s->gamma_momentum[l] + (int64_t)m * C, dgamma, C, lr, s->momentum, 0, first);
    sgd(beta, s->beta_momentum[l] + (int64_t)m * C, dbeta, C, lr, s->momentum, 0, first);
}

/* Images [0, rows) of `images` (channel-major, as the dataset holds them) at `order` (or consecutive when order is
 * 0) into x (rows, H, W, C); their labels into y when given. */
static void gather(const ConvStep* s, const real* images, const int64_t* labels, const int64_t* order, int rows,
                   real* restrict x, int64_t* y) {
    const int C = s->channels[0];
    const int64_t P = positions(s, 0);
    for (int r = 0; r < rows; r++) {
        const int64_t index = order ? order[r] : r;
        const real* image = images + index * C * P;
        if (C == 1)
            for (int64_t p = 0; p < P; p++) x[(int64_t)r * P + p] = image[p];
        else
            for (int64_t p = 0; p < P; p++)
                for (int c = 0; c < C; c++) x[((int64_t)r * P + p) * C + c] = image[c * P + p];
        if (y) y[r] = labels[index];
    }
}

/* Model m's forward pass on x (rows, H, W, C): the logits in b->logits. */
static void cnn_forward(const ConvStep* s, int m, int rows, int mode, const Buffers* b) {
    const real* in = b->x;
    for (int l = 0; l < CNN_LAYERS; l++) {
        const int H = s->height >> l, W = s->width >> l, cin = s->channels[l], cout = s->channels[l + 1];
        const int64_t P = positions(s, l);
        unfold(in, rows, H, W, cin, b->cols[l]);
        gemm(0, 1, (int)(rows * P), cout, 9 * cin, b->cols[l], 9 * cin, s->weight[l] + (int64_t)m * weight_size(s, l),
             9 * cin, 0, b->h[l], cout);
        add_bias(b->h[l], rows * P, cout, s->bias[l] + (int64_t)m * cout);
        conv_normalize(s, l, m, rows, mode, b);
        const real* gamma = s->norm == NORM_NONE ? 0 : s->gamma[l] + (int64_t)m * cout;
        const real* beta = s->norm == NORM_NONE ? 0 : s->beta[l] + (int64_t)m * cout;
        pool(b->h[l], gamma, beta, rows, H, W, cout, b->pooled[l]);
        in = b->pooled[l];
    }
    /* nn.Linear reads the maps channel-major (flatten(1) of C, H, W); they are channels-last here, so the weight's
     * columns are put in that order instead, a copy of classes x features values. */
    const int C = s->channels[CNN_LAYERS], P = (int)positions(s, CNN_LAYERS), features = C * P;
    const real* w = s->weight[CNN_LAYERS] + (int64_t)m * weight_size(s, CNN_LAYERS);
    for (int k = 0; k < s->classes; k++)
        for (int p = 0; p < P; p++)
            for (int c = 0; c < C; c++) b->fc[((int64_t)k * P + p) * C + c] = w[((int64_t)k * C + c) * P + p];
    gemm(0, 1, rows, s->classes, features, in, features, b->fc, features, 0, b->logits, s->classes);
    add_bias(b->logits, rows, s->classes, s->bias[CNN_LAYERS] + (int64_t)m * s->classes);
}

/* Layer l's weight and bias step from g, the gradient at its output (rows, out), and its input (rows, in), whose
 * gradient through the weight as the forward pass used it (`used`) goes to `input_gradient` where given: the
 * momentum buffer takes the weight's gradient straight from the product, v = g^T in + momentum v (mlp.c's way).
 * The linear layer's buffer is in b->fc's column order, and its weight is updated through that order. */
static void layer_step(const ConvStep* s, int l, int m, int64_t rows, int out, int in, const real* g,
                       const real* input, const real* used, real* input_gradient, real lr, int first, real* sums) {
    real* w = s->weight[l] + (int64_t)m * weight_size(s, l);
    real* velocity = s->weight_momentum[l] + (int64_t)m * weight_size(s, l);
    gemm(1, 0, out, in, (int)rows, g, out, input, in, first ? 0 : s->momentum, velocity, in);
    if (input_gradient) gemm(0, 0, (int)rows, in, out, g, out, used, in, 0, input_gradient, in);
    if (l < CNN_LAYERS) {
        for (int64_t i = 0; i < (int64_t)out * in; i++) w[i] -= lr * velocity[i];
    } else {
        const int C = s->channels[CNN_LAYERS], P = (int)positions(s, CNN_LAYERS);
        for (int k = 0; k < out; k++)
            for (int c = 0; c < C; c++)
                for (int p = 0; p < P; p++) w[((int64_t)k * C + c) * P + p] -= lr * velocity[((int64_t)k * P + p) * C + c];
    }
    channel_sums(g, (int)rows, out, sums);
    sgd(s->bias[l] + (int64_t)m * out, s->bias_momentum[l] + (int64_t)m * out, sums, out, lr, s->momentum, 0, first);
}

static void cnn_model_step(const ConvStep* s, int m, int step, int first, const Buffers* b) {
    const int start = step * s->batch_size;
    const int rows = s->train_size - start < s->batch_size ? s->train_size - start : s->batch_size;
    const real lr = s->lr[m];
    int64_t labels[rows];
    gather(s, s->images, s->labels, s->order + m * s->order_stride + start, rows, b->x, labels);
    cnn_forward(s, m, rows, TRAIN, b);
    if (s->norm == NORM_BATCH)
        for (int l = 0; l < CNN_LAYERS; l++) s->batches_tracked[l][m] += 1;
    int64_t hits = 0;
    s->losses[m * s->losses_stride + step] = (real)(cross_entropy(b->logits, labels, rows, s->classes, 1, &hits) / rows);
    s->correct[m] += hits;

    real* sums = b->small + 4 * s->channels[CNN_LAYERS];
    const int features = (int)(s->channels[CNN_LAYERS] * positions(s, CNN_LAYERS));
    layer_step(s, CNN_LAYERS, m, rows, s->classes, features, b->logits, b->pooled[CNN_LAYERS - 1], b->fc,
               b->pooled_gradient[CNN_LAYERS - 1], lr, first, sums);
    for (int l = CNN_LAYERS - 1; l >= 0; l--) {
        const int H = s->height >> l, W = s->width >> l, cin = s->channels[l], cout = s->channels[l + 1];
        const int64_t P = positions(s, l);
        const real* gamma = s->norm == NORM_NONE ? 0 : s->gamma[l] + (int64_t)m * cout;
        const real* beta = s->norm == NORM_NONE ? 0 : s->beta[l] + (int64_t)m * cout;
        unpool(b->pooled_gradient[l], b->h[l], gamma, beta, rows, H, W, cout, b->gradient[l]);
        conv_normalize_backward(s, l, m, rows, b->gradient[l], b, lr, first);
        layer_step(s, l, m, rows * P, cout, 9 * cin, b->gradient[l], b->cols[l],
                   s->weight[l] + (int64_t)m * weight_size(s, l), l > 0 ? b->column_gradient : 0, lr, first, b->small);
        if (l > 0) fold(b->column_gradient, rows, H, W, cin, b->pooled_gradient[l - 1]);
    }
}

static Buffers thread_buffers(const ConvStep* s) {
    Buffers b;
    carve(s, s->workspace + omp_get_thread_num() * s->workspace_stride, &b);
    return b;
}

/* Steps [from, to) of the call for model m, on this thread's buffers (spread_steps's task: a step leaves nothing in
 * them that the next one reads). */
static void cnn_model_steps(const void* step, int m, int first_step_index, int from, int to) {
    const ConvStep* s = step;
    const Buffers b = thread_buffers(s);
    for (int k = from; k < to; k++) cnn_model_step(s, m, first_step_index + k, s->first_step && k == 0, &b);
}

/* Steps [first_step_index, first_step_index + steps) of the epoch for every model. */
void bn_cnn_train_steps(const ConvStep* s, int first_step_index, int steps) {
    spread_steps(s, s->models, s->threads, first_step_index, steps, cnn_model_steps);
}

/* Batch k of an evaluation of `n` images in batches of the batch size (with batch statistics a last batch of one
 * image joins the one before) for model m, on this thread's buffers: its summed cross-entropy, its hits added to
 * `correct`. Nothing of the model changes, so any thread may take any model's batch. */
static double evaluate_batch(const ConvStep* s, int m, const real* images, const int64_t* labels, int64_t n,
                             int64_t k, int64_t batches, int batch_statistics, const Buffers* b, int64_t* correct) {
    const int64_t start = k * s->batch_size, rows = k == batches - 1 ? n - start : s->batch_size;
    gather(s, images + start * s->channels[0] * positions(s, 0), 0, 0, (int)rows, b->x, 0);
    cnn_forward(s, m, (int)rows, batch_statistics ? BATCH_STATISTICS : RUNNING, b);
    return cross_entropy(b->logits, labels + start, (int)rows, s->classes, 0, correct);
}

/* Every model on `n` images (channel-major) with labels: summed cross-entropy and hits per model, as mlp.c's
 * bn_evaluate (batch statistics: consecutive batches normalized by their own statistics, changing nothing). The
 * models' batches are cut into one contiguous share per thread (3 models on 2 threads: a model and a half each,
 * not two models on one thread and one on the other), each batch's loss kept apart and a model's summed in batch
 * order afterwards: the sums a model alone on one thread gives, bit for bit. */
void bn_cnn_evaluate(const ConvStep* s, const real* images, const int64_t* labels, int64_t n, int batch_statistics,
                     double* loss_sums, int64_t* hits) {
    int64_t batches = (n + s->batch_size - 1) / s->batch_size;
    if (batch_statistics && batches > 1 && n % s->batch_size == 1) batches -= 1;
    const int64_t items = (int64_t)s->models * batches;
    double* losses = malloc((size_t)items * sizeof(double));
    int64_t* correct = calloc((size_t)items, sizeof(int64_t));
    const int shared = losses && correct;  /* without room for the batches' losses, each model on one thread */
    #pragma omp parallel num_threads(s->threads)
    {
        const int before = local_threads(1);
        const Buffers b = thread_buffers(s);
        if (shared) {
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < items; i++)
                losses[i] = evaluate_batch(s, (int)(i / batches), images, labels, n, i % batches, batches,
                                           batch_statistics, &b, correct + i);
        } else {
            #pragma omp for schedule(dynamic, 1)
            for (int m = 0; m < s->models; m++) {
                double loss = 0.0;
                int64_t hit = 0;
                for (int64_t k = 0; k < batches; k++)
                    loss += evaluate_batch(s, m, images, labels, n, k, batches, batch_statistics, &b, &hit);
                loss_sums[m] = loss;
                hits[m] = hit;
            }
        }
        local_threads(before);
    }
    if (shared)
        for (int m = 0; m < s->models; m++) {
            double loss = 0.0;
            int64_t hit = 0;
            for (int64_t k = 0; k < batches; k++) {
                loss += losses[(int64_t)m * batches + k];
                hit += correct[(int64_t)m * batches + k];
            }
            loss_sums[m] = loss;
            hits[m] = hit;
        }
    free(losses);
    free(correct);
}
