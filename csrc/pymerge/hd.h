// Qualifier for math shared by the C++ CPU kernels and the CUDA kernels: one definition, two compilers.
#pragma once
#if defined(__CUDACC__)
#define PM_HD __host__ __device__ __forceinline__
#else
#define PM_HD inline
#endif
