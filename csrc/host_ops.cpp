// Host implementations: plain C++ loops over pixels with the per-pixel arithmetic of
// pixel_math.h, parallel over fixed chunks of pixels (OpenMP when available). Reductions are
// deterministic: every chunk accumulates its own partials, and the partials are summed in
// chunk order afterwards, whatever the number of threads.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops.h"

namespace cps {
namespace {

constexpr int64_t kChunk = 2048;  // pixels per chunk (fixed: defines the reduction order)

struct Acc {
  double loss = 0.0;
  int64_t count = 0;
  int64_t agree_l = 0, total_l = 0, agree_u = 0, total_u = 0;
};

template <typename F>
void for_chunks(const View& v, int nthreads, F&& body) {
  const int64_t per_img = (v.HW + kChunk - 1) / kChunk;
  const int64_t n_chunks = v.N * per_img;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1) if (n_chunks > 1)
#endif
  for (int64_t k = 0; k < n_chunks; ++k) {
    const int64_t n = k / per_img;
    const int64_t p0 = (k % per_img) * kChunk;
    const int64_t p1 = std::min(p0 + kChunk, v.HW);
    body(k, n, p0, p1);
  }
}

int64_t n_chunks(const View& v) { return v.N * ((v.HW + kChunk - 1) / kChunk); }

template <typename F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case kF32: f(static_cast<float*>(nullptr)); break;
    case kBF16: f(static_cast<bf16*>(nullptr)); break;
    case kF16: f(static_cast<f16*>(nullptr)); break;
    default: throw std::invalid_argument("cps_fast._C: unsupported logits dtype code");
  }
}

void write_mean(const std::vector<Acc>& parts, ptr_t loss, ptr_t inv_count, Acc* total) {
  Acc t;
  for (const Acc& a : parts) {  // fixed order
    t.loss += a.loss;
    t.count += a.count;
    t.agree_l += a.agree_l;
    t.total_l += a.total_l;
    t.agree_u += a.agree_u;
    t.total_u += a.total_u;
  }
  const double cnt = double(std::max<int64_t>(t.count, 1));
  *reinterpret_cast<float*>(loss) = float(t.loss / cnt);
  *reinterpret_cast<float*>(inv_count) = float(1.0 / cnt);
  if (total) *total = t;
}

// Pixel blocks: up to kBlock pixels of one image processed channel by channel (class loop
// outside, pixel loop inside), so that the pixel loops vectorise for NCHW (unit pixel stride,
// kUnit) — the per-pixel arithmetic is the shared one of pixel_math.h, in the same order.
constexpr int kBlock = 256;

template <typename T, bool kUnit>
struct Blk {
  float m[kBlock], s[kBlock], ls[kBlock];
  int am[kBlock];

  // max / argmax / sum exp / log-sum of nb pixels starting at x (class 0 of the first pixel)
  void stats(const T* x, int64_t sC, int64_t sP, int C, int nb) {
    const int64_t sp = kUnit ? 1 : sP;
    for (int i = 0; i < nb; ++i) {
      m[i] = to_float(x[i * sp]);
      am[i] = 0;
      s[i] = 0.f;
    }
    for (int c = 1; c < C; ++c) {
      const T* xc = x + c * sC;
      for (int i = 0; i < nb; ++i) argmax_step(to_float(xc[i * sp]), c, m[i], am[i]);
    }
    for (int c = 0; c < C; ++c) {
      const T* xc = x + c * sC;
      for (int i = 0; i < nb; ++i) s[i] += fexp(to_float(xc[i * sp]) - m[i]);
    }
    for (int i = 0; i < nb; ++i) ls[i] = flog(s[i]);
  }

  // g = (softmax - onehot(t)) * on for nb pixels
  void grad(const T* x, T* g, int64_t sC, int64_t sP, int C, int nb, const int* t,
            const int* on) const {
    const int64_t sp = kUnit ? 1 : sP;
    float inv[kBlock];
    for (int i = 0; i < nb; ++i) inv[i] = fdiv(1.f, s[i]);
    for (int c = 0; c < C; ++c) {
      const T* xc = x + c * sC;
      T* gc = g + c * sC;
      for (int i = 0; i < nb; ++i)
        store(gc + i * sp, grad_elem(to_float(xc[i * sp]), m[i], inv[i], c, t[i], on[i] != 0));
    }
  }
};

// Calls body.template operator()<T, kUnit>() for the logits dtype and layout.
template <typename F>
void dispatch_blk(int dtype, const View& v, F&& f) {
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (v.sP == 1)
      f.template operator()<T, true>();
    else
      f.template operator()<T, false>();
  });
}

}  // namespace

void ce_host(const View& v, int dtype, ptr_t logits, ptr_t target, int tcode,
             int64_t ignore_index, ptr_t grad, ptr_t loss, ptr_t inv_count, int nthreads) {
  std::vector<Acc> parts(n_chunks(v));
  const int C = int(v.C);
  const void* Y = reinterpret_cast<const void*>(target);
  dispatch_blk(dtype, v, [&]<typename T, bool kUnit>() {
    const T* X = reinterpret_cast<const T*>(logits);
    T* G = reinterpret_cast<T*>(grad);
    for_chunks(v, nthreads, [&](int64_t k, int64_t n, int64_t p0, int64_t p1) {
      Acc a;
      Blk<T, kUnit> b;
      int t[kBlock];
      int on[kBlock];  // int, not bool: keeps the grad loop vectorisable
      for (int64_t q = p0; q < p1; q += kBlock) {
        const int nb = int(std::min<int64_t>(kBlock, p1 - q));
        const int64_t off = n * v.sN + q * v.sP;
        for (int i = 0; i < nb; ++i) {
          const int64_t tt = load_label(Y, tcode, n * v.HW + q + i);
          on[i] = label_valid(tt, ignore_index, C);
          t[i] = on[i] ? int(tt) : 0;
        }
        b.stats(X + off, v.sC, v.sP, C, nb);
        for (int i = 0; i < nb; ++i) {
          if (!on[i]) continue;
          a.loss += ce_from(b.m[i], b.ls[i], to_float(X[off + t[i] * v.sC + i * v.sP]));
          a.count += 1;
        }
        if (G) b.grad(X + off, G + off, v.sC, v.sP, C, nb, t, on);
      }
      parts[k] = a;
    });
  });
  write_mean(parts, loss, inv_count, nullptr);
}

void cps_host(const View& v, int dtype, ptr_t a_ptr, ptr_t b_ptr, ptr_t valid_ptr,
              ptr_t labeled_ptr, int64_t background_index, ptr_t grad_a, ptr_t grad_b,
              ptr_t loss, ptr_t inv_count, ptr_t stats, int nthreads) {
  std::vector<Acc> parts(n_chunks(v));
  const int C = int(v.C);
  const uint8_t* V = reinterpret_cast<const uint8_t*>(valid_ptr);
  const uint8_t* L = reinterpret_cast<const uint8_t*>(labeled_ptr);
  dispatch_blk(dtype, v, [&]<typename T, bool kUnit>() {
    const T* A = reinterpret_cast<const T*>(a_ptr);
    const T* B = reinterpret_cast<const T*>(b_ptr);
    T* GA = reinterpret_cast<T*>(grad_a);
    T* GB = reinterpret_cast<T*>(grad_b);
    for_chunks(v, nthreads, [&](int64_t k, int64_t n, int64_t p0, int64_t p1) {
      Acc acc;
      Blk<T, kUnit> ba, bb;
      int on[kBlock];  // int, not bool: keeps the grad loop vectorisable
      const bool lab = L ? L[n] != 0 : false;
      for (int64_t q = p0; q < p1; q += kBlock) {
        const int nb = int(std::min<int64_t>(kBlock, p1 - q));
        const int64_t off = n * v.sN + q * v.sP;
        for (int i = 0; i < nb; ++i) on[i] = V ? V[n * v.HW + q + i] != 0 : true;
        ba.stats(A + off, v.sC, v.sP, C, nb);
        bb.stats(B + off, v.sC, v.sP, C, nb);
        for (int i = 0; i < nb; ++i) {
          if (!on[i]) continue;
          const int pa = ba.am[i], pb = bb.am[i];
          const int64_t o = off + i * v.sP;
          acc.loss += double(ce_from(ba.m[i], ba.ls[i], to_float(A[o + pb * v.sC]))) +
                      double(ce_from(bb.m[i], bb.ls[i], to_float(B[o + pa * v.sC])));
          acc.count += 1;
          const bool counted =
              background_index < 0 || pa != background_index || pb != background_index;
          const int64_t agree = (counted && pa == pb) ? 1 : 0;
          if (lab) {
            acc.agree_l += agree;
            acc.total_l += counted;
          } else {
            acc.agree_u += agree;
            acc.total_u += counted;
          }
        }
        // each network's pseudo-label is the other's argmax
        if (GA) ba.grad(A + off, GA + off, v.sC, v.sP, C, nb, bb.am, on);
        if (GB) bb.grad(B + off, GB + off, v.sC, v.sP, C, nb, ba.am, on);
      }
      parts[k] = acc;
    });
  });
  Acc t;
  write_mean(parts, loss, inv_count, &t);
  int64_t* S = reinterpret_cast<int64_t*>(stats);
  S[0] = t.agree_l;
  S[1] = t.total_l;
  S[2] = t.agree_u;
  S[3] = t.total_u;
}

void ohem_host(const View& v, int dtype, ptr_t logits, ptr_t target, int tcode, float thresh,
               int64_t min_kept, int64_t ignore_index, ptr_t grad, ptr_t loss, ptr_t weight,
               ptr_t key_ptr, ptr_t threshold, int nthreads) {
  const int C = int(v.C);
  const int64_t P = v.N * v.HW;
  const int64_t per_img = (v.HW + kChunk - 1) / kChunk;  // chunks k of image n: n*per_img + j
  uint32_t* key = reinterpret_cast<uint32_t*>(key_ptr);
  std::vector<float> ce(P);
  std::vector<int64_t> nvalid(n_chunks(v), 0);
  const void* Y = reinterpret_cast<const void*>(target);
  // pass 1: p (as an order-preserving key) and CE per pixel
  dispatch_blk(dtype, v, [&]<typename T, bool kUnit>() {
    const T* X = reinterpret_cast<const T*>(logits);
    for_chunks(v, nthreads, [&](int64_t k, int64_t n, int64_t p0, int64_t p1) {
      int64_t cnt = 0;
      Blk<T, kUnit> b;
      int t[kBlock];
      int on[kBlock];  // int, not bool: keeps the grad loop vectorisable
      for (int64_t q = p0; q < p1; q += kBlock) {
        const int nb = int(std::min<int64_t>(kBlock, p1 - q));
        const int64_t off = n * v.sN + q * v.sP;
        for (int i = 0; i < nb; ++i) {
          const int64_t tt = load_label(Y, tcode, n * v.HW + q + i);
          on[i] = label_valid(tt, ignore_index, C);
          t[i] = on[i] ? int(tt) : 0;
        }
        b.stats(X + off, v.sC, v.sP, C, nb);
        for (int i = 0; i < nb; ++i) {
          const int64_t j = n * v.HW + q + i;
          if (!on[i]) {
            key[j] = kInvalidKey;
            ce[j] = 0.f;
            continue;
          }
          const float xt = to_float(X[off + t[i] * v.sC + i * v.sP]);
          key[j] = prob_key(prob_from(b.m[i], b.s[i], xt));
          ce[j] = ce_from(b.m[i], b.ls[i], xt);
          ++cnt;
        }
      }
      nvalid[k] = cnt;
    });
  });
  // per-image threshold (the official ProbOhemCrossEntropy2d rule on each image)
  std::vector<uint32_t> thr(v.N, kKeepAllKey);
  float* TH = reinterpret_cast<float*>(threshold);
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic) num_threads(nthreads > 0 ? nthreads : 1) if (v.N > 1)
#endif
  for (int64_t n = 0; n < v.N; ++n) {
    int64_t num_valid = 0;
    for (int64_t j = 0; j < per_img; ++j) num_valid += nvalid[n * per_img + j];
    const bool sel = ohem_selects(num_valid, min_kept);
    uint32_t kth = 0;
    if (sel) {
      std::vector<uint32_t> keys;
      keys.reserve(num_valid);
      const uint32_t* kn = key + n * v.HW;
      for (int64_t i = 0; i < v.HW; ++i)
        if (kn[i] != kInvalidKey) keys.push_back(kn[i]);
      std::nth_element(keys.begin(), keys.begin() + (min_kept - 1), keys.end());
      kth = keys[min_kept - 1];
    }
    thr[n] = ohem_threshold_key(sel, kth, thresh);
    TH[n] = ohem_threshold_value(thr[n]);
  }
  // pass 2: per-chunk sums over the kept pixels, and the unscaled gradient
  std::vector<Acc> parts(n_chunks(v));
  dispatch_blk(dtype, v, [&]<typename T, bool kUnit>() {
    const T* X = reinterpret_cast<const T*>(logits);
    T* G = reinterpret_cast<T*>(grad);
    for_chunks(v, nthreads, [&](int64_t k, int64_t n, int64_t p0, int64_t p1) {
      Acc a;
      Blk<T, kUnit> b;
      int t[kBlock];
      int on[kBlock];  // int, not bool: keeps the grad loop vectorisable
      const uint32_t thr_n = thr[n];
      for (int64_t q = p0; q < p1; q += kBlock) {
        const int nb = int(std::min<int64_t>(kBlock, p1 - q));
        for (int i = 0; i < nb; ++i) {
          const int64_t j = n * v.HW + q + i;
          on[i] = key[j] <= thr_n;  // kInvalidKey is above every threshold key
          t[i] = on[i] ? int(load_label(Y, tcode, j)) : 0;
          if (on[i]) {
            a.loss += ce[j];
            a.count += 1;
          }
        }
        if (G) {
          const int64_t off = n * v.sN + q * v.sP;
          b.stats(X + off, v.sC, v.sP, C, nb);
          b.grad(X + off, G + off, v.sC, v.sP, C, nb, t, on);
        }
      }
      parts[k] = a;
    });
  });
  // each image's sum and count in chunk order, then the mean of the image means
  OhemMean mean;
  std::vector<int64_t> count(v.N, 0);
  for (int64_t n = 0; n < v.N; ++n) {
    double s = 0.0;
    for (int64_t j = 0; j < per_img; ++j) {
      s += parts[n * per_img + j].loss;
      count[n] += parts[n * per_img + j].count;
    }
    mean.add(s, double(count[n]));
  }
  *reinterpret_cast<float*>(loss) = mean.loss();
  float* W = reinterpret_cast<float*>(weight);
  for (int64_t n = 0; n < v.N; ++n) W[n] = mean.weight(double(count[n]));
}

void confusion_host(const View& v, int dtype, ptr_t x, int pcode, ptr_t target, int tcode,
                    int64_t num_classes, int64_t ignore_index, ptr_t out, int nthreads) {
  const int64_t nc = num_classes;
  const int64_t nch = n_chunks(v);
  // one histogram per chunk group of a thread would be cheaper; per-chunk keeps it simple and
  // the sum is exact (integers), so the order does not matter.
  int nt = nthreads > 0 ? nthreads : 1;
  std::vector<std::vector<int64_t>> hist(nt, std::vector<int64_t>(nc * nc, 0));
  const void* Y = reinterpret_cast<const void*>(target);
  auto run = [&](auto get_pred) {
    for_chunks(v, nt, [&](int64_t, int64_t n, int64_t p0, int64_t p1) {
#ifdef _OPENMP
      std::vector<int64_t>& h = hist[omp_get_thread_num()];
#else
      std::vector<int64_t>& h = hist[0];
#endif
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t i = n * v.HW + p;
        const int64_t t = load_label(Y, tcode, i);
        if (t == ignore_index || t < 0 || t >= nc) continue;
        const int64_t pr = get_pred(n, p, i);
        if (pr < 0 || pr >= nc) continue;
        h[t * nc + pr] += 1;
      }
    });
  };
  if (dtype < 0) {
    const void* Pp = reinterpret_cast<const void*>(x);
    run([&](int64_t, int64_t, int64_t i) { return load_label(Pp, pcode, i); });
  } else {
    dispatch(dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const T* X = reinterpret_cast<const T*>(x);
      run([&](int64_t n, int64_t p, int64_t) {
        float m;
        int am;
        row_argmax(X + n * v.sN + p * v.sP, v.sC, int(v.C), m, am);
        return int64_t(am);
      });
    });
  }
  (void)nch;
  int64_t* O = reinterpret_cast<int64_t*>(out);
  for (int64_t j = 0; j < nc * nc; ++j) {
    int64_t s = 0;
    for (int k = 0; k < nt; ++k) s += hist[k][j];
    O[j] = s;
  }
}

}  // namespace cps
