#include "base/dtype.h"

#include <string>

#include "base/error.h"

namespace shardopt {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case proto::F32: return 4;
    case proto::BF16: return 2;
    case proto::F16: return 2;
    case proto::I32: return 4;
    case proto::I64: return 8;
    case proto::U8: return 1;
    default: break;
  }
  throw ConfigError("dtype_size: unspecified or unknown dtype " + std::to_string(static_cast<int>(dtype)));
}

std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case proto::F32: return "f32";
    case proto::BF16: return "bf16";
    case proto::F16: return "f16";
    case proto::I32: return "i32";
    case proto::I64: return "i64";
    case proto::U8: return "u8";
    default: return "unspecified";
  }
}

DType parse_dtype(std::string_view name) {
  for (DType d : {proto::F32, proto::BF16, proto::F16, proto::I32, proto::I64, proto::U8})
    if (dtype_name(d) == name) return d;
  throw ConfigError("unknown dtype '" + std::string(name) + "': expected f32, bf16, f16, i32, i64 or u8");
}

}  // namespace shardopt
