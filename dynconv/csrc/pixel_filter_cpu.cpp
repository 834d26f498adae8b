// CPU kernels for the pixel_filter primitive (DESIGN.md "The one idea"):
//
//   out[b,c,i,j] = sum_k F[b,c,k,i,j] * x[b, c, i*s - p + kh*d, j*s - p + kw*d]   (zero padding)
//   F = S[bs, g(c), k, i, j]                 (no channel filter)
//   F = A[b, c, k] * S[bs, g(c), k, i, j]    ("mul", DDF)   or   A[b, c, k] + S[...]   ("add")
//
// k = kh*K + kw, g(c) = c / (C/G), bs = b if S has a batch dimension of B, else 0 (TVConv).
//
// Nothing of size (B, C*K*K, Ho, Wo) is ever built. Layout of the work:
// - Output columns are processed in blocks of JB (one 64-byte vector) with a compile-time trip
//   count, so the compiler keeps a block in registers across the K*K taps and emits no remainder
//   loops. Rows are padded to a whole number of blocks in small thread-local buffers: the K*K
//   spatial-filter rows of one output row (copied once, then reused by every channel of the group)
//   and zero-padded copies of the input rows, so the tap loops need no bounds checks.
// - Forward: one work item per output row (b, g, i).
// - Backward: one work item per (sample chunk, group); channels go in chunks of up to kChunk whose
//   padded x and grad-x planes stay in L2. grad x is the transposed gather (a shifted add into the
//   padded grad-x plane), grad S sums over the group's channels in a row buffer, grad A sums over
//   pixels in per-lane partials that are reduced (in double) once per channel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

enum Combine : int { kPlain = 0, kMul = 1, kAdd = 2 };
constexpr int64_t kChunk = 16;  // channels whose padded planes a backward item holds at once

// One 64-byte block of output columns as a GCC/Clang vector: it stays in registers across the
// taps (the compiler splits it into two halves on AVX2-only machines).
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kJB = 64 / sizeof(T);

template <typename T>
inline Vec<T> vload(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
inline void vstore(T* p, const Vec<T>& v) { std::memcpy(p, &v, sizeof v); }
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
      for (int64_t j0 = 0; j0 < g.Wq; j0 += JB) {
        Vec<T> acc[CB] = {};
        const T* sb = fr.base(j0);
        const int64_t ks = fr.kstride(j0);
        for (int64_t kh = 0, k = 0; kh < g.K; ++kh)
          for (int64_t kw = 0; kw < g.K; ++kw, ++k) {
            const Vec<T> sv = vload(sb + k * ks);
            const T* xk = xrow + kh * g.d * g.Wp + j0 * s + kw * g.d;
            for (int t = 0; t < CB; ++t)
              acc[t] += filt<MODE>(ac[t * KK + k], sv) * vload_cols<S1>(xk + t * plane, s);
          }
        for (int t = 0; t < CB; ++t) {
          T* o = out + ((b * g.C + c0 + cc + t) * g.Ho + i) * g.Wo;
          if (j0 + JB <= g.Wo) vstore(o + j0, acc[t]);
          else for (int64_t jj = 0; j0 + jj < g.Wo; ++jj) o[j0 + jj] = acc[t][jj];
        }
      }
    }
  }
}

// Backward of channels [c0, c1) of group gr of sample b. gSg points at the group's slice of the
// spatial-filter gradient this sample accumulates into (`first`: overwrites it instead). Per output row and channel, each tap's
// block of grad_out * x feeds grad S (row buffer gSr) and grad A (per-lane partials dacc). grad x
// at stride 1 is a gather: the K rows P[kw] = F_k * grad_out of one kh are summed, shifted by
// kw*d, into the padded grad-x row, so no store ever partially overlaps the previous one (that
// would stall store-to-load forwarding); other strides scatter lane by lane.
template <typename T, int MODE, bool S1>
void backward_chunk(const Geom& g, const T* x, const T* Sg, const T* A, const T* go, T* gx,
                    T* gSg, T* gA, int64_t b, int64_t c0, int64_t c1, bool first, T* buf,
                    T* xp) {
  constexpr int64_t JB = kJB<T>;
  const int64_t KK = g.KK(), HWo = g.Ho * g.Wo, plane = g.Hp * g.Wp, n = c1 - c0;
  const int64_t s = S1 ? 1 : g.s, M = (g.K - 1) * g.d, PW = M + g.Wx;
  T* tail = buf;                // [KK][JB]
  T* gSr = tail + KK * JB;      // [KK][Wq] grad S of this output row, summed over channels
  T* gor = gSr + KK * g.Wq;
  T* P = gor + g.Wq;           // [K][M + Wx]: zero margins around Wq columns of F * grad_out
  T* dacc = P + g.K * PW;      // [n][KK][JB] per-lane partial sums for grad A
  T* gxp = dacc + n * KK * JB; // [n][Hp][Wp] padded grad-x planes
  std::fill(P, gxp + n * plane, T(0));
  load_padded_planes(g, x, b, c0, n, xp);
  for (int64_t i = 0; i < g.Ho; ++i) {
    const FilterRows<T> fr = filter_rows(g, Sg, i, tail);
    std::fill(gSr, gSr + KK * g.Wq, T(0));
    for (int64_t cc = 0; cc < n; ++cc) {
      const int64_t c = c0 + cc;
      std::copy_n(go + ((b * g.C + c) * g.Ho + i) * g.Wo, g.Wo, gor);
      std::fill(gor + g.Wo, gor + g.Wq, T(0));  // zero lanes past Wo contribute nothing
      const T* ac = MODE == kPlain ? nullptr : A + (b * g.C + c) * KK;
      for (int64_t kh = 0; kh < g.K; ++kh) {
        const int64_t row = (i * g.s + kh * g.d) * g.Wp;
        const T* xrow = xp + cc * plane + row;
        T* gxrow = gxp + cc * plane + row;
        for (int64_t kw = 0; kw < g.K; ++kw) {
          const int64_t k = kh * g.K + kw;
          const T ak = MODE == kPlain ? T(1) : ac[k];
          T* dk = dacc + (cc * KK + k) * JB;
          Vec<T> dsum = vload(dk);
          for (int64_t j0 = 0; j0 < g.Wq; j0 += JB) {
            const Vec<T> gv = vload(gor + j0), sv = vload(fr.base(j0) + k * fr.kstride(j0));
            const Vec<T> t = gv * vload_cols<S1>(xrow + j0 * s + kw * g.d, s);
            if constexpr (MODE == kMul) {
              vstore(gSr + k * g.Wq + j0, vload(gSr + k * g.Wq + j0) + ak * t);
              dsum += sv * t;
            } else {
              vstore(gSr + k * g.Wq + j0, vload(gSr + k * g.Wq + j0) + t);
              if constexpr (MODE == kAdd) dsum += t;
            }
            const Vec<T> f = filt<MODE>(ak, sv) * gv;
            if constexpr (S1) vstore(P + kw * PW + M + j0, f);
            else
              for (int64_t jj = 0; jj < JB; ++jj) gxrow[(j0 + jj) * s + kw * g.d] += f[jj];
          }
          vstore(dk, dsum);
        }
        if constexpr (S1)
          for (int64_t X0 = 0; X0 < g.Wx; X0 += JB) {
            Vec<T> acc = vload(gxrow + X0);
            for (int64_t kw = 0; kw < g.K; ++kw) acc += vload(P + kw * PW + M + X0 - kw * g.d);
            vstore(gxrow + X0, acc);
          }
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

void check_inputs(const at::Tensor& x, const at::Tensor& S, const at::Tensor& A, int64_t mode) {
  TORCH_CHECK(x.device().is_cpu() && S.device().is_cpu(), "native pixel_filter: CPU tensors only");
  TORCH_CHECK(x.is_contiguous() && S.is_contiguous(), "native pixel_filter: contiguous inputs only");
  TORCH_CHECK(x.scalar_type() == S.scalar_type(), "native pixel_filter: x and spatial dtypes differ");
  if (mode != kPlain)
    TORCH_CHECK(A.is_contiguous() && A.scalar_type() == x.scalar_type(),
                "native pixel_filter: channel filter must be contiguous and of x's dtype");
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
    at::parallel_for(0, g.B * g.G * per_group, 1, [&](int64_t u0, int64_t u1) {
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
    at::parallel_for(0, nchunk * g.G, 1, [&](int64_t u0, int64_t u1) {
      std::vector<T> buf(KK * kJB<T> + KK * g.Wq + g.Wq + g.K * ((g.K - 1) * d + g.Wx) + n * KK * kJB<T> +
                         n * g.Hp * g.Wp);
      std::vector<T> planes(n * g.Hp * g.Wp, T(0));
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t chunk = u / g.G, gr = u % g.G;
        T* gSg = gSp + (chunk * g.G + gr) * slice;
        const int64_t b0 = chunk * g.B / nchunk, b1 = (chunk + 1) * g.B / nchunk;
        for (int64_t b = b0; b < b1; ++b) {
          const T* Sg = Sp + ((g.Bs == 1 ? 0 : b) * g.G + gr) * slice;
          for (int64_t c0 = gr * cpg; c0 < (gr + 1) * cpg; c0 += n)
            backward_chunk<T, MODE, S1>(g, xp, Sg, Ap, gop, gxp, gSg, gAp, b, c0,
                                        std::min(c0 + n, (gr + 1) * cpg),
                                        b == b0 && c0 == gr * cpg, buf.data(), planes.data());
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
  check_inputs(x, S, A, mode);
  at::Tensor out = at::empty({x.size(0), x.size(1), S.size(3), S.size(4)}, x.options());
  dispatch<Fwd>(x.scalar_type(), mode, s == 1, x, S, A, out, K, s, p, d);
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& go, const at::Tensor& x, const at::Tensor& S,
                                 const at::Tensor& A, int64_t mode, int64_t K, int64_t s,
                                 int64_t p, int64_t d) {
  check_inputs(x, S, A, mode);
  TORCH_CHECK(go.is_contiguous() && go.scalar_type() == x.scalar_type(),
              "native pixel_filter: grad_output must be contiguous and of x's dtype");
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
