#include "base/dtype.h"

#include <string>

#include "base/error.h"

namespace shardopt {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF32: return 4;
    case DType::kBF16: return 2;
    case DType::kF16: return 2;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
    case DType::kU8: return 1;
    default: break;
  }
  throw ConfigError("dtype_size: unspecified or unknown dtype " + std::to_string(static_cast<int>(dtype)));
}

std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "f32";
    case DType::kBF16: return "bf16";
    case DType::kF16: return "f16";
    case DType::kI32: return "i32";
    case DType::kI64: return "i64";
    case DType::kU8: return "u8";
    default: return "unspecified";
  }
}

DType parse_dtype(std::string_view name) {
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16, DType::kI32, DType::kI64, DType::kU8})
    if (dtype_name(d) == name) return d;
  throw ConfigError("unknown dtype '" + std::string(name) + "': expected f32, bf16, f16, i32, i64 or u8");
}

}  // namespace shardopt
