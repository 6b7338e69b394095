// Declarations only (see ../../README.txt): ProcessGroupGloo holds devices and buffers by pointer.
#pragma once
namespace gloo {
namespace transport {
class Device;
class UnboundBuffer;
} // namespace transport
} // namespace gloo
