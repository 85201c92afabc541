#include "main_functions.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "image_provider.h"
#include "model_settings.h"
#include "output_responder.h"
#include "platform.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/schema/schema_generated.h"

namespace {

// Static, so that the linker map shows the arena in .bss: the RAM a board gives it.
alignas(16) uint8_t tensor_arena[kArenaSize];
uint8_t pixels[kImageBytes];
tflite::MicroInterpreter* interpreter = nullptr;
long images = 0;
long next_image = 0;
bool failed = false;
unsigned long long ticks = 0;

// The class of the largest logit; the first one on ties, as NumPy's argmax.
int ArgMax(const TfLiteTensor* output) {
  int best = 0;
  for (int i = 1; i < kNumClasses; ++i) {
    const float value = output->type == kTfLiteFloat32 ? output->data.f[i] : output->data.int8[i];
    const float top = output->type == kTfLiteFloat32 ? output->data.f[best] : output->data.int8[best];
    if (value > top) best = i;
  }
  return best;
}

// `value` in decimal: newlib-nano's printf, which keeps Cortex-M firmware small, has no %llu.
const char* Decimal(unsigned long long value) {
  static char digits[21];
  char* c = digits + sizeof(digits) - 1;
  *c = '\0';
  do {
    *--c = static_cast<char>('0' + value % 10);
    value /= 10;
  } while (value);
  return c;
}

}  // namespace

bool setup(int argc, char* argv[]) {
  PlatformInit();
  if (argc != 3) {
    printf("usage: %s IMAGES N\n", argc ? argv[0] : "firmware");
    return false;
  }
  images = strtol(argv[2], nullptr, 10);
  if (!OpenImages(argv[1], images)) return false;
  static ModelOpResolver resolver;
  if (AddModelOps(resolver) != kTfLiteOk) {
    printf("error: the op resolver is too small for the model's ops\n");
    return false;
  }
  static tflite::MicroInterpreter static_interpreter(tflite::GetModel(kModelData), resolver, tensor_arena,
                                                     kArenaSize);
  interpreter = &static_interpreter;
  if (interpreter->AllocateTensors() != kTfLiteOk) {
    printf("error: the model's tensors do not fit the %d-byte arena\n", kArenaSize);
    return false;
  }
  return true;
}

bool loop() {
  if (next_image >= images) return false;
  if (!ReadImage(next_image, pixels)) {
    failed = true;
    return false;
  }
  TfLiteTensor* input = interpreter->input(0);
  for (int i = 0; i < kImageBytes; ++i) {
    // The input's quantization, as kernorm.runtime.quantize: round(x / scale) + zero point, clipped.
    if (input->type == kTfLiteFloat32) {
      input->data.f[i] = pixels[i];
    } else {
      // rintf rounds half to even, as NumPy's round.
      const long q = kInputScale ? static_cast<long>(rintf(pixels[i] / kInputScale)) + kInputZeroPoint : pixels[i];
      if (input->type == kTfLiteUInt8) {
        input->data.uint8[i] = static_cast<uint8_t>(q < 0 ? 0 : (q > 255 ? 255 : q));
      } else {
        input->data.int8[i] = static_cast<int8_t>(q < -128 ? -128 : (q > 127 ? 127 : q));
      }
    }
  }
  const unsigned long long start = ReadTicks();
  if (interpreter->Invoke() != kTfLiteOk) {
    printf("error: Invoke failed on image %ld\n", next_image);
    failed = true;
    return false;
  }
  ticks += ReadTicks() - start;
  RespondToClassification(next_image, ArgMax(interpreter->output(0)));
  ++next_image;
  return true;
}

int finish() {
  printf("summary images=%ld arena_used_bytes=%u ticks=%s tick_hz=%lu stack_used_bytes=%lu heap_used_bytes=%lu\n",
         next_image, interpreter ? static_cast<unsigned>(interpreter->arena_used_bytes()) : 0u, Decimal(ticks),
         static_cast<unsigned long>(kTickHz), static_cast<unsigned long>(StackUsedBytes()),
         static_cast<unsigned long>(HeapUsedBytes()));
  fflush(stdout);
  return failed || next_image != images ? 1 : 0;
}
