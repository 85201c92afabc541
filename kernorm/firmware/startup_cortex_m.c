// Start-up of a Cortex-M under QEMU: the vector table, then the FPU on, .data copied from flash,
// .bss zeroed, the stack painted, C++'s constructors run, main called with the arguments QEMU's
// -semihosting-config gives, and its status handed back to QEMU.
#include <stdint.h>

// Laid out by mps2_an386.ld.
extern uint32_t __data_load, __data_start, __data_end, __bss_start__, __bss_end__, __stack_bottom, __stack_top;

const uint32_t kStackPaint = 0xC0FFEE11u;

int main(int argc, char* argv[]);
void __libc_init_array(void);
void SysTick_Handler(void);

// __libc_init_array calls these, and C++ registers static objects' destructors with __dso_handle; the C
// run-time's crti.o and crtbegin.o, which would define them, are not linked.
void _init(void) {}
void _fini(void) {}
void* __dso_handle = 0;

// ARM semihosting: the operation in r0, its argument block in r1, the result back in r0.
int Semihost(int operation, void* argument) {
  register int r0 __asm__("r0") = operation;
  register void* r1 __asm__("r1") = argument;
  __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
  return r0;
}

enum { kSysWrite0 = 0x04, kSysGetCmdline = 0x15, kSysExit = 0x18 };
// SYS_EXIT's reasons: QEMU exits with status 0 for the first, 1 for the second.
enum { kApplicationExit = 0x20026, kRunTimeErrorUnknown = 0x20023 };

// A fault ends the emulation at once with a message, rather than spinning until a time-out.
static void Fault_Handler(void) {
  Semihost(kSysWrite0, "error: the processor faulted\n");
  Semihost(kSysExit, (void*)kRunTimeErrorUnknown);
  for (;;) {
  }
}

// The command line, split at spaces into argv.
static char command_line[256];
static char* arguments[8];

static int ReadArguments(void) {
  struct {
    char* buffer;
    int length;
  } block = {command_line, sizeof(command_line)};
  if (Semihost(kSysGetCmdline, &block) != 0) return 0;
  int count = 0;
  for (char* c = command_line; *c && count < 8;) {
    while (*c == ' ') *c++ = '\0';
    if (!*c) break;
    arguments[count++] = c;
    while (*c && *c != ' ') ++c;
  }
  return count;
}

void Reset_Handler(void) {
  // CP10 and CP11, the FPU, full access (CPACR), before any float instruction.
#if defined(__ARM_FP)
  *(volatile uint32_t*)0xE000ED88 |= 0xFu << 20;
  __asm__ volatile("dsb\n isb");
#endif
  for (uint32_t *from = &__data_load, *to = &__data_start; to < &__data_end;) *to++ = *from++;
  for (uint32_t* to = &__bss_start__; to < &__bss_end__;) *to++ = 0;
  // Up to a little below this function's own frame, which is in use.
  uint32_t* in_use = (uint32_t*)__builtin_frame_address(0) - 64;
  for (uint32_t* word = &__stack_bottom; word < in_use; ++word) *(volatile uint32_t*)word = kStackPaint;
  __libc_init_array();
  int argc = ReadArguments();
  Semihost(kSysExit, (void*)(main(argc, arguments) ? kRunTimeErrorUnknown : kApplicationExit));
  for (;;) {
  }
}

typedef void (*Handler)(void);

// Initial stack pointer, then the exceptions: reset, NMI, hard fault, memory management, bus and
// usage faults, four reserved, SVCall, debug monitor, reserved, PendSV, SysTick.
__attribute__((section(".vectors"), used)) const Handler vectors[16] = {
    (Handler)&__stack_top, Reset_Handler, Fault_Handler, Fault_Handler, Fault_Handler, Fault_Handler,
    Fault_Handler,         0,             0,             0,             0,             Fault_Handler,
    Fault_Handler,         0,             Fault_Handler, SysTick_Handler,
};
