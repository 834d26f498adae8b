// Vector blocks shared by the CPU kernels (involution_cpu.cpp, pixel_filter_cpu.cpp): one block of VB bytes of T
// as a GCC/Clang vector, which stays in registers across the taps and compiles to the build target's widest
// instructions (-march=native).
//
// Loads and stores go through an element-aligned vector type rather than memcpy: typed accesses let the compiler
// keep the geometry in registers (a memcpy store may alias anything).
#pragma once

#include <cstdint>

template <typename T, int VB>
struct VecOf {
  typedef T type __attribute__((vector_size(VB)));
  typedef T unaligned __attribute__((vector_size(VB), aligned(sizeof(T))));
};
template <typename T, int VB>
using Vec = typename VecOf<T, VB>::type;
template <typename T, int VB>
constexpr int64_t kJB = VB / sizeof(T);  // lanes of a block

template <int VB, typename T>
inline Vec<T, VB> vload(const T* p) {
  return *reinterpret_cast<const typename VecOf<T, VB>::unaligned*>(p);
}
template <int VB, typename T>
inline void vstore(T* p, const Vec<T, VB>& v) {
  *reinterpret_cast<typename VecOf<T, VB>::unaligned*>(p) = v;
}

// Copies a row of n elements. The rows here are short (7-56 elements) and copied a million times a pass, so a
// library memmove call per row cost 15 % of the pixel-filter backward at 14x14: whole VB-byte blocks, then a
// fixed-count tail the compiler unrolls (a plain loop would be turned back into memmove).
template <int VB = 32, typename T>
inline void copy_row(const T* src, int64_t n, T* dst) {
  constexpr int64_t J = kJB<T, VB>;
  int64_t j = 0;
  for (; j + J <= n; j += J) vstore<VB>(dst + j, vload<VB, T>(src + j));
  for (int64_t jj = 0; jj < J - 1; ++jj)
    if (j + jj < n) dst[j + jj] = src[j + jj];
}
