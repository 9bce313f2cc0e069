// The proto boundary for element types: base's DType <-> proto::DType (same numeric values, which
// plans and checkpoints store), plus dtype helpers that take the proto enum directly.
#pragma once

#include <string>

#include "base/dtype.h"
#include "base/error.h"
#include "proto/types.pb.h"

namespace shardopt {

static_assert(static_cast<int>(DType::kUnspecified) == proto::DTYPE_UNSPECIFIED);
static_assert(static_cast<int>(DType::kF32) == proto::F32);
static_assert(static_cast<int>(DType::kBF16) == proto::BF16);
static_assert(static_cast<int>(DType::kF16) == proto::F16);
static_assert(static_cast<int>(DType::kI32) == proto::I32);
static_assert(static_cast<int>(DType::kI64) == proto::I64);
static_assert(static_cast<int>(DType::kU8) == proto::U8);

inline proto::DType to_proto(DType dtype) { return static_cast<proto::DType>(dtype); }

// Throws ConfigError for a value base does not know (a newer file format, a corrupt field).
inline DType from_proto(proto::DType dtype) {
  if (dtype < proto::DTYPE_UNSPECIFIED || dtype > proto::U8)
    throw ConfigError("unknown proto dtype value " + std::to_string(static_cast<int>(dtype)));
  return static_cast<DType>(dtype);
}

inline size_t dtype_size(proto::DType dtype) { return dtype_size(from_proto(dtype)); }
inline std::string_view dtype_name(proto::DType dtype) { return dtype_name(from_proto(dtype)); }

}  // namespace shardopt
