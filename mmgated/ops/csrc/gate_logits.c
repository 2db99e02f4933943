/*
 * gate_logits: the inference of a gating module in one call.
 *
 *   pooled[n, c] = mean_{hw} x[n, c, hw]
 *   hidden[n, h] = relu(b1[h] + sum_c W1[h, c] * pooled[n, c])
 *   logits[n, o] = b2[o] + sum_h W2[o, h] * hidden[n, h]
 *   gates[n, o]  = logits[n, o] > 0
 *
 * W1 and b1 carry the folded BN of the hidden layer. Inside a network a
 * gating module's half dozen small PyTorch operations cost several times
 * their arithmetic (dispatch, and each starting cold after the large
 * convolutions before it); this is one call over data that is still in
 * cache. Layouts: x (N, C, HW), W1 (H, C), W2 (O, H), logits and gates
 * (N, O), all row-major float32.
 */
/* gate_training.c */
void pool_planes(const float* x, long P, long HW, float* pooled,
                 int nthreads);
float dot_product(const float* a, const float* b, long n);

void gate_logits(const float* x, long N, long C, long HW, const float* w1,
                 const float* b1, long H, const float* w2, const float* b2,
                 long O, float* logits, float* gates, int nthreads)
{
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && N > 1)
    for (long n = 0; n < N; n++) {
        float pooled[C], hidden[H];
        pool_planes(x + n * C * HW, C, HW, pooled, 1);
        for (long h = 0; h < H; h++) {
            float s = dot_product(w1 + h * C, pooled, C) + b1[h];
            hidden[h] = s > 0.f ? s : 0.f;
        }
        for (long o = 0; o < O; o++) {
            float s = dot_product(w2 + o * H, hidden, H) + b2[o];
            logits[n * O + o] = s;
            gates[n * O + o] = s > 0.f ? 1.f : 0.f;
        }
    }
}
