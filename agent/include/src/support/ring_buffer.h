/*
 * edgec-agent: the byte FIFO between the RPC endpoint and its channel.
 *
 * Written for edgec from rpc_endpoint.{h,cc}'s needs. Bytes live in a
 * circular buffer that grows (keeping its contents) when asked to hold more:
 *   Write / Read                  copy bytes in / out
 *   WriteWithCallback(f, n)       f(ptr, max) fills free space, returns count
 *   ReadWithCallback(f, n)        f(ptr, len) consumes bytes, returns count
 * The callbacks see one contiguous piece, so they may do less than asked;
 * callers loop.
 */
#ifndef TVM_SUPPORT_RING_BUFFER_H_
#define TVM_SUPPORT_RING_BUFFER_H_

#include <tvm/ffi/error.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace tvm {
namespace support {

class RingBuffer {
 public:
  RingBuffer() : ring_(kInitialCapacity) {}

  /*! \return the number of bytes waiting to be read. */
  size_t bytes_available() const { return size_; }

  /*! \brief Make room for at least `n` bytes in total, keeping what is stored. */
  void Reserve(size_t n) {
    if (n <= ring_.size()) return;
    std::vector<char> grown(std::max(n, ring_.size() * 2));
    CopyOut(grown.data(), size_);
    ring_.swap(grown);
    head_ = 0;
  }

  void Read(void* data, size_t size) {
    TVM_FFI_ICHECK_LE(size, size_) << "RingBuffer: read past the stored bytes";
    CopyOut(static_cast<char*>(data), size);
    Consume(size);
  }

  void Write(const void* data, size_t size) {
    Reserve(size_ + size);
    const char* src = static_cast<const char*>(data);
    while (size != 0) {
      size_t tail = (head_ + size_) % ring_.size();
      size_t n = std::min(size, ContiguousFree());
      std::memcpy(ring_.data() + tail, src, n);
      size_ += n;
      src += n;
      size -= n;
    }
  }

  template <typename FSend>
  size_t ReadWithCallback(FSend fsend, size_t max_nbytes) {
    size_t n = std::min({max_nbytes, size_, ring_.size() - head_});
    if (n == 0) return 0;
    size_t done = fsend(static_cast<const void*>(ring_.data() + head_), n);
    Consume(done);
    return done;
  }

  template <typename FRecv>
  size_t WriteWithCallback(FRecv frecv, size_t max_nbytes) {
    Reserve(size_ + max_nbytes);
    size_t tail = (head_ + size_) % ring_.size();
    size_t n = std::min(max_nbytes, ContiguousFree());
    if (n == 0) return 0;
    size_t done = frecv(static_cast<void*>(ring_.data() + tail), n);
    size_ += done;
    return done;
  }

 private:
  static constexpr size_t kInitialCapacity = 1024;

  /*! \brief Free bytes from the write position up to the end of the array or the head. */
  size_t ContiguousFree() const {
    size_t tail = (head_ + size_) % ring_.size();
    if (size_ == ring_.size()) return 0;
    return tail >= head_ ? ring_.size() - tail : head_ - tail;
  }
  /*! \brief Copy the first `n` stored bytes to `dst`, oldest first. */
  void CopyOut(char* dst, size_t n) const {
    size_t first = std::min(n, ring_.size() - head_);
    std::memcpy(dst, ring_.data() + head_, first);
    std::memcpy(dst + first, ring_.data(), n - first);
  }
  void Consume(size_t n) {
    head_ = (head_ + n) % ring_.size();
    size_ -= n;
    if (size_ == 0) head_ = 0;
  }

  std::vector<char> ring_;
  size_t head_ = 0;
  size_t size_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_RING_BUFFER_H_
