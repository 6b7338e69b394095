// What autograd keeps for backward, counted tensor by tensor (src/train/saved_tensors.rs).
//
// Every tensor a node saves — a built-in op's SavedVariable and a custom node's
// save_for_backward alike — goes through SavedVariable, which asks the default autograd engine
// for saved-tensor hooks. libtorch's own engine has none (Python's engine gives
// torch.autograd.graph.saved_tensors_hooks), so while a count is open the default engine is an
// Engine whose hooks record each saved tensor's storage and keep the tensor exactly as the
// SavedVariable would (same storage, nothing copied): memory behaves as without the count.
// Only the thread that opened a count is counted; the engine stub goes back to libtorch's
// base engine when the last open count closes. Storages are kept weakly in the record, so a
// storage freed before the count is read (a graph dropped mid-way) is not counted, and one
// saved by several nodes is counted once (under the tag it was first saved in).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/saved_variable_hooks.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace {

using torch::autograd::Engine;
using torch::autograd::SavedVariableHooks;

struct Entry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  int64_t nbytes = 0;
  int64_t tag = 0;
  std::vector<int64_t> sizes;
  int8_t dtype = 0;
};

struct Count {
  std::vector<Entry> entries;
  std::unordered_map<const c10::StorageImpl*, size_t> index;
  std::unordered_set<const c10::StorageImpl*> excluded;
  int64_t tag = 0;
};

thread_local Count* open_count = nullptr;

void record(const at::Tensor& t) {
  Count* c = open_count;
  if (!c || !t.defined() || !t.has_storage()) return;
  const auto& storage = t.storage();
  const c10::StorageImpl* key = storage.unsafeGetStorageImpl();
  if (c->excluded.count(key)) return;
  auto it = c->index.find(key);
  if (it != c->index.end() && !c->entries[it->second].storage.expired()) return;
  Entry e{storage.getWeakStorageImpl(), static_cast<int64_t>(storage.nbytes()), c->tag, t.sizes().vec(),
          static_cast<int8_t>(t.scalar_type())};
  if (it != c->index.end()) {
    c->entries[it->second] = std::move(e);  // that address's earlier storage was freed
  } else {
    c->index.emplace(key, c->entries.size());
    c->entries.push_back(std::move(e));
  }
}

// Keeps the saved tensor as the SavedVariable would (detached: no reference cycle through an
// output's grad_fn) and records its storage.
struct CountingHooks : SavedVariableHooks {
  at::Tensor kept;
  void call_pack_hook(const at::Tensor& t) override {
    record(t);
    kept = t.detach();
  }
  at::Tensor call_unpack_hook() override { return kept; }
};

struct CountingEngine : Engine {
  std::unique_ptr<SavedVariableHooks> get_default_saved_variable_hooks() override {
    return open_count ? std::make_unique<CountingHooks>() : nullptr;
  }
};

// Never destroyed: an engine's destructor stops worker threads the process may still need.
Engine& counting_engine() {
  static auto* engine = new CountingEngine();
  return *engine;
}

std::mutex stub_mutex;
int64_t counts_open = 0;

}  // namespace

extern "C" {
// Opens a count on this thread, the storages of `exclude` (weights, adapters, rotary tables:
// what exists before the forward pass) left out. Null if this thread already has one open.
void* ftx_saved_count_open(const at::Tensor* const* exclude, int64_t n) {
  if (open_count) return nullptr;
  auto* c = new Count();
  for (int64_t i = 0; i < n; ++i) {
    if (exclude[i] && exclude[i]->defined() && exclude[i]->has_storage())
      c->excluded.insert(exclude[i]->storage().unsafeGetStorageImpl());
  }
  {
    std::lock_guard<std::mutex> lock(stub_mutex);
    if (counts_open++ == 0) torch::autograd::set_default_engine_stub(&counting_engine);
  }
  open_count = c;
  return c;
}

// Tensors saved from now on are recorded under `tag` (e.g. the layer).
void ftx_saved_count_tag(void* count, int64_t tag) { static_cast<Count*>(count)->tag = tag; }

// Stops recording (the records stay readable until freed).
void ftx_saved_count_close(void* count) {
  if (open_count != count) return;
  open_count = nullptr;
  std::lock_guard<std::mutex> lock(stub_mutex);
  if (--counts_open == 0) torch::autograd::set_default_engine_stub(&Engine::get_base_engine);
}

int64_t ftx_saved_count_len(void* count) { return static_cast<int64_t>(static_cast<Count*>(count)->entries.size()); }

// Record `i`: 1 with its fields written when its storage is still alive, else 0. `sizes` takes
// up to `max_dims` entries; `*ndims` is the tensor's dimension count.
int32_t ftx_saved_count_entry(void* count, int64_t i, int64_t* tag, int64_t* nbytes, int8_t* dtype, int64_t* sizes,
                              int64_t max_dims, int64_t* ndims) {
  const auto& e = static_cast<Count*>(count)->entries.at(static_cast<size_t>(i));
  if (e.storage.expired()) return 0;
  *tag = e.tag;
  *nbytes = e.nbytes;
  *dtype = e.dtype;
  *ndims = static_cast<int64_t>(e.sizes.size());
  for (size_t d = 0; d < e.sizes.size() && static_cast<int64_t>(d) < max_dims; ++d) sizes[d] = e.sizes[d];
  return 1;
}

void ftx_saved_count_free(void* count) {
  ftx_saved_count_close(count);
  delete static_cast<Count*>(count);
}
}
