// CUDA implementations of the ops, on the per-pixel arithmetic of pixel_math.h.
//
// - Everything is asynchronous on the caller's stream: no host synchronisation, no device
//   allocation (torch allocates outputs and workspaces), no memcpy, no host reads of results.
// - Launch shapes depend on the tensor shapes only, never on the device, so the floating-point
//   reductions are deterministic: each block writes its partial sums (float64) to its own row,
//   then one block sums the rows in a fixed order. Integer counts may use atomics (exact).
// - Pixel kernels run on a 2-D grid (pixel blocks, image): no 64-bit division per pixel.
#include <cuda_runtime.h>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace cps {
namespace {

constexpr int kThreads = 256;        // threads per block of the pixel kernels
constexpr int kPixPerThread = 4;     // target pixels per thread (grid-stride beyond that)
constexpr int kCols = 6;             // columns of a partials row
constexpr int kHist0 = 4096;         // OHEM select: key bits [20, 32)
constexpr int kHist1 = 1024;         //              key bits [10, 20), then [0, 10)
constexpr int kHistAll = kHist0 + 2 * kHist1;  // bins per image (the selection is per image)
// Pixel kernels: 256 threads, at least 4 resident blocks per SM (<= 64 registers). Stating
// the occupancy target lets ptxas allocate freely below it (without it ptxas spilled a few
// loop invariants of ce_kernel at 48 registers).
#define CPS_PIXEL_BOUNDS __launch_bounds__(kThreads, 4)
constexpr int kScanThreads = 256;    // one block; 256 threads keep the scan spill-free

// Selection state of one image (OHEM selects per image).
struct OhemState {
  unsigned long long num_valid;
  long long k_rem;     // rank still to find inside the current bucket (1-based)
  unsigned int prefix; // key bits found so far
  unsigned int need;   // ohem_selects(num_valid, min_kept): the image's select runs
  unsigned int thr;    // final threshold key
  unsigned int pad;
};

inline int64_t pixel_blocks(int64_t HW, int ppt) {
  int64_t b = (HW + int64_t(kThreads) * ppt - 1) / (int64_t(kThreads) * ppt);
  return b < 1 ? 1 : (b > 65535 ? 65535 : b);
}

inline void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("cps_fast._C: ") + what + ": " + cudaGetErrorString(e));
}

// Make `device` current in this (static) CUDA runtime for the scope of a call.
struct DeviceScope {
  int prev = -1;
  explicit DeviceScope(int device) {
    int cur = -1;
    if (cudaGetDevice(&cur) != cudaSuccess) cur = -1;
    if (cur != device) {
      if (cudaSetDevice(device) != cudaSuccess) check_launch("cudaSetDevice");
      prev = cur;
    }
  }
  ~DeviceScope() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};

template <typename F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case kF32: f(static_cast<float*>(nullptr)); break;
    case kBF16: f(static_cast<bf16*>(nullptr)); break;
    case kF16: f(static_cast<f16*>(nullptr)); break;
    default: throw std::invalid_argument("cps_fast._C: unsupported logits dtype code");
  }
}

// Sum K per-thread values over the block (fixed shuffle tree, then warps in order) and write
// them to a partials row as float64.
template <int K>
__device__ __forceinline__ void block_sum_store(float (&v)[K], double* row) {
  __shared__ float sm[K][kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) sm[k][warp] = v[k];
  }
  __syncthreads();
  if (threadIdx.x < K) {
    double s = 0.0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) s += double(sm[threadIdx.x][w]);
    row[threadIdx.x] = s;
  }
}

// One block: sums the partial rows in a fixed order; writes mean loss, 1/count and the stats.
template <int K>
__global__ void CPS_PIXEL_BOUNDS finalize_kernel(const double* __restrict__ partials,
                                                            int64_t rows, float* loss,
                                                            float* inv_count,
                                                            long long* stats) {
  __shared__ double sm[K][kThreads];
  double s[K];
#pragma unroll
  for (int k = 0; k < K; ++k) s[k] = 0.0;
  for (int64_t r = threadIdx.x; r < rows; r += kThreads) {
#pragma unroll
    for (int k = 0; k < K; ++k) s[k] += partials[r * kCols + k];
  }
#pragma unroll
  for (int k = 0; k < K; ++k) sm[k][threadIdx.x] = s[k];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
#pragma unroll
      for (int k = 0; k < K; ++k) sm[k][threadIdx.x] += sm[k][threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double cnt = sm[1][0] < 1.0 ? 1.0 : sm[1][0];
    *loss = float(sm[0][0] / cnt);
    *inv_count = float(1.0 / cnt);
    if (stats) {
#pragma unroll
      for (int k = 2; k < K; ++k) stats[k - 2] = (long long)(sm[k][0]);
    }
  }
}

// ------------------------------------------------------------------------- cross-entropy
template <typename T>
__global__ void CPS_PIXEL_BOUNDS ce_kernel(View v, const T* __restrict__ X,
                                                      const void* __restrict__ Y, int tcode,
                                                      int64_t ignore_index, T* __restrict__ G,
                                                      double* __restrict__ partials) {
  const int C = int(v.C);
  const int64_t n = blockIdx.y;
  float acc[2] = {0.f, 0.f};
  for (int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x; p < v.HW;
       p += int64_t(gridDim.x) * kThreads) {
    const int64_t off = n * v.sN + p * v.sP;
    const int64_t t64 = load_label(Y, tcode, n * v.HW + p);
    const bool valid = label_valid(t64, ignore_index, C);
    const int t = valid ? int(t64) : 0;
    const Row r = row_stats(X + off, v.sC, C);
    const float xt = to_float(X[off + t * v.sC]);
    acc[0] += valid ? ce_of(r, xt) : 0.f;
    acc[1] += valid ? 1.f : 0.f;
    if (G) write_ce_grad(X + off, G + off, v.sC, C, r, t, valid);
  }
  block_sum_store<2>(acc, partials + (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * kCols);
}

// ------------------------------------------------------------------------- CPS loss
template <typename T>
__global__ void CPS_PIXEL_BOUNDS cps_kernel(View v, const T* __restrict__ A,
                                                       const T* __restrict__ B,
                                                       const uint8_t* __restrict__ V,
                                                       const uint8_t* __restrict__ L,
                                                       int64_t background_index,
                                                       T* __restrict__ GA, T* __restrict__ GB,
                                                       double* __restrict__ partials) {
  const int C = int(v.C);
  const int64_t n = blockIdx.y;
  const bool lab = L ? L[n] != 0 : false;
  float acc[6] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x; p < v.HW;
       p += int64_t(gridDim.x) * kThreads) {
    const int64_t off = n * v.sN + p * v.sP;
    const bool valid = V ? V[n * v.HW + p] != 0 : true;
    const Row ra = row_stats(A + off, v.sC, C);
    const Row rb = row_stats(B + off, v.sC, C);
    if (valid) {
      acc[0] += ce_of(ra, to_float(A[off + rb.am * v.sC])) +
                ce_of(rb, to_float(B[off + ra.am * v.sC]));
      acc[1] += 1.f;
      const bool counted = background_index < 0 || ra.am != background_index ||
                           rb.am != background_index;
      const float agree = (counted && ra.am == rb.am) ? 1.f : 0.f;
      const float cnt = counted ? 1.f : 0.f;
      // static indices only (a dynamic index would put acc[] in local memory)
      acc[2] += lab ? agree : 0.f;
      acc[3] += lab ? cnt : 0.f;
      acc[4] += lab ? 0.f : agree;
      acc[5] += lab ? 0.f : cnt;
    }
    if (GA) write_ce_grad(A + off, GA + off, v.sC, C, ra, rb.am, valid);
    if (GB) write_ce_grad(B + off, GB + off, v.sC, C, rb, ra.am, valid);
  }
  block_sum_store<6>(acc, partials + (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * kCols);
}

// ------------------------------------------------------------------------- OHEM
// Selected per image (the rule: kernels/ohem_cross_entropy.py; the decisions are the shared
// ohem_* functions of pixel_math.h). Every image has its own histograms and state, and every
// kernel after the pixel pass runs on a grid whose second (or only) dimension is the image:
//   init (N) -> pixel (blocks, N) -> scan<0> (N) -> hist<1> (blocks, N) -> scan<1> (N)
//   -> hist<2> (blocks, N) -> scan<2> (N) -> final (blocks, N) -> ohem_finalize (1).
struct OhemWs {
  uint32_t* key;       // N*HW keys (an output of the op)
  float* ce;           // N*HW
  unsigned int* hist;  // N * kHistAll
  OhemState* state;    // N
};

inline size_t align256(size_t b) { return (b + 255) & ~size_t(255); }

OhemWs ohem_layout(ptr_t base, ptr_t key, int64_t N, int64_t HW) {
  char* b = reinterpret_cast<char*>(base);
  OhemWs w;
  size_t o = 0;
  w.key = reinterpret_cast<uint32_t*>(key);
  w.ce = reinterpret_cast<float*>(b + o);
  o += align256(size_t(N * HW) * 4);
  w.hist = reinterpret_cast<unsigned int*>(b + o);
  o += align256(size_t(N) * kHistAll * 4);
  w.state = reinterpret_cast<OhemState*>(b + o);
  return w;
}

// One block per image: zero its histograms and state.
__global__ void ohem_init_kernel(OhemWs w) {
  unsigned int* h = w.hist + int64_t(blockIdx.x) * kHistAll;
  for (int i = threadIdx.x; i < kHistAll; i += blockDim.x) h[i] = 0u;
  if (threadIdx.x == 0) w.state[blockIdx.x] = OhemState{0ull, 0ll, 0u, 0u, 0u, 0u};
}

// p (as an order-preserving key) and CE per pixel; the image's level-0 histogram of its valid
// keys and its number of valid pixels.
template <typename T>
__global__ void CPS_PIXEL_BOUNDS ohem_pixel_kernel(View v, const T* __restrict__ X,
                                                              const void* __restrict__ Y,
                                                              int tcode, int64_t ignore_index,
                                                              OhemWs w) {
  __shared__ unsigned int hist[kHist0];
  __shared__ unsigned int nvalid;
  for (int i = threadIdx.x; i < kHist0; i += kThreads) hist[i] = 0u;
  if (threadIdx.x == 0) nvalid = 0u;
  __syncthreads();
  const int C = int(v.C);
  const int64_t n = blockIdx.y;
  unsigned int cnt = 0;
  for (int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x; p < v.HW;
       p += int64_t(gridDim.x) * kThreads) {
    const int64_t i = n * v.HW + p;
    const int64_t t = load_label(Y, tcode, i);
    if (!label_valid(t, ignore_index, C)) {
      w.key[i] = kInvalidKey;
      w.ce[i] = 0.f;
      continue;
    }
    const int64_t off = n * v.sN + p * v.sP;
    const Row r = row_stats(X + off, v.sC, C);
    const float xt = to_float(X[off + t * v.sC]);
    const uint32_t k = prob_key(prob_of(r, xt));
    w.key[i] = k;
    w.ce[i] = ce_of(r, xt);
    atomicAdd(&hist[k >> 20], 1u);
    ++cnt;
  }
  atomicAdd(&nvalid, cnt);
  __syncthreads();
  unsigned int* g = w.hist + n * kHistAll;
  for (int i = threadIdx.x; i < kHist0; i += kThreads)
    if (hist[i]) atomicAdd(&g[i], hist[i]);
  if (threadIdx.x == 0 && nvalid)
    atomicAdd(&w.state[n].num_valid, (unsigned long long)nvalid);
}

// Histogram of image n's keys that match the prefix found so far (levels 1 and 2); images
// whose select does not run (they keep every valid pixel) skip the read.
template <int kLevel>
__global__ void CPS_PIXEL_BOUNDS ohem_hist_kernel(int64_t HW, OhemWs w) {
  const int64_t n = blockIdx.y;
  const OhemState* st = w.state + n;
  if (!st->need) return;
  __shared__ unsigned int hist[kHist1];
  for (int i = threadIdx.x; i < kHist1; i += kThreads) hist[i] = 0u;
  __syncthreads();
  constexpr int kHiShift = kLevel == 1 ? 20 : 10;
  constexpr int kShift = kLevel == 1 ? 10 : 0;
  const uint32_t want = st->prefix >> kHiShift;
  const uint32_t* key = w.key + n * HW;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < HW;
       i += int64_t(gridDim.x) * kThreads) {
    const uint32_t k = key[i];
    if (k != kInvalidKey && (k >> kHiShift) == want) atomicAdd(&hist[(k >> kShift) & 1023u], 1u);
  }
  __syncthreads();
  unsigned int* g = w.hist + n * kHistAll + kHist0 + (kLevel - 1) * kHist1;
  for (int i = threadIdx.x; i < kHist1; i += kThreads)
    if (hist[i]) atomicAdd(&g[i], hist[i]);
}

// One block per image: find the bucket holding its k_rem-th key; the last level sets the
// image's threshold (key in the state, value in the op's threshold output).
template <int kLevel>
__global__ void __launch_bounds__(kScanThreads) ohem_scan_kernel(OhemWs w, long long min_kept,
                                                                 float thresh,
                                                                 float* threshold) {
  using Scan = cub::BlockScan<unsigned long long, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int64_t n = blockIdx.x;
  OhemState* st = w.state + n;
  if (kLevel == 0 && threadIdx.x == 0) {
    st->need = ohem_selects((long long)st->num_valid, min_kept) ? 1u : 0u;
    st->k_rem = min_kept;
  }
  __syncthreads();
  if (st->need) {
    constexpr int kBins = kLevel == 0 ? kHist0 : kHist1;
    constexpr int kPer = kBins / kScanThreads;
    constexpr int kShift = kLevel == 0 ? 20 : (kLevel == 1 ? 10 : 0);
    const unsigned int* h =
        w.hist + n * kHistAll + (kLevel == 0 ? 0 : kHist0 + (kLevel - 1) * kHist1);
    unsigned long long local = 0;
#pragma unroll
    for (int j = 0; j < kPer; ++j) local += h[threadIdx.x * kPer + j];
    unsigned long long excl;
    Scan(tmp).ExclusiveSum(local, excl);
    const unsigned long long k = (unsigned long long)st->k_rem;
    __syncthreads();  // every thread has read k_rem before it is updated
    if (excl < k && k <= excl + local) {
      unsigned long long c = excl;
      for (int j = 0; j < kPer; ++j) {
        const unsigned long long hj = h[threadIdx.x * kPer + j];
        if (k <= c + hj) {
          st->prefix |= (unsigned int)(threadIdx.x * kPer + j) << kShift;
          st->k_rem = (long long)(k - c);
          break;
        }
        c += hj;
      }
    }
  }
  if (kLevel == 2) {
    __syncthreads();
    if (threadIdx.x == 0) {
      const unsigned int thr = ohem_threshold_key(st->need != 0u, st->prefix, thresh);
      st->thr = thr;
      threshold[n] = ohem_threshold_value(thr);
    }
  }
}

// Kept sums per block (partials row n * gridDim.x + blockIdx.x) and the unscaled gradient.
template <typename T>
__global__ void CPS_PIXEL_BOUNDS ohem_final_kernel(View v, const T* __restrict__ X,
                                                              const void* __restrict__ Y,
                                                              int tcode, OhemWs w,
                                                              T* __restrict__ G,
                                                              double* __restrict__ partials) {
  const int64_t n = blockIdx.y;
  const uint32_t thr = w.state[n].thr;
  const int C = int(v.C);
  float acc[2] = {0.f, 0.f};
  for (int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x; p < v.HW;
       p += int64_t(gridDim.x) * kThreads) {
    const int64_t i = n * v.HW + p;
    const bool kept = w.key[i] <= thr;
    if (kept) {
      acc[0] += w.ce[i];
      acc[1] += 1.f;
    }
    if (G) {
      const int64_t off = n * v.sN + p * v.sP;
      const Row r = row_stats(X + off, v.sC, C);
      const int t = kept ? int(load_label(Y, tcode, i)) : 0;
      write_ce_grad(X + off, G + off, v.sC, C, r, t, kept);
    }
  }
  block_sum_store<2>(acc, partials + (n * gridDim.x + blockIdx.x) * kCols);
}

// One block: each warp sums its images' partial rows (warp w takes images w, w + 8, ...;
// lanes stride over the rows, then a fixed shuffle tree), the warps' OhemMeans are merged
// in warp order; the loss and every image's weight are written. Deterministic.
__global__ void __launch_bounds__(kThreads) ohem_finalize_kernel(
    const double* __restrict__ partials, int64_t N, int64_t rows_per_image, float* loss,
    float* weight) {
  constexpr int kWarps = kThreads / 32;
  __shared__ double sm_total[kWarps];
  __shared__ long long sm_images[kWarps];
  __shared__ double sm_all_total;
  __shared__ long long sm_all_images;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  OhemMean mine;
  for (int64_t n = warp; n < N; n += kWarps) {
    const double* rows = partials + n * rows_per_image * kCols;
    double s = 0.0, c = 0.0;
    for (int64_t r = lane; r < rows_per_image; r += 32) {
      s += rows[r * kCols + 0];
      c += rows[r * kCols + 1];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      s += __shfl_down_sync(0xffffffffu, s, o);
      c += __shfl_down_sync(0xffffffffu, c, o);
    }
    if (lane == 0) {
      mine.add(s, c);
      weight[n] = float(c);  // the count for now (exact below 2^24); rescaled below
    }
  }
  if (lane == 0) {
    sm_total[warp] = mine.total;
    sm_images[warp] = mine.images;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    OhemMean all;
    for (int k = 0; k < kWarps; ++k) {  // fixed order
      OhemMean part;
      part.total = sm_total[k];
      part.images = sm_images[k];
      all.merge(part);
    }
    sm_all_total = all.total;
    sm_all_images = all.images;
    *loss = all.loss();
  }
  __syncthreads();
  if (lane == 0) {
    OhemMean all;
    all.total = sm_all_total;
    all.images = sm_all_images;
    for (int64_t n = warp; n < N; n += kWarps) weight[n] = all.weight(double(weight[n]));
  }
}

// ------------------------------------------------------------------------- confusion matrix
// kLogits: argmax of logits T; otherwise integer predictions (T unused).
template <typename T, bool kLogits>
__global__ void CPS_PIXEL_BOUNDS confusion_kernel(
    View v, const T* __restrict__ X, const void* __restrict__ Pr, int pcode,
    const void* __restrict__ Y, int tcode, int nc, int64_t ignore_index,
    unsigned long long* __restrict__ out, bool use_smem) {
  extern __shared__ unsigned int hist[];
  if (use_smem) {
    for (int i = threadIdx.x; i < nc * nc; i += kThreads) hist[i] = 0u;
    __syncthreads();
  }
  const int64_t n = blockIdx.y;
  for (int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x; p < v.HW;
       p += int64_t(gridDim.x) * kThreads) {
    const int64_t i = n * v.HW + p;
    const int64_t t = load_label(Y, tcode, i);
    if (t == ignore_index || t < 0 || t >= nc) continue;
    int64_t pr;
    if (kLogits) {
      float m;
      int am;
      row_argmax(X + n * v.sN + p * v.sP, v.sC, int(v.C), m, am);
      pr = am;
    } else {
      pr = load_label(Pr, pcode, i);
    }
    if (pr < 0 || pr >= nc) continue;
    const int idx = int(t) * nc + int(pr);
    if (use_smem)
      atomicAdd(&hist[idx], 1u);
    else
      atomicAdd(&out[idx], 1ull);
  }
  if (use_smem) {
    __syncthreads();
    for (int i = threadIdx.x; i < nc * nc; i += kThreads)
      if (hist[i]) atomicAdd(&out[i], (unsigned long long)hist[i]);
  }
}

void check_grid(const View& v) {
  if (v.N > 65535) throw std::invalid_argument("cps_fast._C: batch size above 65535");
}

}  // namespace

int64_t device_partial_rows(int64_t N, int64_t HW) { return N * pixel_blocks(HW, kPixPerThread); }

int64_t device_ohem_workspace_bytes(int64_t N, int64_t HW) {
  return int64_t(align256(size_t(N * HW) * 4) + align256(size_t(N) * kHistAll * 4) +
                 size_t(N) * sizeof(OhemState));
}

void ce_device(const View& v, int dtype, ptr_t logits, ptr_t target, int tcode,
               int64_t ignore_index, ptr_t grad, ptr_t loss, ptr_t inv_count, ptr_t partials,
               int device, ptr_t stream) {
  check_grid(v);
  DeviceScope scope(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(unsigned(pixel_blocks(v.HW, kPixPerThread)), unsigned(v.N));
  double* part = reinterpret_cast<double*>(partials);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    ce_kernel<T><<<grid, kThreads, 0, s>>>(v, reinterpret_cast<const T*>(logits),
                                           reinterpret_cast<const void*>(target), tcode,
                                           ignore_index, reinterpret_cast<T*>(grad), part);
  });
  check_launch("cross_entropy kernel");
  finalize_kernel<2><<<1, kThreads, 0, s>>>(part, int64_t(grid.x) * grid.y,
                                            reinterpret_cast<float*>(loss),
                                            reinterpret_cast<float*>(inv_count), nullptr);
  check_launch("cross_entropy finalize");
}

void cps_device(const View& v, int dtype, ptr_t a, ptr_t b, ptr_t valid, ptr_t is_labeled,
                int64_t background_index, ptr_t grad_a, ptr_t grad_b, ptr_t loss,
                ptr_t inv_count, ptr_t stats, ptr_t partials, int device, ptr_t stream) {
  check_grid(v);
  DeviceScope scope(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(unsigned(pixel_blocks(v.HW, kPixPerThread)), unsigned(v.N));
  double* part = reinterpret_cast<double*>(partials);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cps_kernel<T><<<grid, kThreads, 0, s>>>(
        v, reinterpret_cast<const T*>(a), reinterpret_cast<const T*>(b),
        reinterpret_cast<const uint8_t*>(valid), reinterpret_cast<const uint8_t*>(is_labeled),
        background_index, reinterpret_cast<T*>(grad_a), reinterpret_cast<T*>(grad_b), part);
  });
  check_launch("cps_loss kernel");
  finalize_kernel<6><<<1, kThreads, 0, s>>>(part, int64_t(grid.x) * grid.y,
                                            reinterpret_cast<float*>(loss),
                                            reinterpret_cast<float*>(inv_count),
                                            reinterpret_cast<long long*>(stats));
  check_launch("cps_loss finalize");
}

void ohem_device(const View& v, int dtype, ptr_t logits, ptr_t target, int tcode,
                 float thresh, int64_t min_kept, int64_t ignore_index, ptr_t grad, ptr_t loss,
                 ptr_t weight, ptr_t key, ptr_t threshold, ptr_t partials, ptr_t workspace,
                 int device, ptr_t stream) {
  check_grid(v);
  DeviceScope scope(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const OhemWs w = ohem_layout(workspace, key, v.N, v.HW);
  const dim3 grid(unsigned(pixel_blocks(v.HW, kPixPerThread)), unsigned(v.N));
  // histogram blocks per image: 16 keys per thread, at most 2048 blocks in all
  int64_t hb = (v.HW + int64_t(kThreads) * 16 - 1) / (int64_t(kThreads) * 16);
  const int64_t hb_max = std::max<int64_t>(1, 2048 / v.N);
  hb = hb < 1 ? 1 : (hb > hb_max ? hb_max : hb);
  const dim3 hgrid(unsigned(hb), unsigned(v.N));
  const unsigned nimg = unsigned(v.N);
  float* thr = reinterpret_cast<float*>(threshold);
  double* part = reinterpret_cast<double*>(partials);
  ohem_init_kernel<<<nimg, kThreads, 0, s>>>(w);
  check_launch("ohem init");
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    ohem_pixel_kernel<T><<<grid, kThreads, 0, s>>>(v, reinterpret_cast<const T*>(logits),
                                                   reinterpret_cast<const void*>(target), tcode,
                                                   ignore_index, w);
  });
  check_launch("ohem pixel kernel");
  ohem_scan_kernel<0><<<nimg, kScanThreads, 0, s>>>(w, (long long)min_kept, thresh, thr);
  ohem_hist_kernel<1><<<hgrid, kThreads, 0, s>>>(v.HW, w);
  ohem_scan_kernel<1><<<nimg, kScanThreads, 0, s>>>(w, (long long)min_kept, thresh, thr);
  ohem_hist_kernel<2><<<hgrid, kThreads, 0, s>>>(v.HW, w);
  ohem_scan_kernel<2><<<nimg, kScanThreads, 0, s>>>(w, (long long)min_kept, thresh, thr);
  check_launch("ohem select kernels");
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    ohem_final_kernel<T><<<grid, kThreads, 0, s>>>(v, reinterpret_cast<const T*>(logits),
                                                   reinterpret_cast<const void*>(target), tcode,
                                                   w, reinterpret_cast<T*>(grad), part);
  });
  check_launch("ohem final kernel");
  ohem_finalize_kernel<<<1, kThreads, 0, s>>>(part, v.N, int64_t(grid.x),
                                              reinterpret_cast<float*>(loss),
                                              reinterpret_cast<float*>(weight));
  check_launch("ohem finalize");
}

void confusion_device(const View& v, int dtype, ptr_t x, int pcode, ptr_t target, int tcode,
                      int64_t num_classes, int64_t ignore_index, ptr_t out, int device,
                      ptr_t stream) {
  check_grid(v);
  DeviceScope scope(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int nc = int(num_classes);
  const size_t smem = size_t(nc) * nc * 4;
  const bool use_smem = smem <= 48 * 1024;
  const dim3 grid(unsigned(pixel_blocks(v.HW, 16)), unsigned(v.N));
  unsigned long long* o = reinterpret_cast<unsigned long long*>(out);
  const void* Y = reinterpret_cast<const void*>(target);
  if (dtype < 0) {
    confusion_kernel<float, false><<<grid, kThreads, use_smem ? smem : 0, s>>>(
        v, nullptr, reinterpret_cast<const void*>(x), pcode, Y, tcode, nc, ignore_index, o,
        use_smem);
  } else {
    dispatch(dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      confusion_kernel<T, true><<<grid, kThreads, use_smem ? smem : 0, s>>>(
          v, reinterpret_cast<const T*>(x), nullptr, 0, Y, tcode, nc, ignore_index, o,
          use_smem);
    });
  }
  check_launch("confusion_matrix kernel");
}

}  // namespace cps
