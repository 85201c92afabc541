#include "print.h"

#include "platform.h"

Number::Number(long long value) {
  char* c = digits_ + sizeof(digits_) - 1;
  *c = '\0';
  // Digits from the magnitude's unsigned value, which exists for the most negative number too.
  unsigned long long magnitude = value < 0 ? 0ull - static_cast<unsigned long long>(value) : value;
  do {
    *--c = static_cast<char>('0' + magnitude % 10);
    magnitude /= 10;
  } while (magnitude);
  if (value < 0) *--c = '-';
  start_ = c;
}

void PrintLine(std::initializer_list<const char*> parts) {
  for (const char* part : parts) Write(part);
  Write("\n");
}
