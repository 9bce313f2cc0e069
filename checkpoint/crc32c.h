// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as used by iSCSI (RFC 3720) and ext4.
// Uses the SSE4.2 crc32 instruction when the CPU has it (checked once at run time), else a
// slicing-by-8 table implementation. Both produce identical values.
#pragma once

#include <cstddef>
#include <cstdint>

namespace shardopt::ckpt {

// CRC32C of `size` bytes continuing from a previous result `crc` (0 to start):
// crc32c_extend(crc32c(a), b) == crc32c(a + b).
uint32_t crc32c_extend(uint32_t crc, const void* data, size_t size);
inline uint32_t crc32c(const void* data, size_t size) { return crc32c_extend(0, data, size); }

// The two implementations, exposed so tests can check each one.
uint32_t crc32c_extend_portable(uint32_t crc, const void* data, size_t size);
bool crc32c_hardware_available();
// Only call when crc32c_hardware_available(); otherwise falls back to the portable version.
uint32_t crc32c_extend_hardware(uint32_t crc, const void* data, size_t size);

}  // namespace shardopt::ckpt
