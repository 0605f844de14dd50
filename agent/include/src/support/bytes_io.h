/*
 * edgec-agent: support::Stream over bytes held in memory.
 *
 * Written for edgec from what the TVM runtime sources need:
 *   BytesOutStream(&str)   appends every write to a std::string
 *   BytesInStream(bytes)   reads a std::string or ffi::Bytes front to back
 *                          (it borrows the bytes: keep them alive meanwhile)
 */
#ifndef TVM_SUPPORT_BYTES_IO_H_
#define TVM_SUPPORT_BYTES_IO_H_

#include <tvm/ffi/string.h>
#include <tvm/support/io.h>

#include <algorithm>
#include <cstring>
#include <string>

namespace tvm {
namespace support {

class BytesOutStream : public Stream {
 public:
  explicit BytesOutStream(std::string* out) : out_(out) {}
  using Stream::Write;
  size_t Read(void* ptr, size_t size) final { return 0; }
  size_t Write(const void* ptr, size_t size) final {
    out_->append(static_cast<const char*>(ptr), size);
    return size;
  }

 private:
  std::string* out_;
};

class BytesInStream : public Stream {
 public:
  BytesInStream(const char* data, size_t size) : data_(data), size_(size) {}
  explicit BytesInStream(const std::string& bytes) : BytesInStream(bytes.data(), bytes.size()) {}
  explicit BytesInStream(const ffi::Bytes& bytes) : BytesInStream(bytes.data(), bytes.size()) {}
  using Stream::Read;
  size_t Read(void* ptr, size_t size) final {
    size_t n = std::min(size, size_ - pos_);
    if (n != 0) std::memcpy(ptr, data_ + pos_, n);
    pos_ += n;
    return n;
  }
  size_t Write(const void* ptr, size_t size) final { return 0; }

 private:
  const char* data_;
  size_t size_;
  size_t pos_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_BYTES_IO_H_
