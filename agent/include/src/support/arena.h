/*
 * edgec-agent: a bump allocator for the RPC endpoint's per-request scratch.
 *
 * Written for edgec from rpc_endpoint.cc's needs: allocate_<T>(n) hands out
 * uninitialised space for n trivial T's; RecycleAll() takes everything back
 * at once (blocks of the default size are kept for the next request, larger
 * ones, e.g. for an uploaded file, are freed).
 */
#ifndef TVM_SUPPORT_ARENA_H_
#define TVM_SUPPORT_ARENA_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

namespace tvm {
namespace support {

class Arena {
 public:
  template <typename T>
  T* allocate_(int count = 1) {
    static_assert(std::is_trivial<T>::value, "Arena only holds trivial types");
    return static_cast<T*>(Allocate(sizeof(T) * static_cast<size_t>(count < 0 ? 0 : count), alignof(T)));
  }

  void RecycleAll() {
    std::vector<Block> kept;
    for (Block& block : blocks_) {
      if (block.size == kBlockSize) kept.push_back(std::move(block));
    }
    blocks_.swap(kept);
    current_ = 0;
    offset_ = 0;
  }

 private:
  static constexpr size_t kBlockSize = 64 * 1024;
  struct Block {
    std::unique_ptr<char[]> data;
    size_t size;
  };

  void* Allocate(size_t nbytes, size_t align) {
    if (align < alignof(std::max_align_t)) align = alignof(std::max_align_t);
    while (true) {
      if (current_ < blocks_.size()) {
        Block& block = blocks_[current_];
        uintptr_t base = reinterpret_cast<uintptr_t>(block.data.get());
        size_t start = ((base + offset_ + align - 1) & ~(uintptr_t(align) - 1)) - base;
        if (start + nbytes <= block.size) {
          offset_ = start + nbytes;
          return block.data.get() + start;
        }
        ++current_;
        offset_ = 0;
        continue;
      }
      size_t size = nbytes + align > kBlockSize ? nbytes + align : kBlockSize;
      blocks_.push_back(Block{std::unique_ptr<char[]>(new char[size]), size});
    }
  }

  std::vector<Block> blocks_;
  size_t current_ = 0;
  size_t offset_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_ARENA_H_
