// Allocation counting for "allocates nothing" tests. Linking tests/common/counting_new.cc into an
// executable replaces the global operator new for the whole program, so such a test gets its own
// executable. Counting is per thread: only allocations on the thread that opened an
// AllocationCounter are seen, and a PauseCounting scope hides the code inside it.
#pragma once

#include <cstdint>

namespace shardopt::test_alloc {

// Allocations on this thread between construction and count(); counting stops at destruction.
class AllocationCounter {
 public:
  AllocationCounter();
  ~AllocationCounter();
  AllocationCounter(const AllocationCounter&) = delete;
  AllocationCounter& operator=(const AllocationCounter&) = delete;
  int64_t count() const;
};

// Allocations inside this scope are not counted (nests).
class PauseCounting {
 public:
  PauseCounting();
  ~PauseCounting();
  PauseCounting(const PauseCounting&) = delete;
  PauseCounting& operator=(const PauseCounting&) = delete;
};

}  // namespace shardopt::test_alloc
