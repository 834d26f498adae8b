// CPU kernels for the pixel_filter primitive (dynconv/functional/pixel_filter.py):
//
//   out[b,c,i,j] = sum_k F[b,c,k,i,j] * x[b, c, i*s - p + kh*d, j*s - p + kw*d]   (zero padding)
//   F = S[bs, g(c), k, i, j]                 (no channel filter)
//   F = A[b, c, k] * S[bs, g(c), k, i, j]    ("mul", DDF)   or   A[b, c, k] + S[...]   ("add")
//
// k = kh*K + kw, g(c) = c / (C/G), bs = b if S has a batch dimension of B, else 0 (TVConv).
//
// Nothing of size (B, C*K*K, Ho, Wo) is ever built. Layout of the work:
// - Output columns go in blocks of JB (one 32- or 64-byte vector, see vec.h) with a compile-time
//   trip count, so a block stays in registers across the K*K taps and no remainder loops are
//   emitted. The input planes of up to kChunk planes are copied into zero-padded thread-local
//   planes (L2-sized), so the tap loops need no bounds checks; the spatial filter is read in place,
//   except the last, partial block of a row, which is copied with zero padding.
// - A work item's planes all read one spatial-filter slice; plane t is q0 + t*qs in (b*C + c)
//   numbering: the channels of one group of one sample (qs = 1), or, when the batch shares a
//   one-channel-group filter (frozen TVConv, G = C), the samples of one channel (qs = C), so the
//   slice stays in cache across the batch and the samples fill the lanes below.
// - Planes go CB = 4 at a time where the item allows: they share every load of the spatial
//   filter and give independent accumulator chains.
// - Forward: one work item per chunk of such planes; with a shared filter, a thread's consecutive
//   items use the same slice.
// - Backward: one work item per (sample chunk, group), all rows, in one pass over grad_out and x:
//   grad x as the transposed gather into padded grad-x planes, grad S summed over the group's
//   channels in a row buffer, grad A summed over pixels in per-lane partials reduced (in double)
//   once per channel.
// Threads: ATen's intra-op pool (at::parallel_for), so torch.set_num_threads applies.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

enum Combine : int { kPlain = 0, kMul = 1, kAdd = 2 };
constexpr int64_t kChunk = 16;  // channels whose padded planes a work item holds at once

// One block of output columns is a vector of VB bytes (vec.h). VB is 32 unless the forward's 64 covers a row with no more lanes (float maps 9-16, 25-32,
// 41-48 wide, e.g. 14, 28 and 48): then a row takes half the blocks (forward 15 % faster at 48x48,
// measured). Elsewhere 32: unaligned 64-byte loads always straddle two cache lines, 8-float blocks
// waste fewer lanes on 7- and 56-wide maps, and the backward keeps 32 (with 64 it measured 16 %
// slower at 14x14, equal at 28x28, 8 % faster at 48x48 with a shared filter).

// Columns j0*s + jj*s of a row: a plain load at stride 1, a gather otherwise.
template <bool S1, int VB, typename T>
inline Vec<T, VB> vload_cols(const T* p, int64_t s) {
  if constexpr (S1) return vload<VB>(p);
  Vec<T, VB> v;
  for (int64_t jj = 0; jj < kJB<T, VB>; ++jj) v[jj] = p[jj * s];
  return v;
}

// The filter block the combine mode makes of channel factor `a` and spatial block `sv`.
template <int MODE, typename T, typename V>
inline V filt(T a, const V& sv) {
  if constexpr (MODE == kAdd) return a + sv;
  else if constexpr (MODE == kMul) return a * sv;
  else return sv;
}

// Work items per thread so that small inputs run on one thread: waking the pool costs more than
// a few tens of thousands of multiply-adds.
inline int64_t grain_for(int64_t madds_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, madds_per_item));
}

struct Geom {
  int64_t B, C, H, W, G, Bs, K, s, p, d, Ho, Wo;
  int64_t Wq, Wx, Wp, Hp;  // padded widths: output (whole blocks), reached input, buffer; height
  int64_t cpg() const { return C / G; }
  int64_t KK() const { return K * K; }
};

// The K*K spatial-filter rows of output row i, read in place: block j0 of tap k is at
// base(j0) + k * kstride(j0). The last, partial block is copied to `tail` [KK][JB] with zeros past
// Wo, so that no read leaves the tensor and the padding lanes hold zeros.
template <typename T, int VB>
struct FilterRows {
  const T* row;  // Sg + i * Wo
  int64_t HWo, Wo;
  const T* tail;
  const T* base(int64_t j0) const { return j0 + kJB<T, VB> <= Wo ? row + j0 : tail; }
  int64_t kstride(int64_t j0) const { return j0 + kJB<T, VB> <= Wo ? HWo : kJB<T, VB>; }
};

template <int VB, typename T>
FilterRows<T, VB> filter_rows(const Geom& g, const T* Sg, int64_t i, T* tail) {
  constexpr int64_t JB = kJB<T, VB>;
  const int64_t HWo = g.Ho * g.Wo, j0 = g.Wo / JB * JB;
  if (j0 < g.Wo)
    for (int64_t k = 0; k < g.KK(); ++k)
      for (int64_t jj = 0; jj < JB; ++jj)
        tail[k * JB + jj] = j0 + jj < g.Wo ? Sg[k * HWo + i * g.Wo + j0 + jj] : T(0);
  return {Sg + i * g.Wo, HWo, g.Wo, tail};
}

// Copies the H x W planes q0 + cc*qs (cc < n) into the padded planes xp [n][Hp][Wp] at offset
// (p, p). The borders are never written, so they stay zero from allocation.
template <typename T>
void load_padded_planes(const Geom& g, const T* x, int64_t q0, int64_t qs, int64_t n, T* xp) {
  for (int64_t cc = 0; cc < n; ++cc)
    for (int64_t y = 0; y < g.H; ++y)
      copy_row(x + ((q0 + cc * qs) * g.H + y) * g.W, g.W,
                  xp + (cc * g.Hp + y + g.p) * g.Wp + g.p);
}

// The channel-filter factors A[q0 + cc*qs, :] of the planes cc < n, as the rows of dst [n][KK].
template <typename T>
void load_channel_factors(const T* A, int64_t q0, int64_t qs, int64_t n, int64_t KK, T* dst) {
  for (int64_t cc = 0; cc < n; ++cc) std::copy_n(A + (q0 + cc * qs) * KK, KK, dst + cc * KK);
}

// Forward of the planes q0 + t*qs (t < n), which share the spatial-filter slice Sg, all output
// rows. CB planes at a time share each load of the spatial filter and give CB independent
// accumulator chains.
template <typename T, int VB, int MODE, bool S1, int CB>
void forward_chunk(const Geom& g, const T* x, const T* Sg, const T* A, T* out, int64_t q0,
                   int64_t qs, int64_t n, T* tail, T* xp) {
  constexpr int64_t JB = kJB<T, VB>;
  const int64_t KK = g.KK(), s = S1 ? 1 : g.s, plane = g.Hp * g.Wp;
  load_padded_planes(g, x, q0, qs, n, xp);
  std::vector<T> a(n * KK, T(1));  // channel-filter factors, [n][KK]
  if (MODE != kPlain) load_channel_factors(A, q0, qs, n, KK, a.data());
  for (int64_t i = 0; i < g.Ho; ++i) {
    const FilterRows<T, VB> fr = filter_rows<VB>(g, Sg, i, tail);
    for (int64_t cc = 0; cc < n; cc += CB) {
      const T* ac = a.data() + cc * KK;
      const T* xrow = xp + cc * plane + i * g.s * g.Wp;
      // JT blocks of CB channels at a time: CB * JT independent accumulator chains hide the
      // multiply-add latency; JT > 1 only over whole blocks, which are read in place.
      auto tile = [&](auto jt, int64_t j0) {
        constexpr int JT = decltype(jt)::value;
        Vec<T, VB> acc[CB][JT] = {};
        const T* sb = fr.base(j0);
        const int64_t ks = fr.kstride(j0);
        for (int64_t kh = 0, k = 0; kh < g.K; ++kh)
          for (int64_t kw = 0; kw < g.K; ++kw, ++k) {
            const T* xk = xrow + kh * g.d * g.Wp + j0 * s + kw * g.d;
            for (int u = 0; u < JT; ++u) {
              const Vec<T, VB> sv = vload<VB>(sb + k * ks + u * JB);
              for (int t = 0; t < CB; ++t)
                acc[t][u] += filt<MODE>(ac[t * KK + k], sv) *
                             vload_cols<S1, VB>(xk + t * plane + u * JB * s, s);
            }
          }
        for (int t = 0; t < CB; ++t) {
          T* o = out + ((q0 + (cc + t) * qs) * g.Ho + i) * g.Wo;
          for (int u = 0; u < JT; ++u) {
            const int64_t j = j0 + u * JB;
            if (j + JB <= g.Wo) vstore<VB>(o + j, acc[t][u]);
            else for (int64_t jj = 0; j + jj < g.Wo; ++jj) o[j + jj] = acc[t][u][jj];
          }
        }
      };
      constexpr int JT = CB >= 4 ? 2 : 4;
      int64_t j0 = 0;
      for (; j0 + JT * JB <= g.Wo; j0 += JT * JB) tile(std::integral_constant<int, JT>{}, j0);
      for (; j0 < g.Wq; j0 += JB) tile(std::integral_constant<int, 1>{}, j0);
    }
  }
}

// Backward of the planes q0 + t*qs (t < n), which share the spatial-filter slice Sg. gSg points at
// the slice of the spatial-filter gradient they accumulate into (`first`: overwrites it instead).
// Per output row, CB planes at a time: each tap's block of grad_out * x feeds grad S (summed
// over the CB planes in registers, then into the row buffer gSr) and grad A (per-lane partials
// dacc). grad x at stride 1 is a gather: the rows P[k] = F_k * grad_out of all taps are stored
// first, then summed, shifted by (kh*d, kw*d), into the padded grad-x rows. Shifted loads of
// freshly stored data would stall store-to-load forwarding, hence the two passes; other strides
// scatter lane by lane.
template <typename T, int VB, int MODE, bool S1, int CB>
void backward_chunk(const Geom& g, const T* x, const T* Sg, const T* A, const T* go, T* gx,
                    T* gSg, T* gA, int64_t q0, int64_t qs, int64_t n, bool first, T* buf,
                    T* xp) {
  constexpr int64_t JB = kJB<T, VB>;
  const int64_t KK = g.KK(), HWo = g.Ho * g.Wo, plane = g.Hp * g.Wp;
  const int64_t s = S1 ? 1 : g.s, M = (g.K - 1) * g.d, PW = M + g.Wx;
  T* tail = buf;                     // [KK][JB]
  T* gSr = tail + KK * JB;           // [KK][Wq] grad S of this output row, summed over channels
  T* gor = gSr + KK * g.Wq;          // [CB][Wq] grad_out rows, zero past Wo
  T* P = gor + CB * g.Wq;            // [CB][KK][M + Wx] F * grad_out, zero margins
  T* dacc = P + CB * KK * PW;        // [n][KK][JB] per-lane partial sums for grad A
  T* gxp = dacc + n * KK * JB;       // [n][Hp][Wp] padded grad-x planes
  T* av = gxp + n * plane;           // [n][KK] channel-filter factors
  // gor past Wo and P outside [M, M + Wq) are never written: zero from the thread's allocation
  std::fill(dacc, gxp + n * plane, T(0));
  std::fill(av, av + n * KK, T(1));
  if (MODE != kPlain) load_channel_factors(A, q0, qs, n, KK, av);
  load_padded_planes(g, x, q0, qs, n, xp);
  for (int64_t i = 0; i < g.Ho; ++i) {
    const FilterRows<T, VB> fr = filter_rows<VB>(g, Sg, i, tail);
    std::fill(gSr, gSr + KK * g.Wq, T(0));
    for (int64_t cc = 0; cc < n; cc += CB) {
      for (int t = 0; t < CB; ++t)
        copy_row(go + ((q0 + (cc + t) * qs) * g.Ho + i) * g.Wo, g.Wo, gor + t * g.Wq);
      for (int64_t kh = 0; kh < g.K; ++kh) {
        const int64_t row = cc * plane + (i * g.s + kh * g.d) * g.Wp;
        for (int64_t kw = 0; kw < g.K; ++kw) {
          const int64_t k = kh * g.K + kw;
          T ak[CB];
          Vec<T, VB> dsum[CB];
          for (int t = 0; t < CB; ++t) {
            ak[t] = av[(cc + t) * KK + k];
            dsum[t] = vload<VB>(dacc + ((cc + t) * KK + k) * JB);
          }
          for (int64_t j0 = 0; j0 < g.Wq; j0 += JB) {
            const Vec<T, VB> sv = vload<VB>(fr.base(j0) + k * fr.kstride(j0));
            Vec<T, VB> gs = vload<VB>(gSr + k * g.Wq + j0);
            for (int t = 0; t < CB; ++t) {
              const Vec<T, VB> gv = vload<VB>(gor + t * g.Wq + j0);
              const Vec<T, VB> prod = gv * vload_cols<S1, VB>(xp + row + t * plane + j0 * s + kw * g.d, s);
              if constexpr (MODE == kMul) {
                gs += ak[t] * prod;
                dsum[t] += sv * prod;
              } else {
                gs += prod;
                if constexpr (MODE == kAdd) dsum[t] += prod;
              }
              const Vec<T, VB> f = filt<MODE>(ak[t], sv) * gv;
              if constexpr (S1) vstore<VB>(P + (t * KK + k) * PW + M + j0, f);
              else
                for (int64_t jj = 0; jj < JB; ++jj)
                  gxp[row + t * plane + (j0 + jj) * s + kw * g.d] += f[jj];
            }
            vstore<VB>(gSr + k * g.Wq + j0, gs);
          }
          for (int t = 0; t < CB; ++t) vstore<VB>(dacc + ((cc + t) * KK + k) * JB, dsum[t]);
        }
      }
      if constexpr (S1)
        for (int t = 0; t < CB; ++t)
          for (int64_t kh = 0; kh < g.K; ++kh) {
            T* gxrow = gxp + (cc + t) * plane + (i * g.s + kh * g.d) * g.Wp;
            const T* Pk = P + (t * KK + kh * g.K) * PW + M;
            // four blocks at a time: independent add chains instead of one latency-bound chain
            auto gather = [&](auto nb, int64_t X0) {
              constexpr int NB = decltype(nb)::value;
              Vec<T, VB> acc[NB];
              for (int u = 0; u < NB; ++u) acc[u] = vload<VB>(gxrow + X0 + u * JB);
              for (int64_t kw = 0; kw < g.K; ++kw)
                for (int u = 0; u < NB; ++u) acc[u] += vload<VB>(Pk + kw * PW + X0 + u * JB - kw * g.d);
              for (int u = 0; u < NB; ++u) vstore<VB>(gxrow + X0 + u * JB, acc[u]);
            };
            int64_t X0 = 0;
            for (; X0 + 4 * JB <= g.Wx; X0 += 4 * JB) gather(std::integral_constant<int, 4>{}, X0);
            // the last 1-3 blocks together too: one block alone is a latency-bound chain of K adds
            switch ((g.Wx - X0) / JB) {
              case 3: gather(std::integral_constant<int, 3>{}, X0); break;
              case 2: gather(std::integral_constant<int, 2>{}, X0); break;
              case 1: gather(std::integral_constant<int, 1>{}, X0); break;
              default: break;
            }
          }
    }
    for (int64_t k = 0; k < KK; ++k) {
      T* dst = gSg + k * HWo + i * g.Wo;
      const T* src = gSr + k * g.Wq;
      if (first) copy_row(src, g.Wo, dst);
      else for (int64_t j = 0; j < g.Wo; ++j) dst[j] += src[j];
    }
  }
  for (int64_t cc = 0; cc < n; ++cc) {
    for (int64_t y = 0; y < g.H; ++y)
      copy_row(gxp + cc * plane + (y + g.p) * g.Wp + g.p, g.W,
                  gx + ((q0 + cc * qs) * g.H + y) * g.W);
    if (MODE != kPlain)
      for (int64_t k = 0; k < KK; ++k) {
        double sum = 0;
        for (int64_t jj = 0; jj < JB; ++jj) sum += dacc[(cc * KK + k) * JB + jj];
        gA[(q0 + cc * qs) * KK + k] = T(sum);
      }
  }
}

template <typename T, int VB>
Geom make_geom(const at::Tensor& x, const at::Tensor& S, int64_t K, int64_t s, int64_t p,
               int64_t d) {
  Geom g{x.size(0), x.size(1), x.size(2), x.size(3), S.size(1), S.size(0), K, s, p, d,
         S.size(3), S.size(4)};
  constexpr int64_t JB = kJB<T, VB>;
  g.Wq = (g.Wo + JB - 1) / JB * JB;
  g.Wx = ((g.Wq - 1) * s + (K - 1) * d + 1 + JB - 1) / JB * JB;
  g.Wp = std::max(g.p + g.W, g.Wx);
  g.Hp = std::max(g.p + g.H, (g.Ho - 1) * s + (K - 1) * d + 1);
  return g;
}

// The kernels index raw memory, so every shape they rely on is checked here.
void check_inputs(const at::Tensor& x, const at::Tensor& S, const at::Tensor& A, int64_t mode,
                  int64_t K, int64_t s, int64_t p, int64_t d) {
  TORCH_CHECK(x.device().is_cpu() && S.device().is_cpu(), "native pixel_filter: CPU tensors only");
  TORCH_CHECK(x.dim() == 4 && S.dim() == 5, "native pixel_filter: x must be 4-d and spatial 5-d");
  TORCH_CHECK(x.is_contiguous() && S.is_contiguous(), "native pixel_filter: contiguous inputs only");
  TORCH_CHECK(x.scalar_type() == S.scalar_type(), "native pixel_filter: x and spatial dtypes differ");
  TORCH_CHECK(K >= 1 && s >= 1 && d >= 1 && p >= 0,
              "native pixel_filter: needs kernel_size, stride, dilation >= 1 and padding >= 0");
  const int64_t B = x.size(0), C = x.size(1), G = S.size(1);
  const int64_t Ho = (x.size(2) + 2 * p - d * (K - 1) - 1) / s + 1;
  const int64_t Wo = (x.size(3) + 2 * p - d * (K - 1) - 1) / s + 1;
  TORCH_CHECK((S.size(0) == 1 || S.size(0) == B) && G >= 1 && C % G == 0 && S.size(2) == K * K &&
                  S.size(3) == Ho && S.size(4) == Wo && Ho >= 1 && Wo >= 1,
              "native pixel_filter: spatial filter shape does not fit the input and geometry");
  if (mode != kPlain)
    TORCH_CHECK(A.is_contiguous() && A.scalar_type() == x.scalar_type() && A.dim() == 3 &&
                    A.size(0) == B && A.size(1) == C && A.size(2) == K * K,
                "native pixel_filter: channel filter must be contiguous (B, C, K*K) of x's dtype");
}

// Work items are chunks of up to kChunk planes that share a filter slice (see the top of the
// file); they write disjoint outputs.
template <typename T, int VB, int MODE, bool S1>
struct Fwd {
  static void run(const at::Tensor& x, const at::Tensor& S, const at::Tensor& A, at::Tensor& out,
                  int64_t K, int64_t s, int64_t p, int64_t d) {
    const Geom g = make_geom<T, VB>(x, S, K, s, p, d);
    const T* xp = x.data_ptr<T>();
    const T* Sp = S.data_ptr<T>();
    const T* Ap = MODE == kPlain ? nullptr : A.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const int64_t cpg = g.cpg(), slice = g.KK() * g.Ho * g.Wo;
    const bool shared = g.Bs == 1 && g.B > 1;
    // the planes q0 + t*qs (t < m) through 4-plane lanes when they fill them
    auto chunk = [&](const T* Sg, int64_t q0, int64_t qs, int64_t m, T* tail, T* planes) {
      if (m % 4 == 0) forward_chunk<T, VB, MODE, S1, 4>(g, xp, Sg, Ap, op, q0, qs, m, tail, planes);
      else forward_chunk<T, VB, MODE, S1, 1>(g, xp, Sg, Ap, op, q0, qs, m, tail, planes);
    };
    if (shared && cpg == 1) {
      // One channel per group (TVConv): a work item takes up to kChunk samples of one channel, which
      // all read the channel's filter slice (plane ids b*C + c: stride C).
      const int64_t n = std::min(g.B, kChunk), items = (g.B + n - 1) / n;
      at::parallel_for(0, g.G * items, grain_for(n * g.Ho * g.Wq * g.KK()), [&](int64_t u0, int64_t u1) {
        std::vector<T> tail(g.KK() * kJB<T, VB>), planes(n * g.Hp * g.Wp, T(0));
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t c = u / items, b0 = u % items * n, m = std::min(n, g.B - b0);
          chunk(Sp + c * slice, b0 * g.C + c, g.C, m, tail.data(), planes.data());
        }
      });
      return;
    }
    const int64_t n = std::min(cpg, kChunk), per_group = (cpg + n - 1) / n;
    const int64_t grain = grain_for(n * g.Ho * g.Wq * g.KK());
    at::parallel_for(0, g.B * g.G * per_group, grain, [&](int64_t u0, int64_t u1) {
      std::vector<T> tail(g.KK() * kJB<T, VB>), planes(n * g.Hp * g.Wp, T(0));
      for (int64_t u = u0; u < u1; ++u) {
        // a shared filter: group-major, so a thread's consecutive items reuse one filter slice
        const int64_t b = shared ? u / per_group % g.B : u / (g.G * per_group);
        const int64_t gr = shared ? u / (g.B * per_group) : u / per_group % g.G;
        const int64_t c0 = gr * cpg + u % per_group * n, m = std::min(n, (gr + 1) * cpg - c0);
        const T* Sg = Sp + ((g.Bs == 1 ? 0 : b) * g.G + gr) * slice;
        chunk(Sg, b * g.C + c0, 1, m, tail.data(), planes.data());
      }
    });
  }
};

// Work items are (chunk, group) pairs; a chunk is a range of samples whose spatial-filter
// gradient goes to its own slice of gSbuf. With a per-sample filter a chunk is one sample and
// gSbuf is the gradient itself; with a shared filter (Bs == 1) the samples form as few chunks as
// keep every thread busy, and their partial gradients are summed afterwards; a chunk of
// one-channel groups sends its samples through the lanes together.
template <typename T, int VB, int MODE, bool S1>
struct Bwd {
  static void run(const at::Tensor& x, const at::Tensor& S, const at::Tensor& A,
                  const at::Tensor& go, at::Tensor& gx, at::Tensor& gSbuf, at::Tensor& gA,
                  int64_t nchunk, int64_t K, int64_t s, int64_t p, int64_t d) {
    const Geom g = make_geom<T, VB>(x, S, K, s, p, d);
    const T* xp = x.data_ptr<T>();
    const T* Sp = S.data_ptr<T>();
    const T* Ap = MODE == kPlain ? nullptr : A.data_ptr<T>();
    const T* gop = go.data_ptr<T>();
    T* gxp = gx.data_ptr<T>();
    T* gSp = gSbuf.data_ptr<T>();
    T* gAp = MODE == kPlain ? nullptr : gA.data_ptr<T>();
    const int64_t KK = g.KK(), slice = KK * g.Ho * g.Wo, cpg = g.cpg();
    const bool lanes_over_samples = g.Bs == 1 && cpg == 1;  // one-channel groups, shared filter
    const int64_t n = std::min(lanes_over_samples ? (g.B + nchunk - 1) / nchunk : cpg, kChunk);
    const int64_t grain = grain_for((g.B / nchunk) * cpg * g.Ho * g.Wq * KK);
    at::parallel_for(0, nchunk * g.G, grain, [&](int64_t u0, int64_t u1) {
      std::vector<T> buf(KK * kJB<T, VB> + KK * g.Wq + 4 * g.Wq + 4 * KK * ((g.K - 1) * d + g.Wx) +
                         n * KK * kJB<T, VB> + n * g.Hp * g.Wp + n * KK);
      std::vector<T> planes(n * g.Hp * g.Wp, T(0));
      // the planes q0 + t*qs (t < m) through 4-plane lanes when they fill them
      auto planes_bwd = [&](const T* Sg, T* gSg, int64_t q0, int64_t qs, int64_t m, bool first) {
        if (m % 4 == 0)
          backward_chunk<T, VB, MODE, S1, 4>(g, xp, Sg, Ap, gop, gxp, gSg, gAp, q0, qs, m, first, buf.data(),
                                             planes.data());
        else
          backward_chunk<T, VB, MODE, S1, 1>(g, xp, Sg, Ap, gop, gxp, gSg, gAp, q0, qs, m, first, buf.data(),
                                             planes.data());
      };
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t chunk = u / g.G, gr = u % g.G;
        T* gSg = gSp + (chunk * g.G + gr) * slice;
        const int64_t b0 = chunk * g.B / nchunk, b1 = (chunk + 1) * g.B / nchunk;
        if (lanes_over_samples) {  // the chunk's samples of channel gr go through the lanes together
          const T* Sg = Sp + gr * slice;
          for (int64_t b = b0; b < b1; b += n) {
            planes_bwd(Sg, gSg, b * g.C + gr, g.C, std::min(n, b1 - b), b == b0);
          }
          continue;
        }
        for (int64_t b = b0; b < b1; ++b) {
          const T* Sg = Sp + ((g.Bs == 1 ? 0 : b) * g.G + gr) * slice;
          for (int64_t c0 = gr * cpg; c0 < (gr + 1) * cpg; c0 += n) {
            planes_bwd(Sg, gSg, b * g.C + c0, 1, std::min(n, (gr + 1) * cpg - c0), b == b0 && c0 == gr * cpg);
          }
        }
      }
    });
  }
};

// 64-byte forward blocks where they cover an output row with no more lanes than 32-byte ones
// (float only: in double the 32-byte variant is kept, to bound the build time).
inline bool wide_blocks(at::ScalarType dt, int64_t Wo) {
  return dt == at::kFloat && Wo > 8 && (Wo + 15) / 16 * 16 == (Wo + 7) / 8 * 8;
}

// Calls F<T, VB, MODE, S1>::run with the compile-time parameters chosen at run time.
template <template <typename, int, int, bool> class F, typename... Args>
void dispatch(at::ScalarType dt, bool wide, int64_t mode, bool s1, Args&&... args) {
  AT_DISPATCH_FLOATING_TYPES(dt, "pixel_filter_native", [&] {
    auto with_mode = [&](auto m) {
      constexpr int M = decltype(m)::value;
      if constexpr (std::is_same_v<scalar_t, float>)
        if (wide) {
          if (s1) F<scalar_t, 64, M, true>::run(args...);
          else F<scalar_t, 64, M, false>::run(args...);
          return;
        }
      if (s1) F<scalar_t, 32, M, true>::run(args...);
      else F<scalar_t, 32, M, false>::run(args...);
    };
    if (mode == kMul) with_mode(std::integral_constant<int, kMul>{});
    else if (mode == kAdd) with_mode(std::integral_constant<int, kAdd>{});
    else with_mode(std::integral_constant<int, kPlain>{});
  });
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& S, const at::Tensor& A, int64_t mode,
                   int64_t K, int64_t s, int64_t p, int64_t d) {
  check_inputs(x, S, A, mode, K, s, p, d);
  at::Tensor out = at::empty({x.size(0), x.size(1), S.size(3), S.size(4)}, x.options());
  dispatch<Fwd>(x.scalar_type(), wide_blocks(x.scalar_type(), S.size(4)), mode, s == 1, x, S, A, out, K, s, p, d);
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& go, const at::Tensor& x, const at::Tensor& S,
                                 const at::Tensor& A, int64_t mode, int64_t K, int64_t s,
                                 int64_t p, int64_t d) {
  check_inputs(x, S, A, mode, K, s, p, d);
  TORCH_CHECK(go.is_contiguous() && go.scalar_type() == x.scalar_type() &&
                  go.sizes() == at::IntArrayRef({x.size(0), x.size(1), S.size(3), S.size(4)}),
              "native pixel_filter: grad_output must be contiguous, of x's dtype and the output's shape");
  const int64_t B = x.size(0), Bs = S.size(0), G = S.size(1), threads = at::get_num_threads();
  if (B == 0)  // an empty batch: no work to split, zero filter gradients
    return {at::empty_like(x), at::zeros_like(S), mode == kPlain ? at::Tensor() : at::zeros_like(A)};
  const int64_t nchunk = Bs == B ? B : (G >= threads ? 1 : std::min(B, threads));
  at::Tensor gx = at::empty_like(x);  // every element is written once
  // Every slice is written first by one work item and then accumulated, so no zero-fill.
  at::Tensor gSbuf = at::empty({nchunk, G, S.size(2), S.size(3), S.size(4)}, S.options());
  at::Tensor gA = mode == kPlain ? at::Tensor() : at::empty_like(A);
  dispatch<Bwd>(x.scalar_type(), false, mode, s == 1, x, S, A, go, gx, gSbuf, gA, nchunk, K, s, p, d);
  at::Tensor gS = nchunk == Bs ? gSbuf : gSbuf.sum(0, /*keepdim=*/true);
  return {gx, gS, gA};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "pixel_filter forward (CPU)");
  m.def("backward", &backward, "pixel_filter backward: grad x, grad spatial, grad channel (CPU)");
}
