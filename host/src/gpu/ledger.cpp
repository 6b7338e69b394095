// The step ledger (issue 15): every operation a training step runs, recorded through libtorch's
// RecordFunction callbacks, with the bytes its tensors occupy and, for GEMMs and attention, its
// FLOPs. Device-agnostic: sizes come from tensor metadata, nothing waits for the device.
// The callback is the recording thread's (added for the step, removed after), not a global
// one: libtorch hands a thread's callbacks on to the autograd engine's device threads with the
// rest of its thread-local state, so a CUDA backward is recorded too, while other threads of
// the process (a data loader, another test) are not.
//
// What counts as one kernel (so that nothing is counted twice: RecordFunction sees a composite
// op and every op it calls):
// - an op none of whose callees counted (a leaf: `aten::copy_` under `aten::_to_copy` under
//   `aten::to`, `aten::addmm` under `aten::linear`); its callees that launch nothing (views,
//   allocations) do not make it composite;
// - a GEMM or attention op none of whose callees is a counted GEMM or attention op, even when
//   it calls helper kernels (an addmm's bias copy, attention backward's zeroed accumulators are
//   their own kernels, counted too);
// - a fused kernel's scope (`ftx::kernel::*`, ledger.h): one kernel reading its inputs and
//   writing its outputs, whatever runs inside;
// - views and metadata (no kernel) are counted, without bytes.
// Bytes of an op: its tensor inputs (read) and outputs (written), each `elements × element
// size` over the dimensions with a non-zero stride (a broadcast reads its source once); the
// out= argument of an out variant and the destination of copy_/fill_/zero_ count as written
// only, and a gather (index_select, embedding, …) reads from its source what it writes.
// Each kernel is attributed to the innermost ftx node around it (a user scope `ftx::<node>` in
// forward, the node's autograd backward `ftx::<node>.backward`), else to the autograd node
// running it, and to the step's phase (forward, backward, or a `ftx::phase::<name>` scope).
// Called from Rust (src/gpu/ledger.rs).
//
// RecordFunction::inputs() asserts, in builds without NDEBUG, a flag that libtorch's release
// library never sets: this file reads inputs in start callbacks only, as the assert demands.
#ifndef NDEBUG
#define NDEBUG
#endif
#include "ledger.h"

#include <ATen/core/function_schema.h>

#include <atomic>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <unordered_set>
#include <vector>

namespace {

enum class FrameKind { Op, Kernel, Node, Backward, Phase, Other };

struct Frame {
  FrameKind kind = FrameKind::Other;
  std::string name;     // the op, or the node/phase name
  std::string cls;      // an op's class
  double in_bytes = 0;  // what the op reads
  bool gather = false;  // reads as many rows of its source as it writes
  double flops = 0;
  bool counted_below = false;  // a kernel was counted among its callees
  bool heavy_below = false;    // a GEMM or attention kernel was counted among its callees
};

struct Totals {
  uint64_t count = 0;
  double bytes = 0, flops = 0;
};

// (class, phase, node, op, via)
using Key = std::tuple<std::string, std::string, std::string, std::string, std::string>;

std::mutex g_mutex;
std::map<Key, Totals> g_totals;
std::atomic<bool> g_active{false};
std::atomic<uint64_t> g_generation{0};
at::CallbackHandle g_handle = 0;

struct ThreadStack {
  uint64_t generation = 0;
  std::vector<Frame> frames;
};
thread_local ThreadStack t_stack;

std::vector<Frame>& frames() {
  auto gen = g_generation.load(std::memory_order_acquire);
  if (t_stack.generation != gen) {
    t_stack.generation = gen;
    t_stack.frames.clear();
  }
  return t_stack.frames;
}

std::string base_name(const char* name) {
  std::string n(name ? name : "");
  if (n.rfind("aten::", 0) == 0) n = n.substr(6);
  return n;
}

bool has(const std::unordered_set<std::string>& s, const std::string& n) { return s.count(n) > 0; }

// Ops that launch no kernel (views, allocations, metadata, host reads).
const std::unordered_set<std::string> kMetadata = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "view_as", "flatten", "unflatten", "transpose", "transpose_", "t",
    "t_", "permute", "narrow", "select", "slice", "expand", "expand_as", "as_strided", "as_strided_", "detach", "detach_",
    "alias", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_", "split", "split_with_sizes", "chunk", "unbind", "unfold",
    "diagonal", "movedim", "swapaxes", "contiguous", "to", "type_as", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided", "resize_", "resize_as_", "set_", "lift_fresh", "_local_scalar_dense", "item", "is_nonzero",
    "requires_grad_", "retain_grad", "_has_compatible_shallow_copy_type", "size", "stride", "numel", "dim",
    "result_type", "conj", "_conj", "resolve_conj", "resolve_neg", "_neg_view", "real", "imag", "view_as_real",
    "view_as_complex", "record_stream", "is_same_size", "_shape_as_tensor", "broadcast_tensors", "align_to",
    "_nested_tensor_from_mask", "sym_size", "sym_stride", "sym_numel", "_to_dense", "output_nr", "_version",
};

// GEMMs: FLOPs from their two matrix operands (`first` is the index of the left one).
int gemm_left_operand(const std::string& n) {
  static const std::unordered_set<std::string> left0 = {"mm", "bmm", "matmul", "_grouped_mm", "_scaled_mm",
                                                        "_scaled_grouped_mm", "mv", "dot", "linear", "_int_mm"};
  static const std::unordered_set<std::string> left1 = {"addmm", "addmm_", "baddbmm", "baddbmm_", "addbmm", "addbmm_",
                                                        "_addmm_activation", "addmv", "addmv_"};
  if (has(left0, n)) return 0;
  if (has(left1, n)) return 1;
  return -1;
}

// Attention kernels (and their composite wrappers, which a counted callee makes composite).
bool is_attention(const std::string& n) {
  return n.find("attention") != std::string::npos || n.find("flash") != std::string::npos || n.find("sdpa") != std::string::npos;
}

std::string classify(const std::string& n) {
  if (has(kMetadata, n)) return "view";
  if (gemm_left_operand(n) >= 0) return "gemm";
  if (is_attention(n)) return "attention";
  static const std::unordered_set<std::string> copies = {
      "copy_", "_to_copy", "clone", "cat", "stack", "_copy_from", "_copy_from_and_resize", "narrow_copy", "repeat",
      "repeat_interleave", "index_select", "index", "gather", "scatter", "scatter_", "scatter_add", "scatter_add_",
      "index_add", "index_add_", "index_put_", "_index_put_impl_", "index_copy_", "embedding", "embedding_dense_backward",
      "split_with_sizes_copy", "expand_copy", "permute_copy", "transpose_copy", "view_copy", "flip", "roll", "tril", "triu",
      "masked_select", "nonzero", "_unsafe_index", "_unsafe_index_put", "constant_pad_nd", "masked_scatter_"};
  if (has(copies, n)) return "copy";
  static const std::unordered_set<std::string> reductions = {
      "sum", "mean", "norm", "linalg_vector_norm", "max", "min", "amax", "amin", "argmax", "argmin", "logsumexp",
      "_log_softmax", "log_softmax", "_softmax", "softmax", "_log_softmax_backward_data", "_softmax_backward_data",
      "nll_loss", "nll_loss_forward", "nll_loss_backward", "nll_loss2d_forward", "var", "std", "var_mean", "prod",
      "cumsum", "cumprod", "topk", "sort", "any", "all", "count_nonzero", "_foreach_norm", "native_layer_norm",
      "native_layer_norm_backward", "_fused_rms_norm", "_fused_rms_norm_backward", "bincount", "histc", "max_pool2d",
      "_embedding_bag", "sum_to_size"};
  if (has(reductions, n)) return "reduction";
  return "elementwise";
}

// Bytes a tensor occupies as an operand: its elements over the dimensions with a non-zero
// stride (a broadcast operand is read once), times the element size.
double tensor_bytes(const at::Tensor& t) {
  if (!t.defined() || t.layout() != c10::kStrided) return 0;
  double n = 1;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) == 0) return 0;
    if (t.stride(d) != 0) n *= static_cast<double>(t.size(d));
  }
  return n * static_cast<double>(t.element_size());
}

double ivalue_bytes(const c10::IValue& v) {
  if (v.isTensor()) return tensor_bytes(v.toTensor());
  double sum = 0;
  if (v.isTensorList()) {
    auto list = v.toTensorList();
    for (size_t i = 0; i < list.size(); ++i) sum += tensor_bytes(list.get(i));
  } else if (v.isList()) {
    for (const auto& e : v.toListRef())
      if (e.isTensor()) sum += tensor_bytes(e.toTensor());
  }
  return sum;
}

const at::Tensor* tensor_at(c10::ArrayRef<const c10::IValue> in, size_t i) {
  return i < in.size() && in[i].isTensor() && in[i].toTensor().defined() ? &in[i].toTensor() : nullptr;
}

// 2·rows(A)·k·n for A [.., k] and B [.., k, n] (or W [n, k] for linear).
double gemm_flops(const std::string& n, c10::ArrayRef<const c10::IValue> in) {
  int left = gemm_left_operand(n);
  const at::Tensor* a = tensor_at(in, left);
  const at::Tensor* b = tensor_at(in, left + 1);
  if (!a || !b || a->dim() < 1 || b->dim() < 1) return 0;
  double k = static_cast<double>(a->size(-1));
  if (k == 0) return 0;
  double rows = static_cast<double>(a->numel()) / k;
  double cols = n == "linear" ? static_cast<double>(b->size(0)) : (b->dim() >= 2 ? static_cast<double>(b->size(-1)) : 1.0);
  return 2.0 * rows * k * cols;
}

// Attention: 4·B·H·T·S·D for the two products forward (halved when causal), 2.5× that backward.
double attention_flops(const at::RecordFunction& fn, const std::string& n, c10::ArrayRef<const c10::IValue> in) {
  auto schema = fn.operator_schema();
  if (!schema) return 0;
  auto q_at = schema->argumentIndexWithName("query");
  auto k_at = schema->argumentIndexWithName("key");
  auto causal_at = schema->argumentIndexWithName("is_causal");
  if (!q_at || !k_at) return 0;
  const at::Tensor* q = tensor_at(in, *q_at);
  const at::Tensor* k = tensor_at(in, *k_at);
  if (!q || !k || q->dim() != 4 || k->dim() != 4) return 0;
  double f = 4.0 * q->size(0) * q->size(1) * q->size(2) * k->size(2) * q->size(3);
  if (causal_at && static_cast<size_t>(*causal_at) < in.size() && in[*causal_at].isBool() && in[*causal_at].toBool()) f *= 0.5;
  if (n.find("backward") != std::string::npos) f *= 2.5;
  return f;
}

// Gathers read only the rows they write from their source (the first argument): counted as
// their output's bytes, not the whole source (an embedding table).
bool is_gather(const std::string& n) {
  static const std::unordered_set<std::string> gathers = {"index_select", "embedding", "gather", "index", "_unsafe_index"};
  return has(gathers, n);
}

// What an op reads: its tensor inputs, less the arguments it only writes and a gather's source.
double input_bytes(const at::RecordFunction& fn, const std::string& n, c10::ArrayRef<const c10::IValue> in) {
  static const std::unordered_set<std::string> write_only_self = {"copy_", "fill_", "zero_", "normal_", "uniform_",
                                                                  "random_", "bernoulli_", "exponential_", "_copy_from"};
  std::vector<bool> skip(in.size(), false);
  if ((has(write_only_self, n) || is_gather(n)) && !in.empty()) skip[n == "_copy_from" ? 1 : 0] = true;
  const char* overload = fn.overload_name();
  if (overload && std::strstr(overload, "out")) {
    if (auto schema = fn.operator_schema()) {
      const auto& args = schema->arguments();
      for (size_t i = 0; i < args.size() && i < in.size(); ++i)
        if (args[i].is_out()) skip[i] = true;
    }
  }
  double sum = 0;
  for (size_t i = 0; i < in.size(); ++i)
    if (!skip[i]) sum += ivalue_bytes(in[i]);
  return sum;
}

// "torch::autograd::CppNode<(anonymous namespace)::AddRmsNormNode>" → "add_rms_norm"; "" for
// libtorch's own nodes.
std::string custom_node_name(const char* name) {
  std::string n(name ? name : "");
  // Custom functions run as torch::autograd::CppNode<T>; libtorch's own nodes are plain names
  // (MmBackward0) or torch::autograd::AccumulateGrad and the like.
  auto open = n.find("CppNode<");
  if (open == std::string::npos) return "";
  n = n.substr(open + 8);
  if (n.find("::") != std::string::npos) n = n.substr(n.rfind("::") + 2);
  while (!n.empty() && (n.back() == '>' || n.back() == ' ')) n.pop_back();
  if (n.size() > 4 && n.compare(n.size() - 4, 4, "Node") == 0) n.resize(n.size() - 4);
  std::string out;
  for (size_t i = 0; i < n.size(); ++i) {
    char c = n[i];
    if (std::isupper(static_cast<unsigned char>(c))) {
      if (i > 0) out += '_';
      out += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    } else {
      out += c;
    }
  }
  return out;
}

// An autograd node as the ledger names it: ftx's C++ nodes as `ftx::<node>.backward` (the
// forward's scope name with `.backward`), libtorch's as `autograd::<name>`.
std::string backward_name(const char* name) {
  auto custom = custom_node_name(name);
  return custom.empty() ? std::string("autograd::") + (name ? name : "?") : "ftx::" + custom + ".backward";
}

// The innermost node and the phase around the top of the stack (below `depth`), and the
// outermost op since that node (the op the user called, e.g. `aten::to` for a `copy_`).
void context(const std::vector<Frame>& fs, size_t depth, std::string& node, std::string& phase, std::string& via) {
  node = "-";
  phase = "forward";
  via = "";
  bool node_found = false;
  for (size_t i = depth; i-- > 0;) {
    const auto& f = fs[i];
    if (f.kind == FrameKind::Op && !node_found) via = f.name;
    if ((f.kind == FrameKind::Node || f.kind == FrameKind::Backward) && !node_found) {
      node = f.name;
      node_found = true;
    }
    if (f.kind == FrameKind::Backward) phase = "backward";
    if (f.kind == FrameKind::Phase && phase == "forward") phase = f.name;
  }
}

void add(const std::string& cls, const std::string& op, const std::vector<Frame>& fs, size_t depth, double bytes, double flops) {
  std::string node, phase, via;
  context(fs, depth, node, phase, via);
  if (via == op) via.clear();
  std::lock_guard<std::mutex> lock(g_mutex);
  auto& t = g_totals[Key{cls, phase, node, op, via}];
  t.count += 1;
  t.bytes += bytes;
  t.flops += flops;
}

bool inside_kernel(const std::vector<Frame>& fs) {
  for (const auto& f : fs)
    if (f.kind == FrameKind::Kernel) return true;
  return false;
}

// What a start callback records about `fn` (an inert frame while not recording).
Frame frame_of(const at::RecordFunction& fn, const std::vector<Frame>& fs) {
  Frame f;
  if (!g_active.load(std::memory_order_relaxed)) return f;
  const char* name = fn.name();
  switch (fn.scope()) {
    case at::RecordScope::FUNCTION: {
      if (inside_kernel(fs)) break;  // whatever a fused kernel's scope runs is the kernel's
      std::string n(name ? name : "");
      // The autograd engine's wrapper around a node's backward and the summing of the
      // gradients it returns into its inputs' buffers: the node's work.
      const std::string engine = "autograd::engine::evaluate_function: ";
      if (n.rfind(engine, 0) == 0) {
        f.kind = FrameKind::Backward;
        f.name = backward_name(n.substr(engine.size()).c_str());
        break;
      }
      if (n.rfind("aten::", 0) != 0) break;  // not an operator (a TorchScript or user range)
      f.kind = FrameKind::Op;
      f.name = name ? name : "?";
      auto base = base_name(name);
      f.cls = classify(base);
      if (f.cls != "view") {
        auto inputs = fn.inputs();
        f.in_bytes = input_bytes(fn, base, inputs);
        f.gather = is_gather(base);
        if (f.cls == "gemm") f.flops = gemm_flops(base, inputs);
        if (f.cls == "attention") f.flops = attention_flops(fn, base, inputs);
      }
      break;
    }
    case at::RecordScope::USER_SCOPE: {
      std::string n(name ? name : "");
      if (n.rfind("ftx::kernel::", 0) == 0) {
        f.kind = FrameKind::Kernel;
        f.name = n;
        f.cls = "fused";
        for (const auto& v : fn.inputs()) f.in_bytes += ivalue_bytes(v);
      } else if (n.rfind("ftx::phase::", 0) == 0) {
        f.kind = FrameKind::Phase;
        f.name = n.substr(12);
      } else if (n.rfind("ftx::", 0) == 0) {
        f.kind = FrameKind::Node;
        f.name = n;
      }
      break;
    }
    case at::RecordScope::BACKWARD_FUNCTION: {
      f.kind = FrameKind::Backward;
      f.name = backward_name(name);
      break;
    }
    default:
      break;
  }
  return f;
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  // Every start pushes a frame, even one that failed, so that every end pops its own.
  auto& fs = frames();
  Frame f;
  try {
    f = frame_of(fn, fs);
  } catch (...) {
    f = Frame();
  }
  fs.push_back(std::move(f));
  return nullptr;
}

// Counts `f` (just ended) by the rules above; true when it or a callee counted as a kernel,
// and in `heavy` whether a GEMM or attention kernel did.
bool count_frame(const at::RecordFunction& fn, const Frame& f, const std::vector<Frame>& fs, bool& heavy) {
  heavy = f.heavy_below;
  auto outputs = [&] {
    double out = 0;
    for (const auto& v : fn.outputs()) out += ivalue_bytes(v);
    return out;
  };
  if (f.kind == FrameKind::Kernel) {
    add("fused", f.name, fs, fs.size(), f.in_bytes + outputs(), 0);
    return true;
  }
  if (f.kind != FrameKind::Op) return f.counted_below;
  bool is_heavy = f.cls == "gemm" || f.cls == "attention";
  if (is_heavy ? f.heavy_below : f.counted_below) return f.counted_below;  // a composite
  if (f.cls == "view") {
    add("view", f.name, fs, fs.size(), 0, 0);
    return false;
  }
  double out = outputs();
  add(f.cls, f.name, fs, fs.size(), f.in_bytes + (f.gather ? 2 : 1) * out, f.flops);
  heavy = heavy || is_heavy;
  return true;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext*) {
  auto& fs = frames();
  if (fs.empty()) return;  // started before this ledger's generation
  Frame f = std::move(fs.back());
  fs.pop_back();
  if (!g_active.load(std::memory_order_relaxed)) return;
  bool counted = false, heavy = false;
  try {
    counted = count_frame(fn, f, fs, heavy);
  } catch (...) {
    // A failed count loses this entry, never the stack's balance.
  }
  if (!fs.empty()) {
    auto& parent = fs.back();
    parent.counted_below = parent.counted_below || counted;
    parent.heavy_below = parent.heavy_below || heavy;
  }
}

void write_error(char* err, int32_t len, const char* what) {
  if (err && len > 0) std::snprintf(err, static_cast<size_t>(len), "%s", what);
}

// A user scope opened from Rust: its name lives as long as the guard.
struct Scope {
  std::string name;
  std::vector<c10::IValue> reads;
  at::RecordFunction guard{at::RecordScope::USER_SCOPE};
};

}  // namespace

extern "C" {
// Starts recording this thread's ops (and its autograd engine's). 0, or -1 with `err` when a
// ledger already records. Stop it on the same thread.
int32_t ftx_ledger_start(char* err, int32_t err_len) {
  try {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_active.load()) {
      write_error(err, err_len, "a step ledger is already recording");
      return -1;
    }
    g_totals.clear();
    g_generation.fetch_add(1, std::memory_order_acq_rel);
    g_handle = at::addThreadLocalCallback(at::RecordFunctionCallback(on_start, on_end).needsInputs(true).needsOutputs(true));
    g_active.store(true);
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return -1;
  }
}

// Stops recording and hands back what was recorded, one line per (class, phase, node, op, via):
// "class\tphase\tnode\top\tvia\tcount\tbytes\tflops\n" (a malloc'd string; ftx_ledger_free).
char* ftx_ledger_stop() {
  g_active.store(false);
  if (g_handle != 0) {
    at::removeCallback(g_handle);
    g_handle = 0;
  }
  std::ostringstream out;
  out.precision(17);
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (const auto& [k, t] : g_totals) {
      out << std::get<0>(k) << '\t' << std::get<1>(k) << '\t' << std::get<2>(k) << '\t' << std::get<3>(k) << '\t'
          << std::get<4>(k) << '\t' << t.count << '\t' << t.bytes << '\t' << t.flops << '\n';
    }
    g_totals.clear();
  }
  auto s = out.str();
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

void ftx_ledger_free(char* p) { std::free(p); }

// Opens a user scope named `name` ("ftx::<node>", "ftx::phase::<phase>", or a fused kernel
// "ftx::kernel::<name>" reading `reads` and writing `writes`); close it with
// ftx_ledger_scope_end on the same thread. Null when nothing records.
void* ftx_ledger_scope_begin(const char* name, const at::Tensor* const* reads, int32_t n_reads,
                             const at::Tensor* const* writes, int32_t n_writes) {
  try {
    auto s = std::make_unique<Scope>();
    if (!s->guard.isActive()) return nullptr;
    s->name = name;
    for (int32_t i = 0; i < n_reads; ++i) s->reads.emplace_back(*reads[i]);
    s->guard.before(s->name, c10::ArrayRef<const c10::IValue>(s->reads.data(), s->reads.size()));
    std::vector<c10::IValue> out;
    for (int32_t i = 0; i < n_writes; ++i) out.emplace_back(*writes[i]);
    s->guard.setOutputs(std::move(out));
    return s.release();
  } catch (...) {
    return nullptr;
  }
}

void ftx_ledger_scope_end(void* scope) { delete static_cast<Scope*>(scope); }
}
