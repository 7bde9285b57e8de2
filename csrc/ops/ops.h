// Kernels behind the torch.ops.flashcomm schemas (registered in
// csrc/registration.cpp). The real kernels are the public C++ API
// (include/flashcomm/flashcomm.h), reached through one adapter that resolves the
// schema's `str group_name` into the ProcessGroup; the Meta kernels here compute
// the exact output shape, dtype and device symbolically for torch.compile.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/SymInt.h>
#include <flashcomm/flashcomm.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace flashcomm::ops {

at::Tensor gemm_rs_meta(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const GroupPtr& group,
                        int64_t threshold, bool enabled);
at::Tensor ag_gemm_meta(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const GroupPtr& group,
                        c10::SymInt num_tokens, int64_t threshold, bool enabled,
                        bool gather_output);
at::Tensor gemm_rs_w8a8_meta(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& weight_scale,
                             const std::optional<at::Tensor>& input_scale,
                             const std::optional<at::Tensor>& input_zero_point,
                             const std::optional<at::Tensor>& bias, const GroupPtr& group,
                             c10::ScalarType out_dtype, int64_t threshold, bool enabled);
at::Tensor ag_gemm_w8a8_meta(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& weight_scale,
                             const std::optional<at::Tensor>& input_scale,
                             const std::optional<at::Tensor>& input_zero_point,
                             const std::optional<at::Tensor>& bias, const GroupPtr& group,
                             c10::SymInt num_tokens, c10::ScalarType out_dtype, int64_t threshold,
                             bool enabled, bool gather_output);
at::Tensor sp_row_linear_meta(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const GroupPtr& group,
                              int64_t sp_threshold, bool enabled, int64_t threshold);
at::Tensor sp_row_linear_w8a8_meta(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& weight_scale,
                                   const std::optional<at::Tensor>& input_scale,
                                   const std::optional<at::Tensor>& input_zero_point,
                                   const std::optional<at::Tensor>& bias, const GroupPtr& group,
                                   c10::ScalarType out_dtype, int64_t sp_threshold, bool enabled,
                                   int64_t threshold);
at::Tensor sp_column_linear_meta(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const GroupPtr& group,
                                 int64_t sp_threshold, bool enabled, int64_t threshold,
                                 bool gather_output);
at::Tensor sp_column_linear_w8a8_meta(const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& weight_scale,
                                      const std::optional<at::Tensor>& input_scale,
                                      const std::optional<at::Tensor>& input_zero_point,
                                      const std::optional<at::Tensor>& bias, const GroupPtr& group,
                                      c10::ScalarType out_dtype, int64_t sp_threshold,
                                      bool enabled, int64_t threshold, bool gather_output);
std::tuple<at::Tensor, at::Tensor> sp_add_rms_norm_meta(const at::Tensor& x,
                                                        const std::optional<at::Tensor>& residual,
                                                        const at::Tensor& weight, double eps,
                                                        const GroupPtr& group,
                                                        int64_t sp_threshold, bool enabled,
                                                        bool gather);
at::Tensor sp_reduce_meta(const at::Tensor& partial, const GroupPtr& group, int64_t sp_threshold,
                          bool enabled);
void sp_add_rms_norm_meta_(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                           double eps, const GroupPtr& group, int64_t sp_threshold,
                           bool enabled, bool gather);
void sp_reduce_meta_(at::Tensor& partial, const GroupPtr& group, int64_t sp_threshold,
                     bool enabled);
at::Tensor sp_gather_meta(const at::Tensor& x, const GroupPtr& group, int64_t sp_threshold,
                          bool enabled);
void sp_gather_meta_(at::Tensor& x, const GroupPtr& group, int64_t sp_threshold, bool enabled);

// Counters and configuration (see flashcomm.stats / reset_stats in Python).
std::tuple<std::vector<std::string>, std::vector<int64_t>> stats_op();
std::vector<int64_t> get_pipeline_config_op();
void set_auto_threshold_op(const std::string& op, int64_t k, int64_t n, int64_t tp,
                           const std::string& dtype, int64_t threshold);
void clear_auto_thresholds_op();
void verify_agreement_op(const std::string& group_name, const std::vector<std::string>& names,
                         const std::vector<int64_t>& values, const c10::Device& device);
void set_transport_op(const std::string& group_name, const std::string& transport);
std::string transport_op(const std::string& group_name);
std::string all_reduce_provider_op(const std::string& group_name);
void set_capturing_for_testing_op(bool capturing);
void all_reduce_for_testing_op(const at::Tensor& t, const std::string& group_name);
void set_debug_poison_for_testing_op(bool on);

// The policy and shard arithmetic of csrc/core, for Python (one source of each rule).
std::string version_op();
std::string cpu_features_op();
std::tuple<std::vector<std::string>, std::vector<int64_t>> defaults_op();
std::string sp_mode_op(int64_t n, int64_t tp, int64_t sp_threshold, bool enabled);
std::string strategy_op(int64_t n, int64_t tp, int64_t threshold, bool enabled);
int64_t resolve_threshold_op(const std::string& op, int64_t k, int64_t n, int64_t tp,
                             const std::string& dtype, int64_t threshold);
std::vector<int64_t> owned_rows_op(int64_t n, int64_t tp, int64_t rank);
int64_t shard_rows_op(int64_t n, int64_t tp);
std::vector<int64_t> plan_chunks_op(int64_t c, int64_t max_chunks, int64_t min_chunk_rows);

}  // namespace flashcomm::ops
