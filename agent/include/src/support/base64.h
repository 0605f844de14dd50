/*
 * edgec-agent: base64 (RFC 4648, '=' padded) as support::Stream adaptors.
 *
 * Written for edgec. The runtime uses them to put tensors into JSON
 * (tensor.cc: __data_to_json__ / __data_from_json__):
 *   Base64OutStream(out): Write() encodes into `out`; Finish() flushes the tail.
 *   Base64InStream(in):   InitPosition() skips leading blanks; Read() decodes.
 */
#ifndef TVM_SUPPORT_BASE64_H_
#define TVM_SUPPORT_BASE64_H_

#include <tvm/ffi/error.h>
#include <tvm/support/io.h>

#include <cstdint>

namespace tvm {
namespace support {
namespace base64 {
inline const char* Alphabet() {
  return "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
}
/*! \return the 6-bit value of `c`, -1 for padding or anything else. */
inline int Decode(int c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}
}  // namespace base64

class Base64OutStream : public Stream {
 public:
  explicit Base64OutStream(Stream* out) : out_(out) {}
  using Stream::Write;
  size_t Read(void* ptr, size_t size) final { return 0; }
  size_t Write(const void* ptr, size_t size) final {
    const uint8_t* bytes = static_cast<const uint8_t*>(ptr);
    for (size_t i = 0; i < size; ++i) {
      group_[group_size_++] = bytes[i];
      if (group_size_ == 3) EmitGroup();
    }
    return size;
  }
  /*! \brief Encode the last one or two bytes with padding; call once, at the end. */
  void Finish() {
    if (group_size_ != 0) EmitGroup();
  }

 private:
  void EmitGroup() {
    const char* alphabet = base64::Alphabet();
    uint32_t bits = (uint32_t{group_[0]} << 16) | (uint32_t{group_size_ > 1 ? group_[1] : 0u} << 8) |
                    uint32_t{group_size_ > 2 ? group_[2] : 0u};
    char text[4] = {alphabet[(bits >> 18) & 63], alphabet[(bits >> 12) & 63],
                    group_size_ > 1 ? alphabet[(bits >> 6) & 63] : '=',
                    group_size_ > 2 ? alphabet[bits & 63] : '='};
    out_->Write(static_cast<const void*>(text), sizeof(text));
    group_size_ = 0;
  }

  Stream* out_;
  uint8_t group_[3] = {0, 0, 0};
  int group_size_ = 0;
};

class Base64InStream : public Stream {
 public:
  explicit Base64InStream(Stream* in) : in_(in) {}
  using Stream::Read;
  /*! \brief Skip blanks before the first base64 character. */
  void InitPosition() {
    do {
      pending_char_ = NextChar();
    } while (pending_char_ == ' ' || pending_char_ == '\n' || pending_char_ == '\r' ||
             pending_char_ == '\t');
  }
  size_t Read(void* ptr, size_t size) final {
    uint8_t* out = static_cast<uint8_t*>(ptr);
    size_t done = 0;
    while (done < size) {
      if (decoded_pos_ == decoded_size_ && !DecodeGroup()) break;
      out[done++] = decoded_[decoded_pos_++];
    }
    return done;
  }
  size_t Write(const void* ptr, size_t size) final { return 0; }

 private:
  int NextChar() {
    if (pending_char_ != kNone) {
      int c = pending_char_;
      pending_char_ = kNone;
      return c;
    }
    char c;
    return in_->Read(&c, 1) == 1 ? static_cast<unsigned char>(c) : kEnd;
  }
  /*! \brief Decode the next four characters into up to three bytes; false at the end. */
  bool DecodeGroup() {
    if (finished_) return false;
    int values[4];
    int n = 0;
    for (; n < 4; ++n) {
      int c = NextChar();
      if (c == kEnd || c == '=' || base64::Decode(c) < 0) {
        finished_ = true;
        break;
      }
      values[n] = base64::Decode(c);
    }
    TVM_FFI_ICHECK(n != 1) << "truncated base64 data";
    if (n == 0) return false;
    for (int i = n; i < 4; ++i) values[i] = 0;
    uint32_t bits = (uint32_t(values[0]) << 18) | (uint32_t(values[1]) << 12) |
                    (uint32_t(values[2]) << 6) | uint32_t(values[3]);
    decoded_[0] = static_cast<uint8_t>(bits >> 16);
    decoded_[1] = static_cast<uint8_t>(bits >> 8);
    decoded_[2] = static_cast<uint8_t>(bits);
    decoded_size_ = n - 1;  // 4 chars -> 3 bytes, 3 -> 2, 2 -> 1
    decoded_pos_ = 0;
    return true;
  }

  static constexpr int kNone = -2;
  static constexpr int kEnd = -1;
  Stream* in_;
  int pending_char_ = kNone;
  bool finished_ = false;
  uint8_t decoded_[3] = {0, 0, 0};
  int decoded_size_ = 0;
  int decoded_pos_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_BASE64_H_
