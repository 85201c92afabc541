// A Cortex-M's clock (SysTick, counting the processor clock) and its stack and heap, as the linker
// script mps2_an386.ld lays them out and startup_cortex_m.c paints the stack.
#include <cstddef>
#include <cstdint>

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
}

namespace {

struct SysTickRegisters {
  volatile uint32_t ctrl, load, val, calib;
};
SysTickRegisters* const systick = reinterpret_cast<SysTickRegisters*>(0xE000E010);
constexpr uint32_t kReload = 0xFFFFFF;  // SysTick counts down 24 bits
volatile uint32_t wraps = 0;

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

size_t StackUsedBytes() {
  const uint32_t* word = &__stack_bottom;
  while (word < &__stack_top && *word == kStackPaint) ++word;
  return reinterpret_cast<const char*>(&__stack_top) - reinterpret_cast<const char*>(word);
}

size_t HeapUsedBytes() { return static_cast<char*>(_sbrk(0)) - &end; }
