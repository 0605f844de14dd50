/*
 * edgec-agent: the binary stream interface the TVM runtime sources use
 * (tensors, parameter blobs, the Relax VM executable, the RPC wire).
 *
 * Written for edgec from what the call sites need; the pip wheels do not ship
 * this header. A Stream moves raw bytes through two virtual functions; the
 * typed helpers below route every value through support::Serializer<T>
 * (serializer.h), which fixes the on-disk and on-wire encoding.
 */
#ifndef TVM_SUPPORT_IO_H_
#define TVM_SUPPORT_IO_H_

#include <cstddef>
#include <cstdint>

namespace tvm {
namespace support {

class Stream;

/*!
 * \brief How a value of type T is written to and read from a Stream.
 * Specialisations set `enabled = true` and define
 *   static void Write(Stream*, const T&);  static bool Read(Stream*, T*);
 */
template <typename T, typename Enable = void>
struct Serializer {
  static constexpr bool enabled = false;
};

/*! \brief A byte stream with typed, serializer-driven helpers. */
class Stream {
 public:
  virtual ~Stream() = default;
  /*! \return the number of bytes read (fewer than size at the end of the stream). */
  virtual size_t Read(void* ptr, size_t size) = 0;
  /*! \return the number of bytes written. */
  virtual size_t Write(const void* ptr, size_t size) = 0;

  template <typename T>
  void Write(const T& value) {
    static_assert(Serializer<T>::enabled, "support::Serializer<T> is not defined for this type");
    Serializer<T>::Write(this, value);
  }
  template <typename T>
  bool Read(T* out) {
    static_assert(Serializer<T>::enabled, "support::Serializer<T> is not defined for this type");
    return Serializer<T>::Read(this, out);
  }
  /*! \brief Write `count` values, element by element, without a length prefix. */
  template <typename T>
  void WriteArray(const T* values, size_t count) {
    for (size_t i = 0; i < count; ++i) this->Write<T>(values[i]);
  }
  /*! \brief Read `count` values written by WriteArray. */
  template <typename T>
  bool ReadArray(T* values, size_t count) {
    for (size_t i = 0; i < count; ++i) {
      if (!this->Read<T>(values + i)) return false;
    }
    return true;
  }
};

}  // namespace support
}  // namespace tvm

#include <tvm/support/serializer.h>

#endif  // TVM_SUPPORT_IO_H_
