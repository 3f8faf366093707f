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
