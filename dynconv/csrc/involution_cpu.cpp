// Fused CPU kernel of involution (dynconv/functional/involution.py; Li et al., CVPR 2021, Eqs. 4 and 6):
//
//   w[b, g*KK + k, i, j] = sum_m W2[g*KK + k, m] * r[b, m, i, j] + b2[g*KK + k]        (span projection)
//   out[b, c, i, j]      = sum_k w[b, g(c)*KK + k, i, j] * x[b, c, i*sh - ph + kh*dh, j*sw - pw + kw*dw]
//
// k = kh*K + kw, KK = K*K, g(c) = c / (C/G), zero padding. The span weights w, (B, G*KK, Ho, Wo) in
// the unfused operator, exist here one output row of one group at a time (the forward: one block of
// about 64K values of one group, see forward_item).
//
// Tiling. A work item copies its group's C/G input planes into zero-padded thread-local planes (no
// bounds checks in the tap loops) and goes output row by output row. The planes are polyphase: the
// columns X of a padded row are stored by phase X % sw, so that the columns j*sw + kw*dw that a tap
// reads for consecutive j are contiguous (a plain vector load at every stride). For row i it
// computes the group's KK tap rows wt[KK][Wq] from the row's M reduced features (KK*M multiply-adds
// per pixel, in blocks of 8 taps that share each load of r), then the C/G channels use them while
// they are in L1. Every inner loop runs over blocks of JB contiguous output columns held in GCC
// vectors as wide as the CPU's (built with -march=native: 64 bytes with AVX-512, else 32), or 32
// bytes where a row is too narrow for the wide ones; the aggregation keeps 4 channels x 2 blocks of
// accumulators in registers across the taps.
// - Forward: one work item per (sample, group); they write disjoint outputs. The span projection of a
//   block of rows is one GEMM of the BLAS torch links (single-threaded in the work item); the loop
//   (`taps`) serves where the process has no BLAS.
// - Backward: work items are (sample, run of groups); a contiguous range of items is one chunk, one
//   chunk per thread. Per row and group, the recomputed wt and the rows of grad_out are read once
//   for two sums over blocks of 8 channels: gw[k] = sum_c grad_out_c * x_c,tap k (the gradient of w,
//   with grad_out in registers across the taps) and grad x as a gather, each block of a grad-x row
//   summing wt_k * grad_out_c over the taps that reach it (no product is stored). gw then gives
//   grad r (W2_g^T gw) and grad W2 (gw r^T): with a BLAS, two GEMMs per block of rows (wt recomputed
//   by a third, as in the forward); without, per row with lanes over M (`project_row`). Grad W2 and
//   the per-lane partial sums of grad b2 are reduced in double once per item into the chunk's own
//   (G*KK, M) slice; the chunks' slices are summed at the
//   end, in a fixed order. Runs of groups are whole samples unless there are fewer samples than
//   threads; then each run sums into its own copy of grad r, and the copies are added at the end.
// Threads: ATen's intra-op pool (at::parallel_for), so torch.set_num_threads applies.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

// The Fortran BLAS gemm of the BLAS that torch links (MKL in the x86 wheels), found at load time; where
// the process has none, the forward computes the span weights itself (`taps`) as the backward does.
extern "C" {
typedef void (*sgemm_t)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                        const int*, const float*, const int*, const float*, float*, const int*);
typedef void (*dgemm_t)(const char*, const char*, const int*, const int*, const int*, const double*,
                        const double*, const int*, const double*, const int*, const double*, double*, const int*);
}
const sgemm_t kSgemm = reinterpret_cast<sgemm_t>(dlsym(RTLD_DEFAULT, "sgemm_"));
const dgemm_t kDgemm = reinterpret_cast<dgemm_t>(dlsym(RTLD_DEFAULT, "dgemm_"));

bool use_blas = true;  // set_blas(False): the tests run the forward without it

template <typename T>
bool has_gemm() {
  return use_blas && (std::is_same_v<T, float> ? kSgemm != nullptr : kDgemm != nullptr);
}

// Column-major C (m x n, ld ldc) = op(A) op(B) + beta C, op(X) = X ('N') or its transpose ('T').
template <typename T>
void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T beta,
          T* C, int64_t ldc) {
  const int mi = int(m), ni = int(n), ki = int(k), la = int(lda), lb = int(ldb), lc = int(ldc);
  const T one = 1;
  if constexpr (std::is_same_v<T, float>) kSgemm(&ta, &tb, &mi, &ni, &ki, &one, A, &la, B, &lb, &beta, C, &lc);
  else kDgemm(&ta, &tb, &mi, &ni, &ki, &one, A, &la, B, &lb, &beta, C, &lc);
}

#ifdef __AVX512F__
constexpr int kWideVB = 64;  // bytes per vector block: the widest registers of the build's target
#else
constexpr int kWideVB = 32;
#endif

struct Geom {
  int64_t B, C, H, W, M, G, K, sh, sw, ph, pw, dh, dw, Ho, Wo;
  int64_t cpg, KK, HWo;
  int64_t JB, Wq, MV;     // lanes per vector block; output row and M in whole blocks
  int64_t Mq, Wph, RS;    // largest tap shift in phase columns; phase row width (whole blocks); Mq + Wph
  int64_t Hp, plane;      // padded rows; padded plane, Hp rows of sw phases
  std::vector<int64_t> koff;  // per tap: offset of its first column in the planes, from row i*sh
};

template <typename T, int VB>
Geom make_geom(const at::Tensor& x, const at::Tensor& r, int64_t G, int64_t K, int64_t sh, int64_t sw,
               int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  constexpr int64_t JB = VB / sizeof(T);
  Geom g{x.size(0), x.size(1), x.size(2), x.size(3), r.size(1), G, K, sh, sw, ph, pw, dh, dw,
         r.size(2), r.size(3)};
  g.cpg = g.C / G;
  g.KK = K * K;
  g.HWo = g.Ho * g.Wo;
  g.JB = JB;
  g.Wq = (g.Wo + JB - 1) / JB * JB;
  g.MV = (g.M + JB - 1) / JB * JB;
  g.Mq = (K - 1) * dw / sw;
  g.Wph = (std::max((pw + g.W + sw - 1) / sw, g.Wq + g.Mq) + JB - 1) / JB * JB;
  g.RS = g.Mq + g.Wph;
  g.Hp = std::max(ph + g.H, (g.Ho - 1) * sh + (K - 1) * dh + 1);
  g.plane = g.Hp * sw * g.Wph;
  for (int64_t kh = 0; kh < K; ++kh)
    for (int64_t kw = 0; kw < K; ++kw) g.koff.push_back((kh * dh * sw + kw * dw % sw) * g.Wph + kw * dw / sw);
  return g;
}

// Copies between the n planes H x W at x and the padded polyphase planes xp [n][Hp][sw][Wph] (input
// column X = pw + x in phase X % sw, column X / sw); the borders are never written, so they stay
// zero from allocation.
template <typename T, int VB, bool ToPlanes>
void copy_planes(const Geom& g, std::conditional_t<ToPlanes, const T*, T*> x, int64_t n,
                 std::conditional_t<ToPlanes, T*, const T*> xp) {
  for (int64_t c = 0; c < n; ++c)
    for (int64_t y = 0; y < g.H; ++y) {
      auto* row = x + (c * g.H + y) * g.W;
      auto* prow = xp + c * g.plane + (y + g.ph) * g.sw * g.Wph;
      if (g.sw == 1) {
        if constexpr (ToPlanes) copy_row<VB>(row, g.W, prow + g.pw);
        else copy_row<VB>(prow + g.pw, g.W, row);
        continue;
      }
      for (int64_t e = 0; e < g.sw; ++e) {  // phase by phase: strided columns, no division per element
        const int64_t X0 = g.pw + (e - g.pw % g.sw + g.sw) % g.sw;  // first column >= pw of phase e
        auto* src = row + (X0 - g.pw);
        auto* ph = prow + e * g.Wph + X0 / g.sw;
        const int64_t n = X0 < g.pw + g.W ? (g.pw + g.W - X0 + g.sw - 1) / g.sw : 0;
        for (int64_t q = 0; q < n; ++q) {
          if constexpr (ToPlanes) ph[q] = src[q * g.sw];
          else src[q * g.sw] = ph[q];
        }
      }
    }
}

// Row i of the n planes (n, Ho, Wo) at src into the rows of dst, ld apart; lanes past Wo keep their zeros.
template <typename T, int VB>
void load_rows(const Geom& g, const T* src, int64_t n, int64_t i, T* dst, int64_t ld) {
  for (int64_t m = 0; m < n; ++m) copy_row<VB>(src + m * g.HWo + i * g.Wo, g.Wo, dst + m * ld);
}

// wt[k][:] = b2g[k] + sum_m W2g[k][m] * rb[m][:] for the KB taps k0 <= k < k0 + KB (rows RS apart).
template <typename T, int VB, int KB>
inline void taps_block(const Geom& g, const T* W2g, const T* b2g, const T* rb, int64_t k0, T* wt) {
  for (int64_t j0 = 0; j0 < g.Wq; j0 += g.JB) {
    Vec<T, VB> acc[KB];
    for (int t = 0; t < KB; ++t) acc[t] = Vec<T, VB>{} + b2g[k0 + t];
    for (int64_t m = 0; m < g.M; ++m) {
      const Vec<T, VB> rv = vload<VB>(rb + m * g.Wq + j0);
      for (int t = 0; t < KB; ++t) acc[t] += W2g[(k0 + t) * g.M + m] * rv;
    }
    for (int t = 0; t < KB; ++t) vstore<VB>(wt + (k0 + t) * g.RS + j0, acc[t]);
  }
}

// The group's KK tap rows of one output row, wt [KK][RS] (from column -Mq), from its reduced
// features rb [M][Wq]; lanes outside [0, Wq) are never written.
template <typename T, int VB>
void taps(const Geom& g, const T* W2g, const T* b2g, const T* rb, T* wt) {
  int64_t k = 0;
  for (; k + 8 <= g.KK; k += 8) taps_block<T, VB, 8>(g, W2g, b2g, rb, k, wt);
  for (; k < g.KK; ++k) taps_block<T, VB, 1>(g, W2g, b2g, rb, k, wt);
}

// Output row i of CB channels (padded planes from xp, output rows from o, plane stride HWo).
template <typename T, int VB, int CB>
void aggregate_row(const Geom& g, const T* wt, const T* xp, int64_t i, T* o) {
  constexpr int64_t JB = VB / sizeof(T);
  const T* xi = xp + i * g.sh * g.sw * g.Wph;
  auto tile = [&](auto jt, int64_t j0) {
    constexpr int JT = decltype(jt)::value;
    Vec<T, VB> acc[CB][JT] = {};
    for (int64_t k = 0; k < g.KK; ++k) {
      const T* xk = xi + g.koff[k] + j0;
      for (int u = 0; u < JT; ++u) {
        const Vec<T, VB> wv = vload<VB>(wt + k * g.RS + j0 + u * JB);
        for (int t = 0; t < CB; ++t) acc[t][u] += wv * vload<VB>(xk + t * g.plane + u * JB);
      }
    }
    for (int t = 0; t < CB; ++t)
      for (int u = 0; u < JT; ++u) {
        const int64_t j = j0 + u * JB;
        T* dst = o + t * g.HWo + j;
        if (j + JB <= g.Wo) vstore<VB>(dst, acc[t][u]);
        else for (int64_t jj = 0; j + jj < g.Wo; ++jj) dst[jj] = acc[t][u][jj];
      }
  };
  int64_t j0 = 0;
  for (; j0 + 2 * JB <= g.Wq; j0 += 2 * JB) tile(std::integral_constant<int, 2>{}, j0);
  for (; j0 < g.Wq; j0 += JB) tile(std::integral_constant<int, 1>{}, j0);
}

// Rows of span weights one GEMM computes (forward and backward): about 64K values, so they stay in L2.
inline int64_t span_rows(const Geom& g) {
  return std::min(g.Ho, std::max<int64_t>(1, (int64_t(1) << 16) / (g.KK * g.Wo)));
}

// Thread-local buffers, zero from allocation where the kernels rely on it (see each use).
template <typename T>
struct Buffers {
  std::vector<T> xp, gxp, rb, wt, gw, gob, W2t, rt, grt, gWl, gbl, sp, gwb;
  Buffers(const Geom& g, bool backward)
      : xp(g.cpg * g.plane, T(0)), rb(g.M * g.Wq, T(0)), wt(g.KK * g.RS, T(0)) {
    if (has_gemm<T>()) sp.resize(span_rows(g) * g.Wo * g.KK);
    if (!backward) return;
    if (has_gemm<T>()) gwb.resize(span_rows(g) * g.Wo * g.KK);
    gxp.resize(g.cpg * g.plane);
    gw.resize(g.KK * g.Wq);
    gob.assign(kGradBlock * g.RS, T(0));
    W2t.assign(g.KK * g.MV, T(0));
    rt.assign(g.Wo * g.MV, T(0));
    grt.resize(g.Wo * g.MV);
    gWl.resize(g.KK * g.MV);
    gbl.resize(g.KK * g.JB);
  }
  static constexpr int kGradBlock = 8;  // channels per block of the backward
};

// The KK tap rows of one output row into wt [KK][RS] from the block's span weights (rows n apart, this
// row's first column at sp) with the bias added; lanes past Wo keep their values (zero from allocation).
template <typename T, int VB>
void block_taps(const Geom& g, const T* sp, int64_t n, const T* b2g, T* wt) {
  constexpr int64_t JB = VB / sizeof(T);
  for (int64_t k = 0; k < g.KK; ++k) {
    const T* src = sp + k * n;
    T* dst = wt + k * g.RS;
    int64_t j = 0;
    for (; j + JB <= g.Wo; j += JB) vstore<VB>(dst + j, vload<VB>(src + j) + b2g[k]);
    for (; j < g.Wo; ++j) dst[j] = src[j] + b2g[k];
  }
}

// The KK tap rows wt of output row i, row i - i0 of its block: from the block's GEMM (buf.sp, n columns) or,
// without BLAS, from the row's reduced features (loaded into buf.rb, which the backward's loop path reads too).
template <typename T, int VB>
void row_taps(const Geom& g, bool use_gemm, int64_t n, int64_t in_block, int64_t i, const T* rbs, const T* W2g,
              const T* b2g, Buffers<T>& buf, T* wt) {
  if (use_gemm) {
    block_taps<T, VB>(g, buf.sp.data() + in_block * g.Wo, n, b2g, wt);
  } else {
    load_rows<T, VB>(g, rbs, g.M, i, buf.rb.data(), g.Wq);
    taps<T, VB>(g, W2g, b2g, buf.rb.data(), wt);
  }
}

// Group gr of sample b. For a block of output rows, the span weights without the bias, sp [KK][rows*Wo] =
// W2g r_b (one GEMM of torch's BLAS, single-threaded inside the work item, at its speed); per output row the
// KK tap rows are then copied into wt with the bias added (lanes past Wo stay zero from allocation) and
// aggregated while in L1. Without a BLAS, `taps` computes each row's tap rows.
template <typename T, int VB>
void forward_item(const Geom& g, const T* x, const T* r, const T* W2, const T* b2, T* out, int64_t b,
                  int64_t gr, Buffers<T>& buf) {
  const bool use_gemm = has_gemm<T>();
  const int64_t c0 = gr * g.cpg, rows = use_gemm ? span_rows(g) : g.Ho;
  const T* W2g = W2 + gr * g.KK * g.M;
  const T* b2g = b2 + gr * g.KK;
  const T* rbs = r + b * g.M * g.HWo;
  T* wt = buf.wt.data() + g.Mq;
  copy_planes<T, VB, true>(g, x + (b * g.C + c0) * g.H * g.W, g.cpg, buf.xp.data());
  for (int64_t i0 = 0; i0 < g.Ho; i0 += rows) {
    const int64_t n = std::min(rows, g.Ho - i0) * g.Wo;  // columns (pixels) of this block
    // column-major: sp^T (n x KK) = r_b^T (n x M, ld HWo) W2g^T (M x KK, ld M)
    if (use_gemm) gemm<T>('N', 'N', n, g.KK, g.M, rbs + i0 * g.Wo, g.HWo, W2g, g.M, T(0), buf.sp.data(), n);
    for (int64_t i = i0; i < std::min(g.Ho, i0 + rows); ++i) {
      row_taps<T, VB>(g, use_gemm, n, i - i0, i, rbs, W2g, b2g, buf, wt);
      T* o = out + (b * g.C + c0) * g.HWo + i * g.Wo;
      int64_t c = 0;
      for (; c + 4 <= g.cpg; c += 4) aggregate_row<T, VB, 4>(g, wt, buf.xp.data() + c * g.plane, i, o + c * g.HWo);
      for (; c < g.cpg; ++c) aggregate_row<T, VB, 1>(g, wt, buf.xp.data() + c * g.plane, i, o + c * g.HWo);
    }
  }
}

// One output row i of CB channels, whose grad_out rows are gob [CB][RS] (from column -Mq, zero
// outside [0, Wo)): adds sum_c grad_out_c * x_c,tap k into gw [KK][Wq] (or sets it, for the first
// block), and grad x into the padded polyphase planes gxp. Grad x is gathered: phase column q of
// padded row i*sh + kh*dh receives wt_k * grad_out at column q - kw*dw/sw from every tap kw of
// phase kw*dw % sw. Lanes of wt past Wq are finite (zero or a bias) and meet zeros of grad_out.
template <typename T, int VB, int CB>
void backward_row(const Geom& g, const T* wt, const T* xp, const T* gob, bool first, T* gw, T* gxp, int64_t i) {
  constexpr int64_t JB = VB / sizeof(T);
  const T* xi = xp + i * g.sh * g.sw * g.Wph;
  for (int64_t j0 = 0; j0 < g.Wq; j0 += JB) {
    Vec<T, VB> gv[CB];
    for (int t = 0; t < CB; ++t) gv[t] = vload<VB>(gob + t * g.RS + j0);
    for (int64_t k = 0; k < g.KK; ++k) {
      const T* xk = xi + g.koff[k] + j0;
      Vec<T, VB> acc = first ? Vec<T, VB>{} : vload<VB>(gw + k * g.Wq + j0);
      for (int t = 0; t < CB; ++t) acc += gv[t] * vload<VB>(xk + t * g.plane);
      vstore<VB>(gw + k * g.Wq + j0, acc);
    }
  }
  for (int64_t kh = 0; kh < g.K; ++kh)
    for (int64_t e = 0; e < g.sw; ++e) {
      T* gxr = gxp + ((i * g.sh + kh * g.dh) * g.sw + e) * g.Wph;
      for (int64_t q0 = 0; q0 < g.Wph; q0 += JB) {
        Vec<T, VB> acc[CB];
        for (int t = 0; t < CB; ++t) acc[t] = vload<VB>(gxr + t * g.plane + q0);
        for (int64_t kw = 0; kw < g.K; ++kw) {
          if (kw * g.dw % g.sw != e) continue;
          const int64_t q = q0 - kw * g.dw / g.sw;
          const Vec<T, VB> wv = vload<VB>(wt + (kh * g.K + kw) * g.RS + q);
          for (int t = 0; t < CB; ++t) acc[t] += wv * vload<VB>(gob + t * g.RS + q);
        }
        for (int t = 0; t < CB; ++t) vstore<VB>(gxr + t * g.plane + q0, acc[t]);
      }
    }
}

// grad r row i (+= W2g^T gw, into gr [M][Ho][Wo]) and grad W2 (+= gw rb^T, into gWl [KK][MV]) with
// lanes over m (MV: M in whole blocks): each gw[k][j] is broadcast once for both, against the rows
// W2t [KK][MV] (W2g transposed) and rt [Wo][MV] (rb transposed), so the sums run over exactly the
// Wo pixels and the grad-W2 sums stay in registers across a tile of pixels.
template <typename T, int VB>
void project_row(const Geom& g, const T* W2t, const T* gw, const T* rt, T* grt, T* gr, int64_t i, T* gWl) {
  constexpr int64_t JB = VB / sizeof(T);
  constexpr int JT = VB >= 64 ? 8 : 4;  // pixels per tile: 2*JT + KB + 2 vector registers
  auto tile = [&](auto jt, auto kb, int64_t m0, int64_t j0, int64_t k0, Vec<T, VB>* racc, const Vec<T, VB>* rv) {
    constexpr int NJ = decltype(jt)::value, KB = decltype(kb)::value;
    Vec<T, VB> wacc[KB];
    for (int t = 0; t < KB; ++t) wacc[t] = vload<VB>(gWl + (k0 + t) * g.MV + m0);
    for (int t = 0; t < KB; ++t) {
      const Vec<T, VB> wv = vload<VB>(W2t + (k0 + t) * g.MV + m0);
      for (int u = 0; u < NJ; ++u) {
        const T gv = gw[(k0 + t) * g.Wq + j0 + u];
        racc[u] += gv * wv;
        wacc[t] += gv * rv[u];
      }
    }
    for (int t = 0; t < KB; ++t) vstore<VB>(gWl + (k0 + t) * g.MV + m0, wacc[t]);
  };
  auto pixels = [&](auto jt, int64_t m0, int64_t j0) {
    constexpr int NJ = decltype(jt)::value;
    Vec<T, VB> racc[NJ] = {}, rv[NJ];
    for (int u = 0; u < NJ; ++u) rv[u] = vload<VB>(rt + (j0 + u) * g.MV + m0);
    int64_t k0 = 0;
    for (; k0 + 4 <= g.KK; k0 += 4) tile(jt, std::integral_constant<int, 4>{}, m0, j0, k0, racc, rv);
    for (; k0 < g.KK; ++k0) tile(jt, std::integral_constant<int, 1>{}, m0, j0, k0, racc, rv);
    for (int u = 0; u < NJ; ++u) vstore<VB>(grt + (j0 + u) * g.MV + m0, racc[u]);
  };
  for (int64_t m0 = 0; m0 < g.MV; m0 += JB) {  // tiles of JT pixels, the rest in tiles of 4, 2, 1
    int64_t j0 = 0;
    for (; j0 + JT <= g.Wo; j0 += JT) pixels(std::integral_constant<int, JT>{}, m0, j0);
    if constexpr (JT > 4)
      if (j0 + 4 <= g.Wo) pixels(std::integral_constant<int, 4>{}, m0, j0), j0 += 4;
    if (j0 + 2 <= g.Wo) pixels(std::integral_constant<int, 2>{}, m0, j0), j0 += 2;
    if (j0 < g.Wo) pixels(std::integral_constant<int, 1>{}, m0, j0);
  }
  for (int64_t m = 0; m < g.M; ++m) {
    T* dst = gr + m * g.HWo + i * g.Wo;
    for (int64_t j = 0; j < g.Wo; ++j) dst[j] += grt[j * g.MV + m];
  }
}

// Group gr of sample b: grad x of its channels, its share of grad r (added into gr), and its
// grad W2 / grad b2 (summed in T over the item) added in double into gW2d [G*KK][M] and gb2d [G*KK].
// With a BLAS, rows go in blocks as in the forward: one GEMM recomputes the block's span weights, gw of
// each row is kept in gwb [KK][n], and two GEMMs per block add grad r (W2g^T gwb) and grad W2 (gwb r^T);
// without, each row recomputes its taps and `project_row` does both sums.
template <typename T, int VB>
void backward_group(const Geom& g, const T* x, const T* r, const T* W2, const T* b2, const T* go, T* gx, T* gr,
                    double* gW2d, double* gb2d, int64_t b, int64_t grp, Buffers<T>& buf) {
  constexpr int CB = Buffers<T>::kGradBlock;
  const bool use_gemm = has_gemm<T>();
  const int64_t c0 = grp * g.cpg, JB = g.JB, rows = use_gemm ? span_rows(g) : g.Ho;
  const T* W2g = W2 + grp * g.KK * g.M;
  const T* b2g = b2 + grp * g.KK;
  const T* rbs = r + b * g.M * g.HWo;
  T* grb = gr + b * g.M * g.HWo;
  T *gxp = buf.gxp.data(), *wt = buf.wt.data() + g.Mq, *gob = buf.gob.data() + g.Mq;
  copy_planes<T, VB, true>(g, x + (b * g.C + c0) * g.H * g.W, g.cpg, buf.xp.data());
  std::fill(buf.gxp.begin(), buf.gxp.end(), T(0));
  std::fill(buf.gWl.begin(), buf.gWl.end(), T(0));
  std::fill(buf.gbl.begin(), buf.gbl.end(), T(0));
  if (!use_gemm)
    for (int64_t k = 0; k < g.KK; ++k)
      for (int64_t m = 0; m < g.M; ++m) buf.W2t[k * g.MV + m] = W2g[k * g.M + m];
  const T* go_g = go + (b * g.C + c0) * g.HWo;
  for (int64_t i0 = 0; i0 < g.Ho; i0 += rows) {
    const int64_t n = std::min(rows, g.Ho - i0) * g.Wo;
    if (use_gemm) gemm<T>('N', 'N', n, g.KK, g.M, rbs + i0 * g.Wo, g.HWo, W2g, g.M, T(0), buf.sp.data(), n);
    for (int64_t i = i0; i < std::min(g.Ho, i0 + rows); ++i) {
      row_taps<T, VB>(g, use_gemm, n, i - i0, i, rbs, W2g, b2g, buf, wt);
      int64_t c = 0;
      for (; c + CB <= g.cpg; c += CB) {
        load_rows<T, VB>(g, go_g + c * g.HWo, CB, i, gob, g.RS);
        backward_row<T, VB, CB>(g, wt, buf.xp.data() + c * g.plane, gob, c == 0, buf.gw.data(), gxp + c * g.plane,
                                i);
      }
      for (; c < g.cpg; ++c) {
        load_rows<T, VB>(g, go_g + c * g.HWo, 1, i, gob, g.RS);
        backward_row<T, VB, 1>(g, wt, buf.xp.data() + c * g.plane, gob, c == 0, buf.gw.data(), gxp + c * g.plane, i);
      }
      if (use_gemm) {  // this row's gw into the block's gwb
        for (int64_t k = 0; k < g.KK; ++k)
          std::copy_n(buf.gw.data() + k * g.Wq, g.Wo, buf.gwb.data() + k * n + (i - i0) * g.Wo);
      } else {
        for (int64_t m = 0; m < g.M; ++m)
          for (int64_t j = 0; j < g.Wo; ++j) buf.rt[j * g.MV + m] = buf.rb[m * g.Wq + j];
        project_row<T, VB>(g, buf.W2t.data(), buf.gw.data(), buf.rt.data(), buf.grt.data(), grb, i, buf.gWl.data());
      }
      for (int64_t k = 0; k < g.KK; ++k) {  // grad b2: per-lane sums of gw, zero past Wo
        Vec<T, VB> gb = vload<VB>(buf.gbl.data() + k * JB);
        for (int64_t j0 = 0; j0 < g.Wq; j0 += JB) gb += vload<VB>(buf.gw.data() + k * g.Wq + j0);
        vstore<VB>(buf.gbl.data() + k * JB, gb);
      }
    }
    if (use_gemm) {
      // grad r^T (n x M, ld HWo) += gwb^T (n x KK, ld n) W2g (KK x M: W2g row-major, i.e. transposed, ld M)
      gemm<T>('N', 'T', n, g.M, g.KK, buf.gwb.data(), n, W2g, g.M, T(1), grb + i0 * g.Wo, g.HWo);
      // grad W2g (row-major KK x M = column-major M x KK, ld MV) += r_block (M x n) gwb^T (n x KK)
      gemm<T>('T', 'N', g.M, g.KK, n, rbs + i0 * g.Wo, g.HWo, buf.gwb.data(), n, T(1), buf.gWl.data(), g.MV);
    }
  }
  copy_planes<T, VB, false>(g, gx + (b * g.C + c0) * g.H * g.W, g.cpg, gxp);
  for (int64_t k = 0; k < g.KK; ++k) {
    double sb = 0;
    for (int64_t jj = 0; jj < JB; ++jj) sb += buf.gbl[k * JB + jj];
    gb2d[grp * g.KK + k] += sb;
    for (int64_t m = 0; m < g.M; ++m) gW2d[(grp * g.KK + k) * g.M + m] += buf.gWl[k * g.MV + m];
  }
}

// The kernels index raw memory, so every shape they rely on is checked here (the Python wrapper
// gives the user-facing errors first).
void check_inputs(const at::Tensor& x, const at::Tensor& r, const at::Tensor& W2, const at::Tensor& b2, int64_t G,
                  int64_t K, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  for (const at::Tensor* t : {&x, &r, &W2, &b2}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == x.scalar_type(),
                "native involution: contiguous CPU tensors of one dtype only");
  }
  TORCH_CHECK(K >= 1 && sh >= 1 && sw >= 1 && dh >= 1 && dw >= 1 && ph >= 0 && pw >= 0 && G >= 1,
              "native involution: needs kernel_size, stride, dilation, groups >= 1 and padding >= 0");
  TORCH_CHECK(x.dim() == 4 && r.dim() == 4 && W2.dim() == 2 && b2.dim() == 1, "native involution: bad ranks");
  const int64_t Ho = (x.size(2) + 2 * ph - dh * (K - 1) - 1) / sh + 1;
  const int64_t Wo = (x.size(3) + 2 * pw - dw * (K - 1) - 1) / sw + 1;
  TORCH_CHECK(x.size(1) % G == 0 && Ho >= 1 && Wo >= 1 && r.size(0) == x.size(0) && r.size(2) == Ho &&
                  r.size(3) == Wo && W2.size(0) == G * K * K && W2.size(1) == r.size(1) && b2.size(0) == G * K * K,
              "native involution: shapes do not fit the geometry");
}

// Calls f with the vector width (bytes) for rows of Wo columns: the widest unless its blocks pad the
// row by over a quarter more lanes than 32-byte blocks do (a 7-wide row: 16 lanes against 8).
template <typename T, typename F>
void with_width(int64_t Wo, const F& f) {
  constexpr int64_t narrow = 32 / sizeof(T), wide = kWideVB / sizeof(T);
  if ((Wo + wide - 1) / wide * wide * 4 <= (Wo + narrow - 1) / narrow * narrow * 5)
    f(std::integral_constant<int, kWideVB>{});
  else
    f(std::integral_constant<int, 32>{});
}

template <typename T, int VB>
void forward_impl(const at::Tensor& x, const at::Tensor& r, const at::Tensor& W2, const at::Tensor& b2,
                  at::Tensor& out, const Geom& g) {
  const T *xd = x.data_ptr<T>(), *rd = r.data_ptr<T>(), *W2d = W2.data_ptr<T>(), *b2d = b2.data_ptr<T>();
  T* od = out.data_ptr<T>();
  const int64_t work = g.Ho * g.Wq * g.KK * (g.cpg + g.M);  // multiply-adds per item
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, work));
  at::parallel_for(0, g.B * g.G, grain, [&](int64_t u0, int64_t u1) {
    Buffers<T> buf(g, false);
    for (int64_t u = u0; u < u1; ++u) forward_item<T, VB>(g, xd, rd, W2d, b2d, od, u / g.G, u % g.G, buf);
  });
}

template <typename T, int VB>
void backward_impl(const at::Tensor& x, const at::Tensor& r, const at::Tensor& W2, const at::Tensor& b2,
                   const at::Tensor& go, at::Tensor& gx, at::Tensor& grbuf, at::Tensor& gW2d, at::Tensor& gb2d,
                   const Geom& g) {
  const T *xd = x.data_ptr<T>(), *rd = r.data_ptr<T>(), *W2p = W2.data_ptr<T>(), *b2p = b2.data_ptr<T>();
  const T* god = go.data_ptr<T>();
  T *gxd = gx.data_ptr<T>(), *grd = grbuf.data_ptr<T>();
  double *gWd = gW2d.data_ptr<double>(), *gbd = gb2d.data_ptr<double>();
  const int64_t nq = grbuf.size(0), nchunk = gW2d.size(0), items = g.B * nq;
  at::parallel_for(0, nchunk, 1, [&](int64_t ch0, int64_t ch1) {
    Buffers<T> buf(g, true);
    for (int64_t ch = ch0; ch < ch1; ++ch)
      for (int64_t u = ch * items / nchunk; u < (ch + 1) * items / nchunk; ++u) {
        const int64_t b = u / nq, q = u % nq;
        for (int64_t grp = q * g.G / nq; grp < (q + 1) * g.G / nq; ++grp)
          backward_group<T, VB>(g, xd, rd, W2p, b2p, god, gxd, grd + q * g.B * g.M * g.HWo,
                                gWd + ch * g.G * g.KK * g.M, gbd + ch * g.G * g.KK, b, grp, buf);
      }
  });
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& r, const at::Tensor& W2, const at::Tensor& b2, int64_t G,
                   int64_t K, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  check_inputs(x, r, W2, b2, G, K, sh, sw, ph, pw, dh, dw);
  at::Tensor out = at::empty({x.size(0), x.size(1), r.size(2), r.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "involution_forward", [&] {
    with_width<scalar_t>(r.size(3), [&](auto vb) {
      constexpr int VB = decltype(vb)::value;
      forward_impl<scalar_t, VB>(x, r, W2, b2, out, make_geom<scalar_t, VB>(x, r, G, K, sh, sw, ph, pw, dh, dw));
    });
  });
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& go, const at::Tensor& x, const at::Tensor& r, const at::Tensor& W2,
                                 const at::Tensor& b2, int64_t G, int64_t K, int64_t sh, int64_t sw, int64_t ph,
                                 int64_t pw, int64_t dh, int64_t dw) {
  check_inputs(x, r, W2, b2, G, K, sh, sw, ph, pw, dh, dw);
  TORCH_CHECK(go.is_contiguous() && go.scalar_type() == x.scalar_type() &&
                  go.sizes() == at::IntArrayRef({x.size(0), x.size(1), r.size(2), r.size(3)}),
              "native involution: grad_output must be contiguous, of x's dtype and the output's shape");
  const int64_t B = x.size(0), threads = at::get_num_threads();
  if (B == 0)  // an empty batch: no work to split, zero parameter gradients
    return {at::empty_like(x), at::zeros_like(r), at::zeros_like(W2), at::zeros_like(b2)};
  // runs of groups: whole samples, unless fewer samples than threads
  const int64_t nq = B >= threads ? 1 : std::min(G, (threads + B - 1) / B);
  const int64_t nchunk = std::min(B * nq, threads);
  at::Tensor gx = at::empty_like(x);  // every element is written once
  at::Tensor grbuf = at::zeros({nq, B, r.size(1), r.size(2), r.size(3)}, r.options());
  at::Tensor gW2d = at::zeros({nchunk, W2.size(0), W2.size(1)}, W2.options().dtype(at::kDouble));
  at::Tensor gb2d = at::zeros({nchunk, b2.size(0)}, b2.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "involution_backward", [&] {
    with_width<scalar_t>(r.size(3), [&](auto vb) {
      constexpr int VB = decltype(vb)::value;
      backward_impl<scalar_t, VB>(x, r, W2, b2, go, gx, grbuf, gW2d, gb2d,
                                  make_geom<scalar_t, VB>(x, r, G, K, sh, sw, ph, pw, dh, dw));
    });
  });
  at::Tensor gr = nq == 1 ? grbuf[0] : grbuf.sum(0);
  return {gx, gr, gW2d.sum(0).to(W2.scalar_type()), gb2d.sum(0).to(b2.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused involution forward (CPU)");
  m.def("set_blas", [](bool on) { use_blas = on; }, "use torch's BLAS for the forward's span weights (where found)");
  m.def("has_blas", []() { return kSgemm != nullptr && kDgemm != nullptr; }, "torch's BLAS gemm was found");
  m.def("backward", &backward, "fused involution backward: grad x, grad r, grad W2, grad b2 (CPU)");
}
