/*
 * edgec-agent: NVTX profiling ranges. The agent runs CPU code only, so a
 * range is a no-op that keeps vm.cc's `NVTXScopedRange scope(name);` compiling.
 * Written for edgec.
 */
#ifndef TVM_SUPPORT_CUDA_NVTX_H_
#define TVM_SUPPORT_CUDA_NVTX_H_

#include <string>

namespace tvm {
namespace support {

class NVTXScopedRange {
 public:
  explicit NVTXScopedRange(const char* name) {}
  explicit NVTXScopedRange(const std::string& name) {}
  NVTXScopedRange(const NVTXScopedRange&) = delete;
  NVTXScopedRange& operator=(const NVTXScopedRange&) = delete;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_CUDA_NVTX_H_
