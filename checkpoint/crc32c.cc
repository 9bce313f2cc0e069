#include "checkpoint/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define SHARDOPT_CRC32C_X86 1
#endif

namespace shardopt::ckpt {
namespace {

constexpr uint32_t kPolyReflected = 0x82F63B78u;

// tables[k][b]: CRC of byte b followed by k zero bytes (slicing-by-8).
struct Tables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  constexpr Tables() {
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t c = b;
      for (int i = 0; i < 8; ++i) c = (c >> 1) ^ ((c & 1u) ? kPolyReflected : 0u);
      t[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; ++b)
      for (int k = 1; k < 8; ++k) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xffu];
  }
};
constexpr Tables kTables{};

// Product of two polynomials mod P in the reflected representation (bit 31 = x^0).
uint32_t multiply_mod_p(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t bit = 1u << 31; bit != 0; bit >>= 1) {
    if (a & bit) product ^= b;
    b = (b & 1u) ? (b >> 1) ^ kPolyReflected : b >> 1;  // b *= x
  }
  return product;
}

// x^(8 * bytes) mod P: multiplying a raw CRC register by it appends `bytes` zero bytes.
uint32_t x_pow_8n_mod_p(size_t bytes) {
  uint32_t r = 1u << 31;  // x^0
  for (size_t i = 0; i < bytes; ++i) r = (r >> 8) ^ kTables.t[0][r & 0xffu];
  return r;
}

#ifdef SHARDOPT_CRC32C_X86
// The crc32 instruction has a 3-cycle latency and 1-cycle throughput: three independent streams
// over three adjacent blocks keep it busy; their registers are then combined with the linearity of
// CRC: crc(A|B|C) = crc(A)*x^(8|B|+8|C|) ^ crc0(B)*x^(8|C|) ^ crc0(C).
constexpr size_t kStreamBlock = 4096;

__attribute__((target("sse4.2"))) uint32_t extend_sse42(uint32_t crc, const unsigned char* p, size_t n) {
  static const uint32_t shift1 = x_pow_8n_mod_p(kStreamBlock), shift2 = x_pow_8n_mod_p(2 * kStreamBlock);
  uint64_t c = ~crc;
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7u) != 0) {
    c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
    --n;
  }
  while (n >= 3 * kStreamBlock) {
    uint64_t a = c, b = 0, d = 0;
    for (size_t i = 0; i < kStreamBlock; i += 8) {
      uint64_t wa, wb, wd;
      std::memcpy(&wa, p + i, 8);
      std::memcpy(&wb, p + kStreamBlock + i, 8);
      std::memcpy(&wd, p + 2 * kStreamBlock + i, 8);
      a = _mm_crc32_u64(a, wa);
      b = _mm_crc32_u64(b, wb);
      d = _mm_crc32_u64(d, wd);
    }
    c = multiply_mod_p(shift2, static_cast<uint32_t>(a)) ^ multiply_mod_p(shift1, static_cast<uint32_t>(b)) ^
        static_cast<uint32_t>(d);
    p += 3 * kStreamBlock;
    n -= 3 * kStreamBlock;
  }
  while (n >= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    c = _mm_crc32_u64(c, word);
    p += 8;
    n -= 8;
  }
  while (n > 0) {
    c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
    --n;
  }
  return ~static_cast<uint32_t>(c);
}
#endif

bool detect_hardware() {
#ifdef SHARDOPT_CRC32C_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("sse4.2");
#else
  return false;
#endif
}

}  // namespace

uint32_t crc32c_extend_portable(uint32_t crc, const void* data, size_t size) {
  const auto* p = static_cast<const unsigned char*>(data);
  const auto& t = kTables.t;
  uint32_t c = ~crc;
  while (size >= 8) {
    // Little-endian byte order of the first four bytes matches the reflected CRC register.
    uint32_t lo = c ^ (uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24);
    c = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^ t[4][lo >> 24] ^ t[3][p[4]] ^
        t[2][p[5]] ^ t[1][p[6]] ^ t[0][p[7]];
    p += 8;
    size -= 8;
  }
  while (size-- > 0) c = (c >> 8) ^ t[0][(c ^ *p++) & 0xffu];
  return ~c;
}

bool crc32c_hardware_available() {
  static const bool available = detect_hardware();
  return available;
}

uint32_t crc32c_extend_hardware(uint32_t crc, const void* data, size_t size) {
#ifdef SHARDOPT_CRC32C_X86
  if (crc32c_hardware_available()) return extend_sse42(crc, static_cast<const unsigned char*>(data), size);
#endif
  return crc32c_extend_portable(crc, data, size);
}

uint32_t crc32c_extend(uint32_t crc, const void* data, size_t size) {
  return crc32c_extend_hardware(crc, data, size);
}

}  // namespace shardopt::ckpt
