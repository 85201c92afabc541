// What differs between the machines the firmware runs on: a clock, files and output, and the memory it used.
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

// Writes `text` to the standard output.
void Write(const char* text);

// Opens the file at `path` for reading, the one file the firmware reads; false when it cannot.
bool OpenFile(const char* path);

// Reads the open file's next `bytes` bytes into `buffer`; false when fewer are left.
bool ReadFile(void* buffer, unsigned long bytes);

// The deepest the stack has been, in bytes; 0 where it is not measured.
size_t StackUsedBytes();

// Bytes malloc has taken; 0 where it is not measured.
size_t HeapUsedBytes();

#endif  // KERNORM_FIRMWARE_PLATFORM_H_
