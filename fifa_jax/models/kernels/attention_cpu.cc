// Fused softmax attention for XLA's CPU backend (jax.ffi), forward and backward, float32.
//
// Why it exists: XLA's CPU backend materialises the (B, N, T, S) scores of an attention
// (a 32 x 32 latent's self-attention: 8 heads x 1024 x 1024 floats an image) and runs the
// softmax over them as separate memory-bound passes; in a Diffusion-DPO train step that was
// about half the step (benchmarks/RESULTS.md). No library gives JAX a fused CPU attention, so
// this one does the simplest thing that never materialises the scores. Forward: four query
// rows at a time, their S scores in a small buffer (the row maximum taken as they are
// stored), then an exact softmax (exp and sum), the value product, the log-sum-exp saved. Backward (flash-attention's):
// keys in blocks of 256 with every query row for each block, probabilities recomputed from
// the saved log-sum-exp, so a block's keys, values and gradient accumulators stay in the L1
// cache. Layouts are the model's: q, o: (..., T, N, H); k, v: (..., S, N, H); leading
// dimensions are flattened into one batch. Work items are (batch, head[, query block]) and run
// on XLA's intra-op thread pool; the calling thread takes items too, so it never waits on a
// task that has not started. Each item writes its own outputs: results do not depend on the
// thread count or the scheduling.
//
// Per head, keys and values are packed transposed to (H, S), zero-padded to multiples of 4
// and 16, so every inner loop is a unit-stride loop over keys in 16-float vectors (GCC vector
// extensions; -O3 -march=native); the usual head sizes (8, 40, 64, 80) are compile-time
// constants of the score products; exp is a Cephes-style polynomial (about 2 ulp) on vectors,
// with AVX-512's round and scale instructions where the CPU has them. Tested against a
// float64 numpy transcription (tests/models/test_cpu_attention.py), also built without
// AVX-512.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "common.h"

namespace {

using namespace fifa_kernels;  // Vec, Load, Store, RoundUp, ParallelFor

constexpr int64_t kRows = 4;    // query rows processed together (reuse each key/value load)
constexpr int64_t kChannels = 4;  // head-size channels accumulated in registers at once

inline float Sum(Vec v) {
#ifdef __AVX512F__
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) s += v[l];
  return s;
#endif
}

inline Vec Splat(float x) { return Vec{} + x; }

// v with its lanes from n on replaced by `fill` (the zero-padded tail of a key row).
inline Vec KeepFirst(Vec v, int64_t n, float fill) {
  Vec lane;
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = static_cast<float>(l);
  return lane < static_cast<float>(n) ? v : Splat(fill);
}

// exp(x) of 16 floats, x <= 0 (softmax arguments; below -87 it returns exp(-87) ~ 2e-38):
// n = round(x / ln 2), r = x - n ln 2 in two parts (Cody-Waite), e^r by the Cephes
// polynomial (about 2 ulp) in Horner form, times 2^n.
inline Vec ExpV(Vec x) {
  x = x < -87.0f ? Splat(-87.0f) : x;
  const Vec t = x * 1.44269504088896341f;
#ifdef __AVX512F__
  const Vec n = (Vec)_mm512_roundscale_ps((__m512)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const Vec n = (t + 12582912.0f) - 12582912.0f;  // round to nearest integer
#endif
  Vec r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  Vec p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;  // 1 + r + r^2 (0.5 + r / 6 + ...)
#ifdef __AVX512F__
  return (Vec)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
  typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  return p * reinterpret_cast<const Vec&>(bits);
#endif
}

struct Dims {
  int64_t batch, t, s, n, h;
  int64_t sp, hp;  // s rounded up to kLanes, h rounded up to kChannels (zero padding)
};

// Dims from q (..., T, N, H) and k (..., S, N, H).
ffi::Error GetDims(ffi::AnyBuffer q, ffi::AnyBuffer k, Dims* d) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  if (qd.size() < 3 || qd.size() != kd.size()) {
    return ffi::Error::InvalidArgument("attention_cpu: q and k must have the same rank >= 3");
  }
  const size_t r = qd.size();
  d->batch = 1;
  for (size_t i = 0; i + 3 < r; ++i) d->batch *= qd[i];
  d->t = qd[r - 3];
  d->n = qd[r - 2];
  d->h = qd[r - 1];
  d->s = kd[r - 3];
  d->sp = RoundUp(d->s, kLanes);
  d->hp = RoundUp(d->h, kChannels);
  if (kd[r - 2] != d->n || kd[r - 1] != d->h) {
    return ffi::Error::InvalidArgument("attention_cpu: k must have q's heads and head size");
  }
  return ffi::Error::Success();
}

// Head `head` of batch `b` of x (batch, S, N, H), transposed into out (hp, sp), zero-padded.
void PackTransposed(const float* x, const Dims& d, int64_t b, int64_t head, float* out) {
  std::fill(out, out + d.hp * d.sp, 0.0f);
  const float* base = x + (b * d.s * d.n + head) * d.h;
  for (int64_t j = 0; j < d.s; ++j) {
    const float* row = base + j * d.n * d.h;
    for (int64_t c = 0; c < d.h; ++c) out[c * d.sp + j] = row[c];
  }
}

// A (channels, columns) slice of a transposed head: row c starts at data + c * stride.
struct Panel {
  const float* data;
  int64_t stride;  // floats between channel rows (the padded key length)
  int64_t len;     // columns used, a multiple of kLanes
};

// out[i][j] = scale * sum_c a_i[c] * m[c][j] for kRows rows a_i (h floats each), j < m.len;
// out rows are `ld` floats apart. Columns from `valid` on are set to -inf, and row_max[i]
// (when given) is the row's maximum over the others (NaN scores are left out of it; they
// reach the output through the sum of exps). H > 0: the head size as a constant (the
// channel loop unrolled); H = 0: `h` at run time.
template <int64_t H>
void RowsTimesMatrixH(const float* const* a, Panel m, int64_t h, float scale, int64_t valid,
                      float* out, int64_t ld, float* row_max) {
  if (H > 0) h = H;
  Vec mx[kRows];
  for (int64_t i = 0; i < kRows; ++i) mx[i] = Splat(-INFINITY);
  for (int64_t j = 0; j < m.len; j += kLanes) {
    Vec acc[kRows] = {};
#pragma GCC unroll 16
    for (int64_t c = 0; c < h; ++c) {
      const Vec mv = Load(m.data + c * m.stride + j);
      for (int64_t i = 0; i < kRows; ++i) acc[i] += a[i][c] * mv;
    }
    const bool partial = j + kLanes > valid;
    for (int64_t i = 0; i < kRows; ++i) {
      Vec v = acc[i] * scale;
      if (partial) v = KeepFirst(v, valid - j, -INFINITY);
      Store(out + i * ld + j, v);
      mx[i] = v > mx[i] ? v : mx[i];
    }
  }
  if (row_max != nullptr) {
    for (int64_t i = 0; i < kRows; ++i) {
      float best = -INFINITY;
      for (int64_t l = 0; l < kLanes; ++l) best = mx[i][l] > best ? mx[i][l] : best;
      row_max[i] = best;
    }
  }
}

// RowsTimesMatrixH with the head size as a constant for the usual sizes.
void RowsTimesMatrix(const float* const* a, Panel m, int64_t h, float scale, int64_t valid,
                     float* out, int64_t ld, float* row_max = nullptr) {
  switch (h) {
    case 8: return RowsTimesMatrixH<8>(a, m, h, scale, valid, out, ld, row_max);
    case 40: return RowsTimesMatrixH<40>(a, m, h, scale, valid, out, ld, row_max);
    case 64: return RowsTimesMatrixH<64>(a, m, h, scale, valid, out, ld, row_max);
    case 80: return RowsTimesMatrixH<80>(a, m, h, scale, valid, out, ld, row_max);
    default: return RowsTimesMatrixH<0>(a, m, h, scale, valid, out, ld, row_max);
  }
}

// x[j] = exp(x[j] - shift) for j < valid and 0 for valid <= j < len (a multiple of kLanes);
// returns the sum.
float ExpRow(float* x, int64_t len, int64_t valid, float shift) {
  Vec sum = {};
  for (int64_t j = 0; j < len; j += kLanes) {
    Vec e = ExpV(Load(x + j) - shift);
    if (j + kLanes > valid) e = KeepFirst(e, valid - j, 0.0f);
    Store(x + j, e);
    sum += e;
  }
  return Sum(sum);
}

// out[i][c] = sum_j x_i[j] * m[c][j] for kRows rows x_i (`ld` floats apart), c < hp (a
// multiple of kChannels); kRows rows x kChannels channels accumulate in registers.
void RowsTimesMatrixT(const float* x, int64_t ld, Panel m, int64_t hp, float* out) {
  for (int64_t c0 = 0; c0 < hp; c0 += kChannels) {
    Vec acc[kRows][kChannels] = {};
    for (int64_t j = 0; j < m.len; j += kLanes) {
      Vec mv[kChannels];
      for (int64_t g = 0; g < kChannels; ++g) mv[g] = Load(m.data + (c0 + g) * m.stride + j);
      for (int64_t i = 0; i < kRows; ++i) {
        const Vec xv = Load(x + i * ld + j);
        for (int64_t g = 0; g < kChannels; ++g) acc[i][g] += xv * mv[g];
      }
    }
    for (int64_t i = 0; i < kRows; ++i) {
      for (int64_t g = 0; g < kChannels; ++g) out[i * hp + c0 + g] = Sum(acc[i][g]);
    }
  }
}

// The kRows query rows from r0 of head `head` of batch `b` in x (batch, T, N, H); rows past
// the end repeat the last one (their results are not written).
void RowPointers(const float* x, const Dims& d, int64_t b, int64_t head, int64_t r0,
                 int64_t nrows, const float** rows) {
  for (int64_t i = 0; i < kRows; ++i) {
    rows[i] = x + ((b * d.t + r0 + std::min(i, nrows - 1)) * d.n + head) * d.h;
  }
}

// Forward: o (batch, T, N, H), lse (batch, N, T).
ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   float scale, ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse) {
  Dims d;
  if (auto err = GetDims(q, k, &d); err.failure()) return err;
  if (q.element_type() != ffi::F32 || k.element_type() != ffi::F32 ||
      v.element_type() != ffi::F32) {
    return ffi::Error::InvalidArgument("attention_cpu: float32 only");
  }
  const float* qp = q.typed_data<float>();
  const float* kp = k.typed_data<float>();
  const float* vp = v.typed_data<float>();
  float* op = o->typed_data<float>();
  float* lp = lse->typed_data<float>();
  // Work items: (batch, head, query block); a head's keys and values are packed once an
  // item, so a head is split into blocks only as far as the threads need work.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t want = (4 * threads + d.batch * d.n - 1) / (d.batch * d.n);
  const int64_t nblocks = std::max<int64_t>(1, std::min(want, (d.t + 63) / 64));
  const int64_t block = (d.t + nblocks - 1) / nblocks;
  const int64_t items = d.batch * d.n * nblocks;
  ParallelFor(pool, items, [&](int64_t item) {
    const int64_t qb = item % nblocks;
    const int64_t head = (item / nblocks) % d.n;
    const int64_t b = item / (nblocks * d.n);
    std::vector<float> kt(d.hp * d.sp), vt(d.hp * d.sp), p(kRows * d.sp), orows(kRows * d.hp);
    PackTransposed(kp, d, b, head, kt.data());
    PackTransposed(vp, d, b, head, vt.data());
    const int64_t t0 = qb * block, t1 = std::min(d.t, t0 + block);
    for (int64_t r0 = t0; r0 < t1; r0 += kRows) {
      const int64_t nrows = std::min(kRows, t1 - r0);
      const float* qrows[kRows];
      RowPointers(qp, d, b, head, r0, nrows, qrows);
      float row_max[kRows], row_sum[kRows];
      RowsTimesMatrix(qrows, {kt.data(), d.sp, d.sp}, d.h, scale, d.s, p.data(), d.sp,
                      row_max);
      for (int64_t i = 0; i < kRows; ++i) {  // rows past nrows repeat the last: harmless
        row_sum[i] = ExpRow(p.data() + i * d.sp, d.sp, d.s, row_max[i]);
      }
      RowsTimesMatrixT(p.data(), d.sp, {vt.data(), d.sp, d.sp}, d.hp, orows.data());
      for (int64_t i = 0; i < nrows; ++i) {
        const float inv = 1.0f / row_sum[i];
        float* out = op + ((b * d.t + r0 + i) * d.n + head) * d.h;
        for (int64_t c = 0; c < d.h; ++c) out[c] = orows[i * d.hp + c] * inv;
        lp[(b * d.n + head) * d.t + r0 + i] = row_max[i] + std::log(row_sum[i]);
      }
    }
  });
  return ffi::Error::Success();
}

// Backward: dq, dk, dv from q, k, v, o, lse and the output cotangent do.
ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer o, ffi::AnyBuffer lse, ffi::AnyBuffer dout, float scale,
                    ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                    ffi::Result<ffi::AnyBuffer> dv) {
  Dims d;
  if (auto err = GetDims(q, k, &d); err.failure()) return err;
  const float* qp = q.typed_data<float>();
  const float* kp = k.typed_data<float>();
  const float* vp = v.typed_data<float>();
  const float* op = o.typed_data<float>();
  const float* lp = lse.typed_data<float>();
  const float* dop = dout.typed_data<float>();
  float* dqp = dq->typed_data<float>();
  float* dkp = dk->typed_data<float>();
  float* dvp = dv->typed_data<float>();
  // Work items: (batch, head), since dk and dv sum over all queries of a head. Keys go in
  // blocks of kKeyBlock, all query rows for each block, so that the block's transposed keys,
  // values and their gradient accumulators stay in the L1 cache; the probabilities come from
  // the saved log-sum-exp, so a block needs nothing from the others (dq accumulates).
  constexpr int64_t kKeyBlock = 256;
  const int64_t items = d.batch * d.n;
  ParallelFor(pool, items, [&](int64_t item) {
    const int64_t head = item % d.n;
    const int64_t b = item / d.n;
    const int64_t sp = d.sp;
    std::vector<float> kt(d.hp * sp), vt(d.hp * sp), dkt(d.hp * sp, 0.0f), dvt(d.hp * sp, 0.0f);
    std::vector<float> p(kRows * kKeyBlock), ds(kRows * kKeyBlock), dqrows(kRows * d.hp);
    std::vector<float> delta(d.t), dqacc(d.t * d.hp, 0.0f);
    PackTransposed(kp, d, b, head, kt.data());
    PackTransposed(vp, d, b, head, vt.data());
    const float* lrow = lp + (b * d.n + head) * d.t;
    for (int64_t r = 0; r < d.t; ++r) {  // rowsum(do * o)
      const int64_t off = ((b * d.t + r) * d.n + head) * d.h;
      float acc = 0.0f;
      for (int64_t c = 0; c < d.h; ++c) acc += dop[off + c] * op[off + c];
      delta[r] = acc;
    }
    for (int64_t j0 = 0; j0 < sp; j0 += kKeyBlock) {
      const int64_t len = std::min(kKeyBlock, sp - j0);
      const int64_t valid = std::min(len, d.s - j0);  // real keys in the block
      const Panel kb{kt.data() + j0, sp, len}, vb{vt.data() + j0, sp, len};
      for (int64_t r0 = 0; r0 < d.t; r0 += kRows) {
        const int64_t nrows = std::min(kRows, d.t - r0);
        const float* qrows[kRows];
        const float* dorows[kRows];
        RowPointers(qp, d, b, head, r0, nrows, qrows);
        RowPointers(dop, d, b, head, r0, nrows, dorows);
        RowsTimesMatrix(qrows, kb, d.h, scale, valid, p.data(), kKeyBlock);  // scaled scores
        RowsTimesMatrix(dorows, vb, d.h, 1.0f, len, ds.data(), kKeyBlock);   // do . v
        for (int64_t i = 0; i < kRows; ++i) {
          float* pi = p.data() + i * kKeyBlock;
          float* dsi = ds.data() + i * kKeyBlock;
          if (i >= nrows) {  // a repeated row: contributes nothing
            std::fill(pi, pi + len, 0.0f);
            std::fill(dsi, dsi + len, 0.0f);
            continue;
          }
          const float l = lrow[r0 + i], dl = delta[r0 + i];
          for (int64_t j = 0; j < len; j += kLanes) {
            Vec pv = ExpV(Load(pi + j) - l);                       // probabilities
            if (j + kLanes > valid) pv = KeepFirst(pv, valid - j, 0.0f);
            Store(pi + j, pv);
            Store(dsi + j, pv * (Load(dsi + j) - dl));  // d scores (before the scale)
          }
        }
        RowsTimesMatrixT(ds.data(), kKeyBlock, kb, d.hp, dqrows.data());
        for (int64_t i = 0; i < nrows; ++i) {
          float* acc = dqacc.data() + (r0 + i) * d.hp;
          for (int64_t c = 0; c < d.h; ++c) acc[c] += dqrows[i * d.hp + c];
        }
        // dv[c][j] += sum_i p_i[j] do_i[c];  dk[c][j] += sum_i ds_i[j] q_i[c] scale
        for (int64_t c = 0; c < d.h; ++c) {
          float doc[kRows], qc[kRows];
          for (int64_t i = 0; i < kRows; ++i) {
            doc[i] = dorows[i][c];
            qc[i] = qrows[i][c] * scale;
          }
          float* dvc = dvt.data() + c * sp + j0;
          float* dkc = dkt.data() + c * sp + j0;
          for (int64_t j = 0; j < len; j += kLanes) {
            Vec accv = Load(dvc + j);
            Vec acck = Load(dkc + j);
            for (int64_t i = 0; i < kRows; ++i) {
              accv += Load(p.data() + i * kKeyBlock + j) * doc[i];
              acck += Load(ds.data() + i * kKeyBlock + j) * qc[i];
            }
            Store(dvc + j, accv);
            Store(dkc + j, acck);
          }
        }
      }
    }
    for (int64_t r = 0; r < d.t; ++r) {
      const int64_t off = ((b * d.t + r) * d.n + head) * d.h;
      for (int64_t c = 0; c < d.h; ++c) dqp[off + c] = dqacc[r * d.hp + c] * scale;
    }
    for (int64_t j = 0; j < d.s; ++j) {
      const int64_t off = ((b * d.s + j) * d.n + head) * d.h;
      for (int64_t c = 0; c < d.h; ++c) {
        dkp[off + c] = dkt[c * sp + j];
        dvp[off + c] = dvt[c * sp + j];
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FifaAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FifaAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
