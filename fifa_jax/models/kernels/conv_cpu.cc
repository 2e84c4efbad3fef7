// 2-D convolutions (NHWC input, HWIO kernel) for XLA's CPU backend (jax.ffi), float32: the
// stride-1 forward (which also serves as the input gradient, with the kernel flipped) and the
// kernel gradient.
//
// Why they exist: XLA's CPU backend hands convolutions to YNNPACK, which runs SD-sized layers
// at 100-160 GFLOP/s on two AVX-512 cores against oneDNN's (PyTorch's) 200-300, and inside a
// train step it leaves the kernel gradient in a form its fast convolution does not take (the
// per-tap matrix products of `models/conv.py` then make XLA copy nine shifted views of the
// input; benchmarks/RESULTS.md).
//
// Forward (stride 1, `pad` zero pixels each side):
//
//   y[b, h, w, co] = sum_{i, j, ci} x[b, h + i - pad, w + j - pad, ci] * k[i, j, ci, co]
//
// A work item is one output row (b, h): the kh input rows it reads are copied once into a
// zero-padded row buffer, then blocks of NB output pixels x NV vectors of 16 output channels
// accumulate in registers over every tap and input channel (the kernel's rows are read in
// place, Cout floats apart) and are stored once. Each item writes its own row, in a fixed
// order: results do not depend on the thread count.
//
// Kernel gradient:
//
//   dw[i, j, ci, co] = sum_{b, h, w} x[b, h*s + i - p, w*s + j - p, ci] * g[b, h, w, co]
//
// over the output pixels whose input pixel lies inside the image (the zero padding adds
// nothing). For one output row the valid pixels are a contiguous run of g's rows and a
// strided run of x's, so the inner loop is a register-blocked rank-1 update: 8 input channels
// x 64 output channels (4 vectors of 16) accumulate in 32 vector registers while the pixels
// stream by. Work items are (tap, group of 16 input channels); each writes its own block of
// dw in a fixed order, so results do not depend on the thread count. Tested against autodiff
// of XLA's convolution and a float64 numpy loop (tests/models/test_conv.py).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using namespace fifa_kernels;  // Vec, Load, Store, ParallelFor

constexpr int64_t kGroup = 16;  // input channels a work item

// acc[c][o] += sum_{p < n} x[p * xs + c] * g[p * gs + o] for c < CI, o < NV * kLanes;
// acc rows are `lda` floats apart.
template <int CI, int NV>
void RankUpdate(const float* x, int64_t xs, const float* g, int64_t gs, int64_t n, float* acc,
                int64_t lda) {
  Vec a[CI][NV];
#pragma GCC unroll 8
  for (int c = 0; c < CI; ++c) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) a[c][v] = Load(acc + c * lda + v * kLanes);
  }
  for (int64_t p = 0; p < n; ++p) {
    Vec gv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) gv[v] = Load(g + p * gs + v * kLanes);
#pragma GCC unroll 8
    for (int c = 0; c < CI; ++c) {
      const float xv = x[p * xs + c];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) a[c][v] += xv * gv[v];
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < CI; ++c) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) Store(acc + c * lda + v * kLanes, a[c][v]);
  }
}

// RankUpdate over `nci` input channels, in tiles of 8, 4, 2 and 1.
template <int NV>
void RankUpdateChannels(int64_t nci, const float* x, int64_t xs, const float* g, int64_t gs,
                        int64_t n, float* acc, int64_t lda) {
  int64_t c = 0;
  for (; c + 8 <= nci; c += 8) RankUpdate<8, NV>(x + c, xs, g, gs, n, acc + c * lda, lda);
  for (; c + 4 <= nci; c += 4) RankUpdate<4, NV>(x + c, xs, g, gs, n, acc + c * lda, lda);
  for (; c + 2 <= nci; c += 2) RankUpdate<2, NV>(x + c, xs, g, gs, n, acc + c * lda, lda);
  for (; c < nci; ++c) RankUpdate<1, NV>(x + c, xs, g, gs, n, acc + c * lda, lda);
}

// dw (kh, kw, Cin, Cout) from x (B, H, W, Cin) and g (B, Ho, Wo, Cout); Cout % 16 == 0.
ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer g, int64_t stride,
                      int64_t pad, ffi::Result<ffi::AnyBuffer> dw) {
  auto xd = x.dimensions();
  auto gd = g.dimensions();
  auto wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4 || xd[0] != gd[0] ||
      wd[2] != xd[3] || wd[3] != gd[3] || stride < 1 || pad < 0) {
    return ffi::Error::InvalidArgument(
        "conv_cpu: needs x (B, H, W, Cin), g (B, Ho, Wo, Cout), dw (kh, kw, Cin, Cout)");
  }
  if (x.element_type() != ffi::F32 || g.element_type() != ffi::F32 ||
      dw->element_type() != ffi::F32) {
    return ffi::Error::InvalidArgument("conv_cpu: float32 only");
  }
  const int64_t batch = xd[0], height = xd[1], width = xd[2], cin = xd[3];
  const int64_t ho = gd[1], wo = gd[2], cout = gd[3];
  const int64_t kh = wd[0], kw = wd[1];
  if (cout % kLanes != 0) {
    return ffi::Error::InvalidArgument("conv_cpu: Cout must be a multiple of 16");
  }
  const float* xp = x.typed_data<float>();
  const float* gp = g.typed_data<float>();
  float* out = dw->typed_data<float>();
  const int64_t groups = (cin + kGroup - 1) / kGroup;
  ParallelFor(pool, kh * kw * groups, [&](int64_t item) {
    const int64_t tap = item / groups, c0 = (item % groups) * kGroup;
    const int64_t i = tap / kw, j = tap % kw;
    const int64_t nci = std::min(kGroup, cin - c0);
    float* acc = out + (tap * cin + c0) * cout;  // this item's nci rows of Cout floats
    std::fill(acc, acc + nci * cout, 0.0f);
    // Output columns whose input column w * stride + j - pad lies in [0, width).
    int64_t w0 = 0, w1 = wo;
    while (w0 < wo && w0 * stride + j - pad < 0) ++w0;
    while (w1 > w0 && (w1 - 1) * stride + j - pad >= width) --w1;
    if (w1 == w0) return;
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t h = 0; h < ho; ++h) {
        const int64_t y = h * stride + i - pad;
        if (y < 0 || y >= height) continue;
        const float* xrow = xp + ((b * height + y) * width + w0 * stride + j - pad) * cin + c0;
        const float* grow = gp + ((b * ho + h) * wo + w0) * cout;
        int64_t o = 0;
        for (; o + 4 * kLanes <= cout; o += 4 * kLanes) {
          RankUpdateChannels<4>(nci, xrow, stride * cin, grow + o, cout, w1 - w0, acc + o, cout);
        }
        for (; o < cout; o += kLanes) {
          RankUpdateChannels<1>(nci, xrow, stride * cin, grow + o, cout, w1 - w0, acc + o, cout);
        }
      }
    }
  });
  return ffi::Error::Success();
}


// acc[p][v] = sum_{taps, ci} row[tap_i][(x + p + tap_j) * cin + ci] * k[tap][ci][v * 16 ..]:
// NB output pixels x NV vectors of output channels in registers, stored to y (pixels `cout`
// floats apart). `rows` holds the kh padded input rows, `row_len` floats apart.
template <int NB, int NV>
void ForwardBlock(const float* rows, int64_t row_len, const float* k, int64_t kh, int64_t kw,
                  int64_t cin, int64_t cout, float* y) {
  Vec acc[NB][NV] = {};
  for (int64_t i = 0; i < kh; ++i) {
    for (int64_t j = 0; j < kw; ++j) {
      const float* in = rows + i * row_len + j * cin;
      const float* kt = k + (i * kw + j) * cin * cout;
      for (int64_t c = 0; c < cin; ++c) {
        Vec kv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) kv[v] = Load(kt + c * cout + v * kLanes);
#pragma GCC unroll 12
        for (int p = 0; p < NB; ++p) {
          const float s = in[p * cin + c];
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[p][v] += s * kv[v];
        }
      }
    }
  }
#pragma GCC unroll 12
  for (int p = 0; p < NB; ++p) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) Store(y + p * cout + v * kLanes, acc[p][v]);
  }
}

// ForwardBlock over `n` output pixels: blocks of NB, then one shorter block for the rest.
template <int NB, int NV>
void ForwardRun(int64_t n, const float* rows, int64_t row_len, const float* k, int64_t kh,
                int64_t kw, int64_t cin, int64_t cout, float* y) {
  int64_t p = 0;
  for (; p + NB <= n; p += NB) {
    ForwardBlock<NB, NV>(rows + p * cin, row_len, k, kh, kw, cin, cout, y + p * cout);
  }
  const int64_t rest = n - p;
  rows += p * cin;
  y += p * cout;
  // rest < NB: one block size per case (R >= NB cannot happen; those cases instantiate the
  // 1-pixel block only to keep the switch uniform)
#define FIFA_REST(R) \
  case R: return ForwardBlock<(R < NB ? R : 1), NV>(rows, row_len, k, kh, kw, cin, cout, y);
  switch (rest) {
    FIFA_REST(1) FIFA_REST(2) FIFA_REST(3) FIFA_REST(4) FIFA_REST(5) FIFA_REST(6)
    FIFA_REST(7) FIFA_REST(8) FIFA_REST(9) FIFA_REST(10) FIFA_REST(11)
    default: return;
  }
#undef FIFA_REST
}

// y (B, Ho, Wo, Cout) = x (B, H, W, Cin) * k (kh, kw, Cin, Cout), stride 1, `pad` zero
// pixels each side; Cout % 16 == 0.
ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer k, int64_t pad,
                   ffi::Result<ffi::AnyBuffer> y) {
  auto xd = x.dimensions();
  auto kd = k.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4 || kd[2] != xd[3] || pad < 0 ||
      yd[0] != xd[0] || yd[3] != kd[3] || yd[1] != xd[1] + 2 * pad - kd[0] + 1 ||
      yd[2] != xd[2] + 2 * pad - kd[1] + 1) {
    return ffi::Error::InvalidArgument(
        "conv_cpu: needs x (B, H, W, Cin), k (kh, kw, Cin, Cout), y (B, Ho, Wo, Cout) of a "
        "stride-1 convolution");
  }
  if (x.element_type() != ffi::F32 || k.element_type() != ffi::F32 ||
      y->element_type() != ffi::F32) {
    return ffi::Error::InvalidArgument("conv_cpu: float32 only");
  }
  const int64_t batch = xd[0], height = xd[1], width = xd[2], cin = xd[3];
  const int64_t kh = kd[0], kw = kd[1], cout = kd[3];
  const int64_t ho = yd[1], wo = yd[2];
  if (cout % kLanes != 0) {
    return ffi::Error::InvalidArgument("conv_cpu: Cout must be a multiple of 16");
  }
  const float* xp = x.typed_data<float>();
  const float* kp = k.typed_data<float>();
  float* yp = y->typed_data<float>();
  const int64_t row_len = (width + 2 * pad) * cin;  // a zero-padded input row
  ParallelFor(pool, batch * ho, [&](int64_t item) {
    const int64_t b = item / ho, h = item % ho;
    std::vector<float> rows(kh * row_len, 0.0f);
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t src = h + i - pad;
      if (src < 0 || src >= height) continue;  // a padding row: stays zero
      std::copy_n(xp + (b * height + src) * width * cin, width * cin,
                  rows.data() + i * row_len + pad * cin);
    }
    float* out = yp + (b * ho + h) * wo * cout;
    int64_t o = 0;
    for (; o + 4 * kLanes <= cout; o += 4 * kLanes) {
      ForwardRun<6, 4>(wo, rows.data(), row_len, kp + o, kh, kw, cin, cout, out + o);
    }
    for (; o + 2 * kLanes <= cout; o += 2 * kLanes) {
      ForwardRun<12, 2>(wo, rows.data(), row_len, kp + o, kh, kw, cin, cout, out + o);
    }
    for (; o < cout; o += kLanes) {
      ForwardRun<12, 1>(wo, rows.data(), row_len, kp + o, kh, kw, cin, cout, out + o);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FifaConvKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad")
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FifaConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int64_t>("pad")
                                  .Ret<ffi::AnyBuffer>());
