// Memory statistics of libtorch's CUDA caching allocator: what the peers report
// (torch.cuda.max_memory_allocated, memory_allocated, empty_cache), which no C API of libtorch exposes.
// Through the device-generic allocator interface of libc10, so no CUDA header is needed.
#include <c10/core/CachingDeviceAllocator.h>
#include <cstdint>

static c10::CachingDeviceAllocator::DeviceStats stats(int32_t device) {
  return c10::getDeviceAllocator(c10::DeviceType::CUDA)->getDeviceStats(static_cast<c10::DeviceIndex>(device));
}

static constexpr auto kAggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);

extern "C" {
// Bytes: the peak allocated since the last reset, or -1 if the allocator refused.
int64_t ftx_cuda_peak_allocated(int32_t device) {
  try {
    return stats(device).allocated_bytes[kAggregate].peak;
  } catch (...) {
    return -1;
  }
}

// Bytes: the peak reserved (allocated plus cached) since the last reset, or -1.
int64_t ftx_cuda_peak_reserved(int32_t device) {
  try {
    return stats(device).reserved_bytes[kAggregate].peak;
  } catch (...) {
    return -1;
  }
}

// Bytes reserved from the driver now (allocated plus cached), or -1.
int64_t ftx_cuda_current_reserved(int32_t device) {
  try {
    return stats(device).reserved_bytes[kAggregate].current;
  } catch (...) {
    return -1;
  }
}

// Returns the allocator's cached, unused blocks to the driver. 0 on success.
int32_t ftx_cuda_empty_cache() {
  try {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)->emptyCache();
    return 0;
  } catch (...) {
    return -1;
  }
}

// 0 on success.
int32_t ftx_cuda_reset_peak(int32_t device) {
  try {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}
}
