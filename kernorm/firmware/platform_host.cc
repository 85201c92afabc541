#include <cstdio>
#include <ctime>

#include "platform.h"

// The process's processor time, which other processes on the machine do not inflate.
const unsigned long kTickHz = CLOCKS_PER_SEC;

void PlatformInit() {}

unsigned long long ReadTicks() { return std::clock(); }

namespace {
FILE* file = nullptr;
}

void Write(const char* text) { fputs(text, stdout); }

bool OpenFile(const char* path) { return (file = fopen(path, "rb")) != nullptr; }

bool ReadFile(void* buffer, unsigned long bytes) { return file && fread(buffer, 1, bytes, file) == bytes; }

size_t StackUsedBytes() { return 0; }

size_t HeapUsedBytes() { return 0; }
