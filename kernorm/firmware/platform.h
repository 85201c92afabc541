// What differs between the machines the firmware runs on: a clock, and the memory it used.
// platform_host.cc implements it for the machine that builds, platform_cortex_m.cc for a Cortex-M.
#ifndef KERNORM_FIRMWARE_PLATFORM_H_
#define KERNORM_FIRMWARE_PLATFORM_H_

#include <cstddef>

// Ticks per second of ReadTicks.
extern const unsigned long kTickHz;

// Starts the clock.
void PlatformInit();

// The clock's ticks since PlatformInit.
unsigned long long ReadTicks();

// The deepest the stack has been, in bytes; 0 where it is not measured.
size_t StackUsedBytes();

// Bytes malloc has taken (stdio's buffers); 0 where it is not measured.
size_t HeapUsedBytes();

#endif  // KERNORM_FIRMWARE_PLATFORM_H_
