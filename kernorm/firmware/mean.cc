#include "mean.h"

#include <algorithm>
#include <cstdint>

#include "tensorflow/lite/kernels/internal/common.h"
#include "tensorflow/lite/micro/kernels/kernel_util.h"
#include "tensorflow/lite/micro/kernels/reduce.h"

namespace kernorm {
namespace {

constexpr int kMaxDims = 8;

// Sums int8 `input` of shape `dims` over the axes flagged in `reduced` into `sums`, one per output
// element in the order of the kept axes. Adjacent axes of the same kind, and axes of size 1, merge
// first, so the innermost loop runs over one contiguous run.
void Sum(const int8_t* input, const int* dims, const bool* reduced, int rank, uint32_t* sums, int outputs) {
  int size[kMaxDims], stride[kMaxDims], index[kMaxDims] = {};
  bool is_reduced[kMaxDims];
  int merged = 0;
  for (int d = 0; d < rank; ++d) {
    if (dims[d] == 1) continue;
    if (merged && is_reduced[merged - 1] == reduced[d]) {
      size[merged - 1] *= dims[d];
    } else {
      size[merged] = dims[d];
      is_reduced[merged++] = reduced[d];
    }
  }
  if (!merged) {  // a single element
    size[0] = 1;
    is_reduced[merged++] = false;
  }
  // The output's stride of each kept axis; a reduced axis does not move the output.
  for (int d = merged - 1, step = 1; d >= 0; --d) {
    stride[d] = is_reduced[d] ? 0 : step;
    step *= is_reduced[d] ? 1 : size[d];
  }
  std::fill(sums, sums + outputs, 0u);
  const int inner = size[merged - 1];
  int outer = 1;
  for (int d = 0; d < merged - 1; ++d) outer *= size[d];
  for (int o = 0, out = 0; o < outer; ++o, input += inner) {
    // Unsigned sums wrap as TFLM's AddTensorValuesWithExpectedOverflow does.
    if (is_reduced[merged - 1]) {
      uint32_t sum = 0;
      for (int i = 0; i < inner; ++i) sum += static_cast<uint32_t>(static_cast<int32_t>(input[i]));
      sums[out] += sum;
    } else {
      for (int i = 0; i < inner; ++i) sums[out + i] += static_cast<uint32_t>(static_cast<int32_t>(input[i]));
    }
    // The next position of the outer axes, an odometer.
    for (int d = merged - 2; d >= 0; --d) {
      out += stride[d];
      if (++index[d] < size[d]) break;
      out -= stride[d] * size[d];
      index[d] = 0;
    }
  }
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  auto* op_data = static_cast<tflite::OpDataReduce*>(node->user_data);
  const TfLiteEvalTensor* input = tflite::micro::GetEvalInput(context, node, 0);
  const TfLiteEvalTensor* axis = tflite::micro::GetEvalInput(context, node, 1);
  TfLiteEvalTensor* output = tflite::micro::GetEvalOutput(context, node, 0);
  const int rank = input->dims->size;
  bool reduced[kMaxDims] = {};
  bool empty = false;
  for (int d = 0; d < rank && d < kMaxDims; ++d) empty = empty || input->dims->data[d] == 0;
  if (input->type != kTfLiteInt8 || rank > kMaxDims || empty) {
    return tflite::EvalMeanHelper(context, node, op_data);
  }
  const int32_t* axes = tflite::micro::GetTensorData<int32_t>(axis);
  for (int i = 0; i < tflite::micro::GetTensorShape(axis).FlatSize(); ++i) {
    reduced[axes[i] < 0 ? axes[i] + rank : axes[i]] = true;
  }
  int64_t count = 1;  // input elements per output
  for (int d = 0; d < rank; ++d) count *= reduced[d] ? input->dims->data[d] : 1;
  const int outputs = op_data->num_output_elements;
  auto* sums = static_cast<uint32_t*>(context->GetScratchBuffer(context, op_data->scratch_accumulator_idx));
  Sum(tflite::micro::GetTensorData<int8_t>(input), input->dims->data, reduced, rank, sums, outputs);

  // The rescaling of TFLM's reference_ops::QuantizedMeanOrSum, step for step: the mean's 1 / count
  // folded into the input-to-output multiplier.
  int shift = 63 - tflite::CountLeadingZeros(static_cast<uint64_t>(count));
  shift = std::min(shift, 32);
  shift = std::min(shift, 31 + op_data->shift);
  const int32_t multiplier = static_cast<int32_t>((static_cast<int64_t>(op_data->multiplier) << shift) / count);
  int8_t* out = tflite::micro::GetTensorData<int8_t>(output);
  for (int i = 0; i < outputs; ++i) {
    const int32_t centered = static_cast<int32_t>(static_cast<int32_t>(sums[i]) - op_data->input_zp * count);
    const int32_t value = tflite::MultiplyByQuantizedMultiplier(centered, multiplier, op_data->shift - shift) +
                          op_data->output_zp;
    out[i] = static_cast<int8_t>(std::min<int32_t>(std::max<int32_t>(value, -128), 127));
  }
  return kTfLiteOk;
}

}  // namespace

TFLMRegistration RegisterMean() {
  TFLMRegistration registration = tflite::Register_MEAN();
  registration.invoke = Eval;
  return registration;
}

}  // namespace kernorm
