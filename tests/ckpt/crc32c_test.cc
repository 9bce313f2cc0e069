#include "checkpoint/crc32c.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace shardopt::ckpt {
namespace {

// Independent reference: one bit at a time, straight from the definition (reflected 0x1EDC6F41).
uint32_t crc32c_bitwise(const unsigned char* p, size_t n) {
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
  }
  return ~crc;
}

using Impl = uint32_t (*)(uint32_t, const void*, size_t);
const Impl kImpls[] = {&crc32c_extend, &crc32c_extend_portable, &crc32c_extend_hardware};

// RFC 3720 appendix B.4 test vectors.
TEST(Crc32c, Rfc3720Vectors) {
  std::vector<unsigned char> zeros(32, 0x00), ones(32, 0xFF), inc(32), dec(32);
  for (int i = 0; i < 32; ++i) inc[i] = static_cast<unsigned char>(i), dec[i] = static_cast<unsigned char>(31 - i);
  const unsigned char iscsi_read[48] = {
      0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
      0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x18,
      0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
  const std::string check = "123456789";
  for (Impl f : kImpls) {
    EXPECT_EQ(f(0, zeros.data(), 32), 0x8A9136AAu);
    EXPECT_EQ(f(0, ones.data(), 32), 0x62A8AB43u);
    EXPECT_EQ(f(0, inc.data(), 32), 0x46DD794Eu);
    EXPECT_EQ(f(0, dec.data(), 32), 0x113FDB5Cu);
    EXPECT_EQ(f(0, iscsi_read, 48), 0xD9963A56u);
    EXPECT_EQ(f(0, check.data(), check.size()), 0xE3069283u);  // the standard CRC catalogue check value
    EXPECT_EQ(f(0, nullptr, 0), 0u);
  }
}

TEST(Crc32c, MatchesBitwiseReferenceOnRandomBuffers) {
  std::mt19937_64 rng(42);
  std::vector<unsigned char> buf(5000);
  for (auto& b : buf) b = static_cast<unsigned char>(rng());
  for (int trial = 0; trial < 300; ++trial) {
    const size_t offset = rng() % 16;  // unaligned starts exercise the hardware prologue
    const size_t len = rng() % (buf.size() - offset);
    const uint32_t expected = crc32c_bitwise(buf.data() + offset, len);
    for (Impl f : kImpls) ASSERT_EQ(f(0, buf.data() + offset, len), expected) << "len " << len << " offset " << offset;
  }
}

// Large buffers take the three-stream hardware path (blocks of 3 x 4 KiB) and its combination step.
TEST(Crc32c, MatchesBitwiseReferenceOnLargeBuffers) {
  std::mt19937_64 rng(43);
  std::vector<unsigned char> buf(200000);
  for (auto& b : buf) b = static_cast<unsigned char>(rng());
  for (size_t len : {size_t{12287}, size_t{12288}, size_t{12289}, size_t{24576 + 5}, size_t{199990}}) {
    const size_t offset = rng() % 8;
    const uint32_t expected = crc32c_bitwise(buf.data() + offset, len);
    for (Impl f : kImpls) ASSERT_EQ(f(0, buf.data() + offset, len), expected) << "len " << len;
    // Continuing from a non-zero CRC through the combined path.
    const uint32_t head = crc32c_bitwise(buf.data(), offset + 3);
    const uint32_t whole = crc32c_bitwise(buf.data(), offset + 3 + len);
    for (Impl f : kImpls) ASSERT_EQ(f(head, buf.data() + offset + 3, len), whole) << "len " << len;
  }
  for (int trial = 0; trial < 20; ++trial) {
    const size_t offset = rng() % 16, len = rng() % (buf.size() - 16);
    const uint32_t expected = crc32c_bitwise(buf.data() + offset, len);
    for (Impl f : kImpls) ASSERT_EQ(f(0, buf.data() + offset, len), expected) << "len " << len;
  }
}

TEST(Crc32c, ExtendEqualsWholeBuffer) {
  std::mt19937_64 rng(7);
  std::vector<unsigned char> buf(3001);
  for (auto& b : buf) b = static_cast<unsigned char>(rng());
  const uint32_t whole = crc32c_bitwise(buf.data(), buf.size());
  for (int trial = 0; trial < 50; ++trial) {
    const size_t cut = rng() % buf.size();
    for (Impl f : kImpls) EXPECT_EQ(f(f(0, buf.data(), cut), buf.data() + cut, buf.size() - cut), whole);
  }
}

// The run-time detection agrees with the compiler's own CPU probe: the hardware path is taken
// exactly when the CPU has the instruction.
TEST(Crc32c, HardwareDetectionMatchesTheCpu) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  EXPECT_EQ(crc32c_hardware_available(), __builtin_cpu_supports("sse4.2") != 0);
#else
  EXPECT_FALSE(crc32c_hardware_available()) << "only the x86 SSE4.2 path exists";
#endif
  RecordProperty("sse42", crc32c_hardware_available() ? "yes" : "no");
}

// Hardware (SSE4.2) and table paths agree on every length up to a few blocks at every start
// alignment, from zero and non-zero initial CRCs; the dispatching entry point agrees with both.
TEST(Crc32c, HardwareEqualsTableOnAllLengthsAndAlignments) {
  if (!crc32c_hardware_available()) GTEST_SKIP() << "no SSE4.2 on this CPU: the hardware path is the table path";
  std::mt19937_64 rng(11);
  std::vector<unsigned char> buf(1100 + 16);
  for (auto& b : buf) b = static_cast<unsigned char>(rng());
  for (size_t offset = 0; offset < 16; ++offset)
    for (size_t len = 0; len <= 1100; ++len) {
      const uint32_t seed = static_cast<uint32_t>(rng());
      for (uint32_t start : {0u, seed}) {
        const uint32_t table = crc32c_extend_portable(start, buf.data() + offset, len);
        ASSERT_EQ(crc32c_extend_hardware(start, buf.data() + offset, len), table)
            << "len " << len << " offset " << offset << " start " << start;
        ASSERT_EQ(crc32c_extend(start, buf.data() + offset, len), table) << "len " << len << " offset " << offset;
      }
    }
  // Lengths around the hardware path's 3-stream block boundaries.
  std::vector<unsigned char> big(3 * 3 * 4096 + 64);
  for (auto& b : big) b = static_cast<unsigned char>(rng());
  for (size_t block : {size_t{3 * 4096}, size_t{2 * 3 * 4096}})
    for (size_t len = block - 9; len <= block + 9; ++len)
      for (size_t offset : {size_t{0}, size_t{1}, size_t{7}})
        ASSERT_EQ(crc32c_extend_hardware(0, big.data() + offset, len),
                  crc32c_extend_portable(0, big.data() + offset, len))
            << "len " << len << " offset " << offset;
}

}  // namespace
}  // namespace shardopt::ckpt
