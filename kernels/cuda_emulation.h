// Lets the CUDA sources in this folder compile as plain C++ (g++), so the very same kernels can be
// run on the CPU and compared with the numpy twin where no GPU exists. Qualifiers are defined away;
// blockIdx / threadIdx are per-thread variables set by the launchers below; the *_rn intrinsics
// are the IEEE float32 operations they name (build with -ffp-contract=off so nothing fuses).
//   emu_launch              runs the grid as nested loops: kernels without __syncthreads.
//   emu_launch_cooperative  one OS thread per CUDA thread of a block, __syncthreads a barrier;
//                           blocks run one after another, so `static` stands in for __shared__.
#pragma once
#ifdef __CUDACC__
#error "cuda_emulation.h is for host compilers only"
#endif

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct uint3 {
    unsigned int x = 0, y = 0, z = 0;
};

struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;

inline void __syncthreads()
{
    if (emu_block_barrier == nullptr) {
        std::fprintf(stderr, "cuda_emulation: __syncthreads outside emu_launch_cooperative\n");
        std::abort();
    }
    emu_block_barrier->arrive_and_wait();
}

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

// IEEE binary16 storage; conversion rounds to nearest even like __float2half_rn.
struct __half {
    std::uint16_t bits;
};

inline __half __float2half_rn(float f)
{
    std::uint32_t x;
    std::memcpy(&x, &f, sizeof x);
    const std::uint16_t sign = (std::uint16_t)((x >> 16) & 0x8000u);
    const std::uint32_t mag = x & 0x7fffffffu;
    if (mag >= 0x7f800000u) {
        return {(std::uint16_t)(sign | (mag > 0x7f800000u ? 0x7e00u : 0x7c00u))};
    }
    if (mag >= 0x477ff000u) {  // >= 65520 rounds to infinity
        return {(std::uint16_t)(sign | 0x7c00u)};
    }
    if (mag < 0x38800000u) {  // below 2^-14: subnormal half in units of 2^-24 (exact scaling, RNE)
        const float units = std::nearbyint(std::fabs(f) * 16777216.0f);
        return {(std::uint16_t)(sign | (std::uint16_t)units)};
    }
    const std::uint32_t mantissa = mag & 0x7fffffu;
    std::uint32_t h = ((((mag >> 23) - 127u + 15u)) << 10) | (mantissa >> 13);
    const std::uint32_t rest = mantissa & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) {
        h += 1u;
    }
    return {(std::uint16_t)(sign | h)};
}

template <class Kernel>
void emu_launch(dim3 grid, dim3 block, Kernel kernel)
{
    gridDim = grid;
    blockDim = block;
    for (unsigned int bz = 0; bz < grid.z; ++bz)
        for (unsigned int by = 0; by < grid.y; ++by)
            for (unsigned int bx = 0; bx < grid.x; ++bx)
                for (unsigned int tz = 0; tz < block.z; ++tz)
                    for (unsigned int ty = 0; ty < block.y; ++ty)
                        for (unsigned int tx = 0; tx < block.x; ++tx) {
                            blockIdx = {bx, by, bz};
                            threadIdx = {tx, ty, tz};
                            kernel();
                        }
}

template <class Kernel>
void emu_launch_cooperative(dim3 grid, dim3 block, Kernel kernel)
{
    gridDim = grid;
    blockDim = block;
    const std::ptrdiff_t threads = (std::ptrdiff_t)block.x * block.y * block.z;
    for (unsigned int bz = 0; bz < grid.z; ++bz)
        for (unsigned int by = 0; by < grid.y; ++by)
            for (unsigned int bx = 0; bx < grid.x; ++bx) {
                std::barrier<> sync(threads);
                emu_block_barrier = &sync;
                std::vector<std::thread> workers;
                workers.reserve(threads);
                for (unsigned int tz = 0; tz < block.z; ++tz)
                    for (unsigned int ty = 0; ty < block.y; ++ty)
                        for (unsigned int tx = 0; tx < block.x; ++tx)
                            workers.emplace_back([=] {
                                blockIdx = {bx, by, bz};
                                threadIdx = {tx, ty, tz};
                                kernel();
                            });
                for (std::thread& w : workers) {
                    w.join();
                }
                emu_block_barrier = nullptr;
            }
}
