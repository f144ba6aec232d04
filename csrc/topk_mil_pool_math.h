// Per-element maths of top-k MIL pooling, shared by the CPU and CUDA kernels.
//
// Selection works on order-preserving unsigned integer keys instead of floats:
// a > b as torch.topk orders them  <=>  key(a) > key(b) as unsigned integers.
// That turns "the k-th largest value" into an integer radix select, and makes
// NaN handling a property of the key: every NaN maps to the top key, above
// +inf, which is where torch.topk puts NaN. -0.0 and +0.0 share one key, as
// they compare equal in torch (so among them lower time indices win, like any tie).
// For largest=False the keys are complemented: the k smallest values are then
// the k largest keys and NaN, still larger than every number, comes last.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>

namespace mmsd_ext {
namespace topk_mil_pool_math {

// The key of an fp32 accumulator value is 32 bits wide, of fp64 64 bits.
// fp16/bf16 scores are widened to fp32 first (exact and order-preserving).
template <typename acc_t>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

C10_HOST_DEVICE inline uint32_t bits_of(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

C10_HOST_DEVICE inline uint64_t bits_of(double x) {
#ifdef __CUDA_ARCH__
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

C10_HOST_DEVICE inline float float_of(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

C10_HOST_DEVICE inline double float_of(uint64_t u) {
#ifdef __CUDA_ARCH__
  return __longlong_as_double(static_cast<long long>(u));
#else
  double x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// All ones when pooling the smallest values (keys complemented), else zero.
template <typename key_t>
C10_HOST_DEVICE inline key_t flip_mask(bool largest) {
  return largest ? key_t(0) : ~key_t(0);
}

// Integer traits of the key of acc_t: its signed twin, and the bits of +inf.
template <typename key_t>
struct KeyBits;
template <>
struct KeyBits<uint32_t> {
  using signed_t = int32_t;
  static constexpr uint32_t inf = 0x7F800000u;
};
template <>
struct KeyBits<uint64_t> {
  using signed_t = int64_t;
  static constexpr uint64_t inf = 0x7FF0000000000000ull;
};

// The order key of x. Integer arithmetic only, no branches or float compares,
// so that loops over it vectorise and do not mispredict on random signs.
template <typename acc_t>
C10_HOST_DEVICE inline typename KeyOf<acc_t>::type order_key(acc_t x, typename KeyOf<acc_t>::type flip) {
  using key_t = typename KeyOf<acc_t>::type;
  using signed_t = typename KeyBits<key_t>::signed_t;
  constexpr key_t sign = key_t(1) << (sizeof(key_t) * 8 - 1);
  key_t u = bits_of(x);
  u &= ~(key_t(0) - key_t(u == sign));  // -0.0 becomes +0.0: they compare equal in torch
  // Negative numbers: complement (larger magnitude, smaller key); others: set the sign bit.
  const key_t negative = static_cast<key_t>(static_cast<signed_t>(u) >> (sizeof(key_t) * 8 - 1));
  key_t key = u ^ (negative | sign);
  // Every NaN (magnitude bits above those of inf): the top key.
  key |= key_t(0) - key_t(static_cast<signed_t>(u & ~sign) > static_cast<signed_t>(KeyBits<key_t>::inf));
  return key ^ flip;
}

// The value whose key is `key` (the inverse of order_key up to -0.0 and NaN payloads).
template <typename key_t>
C10_HOST_DEVICE inline auto value_of_key(key_t key, key_t flip) -> decltype(float_of(key)) {
  constexpr key_t sign = key_t(1) << (sizeof(key_t) * 8 - 1);
  key ^= flip;
  const key_t u = (key & sign) ? key_t(key & ~sign) : key_t(~key);
  return float_of(u);
}

// The selection rule both forward and backward agree on. `kth` is the k-th
// largest key of the column; `cut` the last time index, among the elements
// equal to it, that is selected (lower indices first). t must be a valid index.
template <typename key_t, typename index_t>
C10_HOST_DEVICE inline bool is_selected(key_t key, key_t kth, index_t t, index_t cut) {
  // Bitwise, not short-circuit: branch-free in the backward's vectorised loop.
  return (key > kth) | ((key == kth) & (t <= cut));
}

// What the kernels save for a video whose k or length is out of range (CUDA
// cannot raise without a host sync): nothing is selected, so the gradient is zero.
template <typename key_t>
C10_HOST_DEVICE inline key_t invalid_kth() {
  return ~key_t(0);
}
constexpr int64_t kInvalidCut = -1;

}  // namespace topk_mil_pool_math
}  // namespace mmsd_ext
