#include "proto/dtype_convert.h"
#include "checkpoint/export.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "base/dtype.h"
#include "base/error.h"
#include "checkpoint/io_util.h"

namespace shardopt::ckpt {
namespace {

const char* safetensors_dtype(DType d) {
  switch (d) {
    case DType::kF32: return "F32";
    case DType::kBF16: return "BF16";
    case DType::kF16: return "F16";
    case DType::kI32: return "I32";
    case DType::kI64: return "I64";
    case DType::kU8: return "U8";
    default: break;
  }
  throw ConfigError("export: dtype " + std::to_string(static_cast<int>(d)) + " has no safetensors name");
}

}  // namespace

std::string export_name(const std::string& tensor, const std::string& state) {
  return state == kParamState ? tensor : tensor + ":" + state;
}

ExportSummary export_consolidated(CheckpointReader& reader, const std::filesystem::path& out,
                                  const ExportOptions& options) {
  const auto& m = reader.manifest();
  struct Item {
    std::string tensor, state;
    DType dtype;
    int64_t numel;
    uint64_t begin, end;
  };
  std::vector<Item> items;
  nlohmann::ordered_json header;
  header["__metadata__"] = {{"format", "shardopt"},
                            {"step", std::to_string(m.step())},
                            {"world_size", std::to_string(m.world_size())},
                            {"source", reader.dir().filename().string()}};
  uint64_t at = 0;
  for (const auto& t : m.tensors()) {
    for (const auto& s : t.states()) {
      if (!options.states.empty() &&
          std::find(options.states.begin(), options.states.end(), s.name()) == options.states.end())
        continue;
      const int64_t numel = reader.state_numel(t.spec().name(), s.name());
      const uint64_t bytes = static_cast<uint64_t>(numel) * dtype_size(s.dtype());
      items.push_back(Item{t.spec().name(), s.name(), from_proto(s.dtype()), numel, at, at + bytes});
      std::vector<int64_t> shape(s.shape().begin(), s.shape().end());
      header[export_name(t.spec().name(), s.name())] = {
          {"dtype", safetensors_dtype(from_proto(s.dtype()))}, {"shape", shape}, {"data_offsets", {at, at + bytes}}};
      at += bytes;
    }
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');

  std::filesystem::path tmp = out;
  tmp += ".tmp";
  File f = File::create(tmp);
  try {
    uint64_t n = json.size();
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
    f.write_all(len, 8);
    f.write_all(json.data(), json.size());
    std::vector<unsigned char> chunk;
    for (const Item& item : items) {
      const size_t esize = dtype_size(item.dtype);
      const int64_t per_chunk = std::max<int64_t>(1, static_cast<int64_t>(options.chunk_bytes / esize));
      chunk.resize(static_cast<size_t>(std::min(per_chunk, item.numel)) * esize);
      for (int64_t done = 0; done < item.numel;) {
        const int64_t count = std::min(per_chunk, item.numel - done);
        reader.read(item.tensor, item.state, done, count, chunk.data());
        f.write_all(chunk.data(), static_cast<size_t>(count) * esize);
        done += count;
      }
    }
    f.fsync();
    f.close();
  } catch (...) {
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    throw;
  }
  std::error_code ec;
  std::filesystem::rename(tmp, out, ec);
  if (ec) throw CheckpointError("export: cannot rename '" + tmp.string() + "' to '" + out.string() + "': " + ec.message());
  return ExportSummary{static_cast<int>(items.size()), at, 8 + json.size()};
}

}  // namespace shardopt::ckpt
