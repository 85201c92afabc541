// Text output without printf, whose formatting would take several KiB of a Cortex-M's flash.
#ifndef KERNORM_FIRMWARE_PRINT_H_
#define KERNORM_FIRMWARE_PRINT_H_

#include <initializer_list>

// An integer in decimal, as text that lives as long as the Number: PrintLine({"images=", Number(n)}).
class Number {
 public:
  explicit Number(long long value);
  operator const char*() const { return start_; }

 private:
  char digits_[21];  // a sign and 19 digits, then the terminating zero
  const char* start_;
};

// Writes each part in turn, then a newline, to the standard output (platform.h's Write).
void PrintLine(std::initializer_list<const char*> parts);

#endif  // KERNORM_FIRMWARE_PRINT_H_
