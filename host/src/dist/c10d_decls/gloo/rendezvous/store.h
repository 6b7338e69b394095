// Declarations only (see ../../README.txt): the virtual interface ProcessGroupGloo::GlooStore
// overrides inline. ftx never constructs a GlooStore (libtorch does, inside the library), so
// this class's layout and vtable are never used by the code compiled against it.
#pragma once
#include <chrono>
#include <string>
#include <vector>
namespace gloo {
namespace rendezvous {
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) = 0;
};
} // namespace rendezvous
} // namespace gloo
