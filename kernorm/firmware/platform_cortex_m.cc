// A Cortex-M's clock (SysTick, counting the processor clock), its files and output (ARM semihosting,
// which QEMU serves from the machine it runs on), and its stack and heap, as the linker script
// mps2_an386.ld lays them out and startup_cortex_m.c paints the stack.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "platform.h"

// The processor clock of QEMU's mps2 machines. Under `qemu-system-arm -icount shift=0` each
// instruction takes one nanosecond of the emulated clock, so a tick is 40 instructions.
const unsigned long kTickHz = 25000000;

extern "C" {
extern uint32_t __stack_bottom, __stack_top;
extern char end;  // where the heap starts
void* _sbrk(ptrdiff_t increment);  // newlib's librdimon: moves the heap's end
// The value startup_cortex_m.c paints the stack with.
extern const uint32_t kStackPaint;
// startup_cortex_m.c's semihosting call: the operation, its argument block; the result.
int Semihost(int operation, void* argument);
}

namespace {

struct SysTickRegisters {
  volatile uint32_t ctrl, load, val, calib;
};
SysTickRegisters* const systick = reinterpret_cast<SysTickRegisters*>(0xE000E010);
constexpr uint32_t kReload = 0xFFFFFF;  // SysTick counts down 24 bits
volatile uint32_t wraps = 0;

enum { kSysOpen = 0x01, kSysWrite = 0x05, kSysRead = 0x06 };
enum { kModeRead = 1, kModeWrite = 4 };  // fopen's "rb" and "w"
int file = -1;

int Open(const char* path, int mode) {
  uintptr_t block[] = {reinterpret_cast<uintptr_t>(path), static_cast<uintptr_t>(mode), strlen(path)};
  return Semihost(kSysOpen, block);
}

}  // namespace

extern "C" void SysTick_Handler() { wraps = wraps + 1; }

void PlatformInit() {
  systick->load = kReload;
  systick->val = 0;
  systick->ctrl = 0x7;  // enabled, interrupt on wrap, processor clock
}

unsigned long long ReadTicks() {
  uint32_t high, low;
  do {  // a wrap between the two reads would pair a count with the wrong wrap
    high = wraps;
    low = systick->val;
  } while (high != wraps);
  return (static_cast<unsigned long long>(high) + 1) * (kReload + 1) - low - 1;
}

void Write(const char* text) {
  static const int console = Open(":tt", kModeWrite);  // semihosting's name for the standard output
  uintptr_t block[] = {static_cast<uintptr_t>(console), reinterpret_cast<uintptr_t>(text), strlen(text)};
  Semihost(kSysWrite, block);
}

bool OpenFile(const char* path) { return (file = Open(path, kModeRead)) != -1; }

bool ReadFile(void* buffer, unsigned long bytes) {
  uintptr_t block[] = {static_cast<uintptr_t>(file), reinterpret_cast<uintptr_t>(buffer), bytes};
  return file != -1 && Semihost(kSysRead, block) == 0;  // the bytes it could not read
}

size_t StackUsedBytes() {
  const uint32_t* word = &__stack_bottom;
  while (word < &__stack_top && *word == kStackPaint) ++word;
  return reinterpret_cast<const char*>(&__stack_top) - reinterpret_cast<const char*>(word);
}

size_t HeapUsedBytes() { return static_cast<char*>(_sbrk(0)) - &end; }
