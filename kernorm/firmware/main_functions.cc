#include "main_functions.h"

#include <cmath>

#include "image_provider.h"
#include "model_settings.h"
#include "output_responder.h"
#include "platform.h"
#include "print.h"
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

// A count in decimal digits; -1 for anything else.
long ParseCount(const char* text) {
  long value = 0;
  for (const char* c = text; *c; ++c) {
    if (*c < '0' || *c > '9' || value > 100000000) return -1;
    value = value * 10 + (*c - '0');
  }
  return *text ? value : -1;
}

}  // namespace

bool setup(int argc, char* argv[]) {
  PlatformInit();
  if (argc != 3) {
    PrintLine({"usage: ", argc ? argv[0] : "firmware", " IMAGES N"});
    return false;
  }
  images = ParseCount(argv[2]);
  if (!OpenImages(argv[1], images)) return false;
  static ModelOpResolver resolver;
  if (AddModelOps(resolver) != kTfLiteOk) {
    PrintLine({"error: the op resolver is too small for the model's ops"});
    return false;
  }
  static tflite::MicroInterpreter static_interpreter(tflite::GetModel(kModelData), resolver, tensor_arena,
                                                     kArenaSize);
  interpreter = &static_interpreter;
  if (interpreter->AllocateTensors() != kTfLiteOk) {
    PrintLine({"error: the model's tensors do not fit the ", Number(kArenaSize), "-byte arena"});
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
    PrintLine({"error: Invoke failed on image ", Number(next_image)});
    failed = true;
    return false;
  }
  ticks += ReadTicks() - start;
  RespondToClassification(next_image, ArgMax(interpreter->output(0)));
  ++next_image;
  return true;
}

int finish() {
  PrintLine({"summary images=", Number(next_image), " arena_used_bytes=",
             Number(interpreter ? static_cast<long long>(interpreter->arena_used_bytes()) : 0), " ticks=",
             Number(static_cast<long long>(ticks)), " tick_hz=", Number(kTickHz), " stack_used_bytes=",
             Number(StackUsedBytes()), " heap_used_bytes=", Number(HeapUsedBytes())});
  return failed || next_image != images ? 1 : 0;
}
