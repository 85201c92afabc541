// kernorm's normalization training step as two TensorFlow CPU ops (see kernorm/native.py).
//
// KernormNormalizeGroups(x, gamma, beta) normalizes x, shaped (rows, positions,
// channels), with one mean and variance per row and group of channels, then
// scales and shifts per channel; KernormNormalizeGroupsGrad is its gradient.
// Each makes two passes over the feature map, split over TensorFlow's CPU
// threads: the per-channel sums, then the output. Keras's layers and XLA take
// four to six; in the study's network that is most of a training step's norm
// time (docs/benchmarks.md). With relu=true both take x before the ReLU
// that precedes the norm in kernorm's layers and apply it on the way, which
// saves the ReLU's own passes.
//
// The sums walk the map in strips of 16 · channels floats: lane j of a strip
// always holds channel j % channels, and a strip is a whole number of
// 16-float vectors, so the loops over a strip vectorize for any channel count.
//
// The moments come from sums of x − k, with k each row's first value of the
// channel (the shifted-data algorithm): Σx² − (Σx)²/n in float loses the
// variance of a map whose mean is large against its spread (a constant map of
// 70,000 came out at 0.072, where the variance is 0), sums of x − k do not.
//
// Both kernels and their shape functions check every input's shape and fail with
// InvalidArgument on any other, before indexing anything. A map with no rows or
// no positions is valid and gives what Keras's layers give: an empty y and dx,
// and where the rows have no positions, statistics of 0/0 = NaN, hence a NaN dgamma.

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

// InvalidArgument with the message args... put together.
template <typename... Args>
absl::Status invalid(const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat(args...));
}

constexpr int64_t kStripsPerUnit = 64;  // a unit of work: 64 strips of one row (40 KB at 10 channels)

// How a (rows, positions, channels) map splits into units of work, each within one row.
struct Layout {
  Layout(const Tensor& x, int64_t groups)
      : rows(x.dim_size(0)), positions(x.dim_size(1)), channels(x.dim_size(2)), groups(groups),
        strip(16 * channels), row_size(positions * channels),
        units_per_row(std::max<int64_t>(1, (row_size + kStripsPerUnit * strip - 1) / (kStripsPerUnit * strip))),
        count(static_cast<double>(positions) * (channels / groups)) {}

  int64_t rows, positions, channels, groups, strip, row_size, units_per_row;
  double count;  // values behind each statistic

  int64_t units() const { return rows * units_per_row; }
  int64_t row(int64_t unit) const { return unit / units_per_row; }
  int64_t begin(int64_t unit) const { return row(unit) * row_size + unit % units_per_row * kStripsPerUnit * strip; }
  int64_t end(int64_t unit) const { return std::min(begin(unit) + kStripsPerUnit * strip, (row(unit) + 1) * row_size); }
  int64_t group(int64_t channel) const { return channel / (channels / groups); }
};

// Runs fn(first, last) on ranges of units that together cover all, spread over TensorFlow's
// intra-op threads; fn allocates its buffers once per range.
template <typename Fn>
void for_unit_ranges(OpKernelContext* ctx, const Layout& layout, Fn fn) {
  if (layout.row_size == 0) return;  // no values: nothing to pass over
  const int64_t cost = std::min(layout.row_size, kStripsPerUnit * layout.strip) * 4;  // ~4 cycles a float
  ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
      layout.units(), tsl::thread::ThreadPool::SchedulingParams::Adaptive(cost), fn);
}

// Lane j of a strip holds channel j % channels: per_channel repeated over a strip.
void spread_over_strip(const float* per_channel, int64_t channels, float* strip) {
  for (int64_t lane = 0; lane < 16 * channels; lane += channels)
    std::copy(per_channel, per_channel + channels, strip + lane);
}

// Per unit and channel, Σa and Σa·b over the unit's span, into sums[unit · 2C + c] and [unit · 2C + C + c],
// where a and b are first shifted by ka and kb, (rows, channels) each, and before that pass through a ReLU
// where kReluA and kReluB say so.
template <bool kReluA, bool kReluB>
void channel_sums(OpKernelContext* ctx, const Layout& layout, const float* a, const float* b,
                  const std::vector<float>& ka, const std::vector<float>& kb, std::vector<double>* sums) {
  const int64_t c = layout.channels, strip = layout.strip;
  sums->assign(layout.units() * 2 * c, 0.0);
  for_unit_ranges(ctx, layout, [&](int64_t first, int64_t last) {
    std::vector<float> sa(strip), sab(strip), kka(strip), kkb(strip);
    for (int64_t unit = first; unit < last; ++unit) {
      std::fill(sa.begin(), sa.end(), 0.0f);
      std::fill(sab.begin(), sab.end(), 0.0f);
      spread_over_strip(&ka[layout.row(unit) * c], c, kka.data());
      spread_over_strip(&kb[layout.row(unit) * c], c, kkb.data());
      const int64_t end = layout.end(unit);
      for (int64_t i = layout.begin(unit); i < end; i += strip) {
        const int64_t n = std::min(strip, end - i);
        for (int64_t j = 0; j < n; ++j) {
          const float av = (kReluA ? std::max(a[i + j], 0.0f) : a[i + j]) - kka[j];
          const float bv = (kReluB ? std::max(b[i + j], 0.0f) : b[i + j]) - kkb[j];
          sa[j] += av;
          sab[j] += av * bv;
        }
      }
      double* out = sums->data() + unit * 2 * c;
      for (int64_t lane = 0; lane < strip; lane += c)
        for (int64_t k = 0; k < c; ++k) {
          out[k] += sa[lane + k];
          out[c + k] += sab[lane + k];
        }
    }
  });
}

// Each row's first value per channel, (rows, channels), after a ReLU if relu: the shift k of the sums
// (0 where the rows have no positions).
std::vector<float> first_values(const Layout& layout, const float* x, bool relu) {
  std::vector<float> k(layout.rows * layout.channels, 0.0f);
  if (layout.positions == 0) return k;
  for (int64_t r = 0; r < layout.rows; ++r)
    for (int64_t ch = 0; ch < layout.channels; ++ch) {
      const float v = x[r * layout.row_size + ch];
      k[r * layout.channels + ch] = relu ? std::max(v, 0.0f) : v;
    }
  return k;
}

// Per row and channel, the units' sums added up: (rows, 2C).
std::vector<double> row_sums(const Layout& layout, const std::vector<double>& unit_sums) {
  const int64_t width = 2 * layout.channels;
  std::vector<double> rows(layout.rows * width, 0.0);
  for (int64_t unit = 0; unit < layout.units(); ++unit)
    for (int64_t k = 0; k < width; ++k) rows[layout.row(unit) * width + k] += unit_sums[unit * width + k];
  return rows;
}

// out[i] = (a[i] − ka[r, c]) · p[r, c] + (b[i] − kb[r, c]) · q[r, c] + s[r, c] over the whole map, c being
// i's channel and r its row; ka, p, kb, q and s are (rows, channels). b may be null (then kb and q are
// unused). kReluA passes a through a ReLU first; kMaskB makes out 0 wherever b ≤ 0 (the ReLU's gradient).
// The shifts keep the products small where the map's mean is large against its spread.
template <bool kReluA, bool kMaskB>
void affine_pass(OpKernelContext* ctx, const Layout& layout, const float* a, const std::vector<float>& ka,
                 const std::vector<float>& p, const float* b, const std::vector<float>& kb,
                 const std::vector<float>& q, const std::vector<float>& s, float* out) {
  const int64_t c = layout.channels, strip = layout.strip;
  for_unit_ranges(ctx, layout, [&](int64_t first, int64_t last) {
    std::vector<float> kka(strip), pp(strip), kkb(strip), qq(strip), ss(strip);
    for (int64_t unit = first; unit < last; ++unit) {
      const int64_t r = layout.row(unit), end = layout.end(unit);
      spread_over_strip(&ka[r * c], c, kka.data());
      spread_over_strip(&p[r * c], c, pp.data());
      spread_over_strip(&s[r * c], c, ss.data());
      if (b) {
        spread_over_strip(&kb[r * c], c, kkb.data());
        spread_over_strip(&q[r * c], c, qq.data());
      }
      for (int64_t i = layout.begin(unit); i < end; i += strip) {
        const int64_t n = std::min(strip, end - i);
        if (b) {
          for (int64_t j = 0; j < n; ++j) {
            const float keep = kMaskB ? static_cast<float>(b[i + j] > 0.0f) : 1.0f;
            out[i + j] = ((a[i + j] - kka[j]) * pp[j] + (b[i + j] - kkb[j]) * qq[j] + ss[j]) * keep;
          }
        } else {
          for (int64_t j = 0; j < n; ++j)
            out[i + j] = ((kReluA ? std::max(a[i + j], 0.0f) : a[i + j]) - kka[j]) * pp[j] + ss[j];
        }
      }
    }
  });
}

// OK where x is (rows, positions, channels) with channels a positive multiple of groups, and each of
// vectors (name, tensor) is (channels,): the shapes both kernels index by.
absl::Status check_map(const Tensor& x, int64_t groups,
                       std::initializer_list<std::pair<const char*, const Tensor*>> vectors) {
  if (x.dims() != 3) return invalid("x must be (rows, positions, channels), not ", x.shape().DebugString());
  const int64_t channels = x.dim_size(2);
  if (channels == 0 || channels % groups)
    return invalid("x's channels (", channels, ") must be a positive multiple of groups (", groups, ")");
  for (const auto& [name, vector] : vectors)
    if (vector->shape() != TensorShape({channels}))
      return invalid(name, " must be (", channels, ",) as x's channels, not ", vector->shape().DebugString());
  return absl::OkStatus();
}

class NormalizeGroups : public OpKernel {
 public:
  explicit NormalizeGroups(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("groups", &groups_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("relu", &relu_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    OP_REQUIRES_OK(ctx, check_map(x, groups_, {{"gamma", &ctx->input(1)}, {"beta", &ctx->input(2)}}));
    const Layout layout(x, groups_);
    const int64_t c = layout.channels, g = groups_;
    const float* gamma = ctx->input(1).flat<float>().data();
    const float* beta = ctx->input(2).flat<float>().data();
    Tensor *y, *mean_out, *var_out, *inv_out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({layout.rows, g}), &mean_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({layout.rows, g}), &var_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({layout.rows, g}), &inv_out));
    auto mean = mean_out->flat<float>(), var = var_out->flat<float>(), inv = inv_out->flat<float>();

    const float* xs = x.flat<float>().data();
    const std::vector<float> k = first_values(layout, xs, relu_);
    std::vector<double> unit_sums;
    (relu_ ? channel_sums<true, true> : channel_sums<false, false>)(ctx, layout, xs, xs, k, k, &unit_sums);
    const std::vector<double> sums = row_sums(layout, unit_sums);  // Σ(x − k) and Σ(x − k)² per row and channel

    // Per row and group, over its channels, each with its own k: the mean from Σx = Σ(x − k) + n·k,
    // then Σ(x − m)² = Σ(x − k)² + 2(k − m)·Σ(x − k) + n·(k − m)².
    const double n = static_cast<double>(layout.positions);
    std::vector<float> centre(layout.rows * c), scale(layout.rows * c), offset(layout.rows * c);
    std::vector<double> s1(layout.rows * g, 0.0), s2(layout.rows * g, 0.0);  // Σx, Σ(x − m)² per row and group
    for (int64_t r = 0; r < layout.rows; ++r) {
      for (int64_t ch = 0; ch < c; ++ch) s1[r * g + layout.group(ch)] += sums[r * 2 * c + ch] + n * k[r * c + ch];
      for (int64_t at = r * g; at < (r + 1) * g; ++at) mean(at) = s1[at] / layout.count;
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t at = r * g + layout.group(ch);
        const double d = k[r * c + ch] - static_cast<double>(mean(at));
        s2[at] += sums[r * 2 * c + c + ch] + 2.0 * d * sums[r * 2 * c + ch] + n * d * d;
      }
      for (int64_t at = r * g; at < (r + 1) * g; ++at) {
        const double v = std::max(s2[at] / layout.count, 0.0);
        var(at) = v;
        inv(at) = 1.0 / std::sqrt(v + epsilon_);
      }
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t at = r * g + layout.group(ch);
        centre[r * c + ch] = mean(at);
        scale[r * c + ch] = gamma[ch] * inv(at);
        offset[r * c + ch] = beta[ch];
      }
    }
    (relu_ ? affine_pass<true, false> : affine_pass<false, false>)(ctx, layout, xs, centre, scale, nullptr, {}, {},
                                                                   offset, y->flat<float>().data());
  }

 private:
  int64_t groups_;
  float epsilon_;
  bool relu_;
};

class NormalizeGroupsGrad : public OpKernel {
 public:
  explicit NormalizeGroupsGrad(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("groups", &groups_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("relu", &relu_));
  }

  // With x̂ = (x − m)·inv and g = dy·γ: dx = inv·(g − mean(g) − x̂·mean(g·x̂)), which is
  // dy·γ·inv + (x − m)·a + b with a and b constant per row and group.
  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    OP_REQUIRES_OK(ctx, check_map(x, groups_, {{"gamma", &ctx->input(2)}}));
    OP_REQUIRES(ctx, dy.shape() == x.shape(),
                invalid("dy must be shaped as x ", x.shape().DebugString(), ", not ", dy.shape().DebugString()));
    const TensorShape statistics({x.dim_size(0), groups_});
    for (const auto& [name, input] : {std::pair{"mean", 3}, std::pair{"inv", 4}})
      OP_REQUIRES(ctx, ctx->input(input).shape() == statistics,
                  invalid(name, " must be (rows, groups) ", statistics.DebugString(), ", not ",
                          ctx->input(input).shape().DebugString()));
    const Layout layout(x, groups_);
    const int64_t c = layout.channels, g = groups_;
    const float* gamma = ctx->input(2).flat<float>().data();
    const auto mean = ctx->input(3).flat<float>();
    const auto inv = ctx->input(4).flat<float>();
    Tensor *dx, *dgamma, *dbeta;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({c}), &dgamma));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({c}), &dbeta));

    const float* dys = dy.flat<float>().data();
    const float* xs = x.flat<float>().data();
    const std::vector<float> k = first_values(layout, xs, relu_), no_shift(layout.rows * c, 0.0f);
    std::vector<double> unit_sums;
    (relu_ ? channel_sums<false, true> : channel_sums<false, false>)(ctx, layout, dys, xs, no_shift, k, &unit_sums);
    const std::vector<double> sums = row_sums(layout, unit_sums);  // Σdy and Σdy·(x − k) per row and channel

    std::vector<float> scale(layout.rows * c), a(layout.rows * c), b(layout.rows * c), centre(layout.rows * c);
    std::vector<double> dgamma_sum(c, 0.0), dbeta_sum(c, 0.0);
    std::vector<double> mean_g(layout.rows * g, 0.0), mean_gx(layout.rows * g, 0.0);  // per row and group
    for (int64_t r = 0; r < layout.rows; ++r) {
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t at = r * g + layout.group(ch);
        const double dy_sum = sums[r * 2 * c + ch];
        const double centred = sums[r * 2 * c + c + ch] + (k[r * c + ch] - mean(at)) * dy_sum;  // Σ dy·(x − m)
        mean_g[at] += gamma[ch] * dy_sum / layout.count;
        mean_gx[at] += inv(at) * gamma[ch] * centred / layout.count;
        dgamma_sum[ch] += inv(at) * centred;
        dbeta_sum[ch] += dy_sum;
      }
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t at = r * g + layout.group(ch);
        const double i = inv(at);
        scale[r * c + ch] = gamma[ch] * i;
        a[r * c + ch] = -i * i * mean_gx[at];
        b[r * c + ch] = -i * mean_g[at];
        centre[r * c + ch] = mean(at);
      }
    }
    std::copy(dgamma_sum.begin(), dgamma_sum.end(), dgamma->flat<float>().data());
    std::copy(dbeta_sum.begin(), dbeta_sum.end(), dbeta->flat<float>().data());
    (relu_ ? affine_pass<false, true> : affine_pass<false, false>)(ctx, layout, dys, no_shift, scale, xs, centre, a,
                                                                   b, dx->flat<float>().data());
  }

 private:
  int64_t groups_;
  bool relu_;
};

// check_map where the shapes are known when a graph is built: x, input x_index, of rank 3 with channels a
// positive multiple of groups, and the inputs vectors of rank 1 with as many; x refined into *x.
absl::Status map_shapes(InferenceContext* ctx, int x_index, std::initializer_list<int> vectors, int64_t groups,
                        ShapeHandle* x) {
  TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(x_index), 3, x));
  DimensionHandle channels = ctx->Dim(*x, 2);
  for (int k : vectors) {
    ShapeHandle vector;
    TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(k), 1, &vector));
    TF_RETURN_IF_ERROR(ctx->Merge(channels, ctx->Dim(vector, 0), &channels));
  }
  if (ctx->ValueKnown(channels) && (ctx->Value(channels) == 0 || ctx->Value(channels) % groups))
    return invalid("x's channels (", ctx->Value(channels), ") must be a positive multiple of groups (", groups,
                   ")");
  return ctx->ReplaceDim(*x, 2, channels, x);
}

absl::Status forward_shapes(InferenceContext* ctx) {  // y like x; mean, variance, inv (rows, groups)
  int64_t groups;
  TF_RETURN_IF_ERROR(ctx->GetAttr("groups", &groups));
  ShapeHandle x;
  TF_RETURN_IF_ERROR(map_shapes(ctx, 0, {1, 2}, groups, &x));
  ctx->set_output(0, x);
  for (int k = 1; k < 4; ++k) ctx->set_output(k, ctx->Matrix(ctx->Dim(x, 0), groups));
  return absl::OkStatus();
}

absl::Status gradient_shapes(InferenceContext* ctx) {  // dx like x; dgamma, dbeta (channels,)
  int64_t groups;
  TF_RETURN_IF_ERROR(ctx->GetAttr("groups", &groups));
  ShapeHandle x, statistics;
  TF_RETURN_IF_ERROR(map_shapes(ctx, 1, {2}, groups, &x));
  TF_RETURN_IF_ERROR(ctx->Merge(x, ctx->input(0), &x));  // dy shaped as x
  for (int k : {3, 4}) {  // mean and inv (rows, groups)
    TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(k), 2, &statistics));
    TF_RETURN_IF_ERROR(ctx->Merge(statistics, ctx->Matrix(ctx->Dim(x, 0), groups), &statistics));
  }
  ctx->set_output(0, x);
  for (int k = 1; k < 3; ++k) ctx->set_output(k, ctx->Vector(ctx->Dim(x, 2)));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("KernormNormalizeGroups")
    .Input("x: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Attr("groups: int >= 1")
    .Attr("epsilon: float")
    .Attr("relu: bool = false")
    .Output("y: float")
    .Output("mean: float")
    .Output("variance: float")
    .Output("inv: float")
    .SetShapeFn(forward_shapes);

REGISTER_OP("KernormNormalizeGroupsGrad")
    .Input("dy: float")
    .Input("x: float")
    .Input("gamma: float")
    .Input("mean: float")
    .Input("inv: float")
    .Attr("groups: int >= 1")
    .Attr("relu: bool = false")
    .Output("dx: float")
    .Output("dgamma: float")
    .Output("dbeta: float")
    .SetShapeFn(gradient_shapes);

REGISTER_KERNEL_BUILDER(Name("KernormNormalizeGroups").Device(tensorflow::DEVICE_CPU), NormalizeGroups);
REGISTER_KERNEL_BUILDER(Name("KernormNormalizeGroupsGrad").Device(tensorflow::DEVICE_CPU), NormalizeGroupsGrad);
