#include <chrono>

#include "platform.h"

const unsigned long kTickHz = 1000000000;

namespace {
std::chrono::steady_clock::time_point start;
}

void PlatformInit() { start = std::chrono::steady_clock::now(); }

unsigned long long ReadTicks() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
}

size_t StackUsedBytes() { return 0; }

size_t HeapUsedBytes() { return 0; }
