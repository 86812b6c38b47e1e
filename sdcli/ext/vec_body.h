/* The element-wise kernels of vec.h, written once for any vector width.
 *
 * vec.h includes this file once per width, with these defined: SDCLI_W (lanes), SDCLI_F, SDCLI_I, SDCLI_D (vectors
 * of SDCLI_W floats, ints, doubles), SDCLI_FN(name) (the name with the width's suffix) and SDCLI_TARGET (the
 * function attribute of the width's instruction set, or nothing); it undefines all but SDCLI_TARGET at its end. No
 * include guard, on purpose.
 */

SDCLI_TARGET static inline SDCLI_F SDCLI_FN(load)(const float *p) {
    SDCLI_F v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* the first n (< SDCLI_W) values at p, the other lanes set to fill */
SDCLI_TARGET static inline SDCLI_F SDCLI_FN(load_part)(const float *p, ptrdiff_t n, float fill) {
    float lanes[SDCLI_W];
    for (int lane = 0; lane < SDCLI_W; lane++) lanes[lane] = lane < n ? p[lane] : fill;
    return SDCLI_FN(load)(lanes);
}

SDCLI_TARGET static inline void SDCLI_FN(store)(float *p, SDCLI_F v, ptrdiff_t n) {
    memcpy(p, &v, (size_t)n * sizeof(float));
}

SDCLI_TARGET static inline SDCLI_F SDCLI_FN(select)(SDCLI_I mask, SDCLI_F if_true, SDCLI_F if_false) {
    return (SDCLI_F)(((SDCLI_I)if_true & mask) | ((SDCLI_I)if_false & ~mask));
}

/* exp(x): Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, times 2^n), within 2 ulp over
 * the normal range. Below ln(FLT_MIN) it gives 0 (no denormals), above ln(FLT_MAX) +inf; exp(-inf) = 0,
 * exp(+inf) = +inf, exp(nan) = nan. */
SDCLI_TARGET static inline SDCLI_F SDCLI_FN(exp)(SDCLI_F x) {
    const SDCLI_F zero = {0};
    const SDCLI_F lo = zero - 87.33654475f, hi = zero + 88.72283906f;
    const SDCLI_I underflow = x < lo, overflow = x > hi, not_a_number = x != x;
    const SDCLI_F xc = SDCLI_FN(select)(underflow | not_a_number, lo, SDCLI_FN(select)(overflow, hi, x));
    /* n = floor(x log2(e) + 1/2): truncation toward zero, then one less where that rounded up */
    const SDCLI_F fx = xc * 1.44269504088896341f + 0.5f;
    SDCLI_I n = __builtin_convertvector(fx, SDCLI_I);
    n += __builtin_convertvector(n, SDCLI_F) > fx; /* true is -1 */
    const SDCLI_F nf = __builtin_convertvector(n, SDCLI_F);
    const SDCLI_F r = xc - nf * 0.693359375f - nf * -2.12194440e-4f;
    SDCLI_F y = 1.9875691500e-4f * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    /* times 2^n in two factors, so that n = 128 (x near ln(FLT_MAX)) stays representable */
    const SDCLI_I half = n >> 1;
    y *= (SDCLI_F)((half + 127) << 23);
    y *= (SDCLI_F)((n - half + 127) << 23);
    y = SDCLI_FN(select)(underflow, zero, SDCLI_FN(select)(overflow, zero + INFINITY, y));
    return SDCLI_FN(select)(not_a_number, x, y);
}

SDCLI_TARGET static float SDCLI_FN(max)(const float *x, ptrdiff_t n) {
    SDCLI_F best = (SDCLI_F){0} - INFINITY;
    ptrdiff_t j = 0;
    for (; j + SDCLI_W <= n; j += SDCLI_W) {
        const SDCLI_F v = SDCLI_FN(load)(x + j);
        best = SDCLI_FN(select)(v > best, v, best);
    }
    float result = -INFINITY;
    for (int lane = 0; lane < SDCLI_W; lane++) result = best[lane] > result ? best[lane] : result;
    for (; j < n; j++) result = x[j] > result ? x[j] : result;
    return result;
}

SDCLI_TARGET static double SDCLI_FN(exp_shifted)(const float *x, float shift, ptrdiff_t n, float *y) {
    SDCLI_D total = {0}; /* the sum accumulates in double */
    ptrdiff_t j = 0;
    for (; j + SDCLI_W <= n; j += SDCLI_W) {
        const SDCLI_F e = SDCLI_FN(exp)(SDCLI_FN(load)(x + j) - shift);
        SDCLI_FN(store)(y + j, e, SDCLI_W);
        total += __builtin_convertvector(e, SDCLI_D);
    }
    if (j < n) {
        const SDCLI_F e = SDCLI_FN(exp)(SDCLI_FN(load_part)(x + j, n - j, -INFINITY) - shift);
        SDCLI_FN(store)(y + j, e, n - j);
        total += __builtin_convertvector(e, SDCLI_D);
    }
    double sum = 0.0;
    for (int lane = 0; lane < SDCLI_W; lane++) sum += total[lane];
    return sum;
}

SDCLI_TARGET static void SDCLI_FN(quick_gelu)(const float *x, ptrdiff_t n, float *y) {
    for (ptrdiff_t j = 0; j < n; j += SDCLI_W) {
        const ptrdiff_t lanes = n - j < SDCLI_W ? n - j : SDCLI_W;
        const SDCLI_F v = lanes == SDCLI_W ? SDCLI_FN(load)(x + j) : SDCLI_FN(load_part)(x + j, lanes, 0.0f);
        SDCLI_FN(store)(y + j, v / (1.0f + SDCLI_FN(exp)(-1.702f * v)), lanes);
    }
}

/* GELU's tanh approximation, 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), written as
 * x sigmoid(2 u) = x / (1 + exp(-2 u)), the same function. */
SDCLI_TARGET static void SDCLI_FN(gelu_tanh)(const float *x, ptrdiff_t n, float *y) {
    for (ptrdiff_t j = 0; j < n; j += SDCLI_W) {
        const ptrdiff_t lanes = n - j < SDCLI_W ? n - j : SDCLI_W;
        const SDCLI_F v = lanes == SDCLI_W ? SDCLI_FN(load)(x + j) : SDCLI_FN(load_part)(x + j, lanes, 0.0f);
        const SDCLI_F twice_u = v * (1.5957691216057308f + 0.0713548162726009f * (v * v));
        SDCLI_FN(store)(y + j, v / (1.0f + SDCLI_FN(exp)(-twice_u)), lanes);
    }
}

/* GELU, x Phi(x), with Phi(x) = erfc(-x / sqrt 2) / 2 from Numerical Recipes' erfcc (as numpy_ops.erf): for
 * z = |x| / sqrt 2, erfc(z) = t exp(P(t) - z^2) with t = 1 / (1 + z / 2), relative error below 1.2e-7, and
 * erfc(-z) = 2 - erfc(z). Infinities and nan come out as the reference's formula gives them (-inf: nan). */
SDCLI_TARGET static inline SDCLI_F SDCLI_FN(gelu_lanes)(SDCLI_F x) {
    const SDCLI_F zero = {0};
    const SDCLI_I negative = x < zero;
    const SDCLI_F z = SDCLI_FN(select)(negative, -x, x) * 0.70710678118654752f;
    const SDCLI_F t = 1.0f / (1.0f + 0.5f * z);
    SDCLI_F p = t * 0.17087277f - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    const SDCLI_F half_erfc = 0.5f * t * SDCLI_FN(exp)(p - z * z); /* erfc(|x| / sqrt 2) / 2 */
    return x * SDCLI_FN(select)(negative, half_erfc, 1.0f - half_erfc);
}

/* y[j] = gelu(x[j]) for j < n */
SDCLI_TARGET static void SDCLI_FN(gelu)(const float *x, ptrdiff_t n, float *y) {
    for (ptrdiff_t j = 0; j < n; j += SDCLI_W) {
        const ptrdiff_t lanes = n - j < SDCLI_W ? n - j : SDCLI_W;
        const SDCLI_F v = lanes == SDCLI_W ? SDCLI_FN(load)(x + j) : SDCLI_FN(load_part)(x + j, lanes, 0.0f);
        SDCLI_FN(store)(y + j, SDCLI_FN(gelu_lanes)(v), lanes);
    }
}

/* GEGLU: y[j] = value[j] * gelu(gate[j]) for j < n */
SDCLI_TARGET static void SDCLI_FN(geglu)(const float *value, const float *gate, ptrdiff_t n, float *y) {
    for (ptrdiff_t j = 0; j < n; j += SDCLI_W) {
        const ptrdiff_t lanes = n - j < SDCLI_W ? n - j : SDCLI_W;
        const int whole = lanes == SDCLI_W;
        const SDCLI_F a = whole ? SDCLI_FN(load)(value + j) : SDCLI_FN(load_part)(value + j, lanes, 0.0f);
        const SDCLI_F g = whole ? SDCLI_FN(load)(gate + j) : SDCLI_FN(load_part)(gate + j, lanes, 0.0f);
        SDCLI_FN(store)(y + j, a * SDCLI_FN(gelu_lanes)(g), lanes);
    }
}

/* the sum of x[0:n] minus `shift`, squared when `square`; the lanes accumulate in double */
SDCLI_TARGET static double SDCLI_FN(sum_shifted)(const float *x, ptrdiff_t n, float shift, int square) {
    SDCLI_D total = {0};
    ptrdiff_t j = 0;
    for (; j + SDCLI_W <= n; j += SDCLI_W) {
        const SDCLI_F v = SDCLI_FN(load)(x + j) - shift;
        total += __builtin_convertvector(square ? v * v : v, SDCLI_D);
    }
    double sum = 0.0;
    for (int lane = 0; lane < SDCLI_W; lane++) sum += total[lane];
    for (; j < n; j++) {
        const float v = x[j] - shift;
        sum += square ? (double)(v * v) : (double)v;
    }
    return sum;
}

/* the sum of (x[j] - mean)^2 for j < n, in double: x widened exactly, the mean a double (group norm's variance) */
SDCLI_TARGET static double SDCLI_FN(sum_centred_squares)(const float *x, ptrdiff_t n, double mean) {
    SDCLI_D total = {0};
    ptrdiff_t j = 0;
    for (; j + SDCLI_W <= n; j += SDCLI_W) {
        const SDCLI_D v = __builtin_convertvector(SDCLI_FN(load)(x + j), SDCLI_D) - mean;
        total += v * v;
    }
    double sum = 0.0;
    for (int lane = 0; lane < SDCLI_W; lane++) sum += total[lane];
    for (; j < n; j++) {
        const double v = (double)x[j] - mean;
        sum += v * v;
    }
    return sum;
}

/* y[j] = (x[j] - mean) * scale + shift for j < n, in double and rounded to float once, then x / (1 + exp(-x))
 * (SiLU, in float) of that when `silu` (group norm's normalisation, scale and shift) */
SDCLI_TARGET static void SDCLI_FN(normalize_shift)(const float *x, ptrdiff_t n, double mean, double scale,
                                                   double shift, int silu, float *y) {
    for (ptrdiff_t j = 0; j < n; j += SDCLI_W) {
        const ptrdiff_t lanes = n - j < SDCLI_W ? n - j : SDCLI_W;
        const SDCLI_F v = lanes == SDCLI_W ? SDCLI_FN(load)(x + j) : SDCLI_FN(load_part)(x + j, lanes, 0.0f);
        SDCLI_F out = __builtin_convertvector((__builtin_convertvector(v, SDCLI_D) - mean) * scale + shift, SDCLI_F);
        if (silu) out = out / (1.0f + SDCLI_FN(exp)(-out));
        SDCLI_FN(store)(y + j, out, lanes);
    }
}

/* y[j] = (x[j] - mean) * inverse_std * weight[j] + bias[j] for j < n (layer norm's affine step) */
SDCLI_TARGET static void SDCLI_FN(normalize_affine)(const float *x, ptrdiff_t n, float mean, float inverse_std,
                                                    const float *weight, const float *bias, float *y) {
    ptrdiff_t j = 0;
    for (; j + SDCLI_W <= n; j += SDCLI_W)
        SDCLI_FN(store)(y + j, (SDCLI_FN(load)(x + j) - mean) * inverse_std * SDCLI_FN(load)(weight + j)
                                   + SDCLI_FN(load)(bias + j), SDCLI_W);
    for (; j < n; j++) y[j] = (x[j] - mean) * inverse_std * weight[j] + bias[j];
}

/* the parameters of this width, so that the next include can define its own (SDCLI_TARGET stays: the includer may
 * compile more code for the same target) */
#undef SDCLI_W
#undef SDCLI_F
#undef SDCLI_I
#undef SDCLI_D
#undef SDCLI_FN
