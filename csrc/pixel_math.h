// Per-pixel arithmetic shared by the CUDA kernels (device_ops.cu) and the host C++ loops
// (host_ops.cpp): one source, two targets. Everything here is inline and `__host__ __device__`
// under nvcc, plain `inline` under the host compiler.
//
// Conventions (they define the semantics; see kernels/*.py for the eager references):
// - logits are addressed as x[n*sN + c*sC + p*sP] (p = pixel index within an image, H*W
//   collapsed), so NCHW-contiguous (sC = HW, sP = 1) and channels_last (sC = 1, sP = C) work;
// - fp32 / bf16 / fp16 are loaded as raw bits and converted to float; all math is fp32;
// - argmax ties go to the lowest class index (strict `>`), as torch.argmax;
// - CE = (max - x_target) + log(sum exp(x - max)), which stays exact for logits of ±1e4.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define CPS_HD __host__ __device__ __forceinline__
#else
#define CPS_HD inline
#endif

namespace cps {

// 16-bit storage types: raw bits, converted on load / store.
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

// dtype codes shared with cps_fast/ext.py
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
enum IType : int { kI64 = 0, kU8 = 1, kI32 = 2 };

// Sentinel key of an ignored pixel in the OHEM probability array (above every p in [0, 1]).
constexpr uint32_t kInvalidKey = 0xFFFFFFFFu;
// Threshold key meaning "keep every valid pixel".
constexpr uint32_t kKeepAllKey = 0xFFFFFFFEu;

CPS_HD float bits_to_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

CPS_HD uint32_t f32_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

CPS_HD float to_float(float x) { return x; }
CPS_HD float to_float(bf16 x) { return bits_to_f32(uint32_t(x.bits) << 16); }
CPS_HD float to_float(f16 x) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(x.bits));
#else
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0) {  // zero / subnormal: mant * 2^-24, exact in fp32
    const float v = float(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_f32(sign | 0x7F800000u | (mant << 13));  // inf / nan
  return bits_to_f32(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

CPS_HD void store(float* p, float v) { *p = v; }
CPS_HD void store(bf16* p, float v) {
#ifdef __CUDA_ARCH__
  p->bits = __bfloat16_as_ushort(__float2bfloat16_rn(v));
#else
  uint32_t u = f32_to_bits(v);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {  // nan
    p->bits = uint16_t((u >> 16) | 0x40u);
    return;
  }
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  p->bits = uint16_t(u >> 16);
#endif
}
CPS_HD void store(f16* p, float v) {
#ifdef __CUDA_ARCH__
  p->bits = __half_as_ushort(__float2half_rn(v));
#else
  // fp32 -> fp16, round to nearest even (after M. Dukhan's FP16 library).
  const float scale_to_inf = bits_to_f32(0x77800000u);   // 2^112
  const float scale_to_zero = bits_to_f32(0x08800000u);  // 2^-110
  float base = (std::fabs(v) * scale_to_inf) * scale_to_zero;
  const uint32_t w = f32_to_bits(v);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mant_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mant_bits;
  p->bits = uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
}

// exp on the host: a branch-free Cephes-style polynomial (about 1 ulp on [-87, 88]; inputs
// below -87 give ~1e-38 instead of 0, harmless for softmax) that the host compiler can
// vectorise across pixels without -ffast-math. The device uses the hardware-backed expf.
CPS_HD float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : x;  // two plain selects: the host compiler vectorises these
  x = x > 88.0f ? 88.0f : x;
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x/ln2)
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return p * bits_to_f32(uint32_t(int(k) + 127) << 23);
}

CPS_HD float fexp(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  return exp_poly(x);
#endif
}
// a / b for b in [1, C] (softmax denominators). On the device __fdividef (2 ulp there) avoids
// the IEEE division's out-of-line slow path, which costs a call and register spills.
CPS_HD float fdiv(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdividef(a, b);
#else
  return a / b;
#endif
}
CPS_HD float flog(float x) { return logf(x); }

// One step of the running argmax (strict >: ties keep the lowest index).
CPS_HD void argmax_step(float v, int c, float& m, int& am) {
  const float m0 = m;
  const int gt = -int(v > m0);  // all ones when v > m: a branch-free, vectorisable update
  m = gt ? v : m0;
  am = (am & ~gt) | (c & gt);
}
// Gradient element of class c: softmax - onehot(t), or 0 when the pixel is off.
CPS_HD float grad_elem(float x, float m, float inv_s, int c, int t, bool on) {
  const float sm = fexp(x - m) * inv_s;
  const float v = c == t ? sm - 1.f : sm;
  return on ? v : 0.f;
}

// Softmax statistics of one pixel's C logits.
struct Row {
  float m;    // max logit
  int am;     // argmax (lowest index on ties)
  float s;    // sum exp(x - m), >= 1
  float ls;   // log(s)
};

template <typename T>
CPS_HD void row_argmax(const T* x, int64_t sC, int C, float& m, int& am) {
  m = to_float(x[0]);
  am = 0;
  for (int c = 1; c < C; ++c) argmax_step(to_float(x[c * sC]), c, m, am);
}

template <typename T>
CPS_HD Row row_stats(const T* x, int64_t sC, int C) {
  Row r;
  row_argmax(x, sC, C, r.m, r.am);
  float s = 0.f;
  for (int c = 0; c < C; ++c) s += fexp(to_float(x[c * sC]) - r.m);
  r.s = s;
  r.ls = flog(s);
  return r;
}

// Cross-entropy of a pixel against class t from its max m, log-sum log(s) and logit x_t.
CPS_HD float ce_from(float m, float ls, float xt) { return (m - xt) + ls; }
CPS_HD float ce_of(const Row& r, float xt) { return ce_from(r.m, r.ls, xt); }
// Softmax probability of class t.
CPS_HD float prob_from(float m, float s, float xt) { return fdiv(fexp(xt - m), s); }
CPS_HD float prob_of(const Row& r, float xt) { return prob_from(r.m, r.s, xt); }

// OHEM key of a probability: nonnegative floats order like their bit patterns.
CPS_HD uint32_t prob_key(float p) { return f32_to_bits(p); }

// ---- OHEM, selected per image (the rule: kernels/ohem_cross_entropy.py). The host loops and
// the CUDA kernels decide with these same functions; they differ only in how they find the
// min_kept-th smallest key (std::nth_element there, a radix select on the device).
//
// Whether an image's selection runs: min_kept <= 0 switches the mining off (official code),
// and an image with num_valid <= min_kept keeps every valid pixel.
CPS_HD bool ohem_selects(int64_t num_valid, int64_t min_kept) {
  return min_kept > 0 && num_valid > min_kept;
}
// Threshold key of an image: max(t, thresh) for t = its min_kept-th smallest p (kth_key), or
// kKeepAllKey. A pixel is kept when its key <= the threshold key (ties all kept).
CPS_HD uint32_t ohem_threshold_key(bool selects, uint32_t kth_key, float thresh) {
  if (!selects) return kKeepAllKey;
  const float kth = bits_to_f32(kth_key);
  return prob_key(kth > thresh ? kth : thresh);
}
// The threshold as a probability (+inf: every valid pixel kept), the value the ops return.
CPS_HD float ohem_threshold_value(uint32_t thr_key) {
  return thr_key == kKeepAllKey ? bits_to_f32(0x7F800000u) : bits_to_f32(thr_key);
}
// The batch loss: the mean over the images with a kept pixel of each image's mean CE over its
// kept pixels (0 when there is none), and the weight 1 / (num_counted_images * count_n) that
// scales image n's unnormalised gradient. Images must be added in a fixed order.
struct OhemMean {
  double total = 0.0;  // sum of the counted images' means
  int64_t images = 0;  // number of images with count > 0
  CPS_HD void add(double sum, double count) {
    if (count > 0.0) {
      total += sum / count;
      images += 1;
    }
  }
  CPS_HD void merge(const OhemMean& o) {
    total += o.total;
    images += o.images;
  }
  CPS_HD double denom() const { return double(images > 0 ? images : 1); }
  CPS_HD float loss() const { return float(total / denom()); }
  CPS_HD float weight(double count) const {
    return float(1.0 / (denom() * (count > 1.0 ? count : 1.0)));
  }
};

// Unscaled CE gradient of one pixel: (softmax - onehot(t)) if on, else 0 (the caller scales
// by 1/count in backward, where the upstream gradient is applied anyway).
template <typename T, typename G>
CPS_HD void write_ce_grad(const T* x, G* g, int64_t sC, int C, const Row& r, int t, bool on) {
  if (!on) {
    for (int c = 0; c < C; ++c) store(g + c * sC, 0.f);
    return;
  }
  const float inv = fdiv(1.f, r.s);
  for (int c = 0; c < C; ++c) store(g + c * sC, grad_elem(to_float(x[c * sC]), r.m, inv, c, t, true));
}

// Load a label of any supported integer storage type as int64.
CPS_HD int64_t load_label(const void* base, int code, int64_t i) {
  switch (code) {
    case kU8: return int64_t(static_cast<const uint8_t*>(base)[i]);
    case kI32: return int64_t(static_cast<const int32_t*>(base)[i]);
    default: return static_cast<const int64_t*>(base)[i];
  }
}

// Whether a label counts: not ignore_index and inside [0, C). Out-of-range labels are
// treated as ignored on this path (the Python layer rejects them on CPU tensors beforehand;
// a device kernel cannot raise, and must not read out of bounds).
CPS_HD bool label_valid(int64_t t, int64_t ignore_index, int C) {
  return t != ignore_index && t >= 0 && t < C;
}

// Geometry of a logits tensor (N, C, H*W) with element strides.
struct View {
  int64_t N, C, HW;
  int64_t sN, sC, sP;
};

}  // namespace cps
