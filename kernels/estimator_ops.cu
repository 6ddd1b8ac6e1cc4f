// The estimator's element-wise work on the device, so that only one scalar per sample leaves it:
// forward noising of prepared inputs and the per-sample masked, weighted squared error of a
// backend's noise prediction. Semantics of kernels/cpu_twin.py (add_noise bit for bit; the error
// is a float32 block reduction, equal to the twin's float64 sum within float32 rounding).
#ifndef __CUDACC__
#include "cuda_emulation.h"
#endif

// x_t = sqrt(abar) * x0 + sqrt(1 - abar) * noise for x0 [batch][per_sample]; noise is [batch][per_sample],
// or [per_sample] shared by every sample when noise_shared != 0. Any 1-D launch (grid-stride loop).
extern "C" __global__ void add_noise_f32(const float* __restrict__ x0, const float* __restrict__ noise,
                                         const float* __restrict__ alphas_cumprod_at_t,
                                         int batch, int per_sample, int noise_shared,
                                         float* __restrict__ x_t)
{
    const long long total = (long long)batch * per_sample;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const long long sample = i / per_sample;
        const float abar = alphas_cumprod_at_t[sample];
        const float e = noise[noise_shared ? i % per_sample : i];
        x_t[i] = __fadd_rn(__fmul_rn(__fsqrt_rn(abar), x0[i]), __fmul_rn(__fsqrt_rn(__fsub_rn(1.0f, abar)), e));
    }
}

// out[b] = weights[b] * inv_norm * sum_{c,p} mask[p] * (eps_hat[b][c][p] - noise[b or 0][c][p])^2,
// inv_norm = 1 / (sum(mask) * channels). One block per sample (grid-stride over samples);
// blockDim.x must be a power of two <= 1024.
extern "C" __global__ void masked_weighted_error_f32(const float* __restrict__ eps_hat,
                                                     const float* __restrict__ noise,
                                                     const float* __restrict__ mask,
                                                     const float* __restrict__ weights,
                                                     int batch, int channels, int plane, int noise_shared,
                                                     float inv_norm, float* __restrict__ out)
{
    __shared__ float partial[1024];
    const int per_sample = channels * plane;
    for (int b = blockIdx.x; b < batch; b += gridDim.x) {
        const float* e = eps_hat + (long long)b * per_sample;
        const float* n = noise + (noise_shared ? 0 : (long long)b * per_sample);
        float acc = 0.0f;
        for (int i = threadIdx.x; i < per_sample; i += blockDim.x) {
            const float d = e[i] - n[i];
            acc += mask[i % plane] * d * d;
        }
        partial[threadIdx.x] = acc;
        __syncthreads();
        for (int half = blockDim.x / 2; half > 0; half /= 2) {
            if (threadIdx.x < half) {
                partial[threadIdx.x] += partial[threadIdx.x + half];
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            out[b] = partial[0] * inv_norm * weights[b];
        }
        __syncthreads();
    }
}
