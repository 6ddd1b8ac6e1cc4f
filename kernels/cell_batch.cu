// Batched cell preprocessing: one launch cuts, resamples, colour-normalises and lays out (NCHW) the
// model inputs of a whole batch of cells from field tiles resident in device memory.
//
// Semantics are those of kernels/cpu_twin.py: float32 arithmetic with explicit round-to-nearest
// intrinsics (__fmul_rn / __fadd_rn stop nvcc fusing into FMA), pixel centres at integer
// coordinates, taps outside the tile read as 0, the bilinear value rounded to the nearest grey level
// (half to even, as OpenCV's uint8 resampling does), then the colour transform; valid = 1 only where
// all taps with weight are inside (0 <= q <= size-1). Built by nvcc (pycuda / PTX) and, through
// cuda_emulation.h, by g++.
//
// Launch: block (16, 16, 1), grid (ceil(S/16), ceil(S/16), min(n_cells, 65535)); cells stride by
// gridDim.z. Tiles: RGB uint8, packed back to back; tile i starts at byte tile_offsets[i].
// affines: [n_cells][6] float32 (a00 a01 a02 a10 a11 a12: output pixel -> tile coordinates).
// colour: [4][3] float32 rows scale, offset, lo, hi (out = clamp(v * scale + offset, lo, hi)).
#ifdef __CUDACC__
#include <cuda_fp16.h>
#else
#include "cuda_emulation.h"
#endif

template <typename OutT> __device__ __forceinline__ OutT to_output(float v);
template <> __device__ __forceinline__ float to_output<float>(float v) { return v; }
template <> __device__ __forceinline__ __half to_output<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float tile_tap(const unsigned char* __restrict__ tile, int height, int width,
                                          int x, int y, int channel)
{
    if (x < 0 || y < 0 || x >= width || y >= height) {
        return 0.0f;
    }
    return (float)tile[((long long)y * width + x) * 3 + channel];
}

template <typename OutT>
__device__ __forceinline__ void prepare_cells(const unsigned char* __restrict__ tiles,
                                              const long long* __restrict__ tile_offsets,
                                              const int* __restrict__ tile_heights,
                                              const int* __restrict__ tile_widths,
                                              const int* __restrict__ cell_tiles,
                                              const float* __restrict__ affines,
                                              const float* __restrict__ colour,
                                              int n_cells, int out_size,
                                              OutT* __restrict__ out, unsigned char* __restrict__ valid)
{
    const int px = blockIdx.x * blockDim.x + threadIdx.x;
    const int py = blockIdx.y * blockDim.y + threadIdx.y;
    if (px >= out_size || py >= out_size) {
        return;
    }
    const int plane = out_size * out_size;
    const float fpx = (float)px;
    const float fpy = (float)py;
    for (int cell = blockIdx.z; cell < n_cells; cell += gridDim.z) {
        const float* a = affines + 6 * (long long)cell;
        const int t = cell_tiles[cell];
        const int height = tile_heights[t];
        const int width = tile_widths[t];
        const unsigned char* tile = tiles + tile_offsets[t];

        float qx = __fadd_rn(__fmul_rn(a[0], fpx), __fadd_rn(__fmul_rn(a[1], fpy), a[2]));
        float qy = __fadd_rn(__fmul_rn(a[3], fpx), __fadd_rn(__fmul_rn(a[4], fpy), a[5]));
        const float wmax = (float)(width - 1);
        const float hmax = (float)(height - 1);
        const bool inside = qx >= 0.0f && qx <= wmax && qy >= 0.0f && qy <= hmax;
        qx = fminf(fmaxf(qx, -2.0f), (float)width);
        qy = fminf(fmaxf(qy, -2.0f), (float)height);
        const float x0f = floorf(qx);
        const float y0f = floorf(qy);
        const float fx = __fsub_rn(qx, x0f);
        const float fy = __fsub_rn(qy, y0f);
        const float gx = __fsub_rn(1.0f, fx);
        const float gy = __fsub_rn(1.0f, fy);
        const int x0 = (int)x0f;
        const int y0 = (int)y0f;

        const long long pixel = (long long)py * out_size + px;
        const long long base = (long long)cell * 3 * plane + pixel;
        for (int c = 0; c < 3; ++c) {
            const float r0 = __fadd_rn(__fmul_rn(gx, tile_tap(tile, height, width, x0, y0, c)),
                                       __fmul_rn(fx, tile_tap(tile, height, width, x0 + 1, y0, c)));
            const float r1 = __fadd_rn(__fmul_rn(gx, tile_tap(tile, height, width, x0, y0 + 1, c)),
                                       __fmul_rn(fx, tile_tap(tile, height, width, x0 + 1, y0 + 1, c)));
            const float v = rintf(__fadd_rn(__fmul_rn(gy, r0), __fmul_rn(fy, r1)));
            const float o = __fadd_rn(__fmul_rn(v, colour[c]), colour[3 + c]);
            out[base + (long long)c * plane] = to_output<OutT>(fminf(fmaxf(o, colour[6 + c]), colour[9 + c]));
        }
        valid[(long long)cell * plane + pixel] = inside ? 1 : 0;
    }
}

// One unmangled entry point per output type (pycuda / module_from_file look kernels up by name).
#define PREPARE_CELLS_ENTRY(NAME, OUT_T)                                                                      \
    extern "C" __global__ void NAME(const unsigned char* __restrict__ tiles,                                  \
                                    const long long* __restrict__ tile_offsets,                               \
                                    const int* __restrict__ tile_heights, const int* __restrict__ tile_widths, \
                                    const int* __restrict__ cell_tiles, const float* __restrict__ affines,    \
                                    const float* __restrict__ colour, int n_cells, int out_size,              \
                                    OUT_T* __restrict__ out, unsigned char* __restrict__ valid)               \
    {                                                                                                         \
        prepare_cells<OUT_T>(tiles, tile_offsets, tile_heights, tile_widths, cell_tiles, affines, colour,     \
                             n_cells, out_size, out, valid);                                                  \
    }

PREPARE_CELLS_ENTRY(prepare_cells_f32, float)
PREPARE_CELLS_ENTRY(prepare_cells_f16, __half)
