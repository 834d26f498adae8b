// Fused CPU kernel of involution (dynconv/functional/involution.py; Li et al., CVPR 2021, Eqs. 4 and 6):
//
//   w[b, g*KK + k, i, j] = sum_m W2[g*KK + k, m] * r[b, m, i, j] + b2[g*KK + k]        (span projection)
//   out[b, c, i, j]      = sum_k w[b, g(c)*KK + k, i, j] * x[b, c, i*sh - ph + kh*dh, j*sw - pw + kw*dw]
//
// k = kh*K + kw, KK = K*K, g(c) = c / (C/G), zero padding. The span weights w, (B, G*KK, Ho, Wo) in
// the unfused operator, exist here one output row of one group at a time.
//
// Tiling. A work item copies its group's C/G input planes into zero-padded thread-local planes (no
// bounds checks in the tap loops) and goes output row by output row. For row i it computes the
// group's KK tap rows wt[KK][Wq] from the row's M reduced features (KK*M multiply-adds per pixel, in
// blocks of 8 taps that share each load of r), then the C/G channels use them while they are in L1.
// Every inner loop runs over blocks of JB contiguous output columns held in GCC vectors (one 32-byte
// register); the aggregation keeps 4 channels x 2 blocks of accumulators in registers across the taps.
// - Forward: one work item per (sample, group); they write disjoint outputs.
// - Backward: work items are (sample, run of groups); a contiguous range of items is one chunk, one
//   chunk per thread. Per row and group, recomputed wt and grad_out give, in one pass over the taps,
//   gw[k] = sum_c grad_out_c * x_c,tap k (the gradient of w, summed over the group's channels) and the
//   rows wt_k * grad_out_c that grad x gathers (stride 1) or that are scattered into padded grad-x
//   planes (other strides). gw then gives the row of grad r (W2_g^T gw) and per-lane partial sums of
//   grad W2 (gw r^T) and grad b2, reduced in double once per item into the chunk's own (G*KK, M)
//   slice; the chunks' slices are summed at the end, in a fixed order. Runs of groups are whole
//   samples unless there are fewer samples than threads; then each run sums into its own copy of
//   grad r, and the copies are added at the end.
// Threads: ATen's intra-op pool (at::parallel_for), so torch.set_num_threads applies.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

constexpr int kVB = 32;  // bytes per vector block: AVX2 width, and 8 floats fit 7-, 14-, 28- and 56-wide rows

template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kVB)));
  typedef T unaligned __attribute__((vector_size(kVB), aligned(sizeof(T))));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kJB = kVB / sizeof(T);

template <typename T>
inline Vec<T> vload(const T* p) {
  return *reinterpret_cast<const typename VecOf<T>::unaligned*>(p);
}
template <typename T>
inline void vstore(T* p, const Vec<T>& v) {
  *reinterpret_cast<typename VecOf<T>::unaligned*>(p) = v;
}
// Columns j*s of a row for the block's lanes: a plain load at stride 1, a gather otherwise.
template <bool S1, typename T>
inline Vec<T> vload_cols(const T* p, int64_t s) {
  if constexpr (S1) return vload(p);
  Vec<T> v;
  for (int64_t jj = 0; jj < kJB<T>; ++jj) v[jj] = p[jj * s];
  return v;
}

// Copies a short row: whole blocks, then a fixed-count tail (no library call per row).
template <typename T>
inline void copy_row(const T* src, int64_t n, T* dst) {
  constexpr int64_t J = kJB<T>;
  int64_t j = 0;
  for (; j + J <= n; j += J) vstore(dst + j, vload(src + j));
  for (int64_t jj = 0; jj < J - 1; ++jj)
    if (j + jj < n) dst[j + jj] = src[j + jj];
}

struct Geom {
  int64_t B, C, H, W, M, G, K, sh, sw, ph, pw, dh, dw, Ho, Wo;
  int64_t cpg, KK, HWo;
  int64_t Wq, Wx, Wp, Hp, plane;  // output row in whole blocks; reached padded width; padded plane
};

template <typename T>
Geom make_geom(const at::Tensor& x, const at::Tensor& r, int64_t G, int64_t K, int64_t sh, int64_t sw,
               int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  constexpr int64_t JB = kJB<T>;
  Geom g{x.size(0), x.size(1), x.size(2), x.size(3), r.size(1), G, K, sh, sw, ph, pw, dh, dw,
         r.size(2), r.size(3)};
  g.cpg = g.C / G;
  g.KK = K * K;
  g.HWo = g.Ho * g.Wo;
  g.Wq = (g.Wo + JB - 1) / JB * JB;
  g.Wx = ((g.Wq - 1) * sw + (K - 1) * dw + 1 + JB - 1) / JB * JB;
  g.Wp = std::max(pw + g.W, g.Wx);
  g.Hp = std::max(ph + g.H, (g.Ho - 1) * sh + (K - 1) * dh + 1);
  g.plane = g.Hp * g.Wp;
  return g;
}

// Copies the n planes H x W at x into the padded planes xp [n][Hp][Wp] at offset (ph, pw); the
// borders are never written, so they stay zero from allocation.
template <typename T>
void load_planes(const Geom& g, const T* x, int64_t n, T* xp) {
  for (int64_t c = 0; c < n; ++c)
    for (int64_t y = 0; y < g.H; ++y)
      copy_row(x + (c * g.H + y) * g.W, g.W, xp + c * g.plane + (y + g.ph) * g.Wp + g.pw);
}

// Row i of the n planes (n, Ho, Wo) at src into dst [n][Wq]; lanes past Wo keep their zeros.
template <typename T>
void load_rows(const Geom& g, const T* src, int64_t n, int64_t i, T* dst) {
  for (int64_t m = 0; m < n; ++m) copy_row(src + m * g.HWo + i * g.Wo, g.Wo, dst + m * g.Wq);
}

// wt[k][:] = b2g[k] + sum_m W2g[k][m] * rb[m][:] for the KB taps k0 <= k < k0 + KB.
template <typename T, int KB>
inline void taps_block(const Geom& g, const T* W2g, const T* b2g, const T* rb, int64_t k0, T* wt) {
  for (int64_t j0 = 0; j0 < g.Wq; j0 += kJB<T>) {
    Vec<T> acc[KB];
    for (int t = 0; t < KB; ++t) acc[t] = Vec<T>{} + b2g[k0 + t];
    for (int64_t m = 0; m < g.M; ++m) {
      const Vec<T> rv = vload(rb + m * g.Wq + j0);
      for (int t = 0; t < KB; ++t) acc[t] += W2g[(k0 + t) * g.M + m] * rv;
    }
    for (int t = 0; t < KB; ++t) vstore(wt + (k0 + t) * g.Wq + j0, acc[t]);
  }
}

// The group's KK tap rows of one output row, wt [KK][Wq], from its reduced features rb [M][Wq].
template <typename T>
void taps(const Geom& g, const T* W2g, const T* b2g, const T* rb, T* wt) {
  int64_t k = 0;
  for (; k + 8 <= g.KK; k += 8) taps_block<T, 8>(g, W2g, b2g, rb, k, wt);
  for (; k < g.KK; ++k) taps_block<T, 1>(g, W2g, b2g, rb, k, wt);
}

// Output row i of CB channels (padded planes from xp, output rows from o, plane stride HWo).
template <typename T, bool S1, int CB>
void aggregate_row(const Geom& g, const T* wt, const T* xp, int64_t i, T* o) {
  constexpr int64_t JB = kJB<T>;
  const T* xrow = xp + i * g.sh * g.Wp;
  auto tile = [&](auto jt, int64_t j0) {
    constexpr int JT = decltype(jt)::value;
    Vec<T> acc[CB][JT] = {};
    for (int64_t kh = 0, k = 0; kh < g.K; ++kh)
      for (int64_t kw = 0; kw < g.K; ++kw, ++k) {
        const T* xk = xrow + kh * g.dh * g.Wp + j0 * g.sw + kw * g.dw;
        for (int u = 0; u < JT; ++u) {
          const Vec<T> wv = vload(wt + k * g.Wq + j0 + u * JB);
          for (int t = 0; t < CB; ++t) acc[t][u] += wv * vload_cols<S1>(xk + t * g.plane + u * JB * g.sw, g.sw);
        }
      }
    for (int t = 0; t < CB; ++t)
      for (int u = 0; u < JT; ++u) {
        const int64_t j = j0 + u * JB;
        T* dst = o + t * g.HWo + j;
        if (j + JB <= g.Wo) vstore(dst, acc[t][u]);
        else for (int64_t jj = 0; j + jj < g.Wo; ++jj) dst[jj] = acc[t][u][jj];
      }
  };
  int64_t j0 = 0;
  for (; j0 + 2 * JB <= g.Wq; j0 += 2 * JB) tile(std::integral_constant<int, 2>{}, j0);
  for (; j0 < g.Wq; j0 += JB) tile(std::integral_constant<int, 1>{}, j0);
}

// Thread-local buffers, zero from allocation where the kernels rely on it (see each use).
template <typename T>
struct Buffers {
  std::vector<T> xp, gxp, rb, wt, gw, gob, P, grb, gWl, gbl;
  Buffers(const Geom& g, bool backward)
      : xp(g.cpg * g.plane, T(0)), rb(g.M * g.Wq, T(0)), wt(g.KK * g.Wq) {
    if (!backward) return;
    constexpr int64_t JB = kJB<T>;
    gxp.resize(g.cpg * g.plane);
    gw.resize(g.KK * g.Wq);
    gob.assign(4 * g.Wq, T(0));
    P.assign(4 * g.KK * ((g.K - 1) * g.dw + g.Wx), T(0));
    grb.resize(g.M * g.Wq);
    gWl.resize(g.KK * g.M * JB);
    gbl.resize(g.KK * JB);
  }
};

template <typename T, bool S1>
void forward_item(const Geom& g, const T* x, const T* r, const T* W2, const T* b2, T* out, int64_t b,
                  int64_t gr, Buffers<T>& buf) {
  const int64_t c0 = gr * g.cpg;
  const T* W2g = W2 + gr * g.KK * g.M;
  const T* b2g = b2 + gr * g.KK;
  load_planes(g, x + (b * g.C + c0) * g.H * g.W, g.cpg, buf.xp.data());
  for (int64_t i = 0; i < g.Ho; ++i) {
    load_rows(g, r + b * g.M * g.HWo, g.M, i, buf.rb.data());
    taps(g, W2g, b2g, buf.rb.data(), buf.wt.data());
    T* o = out + (b * g.C + c0) * g.HWo + i * g.Wo;
    int64_t c = 0;
    for (; c + 4 <= g.cpg; c += 4)
      aggregate_row<T, S1, 4>(g, buf.wt.data(), buf.xp.data() + c * g.plane, i, o + c * g.HWo);
    for (; c < g.cpg; ++c)
      aggregate_row<T, S1, 1>(g, buf.wt.data(), buf.xp.data() + c * g.plane, i, o + c * g.HWo);
  }
}

// One output row of CB channels: accumulates gw [KK][Wq] and grad x into the padded planes gxp.
// At stride 1 the rows P = wt_k * grad_out are stored first and then summed, shifted by
// (kh*dh, kw*dw), into the grad-x rows (a gather; shifted loads of freshly stored grad-x rows would
// stall store forwarding); other strides scatter lane by lane.
template <typename T, bool S1, int CB>
void backward_row(const Geom& g, const T* wt, const T* xp, const T* gob, T* gw, T* gxp, T* P, int64_t i) {
  constexpr int64_t JB = kJB<T>;
  const int64_t Mg = (g.K - 1) * g.dw, PW = Mg + g.Wx;
  for (int64_t kh = 0; kh < g.K; ++kh) {
    const int64_t row = (i * g.sh + kh * g.dh) * g.Wp;
    for (int64_t kw = 0; kw < g.K; ++kw) {
      const int64_t k = kh * g.K + kw;
      for (int64_t j0 = 0; j0 < g.Wq; j0 += JB) {
        const Vec<T> wv = vload(wt + k * g.Wq + j0);
        Vec<T> gwv = vload(gw + k * g.Wq + j0);
        for (int t = 0; t < CB; ++t) {
          const Vec<T> gv = vload(gob + t * g.Wq + j0);
          gwv += gv * vload_cols<S1>(xp + t * g.plane + row + j0 * g.sw + kw * g.dw, g.sw);
          const Vec<T> f = wv * gv;
          if constexpr (S1) vstore(P + (t * g.KK + k) * PW + Mg + j0, f);
          else
            for (int64_t jj = 0; jj < JB; ++jj) gxp[t * g.plane + row + (j0 + jj) * g.sw + kw * g.dw] += f[jj];
        }
        vstore(gw + k * g.Wq + j0, gwv);
      }
    }
  }
  if constexpr (S1)
    for (int t = 0; t < CB; ++t)
      for (int64_t kh = 0; kh < g.K; ++kh) {
        T* gxrow = gxp + t * g.plane + (i * g.sh + kh * g.dh) * g.Wp;
        const T* Pk = P + (t * g.KK + kh * g.K) * PW + Mg;
        auto gather = [&](auto nb, int64_t X0) {  // NB blocks: independent add chains
          constexpr int NB = decltype(nb)::value;
          Vec<T> acc[NB];
          for (int u = 0; u < NB; ++u) acc[u] = vload(gxrow + X0 + u * JB);
          for (int64_t kw = 0; kw < g.K; ++kw)
            for (int u = 0; u < NB; ++u) acc[u] += vload(Pk + kw * PW + X0 + u * JB - kw * g.dw);
          for (int u = 0; u < NB; ++u) vstore(gxrow + X0 + u * JB, acc[u]);
        };
        int64_t X0 = 0;
        for (; X0 + 4 * JB <= g.Wx; X0 += 4 * JB) gather(std::integral_constant<int, 4>{}, X0);
        for (; X0 < g.Wx; X0 += JB) gather(std::integral_constant<int, 1>{}, X0);
      }
}

// grad r row i (+= W2g^T gw, into gr [M][Ho][Wo]) and the per-lane partial sums of grad W2 (gw rb^T)
// and grad b2 (sum of gw), [KK][M][JB] and [KK][JB].
template <typename T>
void project_row(const Geom& g, const T* W2g, const T* gw, const T* rb, T* grb, T* gr, int64_t i, T* gWl,
                 T* gbl) {
  constexpr int64_t JB = kJB<T>;
  auto grad_r = [&](auto mb, int64_t m0) {
    constexpr int MB = decltype(mb)::value;
    for (int64_t j0 = 0; j0 < g.Wq; j0 += JB) {
      Vec<T> acc[MB] = {};
      for (int64_t k = 0; k < g.KK; ++k) {
        const Vec<T> gwv = vload(gw + k * g.Wq + j0);
        for (int t = 0; t < MB; ++t) acc[t] += W2g[k * g.M + m0 + t] * gwv;
      }
      for (int t = 0; t < MB; ++t) vstore(grb + (m0 + t) * g.Wq + j0, acc[t]);
    }
  };
  int64_t m = 0;
  for (; m + 4 <= g.M; m += 4) grad_r(std::integral_constant<int, 4>{}, m);
  for (; m < g.M; ++m) grad_r(std::integral_constant<int, 1>{}, m);
  for (m = 0; m < g.M; ++m) {
    T* dst = gr + m * g.HWo + i * g.Wo;
    for (int64_t j = 0; j < g.Wo; ++j) dst[j] += grb[m * g.Wq + j];
  }
  auto grad_w2 = [&](auto mb, int64_t k, int64_t m0) {
    constexpr int MB = decltype(mb)::value;
    Vec<T> acc[MB];
    for (int t = 0; t < MB; ++t) acc[t] = vload(gWl + (k * g.M + m0 + t) * JB);
    for (int64_t j0 = 0; j0 < g.Wq; j0 += JB) {
      const Vec<T> gwv = vload(gw + k * g.Wq + j0);
      for (int t = 0; t < MB; ++t) acc[t] += gwv * vload(rb + (m0 + t) * g.Wq + j0);
    }
    for (int t = 0; t < MB; ++t) vstore(gWl + (k * g.M + m0 + t) * JB, acc[t]);
  };
  for (int64_t k = 0; k < g.KK; ++k) {
    Vec<T> gb = vload(gbl + k * JB);
    for (int64_t j0 = 0; j0 < g.Wq; j0 += JB) gb += vload(gw + k * g.Wq + j0);
    vstore(gbl + k * JB, gb);
    int64_t m0 = 0;
    for (; m0 + 4 <= g.M; m0 += 4) grad_w2(std::integral_constant<int, 4>{}, k, m0);
    for (; m0 < g.M; ++m0) grad_w2(std::integral_constant<int, 1>{}, k, m0);
  }
}

// Group gr of sample b: grad x of its channels, its share of grad r (added into gr), and its
// grad W2 / grad b2 added (in double) into gW2d [G*KK][M] and gb2d [G*KK].
template <typename T, bool S1>
void backward_group(const Geom& g, const T* x, const T* r, const T* W2, const T* b2, const T* go, T* gx, T* gr,
                    double* gW2d, double* gb2d, int64_t b, int64_t grp, Buffers<T>& buf) {
  constexpr int64_t JB = kJB<T>;
  const int64_t c0 = grp * g.cpg;
  const T* W2g = W2 + grp * g.KK * g.M;
  const T* b2g = b2 + grp * g.KK;
  T* gxp = buf.gxp.data();
  load_planes(g, x + (b * g.C + c0) * g.H * g.W, g.cpg, buf.xp.data());
  std::fill(buf.gxp.begin(), buf.gxp.end(), T(0));
  std::fill(buf.gWl.begin(), buf.gWl.end(), T(0));
  std::fill(buf.gbl.begin(), buf.gbl.end(), T(0));
  for (int64_t i = 0; i < g.Ho; ++i) {
    load_rows(g, r + b * g.M * g.HWo, g.M, i, buf.rb.data());
    taps(g, W2g, b2g, buf.rb.data(), buf.wt.data());
    std::fill(buf.gw.begin(), buf.gw.end(), T(0));
    const T* gob = go + (b * g.C + c0) * g.HWo;
    int64_t c = 0;
    for (; c + 4 <= g.cpg; c += 4) {
      load_rows(g, gob + c * g.HWo, 4, i, buf.gob.data());
      backward_row<T, S1, 4>(g, buf.wt.data(), buf.xp.data() + c * g.plane, buf.gob.data(), buf.gw.data(),
                             gxp + c * g.plane, buf.P.data(), i);
    }
    for (; c < g.cpg; ++c) {
      load_rows(g, gob + c * g.HWo, 1, i, buf.gob.data());
      backward_row<T, S1, 1>(g, buf.wt.data(), buf.xp.data() + c * g.plane, buf.gob.data(), buf.gw.data(),
                             gxp + c * g.plane, buf.P.data(), i);
    }
    project_row(g, W2g, buf.gw.data(), buf.rb.data(), buf.grb.data(), gr + b * g.M * g.HWo, i, buf.gWl.data(),
                buf.gbl.data());
  }
  for (int64_t cc = 0; cc < g.cpg; ++cc)
    for (int64_t y = 0; y < g.H; ++y)
      copy_row(gxp + cc * g.plane + (y + g.ph) * g.Wp + g.pw, g.W, gx + ((b * g.C + c0 + cc) * g.H + y) * g.W);
  for (int64_t k = 0; k < g.KK; ++k) {
    double sb = 0;
    for (int64_t jj = 0; jj < JB; ++jj) sb += buf.gbl[k * JB + jj];
    gb2d[grp * g.KK + k] += sb;
    for (int64_t m = 0; m < g.M; ++m) {
      double s = 0;
      for (int64_t jj = 0; jj < JB; ++jj) s += buf.gWl[(k * g.M + m) * JB + jj];
      gW2d[(grp * g.KK + k) * g.M + m] += s;
    }
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

template <typename T, bool S1>
void forward_impl(const at::Tensor& x, const at::Tensor& r, const at::Tensor& W2, const at::Tensor& b2,
                  at::Tensor& out, const Geom& g) {
  const T *xd = x.data_ptr<T>(), *rd = r.data_ptr<T>(), *W2d = W2.data_ptr<T>(), *b2d = b2.data_ptr<T>();
  T* od = out.data_ptr<T>();
  const int64_t work = g.Ho * g.Wq * g.KK * (g.cpg + g.M);  // multiply-adds per item
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, work));
  at::parallel_for(0, g.B * g.G, grain, [&](int64_t u0, int64_t u1) {
    Buffers<T> buf(g, false);
    for (int64_t u = u0; u < u1; ++u) forward_item<T, S1>(g, xd, rd, W2d, b2d, od, u / g.G, u % g.G, buf);
  });
}

template <typename T, bool S1>
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
          backward_group<T, S1>(g, xd, rd, W2p, b2p, god, gxd, grd + q * g.B * g.M * g.HWo,
                                gWd + ch * g.G * g.KK * g.M, gbd + ch * g.G * g.KK, b, grp, buf);
      }
  });
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& r, const at::Tensor& W2, const at::Tensor& b2, int64_t G,
                   int64_t K, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  check_inputs(x, r, W2, b2, G, K, sh, sw, ph, pw, dh, dw);
  at::Tensor out = at::empty({x.size(0), x.size(1), r.size(2), r.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "involution_forward", [&] {
    const Geom g = make_geom<scalar_t>(x, r, G, K, sh, sw, ph, pw, dh, dw);
    if (sw == 1) forward_impl<scalar_t, true>(x, r, W2, b2, out, g);
    else forward_impl<scalar_t, false>(x, r, W2, b2, out, g);
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
    const Geom g = make_geom<scalar_t>(x, r, G, K, sh, sw, ph, pw, dh, dw);
    if (sw == 1) backward_impl<scalar_t, true>(x, r, W2, b2, go, gx, grbuf, gW2d, gb2d, g);
    else backward_impl<scalar_t, false>(x, r, W2, b2, go, gx, grbuf, gW2d, gb2d, g);
  });
  at::Tensor gr = nq == 1 ? grbuf[0] : grbuf.sum(0);
  return {gx, gr, gW2d.sum(0).to(W2.scalar_type()), gb2d.sum(0).to(b2.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused involution forward (CPU)");
  m.def("backward", &backward, "fused involution backward: grad x, grad r, grad W2, grad b2 (CPU)");
}
