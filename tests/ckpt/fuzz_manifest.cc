// libFuzzer target for the checkpoint manifest parser (built and run by scripts/fuzz-checkpoint).
// Each input is tried twice: as raw manifest file bytes (header checks), and as a payload sealed
// with a valid header and CRC32C (so the protobuf parser and the consistency checks see it).
// Anything but a clean parse or a CheckpointError is a bug (a crash, a sanitizer report, another exception).
#include <cstdint>
#include <cstring>
#include <string>

#include "base/error.h"
#include "checkpoint/crc32c.h"
#include "checkpoint/format.h"

using namespace shardopt::ckpt;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view raw(reinterpret_cast<const char*>(data), size);
  try {
    decode_manifest(raw, "fuzz");
  } catch (const shardopt::CheckpointError&) {
  }
  std::string sealed(kManifestFileMagic);
  const uint32_t version = kFormatVersion, crc = crc32c(data, size);
  const uint64_t n = size;
  sealed.append(reinterpret_cast<const char*>(&version), 4);
  sealed.append(reinterpret_cast<const char*>(&crc), 4);
  sealed.append(reinterpret_cast<const char*>(&n), 8);
  sealed.append(raw);
  try {
    decode_manifest(sealed, "fuzz");
  } catch (const shardopt::CheckpointError&) {
  }
  return 0;
}

#ifdef SHARDOPT_FUZZ_MAKE_SEED
// Writes a valid manifest payload (two tensors, two files, four pieces) as a starting corpus entry.
#include <cstdio>
int main(int argc, char** argv) {
  if (argc != 2) return 2;
  shardopt::proto::CheckpointManifest m;
  m.set_magic(std::string(kManifestMagic));
  m.set_format_version(kFormatVersion);
  m.set_world_size(2);
  m.set_step(10);
  for (int r = 0; r < 2; ++r) {
    auto* f = m.add_files();
    f->set_name(shard_file_name(r));
    f->set_rank(r);
    f->set_size_bytes(1024);
  }
  for (const char* name : {"w", "b"}) {
    auto* t = m.add_tensors();
    t->mutable_spec()->set_name(name);
    t->mutable_spec()->add_shape(8);
    t->mutable_spec()->add_shape(4);
    auto* s = t->add_states();
    s->set_name("param");
    s->set_dtype(shardopt::proto::F32);
    *s->mutable_shape() = t->spec().shape();
    for (int r = 0; r < 2; ++r) {
      auto* p = m.add_pieces();
      p->set_tensor(name);
      p->set_state("param");
      p->set_global_offset(16 * r);
      p->set_length(16);
      p->set_dtype(shardopt::proto::F32);
      p->set_file(shard_file_name(r));
      p->set_file_offset(64 + (name[0] == 'b' ? 128 : 0));
      p->set_crc32c(123);
    }
  }
  const std::string payload = m.SerializeAsString();
  decode_manifest(encode_manifest(m), "seed");  // must be valid
  FILE* f = std::fopen(argv[1], "wb");
  if (!f || std::fwrite(payload.data(), 1, payload.size(), f) != payload.size()) return 1;
  std::fclose(f);
  return 0;
}
#endif
