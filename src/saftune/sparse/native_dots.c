/* Selected entries' gradients read in place: out[k] = sum_n dy[n, rows[k]] * x[n, cols[k]] in fp32.
 *
 * Compiled on first use by saftune/sparse/native_dots.py (gcc or $CC, cached per CPU) and called through
 * ctypes, which releases the GIL: Python threads take items one at a time and run them side by side. No
 * OpenMP and no runtime of its own: the library is a few KiB of code in the process.
 *
 * Work is cut into items: an item is one block of ENTRY_BLOCK entries over one of TOKEN_CHUNKS token
 * ranges, whose sums go to its own row of `partial`. Items are numbered token range first (item = chunk *
 * blocks + block), so that threads taking consecutive items split the tokens evenly even where the last
 * entry block is nearly empty. `saftune_total` then adds each entry's TOKEN_CHUNKS partial sums in order,
 * so the result is the same whichever thread ran which item. Products of two bf16
 * values are exact in fp32; -ffp-contract=off keeps fp32 products rounded before the addition on every
 * host, so results do not depend on whether the CPU has FMA.
 */
#include <stdint.h>
#include <string.h>

#ifndef TOKEN_CHUNKS
#error "TOKEN_CHUNKS is set by native_dots.py"
#endif
#ifndef ENTRY_BLOCK
#error "ENTRY_BLOCK is set by native_dots.py"
#endif

/* bf16 is the upper half of an fp32: widening is a shift, exact. */
static inline float widen_bf16(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

static inline float widen_f32(float value) { return value; }

/* One item's sums. dy and x are read through (row stride, column stride) in elements; the wrappers below
 * call it with column stride 1 where the tensors are row-major, which lets the compiler drop the multiply. */
#define DEFINE_ITEM(NAME, T, WIDEN)                                                                          \
    static inline void NAME(const T *dy, int64_t dy_row, int64_t dy_col, const T *x, int64_t x_row,          \
                            int64_t x_col, int64_t n_tok, const int64_t *rows, const int64_t *cols,          \
                            int64_t d, float *partial, int64_t item) {                                       \
        int64_t per = (n_tok + TOKEN_CHUNKS - 1) / TOKEN_CHUNKS;                                             \
        int64_t blocks = (d + ENTRY_BLOCK - 1) / ENTRY_BLOCK, chunk = item / blocks, block = item % blocks;  \
        int64_t k0 = block * ENTRY_BLOCK, k1 = (block + 1) * ENTRY_BLOCK < d ? (block + 1) * ENTRY_BLOCK : d; \
        const int64_t *r = rows + k0, *q = cols + k0;                                                        \
        float *acc = partial + chunk * d + k0;                                                               \
        int64_t count = k1 - k0, n = chunk * per, n1 = (chunk + 1) * per < n_tok ? (chunk + 1) * per : n_tok;\
        for (int64_t k = 0; k < count; k++) acc[k] = 0.0f;                                                   \
        /* four tokens a pass: each entry's indices and sum loaded once for four products */                 \
        for (; n + 4 <= n1; n += 4) {                                                                        \
            const T *d0 = dy + n * dy_row, *d1 = d0 + dy_row, *d2 = d1 + dy_row, *d3 = d2 + dy_row;          \
            const T *x0 = x + n * x_row, *x1 = x0 + x_row, *x2 = x1 + x_row, *x3 = x2 + x_row;               \
            for (int64_t k = 0; k < count; k++) {                                                            \
                int64_t i = r[k] * dy_col, j = q[k] * x_col;                                                 \
                float s = acc[k];                                                                            \
                s += WIDEN(d0[i]) * WIDEN(x0[j]);                                                            \
                s += WIDEN(d1[i]) * WIDEN(x1[j]);                                                            \
                s += WIDEN(d2[i]) * WIDEN(x2[j]);                                                            \
                s += WIDEN(d3[i]) * WIDEN(x3[j]);                                                            \
                acc[k] = s;                                                                                  \
            }                                                                                                \
        }                                                                                                    \
        for (; n < n1; n++) {                                                                                \
            const T *dm = dy + n * dy_row, *xm = x + n * x_row;                                              \
            for (int64_t k = 0; k < count; k++) acc[k] += WIDEN(dm[r[k] * dy_col]) * WIDEN(xm[q[k] * x_col]);\
        }                                                                                                    \
    }

DEFINE_ITEM(item_bf16, uint16_t, widen_bf16)
DEFINE_ITEM(item_f32, float, widen_f32)

/* Items [first, last) of one call; `partial` is [TOKEN_CHUNKS, d]. */
#define DEFINE_ITEMS(NAME, ITEM, T)                                                                          \
    void NAME(const T *dy, int64_t dy_row, int64_t dy_col, const T *x, int64_t x_row, int64_t x_col,         \
              int64_t n_tok, const int64_t *rows, const int64_t *cols, int64_t d, float *partial,            \
              int64_t first, int64_t last) {                                                                 \
        for (int64_t item = first; item < last; item++) {                                                    \
            if (dy_col == 1 && x_col == 1)                                                                   \
                ITEM(dy, dy_row, 1, x, x_row, 1, n_tok, rows, cols, d, partial, item);                      \
            else                                                                                             \
                ITEM(dy, dy_row, dy_col, x, x_row, x_col, n_tok, rows, cols, d, partial, item);             \
        }                                                                                                    \
    }

DEFINE_ITEMS(saftune_dots_bf16, item_bf16, uint16_t)
DEFINE_ITEMS(saftune_dots_f32, item_f32, float)

/* out[k] = the TOKEN_CHUNKS partial sums of entry k, added in order. */
void saftune_total(const float *partial, float *out, int64_t d) {
    for (int64_t k = 0; k < d; k++) {
        float s = partial[k];
        for (int64_t chunk = 1; chunk < TOKEN_CHUNKS; chunk++) s += partial[chunk * d + k];
        out[k] = s;
    }
}
