// A small C API over libtorch's c10d (the engine torch.distributed runs on): the TCPStore
// rendezvous, ProcessGroupGloo (CPU) and ProcessGroupNCCL (CUDA), and the collectives ftx's
// distributed training needs. Every function catches every C++ exception and returns its
// message (malloc'd, freed with ftx_dist_free_string), or NULL on success: nothing here aborts.
//
// Gloo is linked directly (libtorch_cpu.so). NCCL lives in libtorch_cuda.so, whose headers need
// the CUDA toolkit, so its constructors are looked up at run time (dlsym) and the objects built
// in generously sized blocks; after construction both are used only through c10d::Backend.
#define USE_C10D_GLOO 1
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <c10/util/Logging.h>

#include <dlfcn.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <string>
#include <vector>

struct FtxStore {
  c10::intrusive_ptr<c10d::Store> store;
};

struct FtxGroup {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

struct FtxWork {
  c10::intrusive_ptr<c10d::Work> work;
  std::chrono::milliseconds timeout;
};

static char* dup_message(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.c_str(), s.size() + 1);
  }
  return out;
}

// Runs `f`; returns NULL, or the message of whatever it threw.
template <class F>
static char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    // what_without_backtrace: the message without libtorch's C++ stack.
    return dup_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return dup_message(e.what());
  } catch (...) {
    return dup_message("unknown C++ exception");
  }
}

// The store logs every connection retry and lost connection with a C++ backtrace; the failure
// that matters is returned. Quiet while it lives, unless the user asked for libtorch's logs
// (TORCH_CPP_LOG_LEVEL).
struct QuietStoreLogs {
  int32_t level = FLAGS_caffe2_log_level;
  QuietStoreLogs() {
    if (std::getenv("TORCH_CPP_LOG_LEVEL") == nullptr) {
      FLAGS_caffe2_log_level = 3;  // FATAL only
    }
  }
  ~QuietStoreLogs() {
    FLAGS_caffe2_log_level = level;
  }
};

static void wait_for(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds timeout) {
  if (!work->wait(timeout)) {
    throw std::runtime_error("the collective did not complete within the timeout");
  }
}

static c10d::ReduceOp reduce_op(int32_t op) {
  switch (op) {
    case 0: return c10d::ReduceOp(c10d::ReduceOp::SUM);
    case 1: return c10d::ReduceOp(c10d::ReduceOp::MAX);
    case 2: return c10d::ReduceOp(c10d::ReduceOp::MIN);
    default: throw std::invalid_argument("unknown reduce op " + std::to_string(op));
  }
}

// ProcessGroupNCCL, built without its header (see the file comment). Both classes derive from
// their c10d bases alone, so the base subobject sits at the start of the block.
static constexpr size_t kNcclOptionsBytes = 64 * 1024;
static constexpr size_t kNcclGroupBytes = 1024 * 1024;

static c10::intrusive_ptr<c10d::Backend> make_nccl(
    const c10::intrusive_ptr<c10d::Store>& store, int rank, int world, std::chrono::milliseconds timeout) {
  void* lib = dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
  if (lib == nullptr) {
    lib = dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_GLOBAL);
  }
  if (lib == nullptr) {
    throw std::runtime_error(std::string("NCCL needs libtorch_cuda.so, which could not be loaded: ") + dlerror());
  }
  // c10d::ProcessGroupNCCL::Options::Options(bool is_high_priority_stream)
  using OptionsCtor = void (*)(void*, bool);
  // c10d::ProcessGroupNCCL::ProcessGroupNCCL(intrusive_ptr<Store>, int, int, intrusive_ptr<Options>)
  using GroupCtor = void (*)(void*, c10::intrusive_ptr<c10d::Store>, int, int, c10::intrusive_ptr<c10d::Backend::Options>);
  auto options_ctor = reinterpret_cast<OptionsCtor>(dlsym(lib, "_ZN4c10d16ProcessGroupNCCL7OptionsC1Eb"));
  auto group_ctor = reinterpret_cast<GroupCtor>(dlsym(lib,
      "_ZN4c10d16ProcessGroupNCCLC1EN3c1013intrusive_ptrINS_5StoreENS1_6detail34intrusive_target_default_null_typeIS3_EEEEii"
      "NS2_INS0_7OptionsENS5_IS8_EEEE"));
  if (options_ctor == nullptr || group_ctor == nullptr) {
    throw std::runtime_error("this libtorch_cuda.so has no ProcessGroupNCCL (a torch built without NCCL?)");
  }
  void* options_block = ::operator new(kNcclOptionsBytes);
  std::memset(options_block, 0, kNcclOptionsBytes);
  try {
    options_ctor(options_block, false);
  } catch (...) {
    ::operator delete(options_block);
    throw;
  }
  auto options = c10::intrusive_ptr<c10d::Backend::Options>::unsafe_steal_from_new(
      static_cast<c10d::Backend::Options*>(options_block));
  options->timeout = timeout;
  void* group_block = ::operator new(kNcclGroupBytes);
  std::memset(group_block, 0, kNcclGroupBytes);
  try {
    group_ctor(group_block, store, rank, world, options);
  } catch (...) {
    ::operator delete(group_block);
    throw;
  }
  return c10::intrusive_ptr<c10d::Backend>::unsafe_steal_from_new(static_cast<c10d::Backend*>(group_block));
}

// DDP's gradient reducer: the trainable tensors in fixed buckets (the same on every rank). Once
// armed, a post-accumulate-grad hook on each tensor marks it ready as the backward pass writes
// its gradient; a bucket whose tensors are all ready is all-reduced at once, asynchronously,
// while the backward goes on. Buckets are launched strictly in their order (a collective's
// place in the sequence is what pairs it across ranks), so a bucket waits for the ones before
// it. `finish` launches whatever is left (tensors without a hook-marked gradient, "late"
// tensors), in order, and waits for every bucket.
struct FtxReducer {
  FtxGroup* group = nullptr;  // set by arm and finish: the group may be closed in between steps
  std::vector<at::Tensor> params;
  std::vector<size_t> bucket_of;
  std::vector<bool> late;  // reduced only by finish (used more than once per backward)
  std::vector<std::vector<size_t>> buckets;
  std::vector<bool> bucket_late;  // holds a late tensor: only finish launches it
  std::vector<size_t> pending;
  std::vector<bool> ready;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  size_t next = 0;
  size_t launched_in_backward = 0;
  bool armed = false;
  std::string error;
  std::mutex mutex;

  // Under the lock.
  void launch(size_t b) {
    std::vector<at::Tensor> grads;
    for (size_t i : buckets[b]) {
      const at::Tensor& g = params[i].grad();
      if (g.defined()) grads.push_back(g);
    }
    if (grads.empty()) return;
    if (grads.size() == 1) {
      c10d::AllreduceOptions opts;
      opts.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
      opts.timeout = group->timeout;
      works.push_back(group->backend->allreduce(grads, opts));
    } else {
      c10d::AllreduceCoalescedOptions opts;
      opts.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
      opts.timeout = group->timeout;
      works.push_back(group->backend->allreduce_coalesced(grads, opts));
    }
  }

  void mark_ready(size_t i) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!armed || late[i] || ready[i] || !error.empty()) return;
    ready[i] = true;
    size_t b = bucket_of[i];
    if (pending[b] > 0) pending[b]--;
    try {
      while (next < buckets.size() && pending[next] == 0 && !bucket_late[next]) {
        launch(next++);
        launched_in_backward++;
      }
    } catch (const c10::Error& e) {
      error = e.what_without_backtrace();
    } catch (const std::exception& e) {
      error = e.what();
    }
  }

  // Under the lock: ready for the next backward, nothing launched.
  void reset() {
    next = 0;
    launched_in_backward = 0;
    works.clear();
    error.clear();
    for (size_t b = 0; b < buckets.size(); b++) {
      pending[b] = 0;
      for (size_t i : buckets[b]) {
        if (!late[i]) pending[b]++;
      }
    }
    std::fill(ready.begin(), ready.end(), false);
  }
};

struct ReadyHook : torch::autograd::PostAccumulateGradHook {
  FtxReducer* reducer;
  size_t index;
  ReadyHook(FtxReducer* r, size_t i) : reducer(r), index(i) {}
  void operator()(const torch::autograd::Variable&) override {
    reducer->mark_ready(index);
  }
};

extern "C" {

void ftx_dist_free_string(char* s) {
  std::free(s);
}

// Rendezvous: rank 0 (`is_server`) hosts a TCPStore on `port` and waits up to `timeout_ms` for
// all `world` ranks to connect; the others connect to `host:port` within the same bound.
char* ftx_dist_store_new(const char* host, uint16_t port, int32_t is_server, int32_t world, int64_t timeout_ms, FtxStore** out) {
  return guarded([&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    opts.numWorkers = static_cast<size_t>(world);
    opts.waitWorkers = true;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    QuietStoreLogs quiet;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *out = new FtxStore{store};
  });
}

void ftx_dist_store_free(FtxStore* s) {
  delete s;
}

// Sets `key` to `value` in the store.
char* ftx_dist_store_set(FtxStore* s, const char* key, const char* value) {
  QuietStoreLogs quiet;
  return guarded([&] {
    std::string v(value);
    s->store->set(std::string(key), std::vector<uint8_t>(v.begin(), v.end()));
  });
}

// `*exists` = 1 when `key` is in the store, else 0 (without waiting).
char* ftx_dist_store_check(FtxStore* s, const char* key, int32_t* exists) {
  QuietStoreLogs quiet;
  return guarded([&] { *exists = s->store->check({std::string(key)}) ? 1 : 0; });
}

// The process group of all `world` ranks: backend 0 = Gloo, 1 = NCCL. `gloo_hostname`, when
// not empty, is the address Gloo binds to (else the machine's hostname, or loopback).
char* ftx_dist_group_new(FtxStore* store, int32_t backend, int32_t rank, int32_t world, int64_t timeout_ms,
                         const char* gloo_hostname, FtxGroup** out) {
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Backend> group;
    if (backend == 0) {
      c10::intrusive_ptr<c10d::ProcessGroupGloo::Options> options;
      if (gloo_hostname != nullptr && gloo_hostname[0] != '\0') {
        options = c10d::ProcessGroupGloo::Options::create(timeout);
        options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(gloo_hostname));
      } else {
        options = c10d::ProcessGroupGloo::Options::create_default(timeout);
      }
      group = c10::make_intrusive<c10d::ProcessGroupGloo>(store->store, rank, world, options);
    } else if (backend == 1) {
      group = make_nccl(store->store, rank, world, timeout);
    } else {
      throw std::invalid_argument("unknown backend " + std::to_string(backend));
    }
    *out = new FtxGroup{group, timeout};
  });
}

void ftx_dist_group_free(FtxGroup* g) {
  // NCCL wants its communicators shut down before the group goes (torch's destroy_process_group).
  try {
    if (g->backend->getBackendName() == "nccl") {
      g->backend->shutdown();
    }
  } catch (...) {
  }
  delete g;
}

// In place, across ranks: op 0 = sum, 1 = max, 2 = min. The tensors go as one coalesced call.
char* ftx_dist_all_reduce(FtxGroup* g, at::Tensor** tensors, size_t n, int32_t op) {
  return guarded([&] {
    std::vector<at::Tensor> ts;
    for (size_t i = 0; i < n; i++) ts.push_back(*tensors[i]);
    c10d::AllreduceOptions opts;
    opts.reduceOp = reduce_op(op);
    opts.timeout = g->timeout;
    if (ts.size() == 1) {
      wait_for(g->backend->allreduce(ts, opts), g->timeout);
    } else {
      c10d::AllreduceCoalescedOptions copts;
      copts.reduceOp = opts.reduceOp;
      copts.timeout = g->timeout;
      wait_for(g->backend->allreduce_coalesced(ts, copts), g->timeout);
    }
  });
}

// In place: every rank's tensor becomes rank `root`'s.
char* ftx_dist_broadcast(FtxGroup* g, at::Tensor* tensor, int32_t root) {
  return guarded([&] {
    std::vector<at::Tensor> ts{*tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.rootTensor = 0;
    opts.timeout = g->timeout;
    wait_for(g->backend->broadcast(ts, opts), g->timeout);
  });
}

// `output` (world × input's elements, contiguous) receives every rank's `input`, in rank order.
char* ftx_dist_all_gather(FtxGroup* g, at::Tensor* output, at::Tensor* input) {
  return guarded([&] {
    c10d::AllgatherOptions opts;
    opts.timeout = g->timeout;
    wait_for(g->backend->_allgather_base(*output, *input, opts), g->timeout);
  });
}

// `output` receives the sum over ranks of this rank's slice of `input` (world × output's elements).
char* ftx_dist_reduce_scatter(FtxGroup* g, at::Tensor* output, at::Tensor* input) {
  return guarded([&] {
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
    opts.timeout = g->timeout;
    wait_for(g->backend->_reduce_scatter_base(*output, *input, opts), g->timeout);
  });
}

// As ftx_dist_all_gather, started and not waited for: `*out` is waited for (and freed) by
// ftx_dist_work_wait, or dropped unwaited by ftx_dist_work_free.
char* ftx_dist_all_gather_start(FtxGroup* g, at::Tensor* output, at::Tensor* input, FtxWork** out) {
  return guarded([&] {
    c10d::AllgatherOptions opts;
    opts.timeout = g->timeout;
    *out = new FtxWork{g->backend->_allgather_base(*output, *input, opts), g->timeout};
  });
}

// Waits for a started collective, then frees its handle (also when the wait fails).
char* ftx_dist_work_wait(FtxWork* w) {
  char* e = guarded([&] { wait_for(w->work, w->timeout); });
  delete w;
  return e;
}

void ftx_dist_work_free(FtxWork* w) {
  delete w;
}

char* ftx_dist_barrier(FtxGroup* g) {
  return guarded([&] {
    c10d::BarrierOptions opts;
    opts.timeout = g->timeout;
    wait_for(g->backend->barrier(opts), g->timeout);
  });
}

// A reducer over `n` tensors: tensor i goes in bucket `bucket[i]` (0, 1, … in launch order;
// each bucket one dtype and device), reduced only by finish when `late[i]`. Hooks are set on
// the tensors now (replacing any post-accumulate-grad hook they had) and act once armed.
char* ftx_dist_reducer_new(at::Tensor** tensors, size_t n, const int64_t* bucket, const uint8_t* late, FtxReducer** out) {
  return guarded([&] {
    auto r = std::make_unique<FtxReducer>();
    size_t nb = 0;
    for (size_t i = 0; i < n; i++) {
      if (bucket[i] < 0) throw std::invalid_argument("negative bucket index");
      nb = std::max(nb, static_cast<size_t>(bucket[i]) + 1);
    }
    r->buckets.resize(nb);
    for (size_t i = 0; i < n; i++) {
      r->params.push_back(*tensors[i]);
      r->bucket_of.push_back(static_cast<size_t>(bucket[i]));
      r->late.push_back(late[i] != 0);
      r->buckets[bucket[i]].push_back(i);
    }
    r->bucket_late.assign(nb, false);
    for (size_t i = 0; i < n; i++) {
      if (r->late[i]) r->bucket_late[bucket[i]] = true;
    }
    r->pending.resize(nb);
    r->ready.resize(n);
    r->reset();
    for (size_t i = 0; i < n; i++) {
      torch::autograd::impl::set_post_acc_grad_hooks(r->params[i], std::make_unique<ReadyHook>(r.get(), i));
    }
    *out = r.release();
  });
}

// Arms the hooks for the next backward pass (the last of a step's accumulation).
void ftx_dist_reducer_arm(FtxReducer* r, FtxGroup* g) {
  std::lock_guard<std::mutex> lock(r->mutex);
  r->group = g;
  r->reset();
  r->armed = true;
}

// Launches every bucket not launched yet, in order, and waits for all of them; disarms.
// `*early` = buckets the backward pass launched before this call.
char* ftx_dist_reducer_finish(FtxReducer* r, FtxGroup* g, size_t* early) {
  return guarded([&] {
    std::lock_guard<std::mutex> lock(r->mutex);
    r->armed = false;
    r->group = g;
    *early = r->launched_in_backward;
    if (!r->error.empty()) {
      std::string e = r->error;
      r->reset();
      throw std::runtime_error(e);
    }
    try {
      while (r->next < r->buckets.size()) r->launch(r->next++);
      for (auto& w : r->works) wait_for(w, r->group->timeout);
    } catch (...) {
      r->reset();
      throw;
    }
    r->reset();
  });
}

// Removes the hooks, then frees the reducer.
void ftx_dist_reducer_free(FtxReducer* r) {
  for (auto& p : r->params) {
    try {
      torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
    } catch (...) {
    }
  }
  delete r;
}

}  // extern "C"
