// A fused kernel's launch as the step ledger (ledger.cpp) sees it: a user scope named
// "ftx::kernel::<name>" whose inputs are the tensors the kernel reads and whose outputs are the
// tensors it writes. The ledger counts the scope as one kernel of those bytes; without a ledger
// (no RecordFunction callback) the guard is inactive and costs one check.
#pragma once

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <initializer_list>
#include <vector>

namespace ftx {

class KernelRecord {
 public:
  // `name` must outlive the record (a string literal). Undefined tensors are left out.
  KernelRecord(const char* name, std::initializer_list<at::Tensor> reads, std::initializer_list<at::Tensor> writes)
      : guard_(at::RecordScope::USER_SCOPE) {
    if (!guard_.isActive()) return;
    if (guard_.needsInputs()) {
      for (const auto& t : reads)
        if (t.defined()) reads_.emplace_back(t);
      guard_.before(name, c10::ArrayRef<const c10::IValue>(reads_.data(), reads_.size()));
    } else {
      guard_.before(name);
    }
    if (guard_.needsOutputs()) {
      std::vector<c10::IValue> out;
      for (const auto& t : writes)
        if (t.defined()) out.emplace_back(t);
      guard_.setOutputs(std::move(out));
    }
  }

 private:
  // Declared before the guard: the guard's inputs point into it until the guard ends.
  std::vector<c10::IValue> reads_;
  at::RecordFunction guard_;
};

}  // namespace ftx
