// Declarations only (see ../README.txt): ProcessGroupGloo holds contexts by shared_ptr; its
// inline setTimeout (never called by ftx) names this member.
#pragma once
#include <chrono>
namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
} // namespace gloo
