/* C kernels for the CPU search (nas/native.py compiles and loads this file).
 *
 * dw_weight_grad_f32: the weight gradient of a depthwise convolution on channels-last float32
 * tensors,
 *
 *     gw[i][j][c] += sum over (b, oh, ow) of gy[b][oh][ow][c] * x[b][oh*s - p + i*d][ow*s - p + j*d][c]
 *
 * (taps that fall into the zero padding contribute nothing), summed over the output rows
 * r = b * Ho + oh in [row0, row1), so that each thread can take a block of rows into its own gw.
 * x is (B, H, W, C), gy (B, Ho, Wo, C) and gw (K, K, C), all dense.
 *
 * For one output row and one block of channels, each tap's sum over the row's pixels is kept in
 * a fixed-size local array (registers), while the row of gy and the K rows of x it reads stay in
 * cache: two loads per multiply-add, and every input element is read from memory about once.
 * The innermost loop runs over channels, contiguous in all three tensors, so it vectorises.
 * Summing a row first and then adding it to gw keeps float32 round-off at the level of a two-level
 * sum (Wo pixels, then the rows) rather than of one running sum over B*Ho*Wo pixels. Returns 0.
 */

/* Adds to gw[., ., c0:c0+CB] the sums over output row (b, oh) of every tap, for CB channels. */
static inline __attribute__((always_inline)) void row_block(
    const float *restrict x, const float *restrict gy_row, float *restrict gw, long b, long oh,
    long H, long W, long C, long Wo, long K, long stride, long pad, long dil, long c0, const long CB)
{
    for (long i = 0; i < K; ++i) {
        const long ih = oh * stride - pad + i * dil;
        if (ih < 0 || ih >= H)
            continue;
        const float *x_row = x + ((b * H + ih) * W) * C + c0;
        for (long j = 0; j < K; ++j) {
            /* the output columns whose tap j lands inside the image: 0 <= ow*stride - pad + j*dil < W */
            const long first = pad - j * dil, last = W - 1 + pad - j * dil;
            const long lo = first <= 0 ? 0 : (first + stride - 1) / stride;
            long hi = last < 0 ? 0 : last / stride + 1;
            if (hi > Wo)
                hi = Wo;
            float a[CB];
            for (long c = 0; c < CB; ++c)
                a[c] = 0.0f;
            for (long ow = lo; ow < hi; ++ow) {
                const float *restrict g = gy_row + ow * C + c0;
                const float *restrict xp = x_row + (ow * stride - pad + j * dil) * C;
                for (long c = 0; c < CB; ++c)
                    a[c] += g[c] * xp[c];
            }
            float *restrict out = gw + (i * K + j) * C + c0;
            for (long c = 0; c < CB; ++c)
                out[c] += a[c];
        }
    }
}

int dw_weight_grad_f32(const float *restrict x, const float *restrict gy, float *restrict gw,
                       long B, long H, long W, long C, long Ho, long Wo,
                       long K, long stride, long pad, long dil, long row0, long row1)
{
    (void)B;
    for (long r = row0; r < row1; ++r) {
        const long b = r / Ho, oh = r % Ho;
        const float *gy_row = gy + (r * Wo) * C;
        long c0 = 0;
        for (; c0 + 64 <= C; c0 += 64)
            row_block(x, gy_row, gw, b, oh, H, W, C, Wo, K, stride, pad, dil, c0, 64);
        for (; c0 + 16 <= C; c0 += 16)
            row_block(x, gy_row, gw, b, oh, H, W, C, Wo, K, stride, pad, dil, c0, 16);
        for (; c0 + 8 <= C; c0 += 8)
            row_block(x, gy_row, gw, b, oh, H, W, C, Wo, K, stride, pad, dil, c0, 8);
        for (; c0 < C; ++c0)
            row_block(x, gy_row, gw, b, oh, H, W, C, Wo, K, stride, pad, dil, c0, 1);
    }
    return 0;
}

/* The edge mixture of one source node (nas/mixture.py), over pixels [n0, n1):
 *
 *     out[n][e][c] = sum over k of w[e][k] * s_k[n][c]  +  sum over m of t_m[n][e][c]
 *
 * s_k (N, C) are the terms every edge shares (identity, pooling + BN), weighted per edge; t_m
 * (N, E, C) the per-edge terms that come out already weighted (the convolutions). All dense,
 * channels innermost. One pass: each output element is written once, each input read once.
 * C is small (8 to 64 in the search space), so the channels run in blocks of a size known at
 * compile time, summed in registers. */
static inline __attribute__((always_inline)) void mix_forward_block(
    float *restrict out, const float *const *s, const float *restrict w, const float *const *t,
    long n, long E, long C, long K, long M, long c0, const long CB)
{
    for (long e = 0; e < E; ++e) {
        const long at = (n * E + e) * C + c0;
        float a[CB];
        for (long c = 0; c < CB; ++c)
            a[c] = 0.0f;
        for (long m = 0; m < M; ++m) {
            const float *restrict tm = t[m] + at;
            for (long c = 0; c < CB; ++c)
                a[c] += tm[c];
        }
        for (long k = 0; k < K; ++k) {
            const float wk = w[e * K + k];
            const float *restrict sk = s[k] + n * C + c0;
            for (long c = 0; c < CB; ++c)
                a[c] += wk * sk[c];
        }
        float *restrict o = out + at;
        for (long c = 0; c < CB; ++c)
            o[c] = a[c];
    }
}

int mix_forward_f32(float *restrict out, const float *const *s, const float *restrict w, const float *const *t,
                    long E, long C, long K, long M, long n0, long n1)
{
    for (long n = n0; n < n1; ++n) {
        long c0 = 0;
        for (; c0 + 16 <= C; c0 += 16)
            mix_forward_block(out, s, w, t, n, E, C, K, M, c0, 16);
        for (; c0 + 8 <= C; c0 += 8)
            mix_forward_block(out, s, w, t, n, E, C, K, M, c0, 8);
        for (; c0 < C; ++c0)
            mix_forward_block(out, s, w, t, n, E, C, K, M, c0, 1);
    }
    return 0;
}

/* Its backward over pixels [n0, n1), given the output gradient g (N, E, C):
 *
 *     gs_k[n][c] = sum over e of w[e][k] * g[n][e][c]              (where gs is not NULL)
 *     gw[e][k][c] += sum over n of g[n][e][c] * s_k[n][c]          (where gw is not NULL)
 *
 * (the per-edge terms' gradient is g itself). gw (E, K, C) is this thread's own; its sums run over
 * blocks of 64 pixels in `scratch` (E*K*C floats) first, then into gw, for a two-level float32 sum.
 * One pass over g. */
static inline __attribute__((always_inline)) void mix_backward_block(
    const float *restrict g, const float *const *s, const float *restrict w, float *const *gs,
    float *restrict scratch, long n, long E, long C, long K, long c0, const long CB)
{
    const float *restrict gn = g + n * E * C + c0;
    for (long k = 0; k < K; ++k) {
        const float *restrict sk = s[k] + n * C + c0;
        if (gs != 0) {
            float a[CB];
            for (long c = 0; c < CB; ++c)
                a[c] = 0.0f;
            for (long e = 0; e < E; ++e) {
                const float we = w[e * K + k];
                const float *restrict ge = gn + e * C;
                for (long c = 0; c < CB; ++c)
                    a[c] += we * ge[c];
            }
            float *restrict o = gs[k] + n * C + c0;
            for (long c = 0; c < CB; ++c)
                o[c] = a[c];
        }
        if (scratch != 0) {
            for (long e = 0; e < E; ++e) {
                float *restrict acc = scratch + (e * K + k) * C + c0;
                const float *restrict ge = gn + e * C;
                for (long c = 0; c < CB; ++c)
                    acc[c] += ge[c] * sk[c];
            }
        }
    }
}

int mix_backward_f32(const float *restrict g, const float *const *s, const float *restrict w,
                     float *const *gs, float *restrict gw, float *restrict scratch,
                     long E, long C, long K, long n0, long n1)
{
    const long block = 64;
    if (gw == 0)
        scratch = 0;
    for (long b0 = n0; b0 < n1; b0 += block) {
        const long b1 = b0 + block < n1 ? b0 + block : n1;
        if (scratch != 0)
            for (long i = 0; i < E * K * C; ++i)
                scratch[i] = 0.0f;
        for (long n = b0; n < b1; ++n) {
            long c0 = 0;
            for (; c0 + 16 <= C; c0 += 16)
                mix_backward_block(g, s, w, gs, scratch, n, E, C, K, c0, 16);
            for (; c0 + 8 <= C; c0 += 8)
                mix_backward_block(g, s, w, gs, scratch, n, E, C, K, c0, 8);
            for (; c0 < C; ++c0)
                mix_backward_block(g, s, w, gs, scratch, n, E, C, K, c0, 1);
        }
        if (scratch != 0)
            for (long i = 0; i < E * K * C; ++i)
                gw[i] += scratch[i];
    }
    return 0;
}
