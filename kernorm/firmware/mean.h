// kernorm's MEAN for int8: TFLM's own arithmetic, without its per-element index computation.
#ifndef KERNORM_FIRMWARE_MEAN_H_
#define KERNORM_FIRMWARE_MEAN_H_

#include "tensorflow/lite/micro/micro_common.h"

namespace kernorm {

// TFLM's MEAN (init and prepare its own) whose int8 evaluation sums each input once, in memory order,
// then rescales every sum exactly as TFLM's reference kernel does, so each output is the same integer.
// Other types, and empty tensors, go to TFLM's kernel. LayerNorm's and GroupNorm's statistics are
// MEANs over most of a feature map, where TFLM's kernel spends about 135 instructions per element.
TFLMRegistration RegisterMean();

}  // namespace kernorm

#endif  // KERNORM_FIRMWARE_MEAN_H_
