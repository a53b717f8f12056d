// Entry points of the host (host_ops.cpp) and device (device_ops.cu) implementations.
// No libtorch: tensors arrive as raw addresses (uintptr_t), sizes and element strides; the
// caller (cps_fast/ext.py) allocates every output and workspace with torch.
//
// Gradient buffers receive the *unscaled* per-pixel gradient (softmax - onehot) * kept; the
// 1/count factor is returned as `inv_count` (a 0-dim device value, never read by the host)
// and applied in backward together with the upstream gradient.
#pragma once

#include <cstdint>

#include "pixel_math.h"

namespace cps {

using ptr_t = std::uintptr_t;

// ---------------------------------------------------------------- host (C++ loops, OpenMP)
void ce_host(const View& v, int dtype, ptr_t logits, ptr_t target, int tcode,
             int64_t ignore_index, ptr_t grad, ptr_t loss, ptr_t inv_count, int nthreads);

void cps_host(const View& v, int dtype, ptr_t a, ptr_t b, ptr_t valid, ptr_t is_labeled,
              int64_t background_index, ptr_t grad_a, ptr_t grad_b, ptr_t loss,
              ptr_t inv_count, ptr_t stats, int nthreads);

// OHEM selected per image (the rule: kernels/ohem_cross_entropy.py). Outputs: loss (1 float),
// weight (N floats: 1 / (num_counted_images * count_n), the scale of image n's gradient),
// key (N*HW uint32: bits of p, kInvalidKey where not valid), threshold (N floats, +inf when
// the image keeps every valid pixel); grad as above (unscaled).
void ohem_host(const View& v, int dtype, ptr_t logits, ptr_t target, int tcode,
               float thresh, int64_t min_kept, int64_t ignore_index, ptr_t grad, ptr_t loss,
               ptr_t weight, ptr_t key, ptr_t threshold, int nthreads);

// logits (dtype >= 0) or predictions (dtype < 0, pcode = their integer type, View.C unused)
void confusion_host(const View& v, int dtype, ptr_t x, int pcode, ptr_t target, int tcode,
                    int64_t num_classes, int64_t ignore_index, ptr_t out, int nthreads);

// ---------------------------------------------------------------- device (CUDA)
// Rows of the per-block partials workspace (float64, rows x 6) the device ops need.
int64_t device_partial_rows(int64_t N, int64_t HW);
// Size in bytes of the OHEM device workspace for N images of HW pixels (see device_ops.cu).
int64_t device_ohem_workspace_bytes(int64_t N, int64_t HW);

void ce_device(const View& v, int dtype, ptr_t logits, ptr_t target, int tcode,
               int64_t ignore_index, ptr_t grad, ptr_t loss, ptr_t inv_count,
               ptr_t partials, int device, ptr_t stream);

void cps_device(const View& v, int dtype, ptr_t a, ptr_t b, ptr_t valid, ptr_t is_labeled,
                int64_t background_index, ptr_t grad_a, ptr_t grad_b, ptr_t loss,
                ptr_t inv_count, ptr_t stats, ptr_t partials, int device, ptr_t stream);

// Outputs as ohem_host. workspace: device_ohem_workspace_bytes(N, HW) bytes (initialised on
// the device by the op itself).
void ohem_device(const View& v, int dtype, ptr_t logits, ptr_t target, int tcode,
                 float thresh, int64_t min_kept, int64_t ignore_index, ptr_t grad, ptr_t loss,
                 ptr_t weight, ptr_t key, ptr_t threshold, ptr_t partials, ptr_t workspace,
                 int device, ptr_t stream);

// out: (num_classes^2) int64, zero-filled by the caller.
void confusion_device(const View& v, int dtype, ptr_t x, int pcode, ptr_t target, int tcode,
                      int64_t num_classes, int64_t ignore_index, ptr_t out, int device,
                      ptr_t stream);

}  // namespace cps
