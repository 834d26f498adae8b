// CPU kernels for local Deformable Kernels (Gao et al., ICLR 2020, Eq. 6), the fused form of
// dynconv/functional/deform_kernel.py:
//
//   out[b,c,i,j] = sum_t W'_c(t, i, j) * x[b, c, i*sh - ph + fh*dh, j*sw - pw + fw*dw]   (zero padding)
//   W'_c(t, i, j) = bilinear(W_c, fh + dH + (Sh - K)/2, fw + dW + (Sw - K)/2),  t = fh*K + fw,
//   (dH, dW) = offset[b, g, t, :, i, j],  g = c mod G,
//
// sampled as the official `planar_bilinear`: 0 unless -1 < h < Sh and -1 < w < Sw, corners outside
// the scope count as 0. Each tap's kernel value is sampled where it is used, so no per-pixel kernel
// tensor (B, C, K*K, Ho, Wo) exists in forward or backward.
//
// Layout: the caller passes x and grad_out as (B, H, W, G, M) (channel c = m*G + g, so the channels
// of one offset group are contiguous; for G = 1 this is channels_last) and the scope weights as
// (G, P, M), the planes bordered with one zero row and column on each side (P = (Sh+2)*(Sw+2)). A
// point inside (-1, S) then has its four corners inside the bordered plane, corners outside the
// scope read 0, and the bilinear value is four contiguous vector loads over the group's channels.
// The bilinear corners are computed once per (pixel, tap, group) and shared by its M channels.
// - Forward: one work item per output row (b, i); the row's corners are tabulated first.
// - Backward: one work item per (b, g), all rows: grad x accumulated in place (the item owns its
//   input planes), grad offset written once per (pixel, tap, group), grad weight summed into
//   per-thread partials that are added at the end.
// Types: float and double (the caller computes bfloat16/float16 inputs in float).
// Threads: ATen's intra-op pool (at::parallel_for), so torch.set_num_threads applies.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Geom {
  int64_t B, H, W, G, M, K, sh, sw, ph, pw, dh, dw, Ho, Wo, Sh, Sw;
  int64_t C() const { return G * M; }
  int64_t KK() const { return K * K; }
  int64_t row() const { return Sw + 2; }              // bordered scope row
  int64_t P() const { return (Sh + 2) * (Sw + 2); }  // bordered scope plane
};

// The bilinear sample of the bordered scope plane at (h, w): `base` is its top-left corner's
// index, c[0..3] the weights of the corners (0,0), (0,1), (1,0), (1,1). False (sample 0, every
// derivative 0) outside (-1, S), NaN included.
template <typename T>
struct Sample {
  int64_t base;
  T lh, lw, c[4];
};

template <typename T>
inline bool sample_at(const Geom& g, T h, T w, Sample<T>& s) {
  if (!(h > T(-1) && h < T(g.Sh) && w > T(-1) && w < T(g.Sw))) return false;
  const T h0 = std::floor(h), w0 = std::floor(w);
  s.lh = h - h0;
  s.lw = w - w0;
  s.base = (static_cast<int64_t>(h0) + 1) * g.row() + static_cast<int64_t>(w0) + 1;
  s.c[0] = (1 - s.lh) * (1 - s.lw);
  s.c[1] = (1 - s.lh) * s.lw;
  s.c[2] = s.lh * (1 - s.lw);
  s.c[3] = s.lh * s.lw;
  return true;
}

// Scope coordinates of tap t = fh*K + fw at output (i, j) for group gi: offset is (B, G, K*K, 2, Ho, Wo).
template <typename T>
inline void coords(const Geom& g, const T* off, int64_t b, int64_t gi, int64_t fh, int64_t fw, int64_t i,
                   int64_t j, T& h, T& w) {
  const int64_t plane = g.Ho * g.Wo;
  const T* o = off + (((b * g.G + gi) * g.KK() + fh * g.K + fw) * 2) * plane + i * g.Wo + j;
  h = o[0] + (T(fh) + T(g.Sh - g.K) / 2);
  w = o[plane] + (T(fw) + T(g.Sw - g.K) / 2);
}

inline int64_t grain_for(int64_t madds_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, madds_per_item));
}

template <typename T>
void forward_kernel(const Geom& g, const T* x, const T* off, const T* wt, T* out) {
  const int64_t C = g.C(), M = g.M, KK = g.KK(), P = g.P(), R = g.row();
  at::parallel_for(0, g.B * g.Ho, grain_for(g.Wo * KK * C), [&](int64_t u0, int64_t u1) {
    std::vector<Sample<T>> table(g.Wo * KK * g.G);
    std::vector<char> valid(g.Wo * KK * g.G);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / g.Ho, i = u % g.Ho;
      for (int64_t t = 0; t < KK; ++t) {
        const int64_t fh = t / g.K, fw = t % g.K;
        for (int64_t gi = 0; gi < g.G; ++gi)
          for (int64_t j = 0; j < g.Wo; ++j) {
            T h, w;
            coords(g, off, b, gi, fh, fw, i, j, h, w);
            const int64_t q = (j * KK + t) * g.G + gi;
            valid[q] = sample_at(g, h, w, table[q]);
          }
      }
      T* orow = out + (b * g.Ho + i) * g.Wo * C;
      std::fill_n(orow, g.Wo * C, T(0));  // zeroed here, where the row is then accumulated in cache
      for (int64_t t = 0; t < KK; ++t) {
        const int64_t fh = t / g.K, fw = t % g.K;
        const int64_t y = i * g.sh - g.ph + fh * g.dh;
        if (y < 0 || y >= g.H) continue;
        for (int64_t j = 0; j < g.Wo; ++j) {
          const int64_t xc = j * g.sw - g.pw + fw * g.dw;
          if (xc < 0 || xc >= g.W) continue;
          const T* xp = x + ((b * g.H + y) * g.W + xc) * C;
          T* op = orow + j * C;
          for (int64_t gi = 0; gi < g.G; ++gi) {
            const int64_t q = (j * KK + t) * g.G + gi;
            if (!valid[q]) continue;
            const Sample<T>& s = table[q];
            const T c0 = s.c[0], c1 = s.c[1], c2 = s.c[2], c3 = s.c[3];
            const T* w0 = wt + (gi * P + s.base) * M;
            const T* w2 = w0 + R * M;
            const T* xg = xp + gi * M;
            T* og = op + gi * M;
#pragma omp simd
            for (int64_t m = 0; m < M; ++m)
              og[m] += (c0 * w0[m] + c1 * w0[M + m] + c2 * w2[m] + c3 * w2[M + m]) * xg[m];
          }
        }
      }
    }
  });
}

// With P = grad_out * x_tap: grad_x_tap += grad_out * W'; grad_W[corner] += P * c_corner;
// grad_(h,w) = sum_m P * sum_corner dc_corner/d(h,w) * W[corner], one reduction over the channels each.
// The (sample, group) items are split into `nchunk` contiguous runs, one grad-weight partial each (indexed by
// the run, not by the thread that happens to take it, so any team size is safe and the sum is deterministic).
template <typename T>
void backward_kernel(const Geom& g, const T* go, const T* x, const T* off, const T* wt, T* gx, T* goff,
                     T* gwt_partials, int64_t nchunk) {
  const int64_t C = g.C(), M = g.M, KK = g.KK(), P = g.P(), R = g.row(), plane = g.Ho * g.Wo;
  const int64_t items = g.B * g.G;
  at::parallel_for(0, nchunk, 1, [&](int64_t ch0, int64_t ch1) {
    for (int64_t ch = ch0; ch < ch1; ++ch) {
      T* gwt = gwt_partials + ch * g.G * P * M;
      for (int64_t u = ch * items / nchunk; u < (ch + 1) * items / nchunk; ++u) {
        const int64_t b = u / g.G, gi = u % g.G;
        // the item's slices of grad x and grad offset, zeroed by the thread that accumulates them
        for (int64_t q = 0; q < g.H * g.W; ++q) std::fill_n(gx + (b * g.H * g.W + q) * C + gi * M, M, T(0));
        std::fill_n(goff + (b * g.G + gi) * KK * 2 * plane, KK * 2 * plane, T(0));
        const T* wg = wt + gi * P * M;
        T* gwg = gwt + gi * P * M;
        for (int64_t i = 0; i < g.Ho; ++i)
          for (int64_t t = 0; t < KK; ++t) {
            const int64_t fh = t / g.K, fw = t % g.K;
            const int64_t y = i * g.sh - g.ph + fh * g.dh;
            if (y < 0 || y >= g.H) continue;
            T* gh_row = goff + (((b * g.G + gi) * KK + t) * 2) * plane + i * g.Wo;
            for (int64_t j = 0; j < g.Wo; ++j) {
              const int64_t xc = j * g.sw - g.pw + fw * g.dw;
              if (xc < 0 || xc >= g.W) continue;
              T h, w;
              Sample<T> s;
              coords(g, off, b, gi, fh, fw, i, j, h, w);
              if (!sample_at(g, h, w, s)) continue;
              const T c0 = s.c[0], c1 = s.c[1], c2 = s.c[2], c3 = s.c[3];
              const int64_t xo = ((b * g.H + y) * g.W + xc) * C + gi * M;
              const T* xg = x + xo;
              T* gxg = gx + xo;
              const T* gog = go + ((b * g.Ho + i) * g.Wo + j) * C + gi * M;
              const T* w0 = wg + s.base * M;
              const T* w2 = w0 + R * M;
              T* g0 = gwg + s.base * M;
              T* g2 = g0 + R * M;
              // d(c0..c3)/dh = (-(1-lw), -lw, 1-lw, lw), d(c0..c3)/dw = (-(1-lh), 1-lh, -lh, lh)
              const T ah = 1 - s.lh, bh = s.lh, aw = 1 - s.lw, bw = s.lw;
              T dh = 0, dw = 0;
  #pragma omp simd reduction(+ : dh, dw)
              for (int64_t m = 0; m < M; ++m) {
                const T v0 = w0[m], v1 = w0[M + m], v2 = w2[m], v3 = w2[M + m];
                const T gm = gog[m], pm = gm * xg[m];
                gxg[m] += gm * (c0 * v0 + c1 * v1 + c2 * v2 + c3 * v3);
                g0[m] += c0 * pm;
                g0[M + m] += c1 * pm;
                g2[m] += c2 * pm;
                g2[M + m] += c3 * pm;
                dh += pm * (aw * (v2 - v0) + bw * (v3 - v1));
                dw += pm * (ah * (v1 - v0) + bh * (v3 - v2));
              }
              gh_row[j] = dh;
              gh_row[plane + j] = dw;
            }
          }
      }
    }
  });
}

// The kernels index raw memory, so every shape they rely on is checked here.
Geom make_geom(const at::Tensor& x, const at::Tensor& off, const at::Tensor& wt, int64_t K, int64_t sh,
               int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t Sh, int64_t Sw) {
  TORCH_CHECK(x.device().is_cpu() && off.device().is_cpu() && wt.device().is_cpu(),
              "native deform_kernel_local: CPU tensors only");
  TORCH_CHECK(x.is_contiguous() && off.is_contiguous() && wt.is_contiguous(),
              "native deform_kernel_local: contiguous inputs only");
  TORCH_CHECK(x.scalar_type() == off.scalar_type() && x.scalar_type() == wt.scalar_type(),
              "native deform_kernel_local: x, offset and weight dtypes differ");
  TORCH_CHECK(x.dim() == 5 && off.dim() == 6 && wt.dim() == 3,
              "native deform_kernel_local: expects x (B, H, W, G, M), offset (B, G, K*K, 2, Ho, Wo), "
              "weight (G, P, M)");
  TORCH_CHECK(K >= 1 && sh >= 1 && sw >= 1 && dh >= 1 && dw >= 1 && ph >= 0 && pw >= 0 && Sh >= 1 && Sw >= 1,
              "native deform_kernel_local: invalid geometry");
  Geom g{x.size(0), x.size(1), x.size(2), x.size(3), x.size(4), K, sh, sw, ph, pw, dh, dw,
         off.size(4), off.size(5), Sh, Sw};
  TORCH_CHECK(g.Ho == (g.H + 2 * ph - dh * (K - 1) - 1) / sh + 1 &&
                  g.Wo == (g.W + 2 * pw - dw * (K - 1) - 1) / sw + 1 && g.Ho >= 1 && g.Wo >= 1,
              "native deform_kernel_local: offset size does not fit the input and geometry");
  TORCH_CHECK(off.size(0) == g.B && off.size(1) == g.G && off.size(2) == K * K && off.size(3) == 2,
              "native deform_kernel_local: offset shape does not fit the input");
  TORCH_CHECK(wt.size(0) == g.G && wt.size(1) == g.P() && wt.size(2) == g.M,
              "native deform_kernel_local: weight shape does not fit the input and scope");
  return g;
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& off, const at::Tensor& wt, int64_t K, int64_t sh,
                   int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t Sh, int64_t Sw) {
  const Geom g = make_geom(x, off, wt, K, sh, sw, ph, pw, dh, dw, Sh, Sw);
  at::Tensor out = at::empty({g.B, g.Ho, g.Wo, g.G, g.M}, x.options());  // each row zeroed by its item
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deform_kernel_local_forward", [&] {
    forward_kernel<scalar_t>(g, x.data_ptr<scalar_t>(), off.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>());
  });
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& go, const at::Tensor& x, const at::Tensor& off,
                                 const at::Tensor& wt, int64_t K, int64_t sh, int64_t sw, int64_t ph,
                                 int64_t pw, int64_t dh, int64_t dw, int64_t Sh, int64_t Sw) {
  const Geom g = make_geom(x, off, wt, K, sh, sw, ph, pw, dh, dw, Sh, Sw);
  TORCH_CHECK(go.is_contiguous() && go.scalar_type() == x.scalar_type() &&
                  go.sizes() == at::IntArrayRef({g.B, g.Ho, g.Wo, g.G, g.M}),
              "native deform_kernel_local: grad_output must be contiguous (B, Ho, Wo, G, M) of x's dtype");
  at::Tensor gx = at::empty_like(x);  // each (sample, group) slice zeroed by its item
  at::Tensor goff = at::empty_like(off);
  const int64_t nchunk = std::min<int64_t>(at::get_num_threads(), g.B * g.G);  // 0 for an empty batch
  at::Tensor partials = at::zeros({nchunk, g.G, g.P(), g.M}, wt.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deform_kernel_local_backward", [&] {
    backward_kernel<scalar_t>(g, go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), off.data_ptr<scalar_t>(),
                              wt.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), goff.data_ptr<scalar_t>(),
                              partials.data_ptr<scalar_t>(), nchunk);
  });
  return {gx, goff, partials.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "local Deformable Kernel forward (CPU)");
  m.def("backward", &backward, "local Deformable Kernel backward: grad x, grad offset, grad weight (CPU)");
}
