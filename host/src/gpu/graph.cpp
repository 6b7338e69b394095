// CUDA graphs through libtorch's own at::cuda::CUDAGraph (capture into the caching allocator's
// private pools, replay), without linking libtorch_cuda: the binary links only libtorch's CPU half
// and loads the CUDA half at run time (src/gpu/mod.rs), so the few CUDAGraph members used here are
// looked up by their (Itanium-mangled) names in the loaded libtorch_cuda.so, and the object lives
// in storage this file owns. Streams go through the device-generic guard interface, as in
// kernels.cpp. Every entry point catches C++ exceptions and writes the message to `err`.
#include <c10/core/impl/VirtualGuardImpl.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <utility>

namespace {
using PoolId = std::pair<unsigned long long, unsigned long long>;  // at::cuda::MempoolId_t
using CtorFn = void (*)(void*, bool);
using MethodFn = void (*)(void*);
using BeginFn = void (*)(void*, PoolId, int);
using PoolFn = PoolId (*)();

// cudaStreamCaptureModeThreadLocal: only this thread is barred from unsafe calls (a sync) while
// capturing, so a mistake in the captured code fails the capture instead of the server's other threads.
constexpr int kCaptureThreadLocal = 1;

struct Api {
  CtorFn ctor;
  MethodFn dtor, end, replay;
  BeginFn begin;
  PoolFn pool;
};

// The members of at::cuda::CUDAGraph (torch 2.x), or null when one is missing.
const Api* api() {
  static const std::optional<Api> a = []() -> std::optional<Api> {
    auto sym = [](const char* n) { return dlsym(RTLD_DEFAULT, n); };
    void* p[6] = {sym("_ZN2at4cuda9CUDAGraphC1Eb"),
                  sym("_ZN2at4cuda9CUDAGraphD1Ev"),
                  sym("_ZN2at4cuda9CUDAGraph11capture_endEv"),
                  sym("_ZN2at4cuda9CUDAGraph6replayEv"),
                  sym("_ZN2at4cuda9CUDAGraph13capture_beginESt4pairIyyE21cudaStreamCaptureMode"),
                  sym("_ZN2at4cuda17graph_pool_handleEv")};
    for (void* f : p)
      if (f == nullptr) return std::nullopt;
    return Api{reinterpret_cast<CtorFn>(p[0]), reinterpret_cast<MethodFn>(p[1]), reinterpret_cast<MethodFn>(p[2]),
               reinterpret_cast<MethodFn>(p[3]), reinterpret_cast<BeginFn>(p[4]), reinterpret_cast<PoolFn>(p[5])};
  }();
  return a ? &*a : nullptr;
}

void write_error(char* err, int32_t len, const char* what) {
  if (err && len > 0) std::snprintf(err, static_cast<size_t>(len), "%s", what);
}

template <class F>
int32_t guarded(char* err, int32_t len, F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    write_error(err, len, e.what());
  } catch (...) {
    write_error(err, len, "unknown C++ exception");
  }
  return -1;
}

// The one side stream of `device` every capture runs on: memory its warm-ups free stays cached for
// that stream alone, so one stream keeps one such cache instead of one per pool stream.
c10::Stream side_stream_of(const c10::impl::VirtualGuardImpl& impl, c10::DeviceIndex device) {
  static std::mutex lock;
  static std::map<c10::DeviceIndex, c10::Stream> streams;
  std::lock_guard<std::mutex> guard(lock);
  auto it = streams.find(device);
  if (it == streams.end()) {
    it = streams.emplace(device, impl.getStreamFromGlobalPool(c10::Device(c10::DeviceType::CUDA, device), false)).first;
  }
  return it->second;
}

// A CUDAGraph (about 150 bytes in torch 2.11) in storage with room to spare, and the stream that
// was current before capture.
struct Graph {
  alignas(64) unsigned char storage[1024];
  bool constructed = false;
  c10::DeviceIndex device = 0;
  std::optional<c10::Stream> previous;
};
}  // namespace

extern "C" {
// 1 when libtorch_cuda's CUDAGraph can be used (the CUDA half is loaded and has the members).
int32_t ftx_cuda_graph_available() { return api() != nullptr ? 1 : 0; }

// A new, empty graph on `device`, or null (message in `err`).
void* ftx_cuda_graph_new(int32_t device, char* err, int32_t len) {
  const Api* a = api();
  if (a == nullptr) {
    write_error(err, len, "libtorch_cuda.so is not loaded or lacks at::cuda::CUDAGraph");
    return nullptr;
  }
  auto* g = new Graph();
  g->device = static_cast<c10::DeviceIndex>(device);
  if (guarded(err, len, [&] { a->ctor(g->storage, false); }) != 0) {
    delete g;
    return nullptr;
  }
  g->constructed = true;
  return g;
}

void ftx_cuda_graph_free(void* p) {
  auto* g = static_cast<Graph*>(p);
  if (g == nullptr) return;
  if (g->constructed) {
    try {
      api()->dtor(g->storage);
    } catch (...) {
    }
  }
  delete g;
}

// A memory pool id that graphs captured with it share.
int32_t ftx_cuda_graph_pool(uint64_t* first, uint64_t* second, char* err, int32_t len) {
  const Api* a = api();
  if (a == nullptr) {
    write_error(err, len, "at::cuda::CUDAGraph is unavailable");
    return -1;
  }
  return guarded(err, len, [&] {
    PoolId id = a->pool();
    *first = id.first;
    *second = id.second;
  });
}

// `on`: waits for the device, then makes the side stream current on the graph's device (capture
// needs a stream other than the default one). Off: waits for that stream and makes the
// previous stream current again.
int32_t ftx_cuda_graph_side_stream(void* p, int32_t on, char* err, int32_t len) {
  auto* g = static_cast<Graph*>(p);
  return guarded(err, len, [&] {
    c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
    c10::Device dev(c10::DeviceType::CUDA, g->device);
    if (on) {
      if (g->previous) return;
      impl.synchronizeDevice(g->device);
      g->previous = impl.exchangeStream(side_stream_of(impl, g->device));
    } else {
      if (!g->previous) return;
      impl.synchronizeStream(impl.getStream(dev));
      impl.exchangeStream(*g->previous);
      g->previous.reset();
    }
  });
}

// Starts capturing the current stream's work (into `pool`, shared with other graphs).
int32_t ftx_cuda_graph_capture_begin(void* p, uint64_t first, uint64_t second, char* err, int32_t len) {
  auto* g = static_cast<Graph*>(p);
  return guarded(err, len, [&] { api()->begin(g->storage, PoolId{first, second}, kCaptureThreadLocal); });
}

int32_t ftx_cuda_graph_capture_end(void* p, char* err, int32_t len) {
  auto* g = static_cast<Graph*>(p);
  return guarded(err, len, [&] { api()->end(g->storage); });
}

// Launches the captured work on the current stream.
int32_t ftx_cuda_graph_replay(void* p, char* err, int32_t len) {
  auto* g = static_cast<Graph*>(p);
  return guarded(err, len, [&] { api()->replay(g->storage); });
}
}
