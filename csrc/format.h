// Numbers, shapes and devices as text for the error messages of every op, formatted
// without std::ostream. On the GPU image we test on (torch 2.11), a TORCH_CHECK of
// this extension whose message streamed an integer crashed the process instead of
// raising, while messages made only of strings and dtype names raised as they
// should. So every piece a message streams is a const char* or a std::string:
// these helpers for numbers, shapes, devices and dtypes.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace mmsd_ext {

inline std::string num(int64_t value) {
  return std::to_string(value);
}

// "[2, 3]", as a shape prints in Python.
inline std::string shape(c10::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    text += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return text + "]";
}

// The shortest "%g" text that reads back as the same double (0.1 -> "0.1",
// 2.0 -> "2", 1e-320 -> "1e-320"), like Python's repr; "nan", "inf", "-inf" spelled out.
// With as_float, `value` is a float32's and the text need only read back as that float32
// (through a double, as mmsd_ext/nms.py reads it): a float32 6.4 prints "6.4", not the
// "6.400000095367432" of its double.
inline std::string real(double value, bool as_float = false) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char text[32];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(text, sizeof(text), "%.*g", digits, value);
    const double back = std::strtod(text, nullptr);
    if (as_float ? static_cast<float>(back) == static_cast<float>(value) : back == value) break;
  }
  return text;
}

// "cpu", "cuda:0", ... (the text that printing the device gives).
inline std::string device_text(const c10::Device& device) {
  return device.str();
}

// "int32", "float16", ...: the dtype's name as Python prints it, without "torch."
// (the Python checks' spelling; c10::toString would say "Int", "Half").
inline std::string dtype_text(c10::ScalarType type) {
  return std::string(c10::getDtypeNames(type).first);
}

}  // namespace mmsd_ext
