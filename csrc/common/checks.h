// Argument checks shared by CPU and CUDA entry points. Every message names the argument,
// what it got and what was expected.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include "common/launch_types.h"

namespace moeops {

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, "moeops: ", name, " must be ", dim, "-D ", shape, ", got shape ",
                    t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, "moeops: ", name, " must be ", want, ", got ",
                   t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "moeops: ", name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device(), "; move them to one device");
}

inline DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default:
      TORCH_CHECK_TYPE(false, "moeops: ", name, " must be float32, float16 or bfloat16, got ",
                       t.scalar_type());
  }
}

}  // namespace moeops
