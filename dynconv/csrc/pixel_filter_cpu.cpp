// CPU kernels for the pixel_filter primitive (DESIGN.md "The one idea"):
//
//   out[b,c,i,j] = sum_k F[b,c,k,i,j] * x[b, c, i*s - p + kh*d, j*s - p + kw*d]   (zero padding)
//   F = S[bs, g(c), k, i, j]                 (no channel filter)
//   F = A[b, c, k] * S[bs, g(c), k, i, j]    ("mul", DDF)   or   A[b, c, k] + S[...]   ("add")
//
// k = kh*K + kw, g(c) = c / (C/G), bs = b if S has a batch dimension of B, else 0 (TVConv).
//
// Nothing of size (B, C*K*K, Ho, Wo) is ever built. Layout of the work:
// - Output columns go in blocks of JB (one 32-byte vector) with a compile-time trip count, so a
//   block stays in registers across the K*K taps and no remainder loops are emitted. The input
//   planes of up to kChunk channels are copied into zero-padded thread-local planes (L2-sized),
//   so the tap loops need no bounds checks; the spatial filter is read in place, except the last,
//   partial block of a row, which is copied with zero padding.
// - Channels go CB = 4 at a time where the group allows: they share every load of the spatial
//   filter and give independent accumulator chains.
// - Forward: one work item per (sample, chunk of a group's channels).
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

namespace {

enum Combine : int { kPlain = 0, kMul = 1, kAdd = 2 };
constexpr int64_t kChunk = 16;  // channels whose padded planes a work item holds at once
constexpr int kVecBytes = 32;

// One block of output columns as a GCC/Clang vector: it stays in registers across the
// taps. 32 bytes, not 64: unaligned 64-byte loads always straddle two cache lines, and blocks of 8
// floats waste fewer lanes on the 7-, 14-, 28- and 56-wide maps of the ResNet stages.
// Loads and stores go through an element-aligned vector type rather than memcpy: typed accesses
// let the compiler keep the geometry in registers (a memcpy store may alias anything).
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kVecBytes)));
  typedef T unaligned __attribute__((vector_size(kVecBytes), aligned(sizeof(T))));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kJB = kVecBytes / sizeof(T);

template <typename T>
inline Vec<T> vload(const T* p) { return *reinterpret_cast<const typename VecOf<T>::unaligned*>(p); }
template <typename T>
inline void vstore(T* p, const Vec<T>& v) { *reinterpret_cast<typename VecOf<T>::unaligned*>(p) = v; }
// Columns j0*s + jj*s of a row: a plain load at stride 1, a gather otherwise.
template <bool S1, typename T>
inline Vec<T> vload_cols(const T* p, int64_t s) {
  if constexpr (S1) return vload(p);
  Vec<T> v;
  for (int64_t jj = 0; jj < kJB<T>; ++jj) v[jj] = p[jj * s];
  return v;
}

// The filter block the combine mode makes of channel factor `a` and spatial block `sv`.
template <int MODE, typename T>
inline Vec<T> filt(T a, const Vec<T>& sv) {
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
template <typename T>
struct FilterRows {
  const T* row;  // Sg + i * Wo
  int64_t HWo, Wo;
  const T* tail;
  const T* base(int64_t j0) const { return j0 + kJB<T> <= Wo ? row + j0 : tail; }
  int64_t kstride(int64_t j0) const { return j0 + kJB<T> <= Wo ? HWo : kJB<T>; }
};

template <typename T>
FilterRows<T> filter_rows(const Geom& g, const T* Sg, int64_t i, T* tail) {
  constexpr int64_t JB = kJB<T>;
  const int64_t HWo = g.Ho * g.Wo, j0 = g.Wo / JB * JB;
  if (j0 < g.Wo)
    for (int64_t k = 0; k < g.KK(); ++k)
      for (int64_t jj = 0; jj < JB; ++jj)
        tail[k * JB + jj] = j0 + jj < g.Wo ? Sg[k * HWo + i * g.Wo + j0 + jj] : T(0);
  return {Sg + i * g.Wo, HWo, g.Wo, tail};
}

// Copies the H x W planes of channels [c0, c0 + n) of sample b into the padded planes xp
// [n][Hp][Wp] at offset (p, p). The borders are never written, so they stay zero from allocation.
template <typename T>
void load_padded_planes(const Geom& g, const T* x, int64_t b, int64_t c0, int64_t n, T* xp) {
  for (int64_t cc = 0; cc < n; ++cc)
    for (int64_t y = 0; y < g.H; ++y)
      std::copy_n(x + ((b * g.C + c0 + cc) * g.H + y) * g.W, g.W,
                  xp + (cc * g.Hp + y + g.p) * g.Wp + g.p);
}

// Forward of channels [c0, c0 + n) of sample b, all output rows. CB channels at a time share
// each load of the spatial filter and give CB independent accumulator chains.
template <typename T, int MODE, bool S1, int CB>
void forward_chunk(const Geom& g, const T* x, const T* Sg, const T* A, T* out, int64_t b,
                   int64_t c0, int64_t n, T* tail, T* xp) {
  constexpr int64_t JB = kJB<T>;
  const int64_t KK = g.KK(), s = S1 ? 1 : g.s, plane = g.Hp * g.Wp;
  load_padded_planes(g, x, b, c0, n, xp);
  std::vector<T> a(n * KK, T(1));  // channel-filter factors, [n][KK]
  if (MODE != kPlain) std::copy_n(A + (b * g.C + c0) * KK, n * KK, a.data());
  for (int64_t i = 0; i < g.Ho; ++i) {
    const FilterRows<T> fr = filter_rows(g, Sg, i, tail);
    for (int64_t cc = 0; cc < n; cc += CB) {
      const T* ac = a.data() + cc * KK;
      const T* xrow = xp + cc * plane + i * g.s * g.Wp;
      // JT blocks of CB channels at a time: CB * JT independent accumulator chains hide the
      // multiply-add latency; JT > 1 only over whole blocks, which are read in place.
      auto tile = [&](auto jt, int64_t j0) {
        constexpr int JT = decltype(jt)::value;
        Vec<T> acc[CB][JT] = {};
        const T* sb = fr.base(j0);
        const int64_t ks = fr.kstride(j0);
        for (int64_t kh = 0, k = 0; kh < g.K; ++kh)
          for (int64_t kw = 0; kw < g.K; ++kw, ++k) {
            const T* xk = xrow + kh * g.d * g.Wp + j0 * s + kw * g.d;
            for (int u = 0; u < JT; ++u) {
              const Vec<T> sv = vload(sb + k * ks + u * JB);
              for (int t = 0; t < CB; ++t)
                acc[t][u] += filt<MODE>(ac[t * KK + k], sv) *
                             vload_cols<S1>(xk + t * plane + u * JB * s, s);
            }
          }
        for (int t = 0; t < CB; ++t) {
          T* o = out + ((b * g.C + c0 + cc + t) * g.Ho + i) * g.Wo;
          for (int u = 0; u < JT; ++u) {
            const int64_t j = j0 + u * JB;
            if (j + JB <= g.Wo) vstore(o + j, acc[t][u]);
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

// Backward of channels [c0, c0 + n) of group gr of sample b. gSg points at the group's slice of
// the spatial-filter gradient this sample accumulates into (`first`: overwrites it instead).
// Per output row, CB channels at a time: each tap's block of grad_out * x feeds grad S (summed
// over the CB channels in registers, then into the row buffer gSr) and grad A (per-lane partials
// dacc). grad x at stride 1 is a gather: the rows P[k] = F_k * grad_out of all taps are stored
// first, then summed, shifted by (kh*d, kw*d), into the padded grad-x rows. Shifted loads of
// freshly stored data would stall store-to-load forwarding, hence the two passes; other strides
// scatter lane by lane.
template <typename T, int MODE, bool S1, int CB>
void backward_chunk(const Geom& g, const T* x, const T* Sg, const T* A, const T* go, T* gx,
                    T* gSg, T* gA, int64_t b, int64_t c0, int64_t n, bool first, T* buf,
                    T* xp) {
  constexpr int64_t JB = kJB<T>;
  const int64_t KK = g.KK(), HWo = g.Ho * g.Wo, plane = g.Hp * g.Wp;
  const int64_t s = S1 ? 1 : g.s, M = (g.K - 1) * g.d, PW = M + g.Wx;
  T* tail = buf;                     // [KK][JB]
  T* gSr = tail + KK * JB;           // [KK][Wq] grad S of this output row, summed over channels
  T* gor = gSr + KK * g.Wq;          // [CB][Wq] grad_out rows, zero past Wo
  T* P = gor + CB * g.Wq;            // [CB][KK][M + Wx] F * grad_out, zero margins
  T* dacc = P + CB * KK * PW;        // [n][KK][JB] per-lane partial sums for grad A
  T* gxp = dacc + n * KK * JB;       // [n][Hp][Wp] padded grad-x planes
  T* av = gxp + n * plane;           // [n][KK] channel-filter factors
  std::fill(gor, gxp + n * plane, T(0));
  std::fill(av, av + n * KK, T(1));
  if (MODE != kPlain) std::copy_n(A + (b * g.C + c0) * KK, n * KK, av);
  load_padded_planes(g, x, b, c0, n, xp);
  for (int64_t i = 0; i < g.Ho; ++i) {
    const FilterRows<T> fr = filter_rows(g, Sg, i, tail);
    std::fill(gSr, gSr + KK * g.Wq, T(0));
    for (int64_t cc = 0; cc < n; cc += CB) {
      for (int t = 0; t < CB; ++t)
        std::copy_n(go + ((b * g.C + c0 + cc + t) * g.Ho + i) * g.Wo, g.Wo, gor + t * g.Wq);
      for (int64_t kh = 0; kh < g.K; ++kh) {
        const int64_t row = cc * plane + (i * g.s + kh * g.d) * g.Wp;
        for (int64_t kw = 0; kw < g.K; ++kw) {
          const int64_t k = kh * g.K + kw;
          T ak[CB];
          Vec<T> dsum[CB];
          for (int t = 0; t < CB; ++t) {
            ak[t] = av[(cc + t) * KK + k];
            dsum[t] = vload(dacc + ((cc + t) * KK + k) * JB);
          }
          for (int64_t j0 = 0; j0 < g.Wq; j0 += JB) {
            const Vec<T> sv = vload(fr.base(j0) + k * fr.kstride(j0));
            Vec<T> gs = vload(gSr + k * g.Wq + j0);
            for (int t = 0; t < CB; ++t) {
              const Vec<T> gv = vload(gor + t * g.Wq + j0);
              const Vec<T> prod = gv * vload_cols<S1>(xp + row + t * plane + j0 * s + kw * g.d, s);
              if constexpr (MODE == kMul) {
                gs += ak[t] * prod;
                dsum[t] += sv * prod;
              } else {
                gs += prod;
                if constexpr (MODE == kAdd) dsum[t] += prod;
              }
              const Vec<T> f = filt<MODE>(ak[t], sv) * gv;
              if constexpr (S1) vstore(P + (t * KK + k) * PW + M + j0, f);
              else
                for (int64_t jj = 0; jj < JB; ++jj)
                  gxp[row + t * plane + (j0 + jj) * s + kw * g.d] += f[jj];
            }
            vstore(gSr + k * g.Wq + j0, gs);
          }
          for (int t = 0; t < CB; ++t) vstore(dacc + ((cc + t) * KK + k) * JB, dsum[t]);
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
              Vec<T> acc[NB];
              for (int u = 0; u < NB; ++u) acc[u] = vload(gxrow + X0 + u * JB);
              for (int64_t kw = 0; kw < g.K; ++kw)
                for (int u = 0; u < NB; ++u) acc[u] += vload(Pk + kw * PW + X0 + u * JB - kw * g.d);
              for (int u = 0; u < NB; ++u) vstore(gxrow + X0 + u * JB, acc[u]);
            };
            int64_t X0 = 0;
            for (; X0 + 4 * JB <= g.Wx; X0 += 4 * JB) gather(std::integral_constant<int, 4>{}, X0);
            for (; X0 < g.Wx; X0 += JB) gather(std::integral_constant<int, 1>{}, X0);
          }
    }
    for (int64_t k = 0; k < KK; ++k) {
      T* dst = gSg + k * HWo + i * g.Wo;
      const T* src = gSr + k * g.Wq;
      if (first) std::copy_n(src, g.Wo, dst);
      else for (int64_t j = 0; j < g.Wo; ++j) dst[j] += src[j];
    }
  }
  for (int64_t cc = 0; cc < n; ++cc) {
    for (int64_t y = 0; y < g.H; ++y)
      std::copy_n(gxp + cc * plane + (y + g.p) * g.Wp + g.p, g.W,
                  gx + ((b * g.C + c0 + cc) * g.H + y) * g.W);
    if (MODE != kPlain)
      for (int64_t k = 0; k < KK; ++k) {
        double sum = 0;
        for (int64_t jj = 0; jj < JB; ++jj) sum += dacc[(cc * KK + k) * JB + jj];
        gA[(b * g.C + c0 + cc) * KK + k] = T(sum);
      }
  }
}

template <typename T>
Geom make_geom(const at::Tensor& x, const at::Tensor& S, int64_t K, int64_t s, int64_t p,
               int64_t d) {
  Geom g{x.size(0), x.size(1), x.size(2), x.size(3), S.size(1), S.size(0), K, s, p, d,
         S.size(3), S.size(4)};
  constexpr int64_t JB = kJB<T>;
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

// Work items are (sample, chunk of up to kChunk channels of one group); they write disjoint
// outputs.
template <typename T, int MODE, bool S1>
struct Fwd {
  static void run(const at::Tensor& x, const at::Tensor& S, const at::Tensor& A, at::Tensor& out,
                  int64_t K, int64_t s, int64_t p, int64_t d) {
    const Geom g = make_geom<T>(x, S, K, s, p, d);
    const T* xp = x.data_ptr<T>();
    const T* Sp = S.data_ptr<T>();
    const T* Ap = MODE == kPlain ? nullptr : A.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const int64_t cpg = g.cpg(), n = std::min(cpg, kChunk), per_group = (cpg + n - 1) / n;
    const int64_t slice = g.KK() * g.Ho * g.Wo;
    const int64_t grain = grain_for(n * g.Ho * g.Wq * g.KK());
    at::parallel_for(0, g.B * g.G * per_group, grain, [&](int64_t u0, int64_t u1) {
      std::vector<T> tail(g.KK() * kJB<T>), planes(n * g.Hp * g.Wp, T(0));
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / (g.G * per_group), gr = u / per_group % g.G;
        const int64_t c0 = gr * cpg + u % per_group * n, m = std::min(n, (gr + 1) * cpg - c0);
        const T* Sg = Sp + ((g.Bs == 1 ? 0 : b) * g.G + gr) * slice;
        if (m % 4 == 0) forward_chunk<T, MODE, S1, 4>(g, xp, Sg, Ap, op, b, c0, m, tail.data(), planes.data());
        else forward_chunk<T, MODE, S1, 1>(g, xp, Sg, Ap, op, b, c0, m, tail.data(), planes.data());
      }
    });
  }
};

// Work items are (chunk, group) pairs; a chunk is a range of samples whose spatial-filter
// gradient goes to its own slice of gSbuf. With a per-sample filter a chunk is one sample and
// gSbuf is the gradient itself; with a shared filter (Bs == 1) the samples form as few chunks as
// keep every thread busy, and their partial gradients are summed afterwards.
template <typename T, int MODE, bool S1>
struct Bwd {
  static void run(const at::Tensor& x, const at::Tensor& S, const at::Tensor& A,
                  const at::Tensor& go, at::Tensor& gx, at::Tensor& gSbuf, at::Tensor& gA,
                  int64_t nchunk, int64_t K, int64_t s, int64_t p, int64_t d) {
    const Geom g = make_geom<T>(x, S, K, s, p, d);
    const T* xp = x.data_ptr<T>();
    const T* Sp = S.data_ptr<T>();
    const T* Ap = MODE == kPlain ? nullptr : A.data_ptr<T>();
    const T* gop = go.data_ptr<T>();
    T* gxp = gx.data_ptr<T>();
    T* gSp = gSbuf.data_ptr<T>();
    T* gAp = MODE == kPlain ? nullptr : gA.data_ptr<T>();
    const int64_t KK = g.KK(), slice = KK * g.Ho * g.Wo, cpg = g.cpg();
    const int64_t n = std::min(cpg, kChunk);
    const int64_t grain = grain_for((g.B / nchunk) * cpg * g.Ho * g.Wq * KK);
    at::parallel_for(0, nchunk * g.G, grain, [&](int64_t u0, int64_t u1) {
      std::vector<T> buf(KK * kJB<T> + KK * g.Wq + 4 * g.Wq + 4 * KK * ((g.K - 1) * d + g.Wx) +
                         n * KK * kJB<T> + n * g.Hp * g.Wp + n * KK);
      std::vector<T> planes(n * g.Hp * g.Wp, T(0));
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t chunk = u / g.G, gr = u % g.G;
        T* gSg = gSp + (chunk * g.G + gr) * slice;
        const int64_t b0 = chunk * g.B / nchunk, b1 = (chunk + 1) * g.B / nchunk;
        for (int64_t b = b0; b < b1; ++b) {
          const T* Sg = Sp + ((g.Bs == 1 ? 0 : b) * g.G + gr) * slice;
          for (int64_t c0 = gr * cpg; c0 < (gr + 1) * cpg; c0 += n) {
            const int64_t m = std::min(n, (gr + 1) * cpg - c0);
            const bool first = b == b0 && c0 == gr * cpg;
            if (m % 4 == 0)
              backward_chunk<T, MODE, S1, 4>(g, xp, Sg, Ap, gop, gxp, gSg, gAp, b, c0, m, first,
                                             buf.data(), planes.data());
            else
              backward_chunk<T, MODE, S1, 1>(g, xp, Sg, Ap, gop, gxp, gSg, gAp, b, c0, m, first,
                                             buf.data(), planes.data());
          }
        }
      }
    });
  }
};

// Calls F<T, MODE, S1>::run with the compile-time parameters chosen at run time.
template <template <typename, int, bool> class F, typename... Args>
void dispatch(at::ScalarType dt, int64_t mode, bool s1, Args&&... args) {
  AT_DISPATCH_FLOATING_TYPES(dt, "pixel_filter_native", [&] {
    auto with_mode = [&](auto m) {
      constexpr int M = decltype(m)::value;
      if (s1) F<scalar_t, M, true>::run(args...);
      else F<scalar_t, M, false>::run(args...);
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
  dispatch<Fwd>(x.scalar_type(), mode, s == 1, x, S, A, out, K, s, p, d);
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
  const int64_t nchunk = Bs == B ? B : (G >= threads ? 1 : std::min(B, threads));
  at::Tensor gx = at::empty_like(x);  // every element is written once
  // Every slice is written first by one work item and then accumulated, so no zero-fill.
  at::Tensor gSbuf = at::empty({nchunk, G, S.size(2), S.size(3), S.size(4)}, S.options());
  at::Tensor gA = mode == kPlain ? at::Tensor() : at::empty_like(A);
  dispatch<Bwd>(x.scalar_type(), mode, s == 1, x, S, A, go, gx, gSbuf, gA, nchunk, K, s, p, d);
  at::Tensor gS = nchunk == Bs ? gSbuf : gSbuf.sum(0, /*keepdim=*/true);
  return {gx, gS, gA};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "pixel_filter forward (CPU)");
  m.def("backward", &backward, "pixel_filter backward: grad x, grad spatial, grad channel (CPU)");
}
