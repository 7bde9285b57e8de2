// Kernels behind the torch.ops.flashcomm schemas (registered in
// csrc/registration.cpp). The real kernels resolve the group by name and call
// the C++ API of include/flashcomm/flashcomm.h; the Meta kernels compute the
// exact output shape, dtype and device symbolically for torch.compile.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace flashcomm::ops {

at::Tensor gemm_rs_op(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const std::string& group_name,
                      int64_t threshold, bool enabled);
at::Tensor gemm_rs_meta(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const std::string& group_name,
                        int64_t threshold, bool enabled);

at::Tensor ag_gemm_op(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const std::string& group_name,
                      int64_t num_tokens, int64_t threshold, bool enabled, bool gather_output);
at::Tensor ag_gemm_meta(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const std::string& group_name,
                        c10::SymInt num_tokens, int64_t threshold, bool enabled,
                        bool gather_output);

at::Tensor gemm_rs_w8a8_op(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& weight_scale,
                           const std::optional<at::Tensor>& input_scale,
                           const std::optional<at::Tensor>& input_zero_point,
                           const std::optional<at::Tensor>& bias, const std::string& group_name,
                           c10::ScalarType out_dtype, int64_t threshold, bool enabled);
at::Tensor gemm_rs_w8a8_meta(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& weight_scale,
                             const std::optional<at::Tensor>& input_scale,
                             const std::optional<at::Tensor>& input_zero_point,
                             const std::optional<at::Tensor>& bias, const std::string& group_name,
                             c10::ScalarType out_dtype, int64_t threshold, bool enabled);

at::Tensor ag_gemm_w8a8_op(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& weight_scale,
                           const std::optional<at::Tensor>& input_scale,
                           const std::optional<at::Tensor>& input_zero_point,
                           const std::optional<at::Tensor>& bias, const std::string& group_name,
                           int64_t num_tokens, c10::ScalarType out_dtype, int64_t threshold,
                           bool enabled, bool gather_output);
at::Tensor ag_gemm_w8a8_meta(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& weight_scale,
                             const std::optional<at::Tensor>& input_scale,
                             const std::optional<at::Tensor>& input_zero_point,
                             const std::optional<at::Tensor>& bias, const std::string& group_name,
                             c10::SymInt num_tokens, c10::ScalarType out_dtype, int64_t threshold,
                             bool enabled, bool gather_output);

// Layout-invariant ops (csrc/ops/sp_ops.cpp).
at::Tensor sp_row_linear_op(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const std::string& group_name,
                            int64_t sp_threshold, bool enabled, int64_t threshold);
at::Tensor sp_row_linear_meta(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const std::string& group_name,
                              int64_t sp_threshold, bool enabled, int64_t threshold);
at::Tensor sp_row_linear_w8a8_op(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& weight_scale,
                                 const std::optional<at::Tensor>& input_scale,
                                 const std::optional<at::Tensor>& input_zero_point,
                                 const std::optional<at::Tensor>& bias,
                                 const std::string& group_name, c10::ScalarType out_dtype,
                                 int64_t sp_threshold, bool enabled, int64_t threshold);
at::Tensor sp_row_linear_w8a8_meta(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& weight_scale,
                                   const std::optional<at::Tensor>& input_scale,
                                   const std::optional<at::Tensor>& input_zero_point,
                                   const std::optional<at::Tensor>& bias,
                                   const std::string& group_name, c10::ScalarType out_dtype,
                                   int64_t sp_threshold, bool enabled, int64_t threshold);
at::Tensor sp_column_linear_op(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const std::string& group_name,
                               int64_t sp_threshold, bool enabled, int64_t threshold,
                               bool gather_output);
at::Tensor sp_column_linear_meta(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::string& group_name, int64_t sp_threshold, bool enabled,
                                 int64_t threshold, bool gather_output);
at::Tensor sp_column_linear_w8a8_op(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
    const std::optional<at::Tensor>& input_scale, const std::optional<at::Tensor>& input_zero_point,
    const std::optional<at::Tensor>& bias, const std::string& group_name, c10::ScalarType out_dtype,
    int64_t sp_threshold, bool enabled, int64_t threshold, bool gather_output);
at::Tensor sp_column_linear_w8a8_meta(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
    const std::optional<at::Tensor>& input_scale, const std::optional<at::Tensor>& input_zero_point,
    const std::optional<at::Tensor>& bias, const std::string& group_name, c10::ScalarType out_dtype,
    int64_t sp_threshold, bool enabled, int64_t threshold, bool gather_output);
std::tuple<at::Tensor, at::Tensor> sp_add_rms_norm_op(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
    double eps, const std::string& group_name, int64_t sp_threshold, bool enabled, bool gather);
std::tuple<at::Tensor, at::Tensor> sp_add_rms_norm_meta(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
    double eps, const std::string& group_name, int64_t sp_threshold, bool enabled, bool gather);

// Counters and configuration (see flashcomm.stats / reset_stats in Python).
std::tuple<std::vector<std::string>, std::vector<int64_t>> stats_op();
void reset_stats_op();
void set_pipeline_config_op(int64_t max_chunks, int64_t min_chunk_rows);
void set_all_reduce_provider_op(const std::string& group_name, const std::string& op,
                                const std::string& provider_group);
void clear_all_reduce_provider_op(const std::string& group_name);
std::string all_reduce_provider_op(const std::string& group_name);
std::vector<int64_t> get_pipeline_config_op();
void set_auto_threshold_op(const std::string& op, int64_t k, int64_t n, int64_t tp,
                           const std::string& dtype, int64_t threshold);
void clear_auto_thresholds_op();
void verify_agreement_op(const std::string& group_name, const std::vector<std::string>& names,
                         const std::vector<int64_t>& values, const c10::Device& device);

}  // namespace flashcomm::ops
