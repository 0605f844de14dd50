/*
 * edgec-agent: encodings of values on a support::Stream.
 *
 * Written for edgec; the encoding must equal the one TVM's compiler used when
 * it exported lib.so (the VM executable and constants are stored with it):
 *   arithmetic, enum   raw little-endian bytes of the value
 *   DLDataType         code (u8), bits (u8), lanes (u16)
 *   DLDevice           device_type (i32), device_id (i32)
 *   strings            u64 byte count, then the bytes
 *   sequences          u64 element count, then each element
 */
#ifndef TVM_SUPPORT_SERIALIZER_H_
#define TVM_SUPPORT_SERIALIZER_H_

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/endian.h>
#include <tvm/ffi/string.h>
#include <tvm/support/io.h>

#include <string>
#include <type_traits>
#include <vector>

namespace tvm {
namespace support {

/*! \brief Numbers and enums: their bytes, in little-endian order. */
template <typename T>
struct Serializer<T, std::enable_if_t<std::is_arithmetic_v<T> || std::is_enum_v<T>>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const T& value) {
    if constexpr (TVM_FFI_IO_NO_ENDIAN_SWAP) {
      strm->Write(static_cast<const void*>(&value), sizeof(T));
    } else {
      T swapped = value;
      ffi::ByteSwap(&swapped, sizeof(T), 1);
      strm->Write(static_cast<const void*>(&swapped), sizeof(T));
    }
  }
  static bool Read(Stream* strm, T* out) {
    if (strm->Read(static_cast<void*>(out), sizeof(T)) != sizeof(T)) return false;
    if constexpr (!TVM_FFI_IO_NO_ENDIAN_SWAP) ffi::ByteSwap(out, sizeof(T), 1);
    return true;
  }
};

template <>
struct Serializer<DLDataType> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const DLDataType& dtype) {
    strm->Write(dtype.code);
    strm->Write(dtype.bits);
    strm->Write(dtype.lanes);
  }
  static bool Read(Stream* strm, DLDataType* dtype) {
    return strm->Read(&dtype->code) && strm->Read(&dtype->bits) && strm->Read(&dtype->lanes);
  }
};

template <>
struct Serializer<DLDevice> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const DLDevice& dev) {
    strm->Write(static_cast<int32_t>(dev.device_type));
    strm->Write(dev.device_id);
  }
  static bool Read(Stream* strm, DLDevice* dev) {
    int32_t device_type;
    if (!strm->Read(&device_type) || !strm->Read(&dev->device_id)) return false;
    dev->device_type = static_cast<DLDeviceType>(device_type);
    return true;
  }
};

namespace detail {
inline void WriteBytes(Stream* strm, const char* data, size_t size) {
  strm->Write(static_cast<uint64_t>(size));
  if (size != 0) strm->Write(static_cast<const void*>(data), size);
}
inline bool ReadBytes(Stream* strm, std::string* out) {
  uint64_t size;
  if (!strm->Read(&size)) return false;
  out->resize(static_cast<size_t>(size));
  return size == 0 || strm->Read(static_cast<void*>(&(*out)[0]), out->size()) == out->size();
}
}  // namespace detail

template <>
struct Serializer<std::string> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::string& s) { detail::WriteBytes(strm, s.data(), s.size()); }
  static bool Read(Stream* strm, std::string* s) { return detail::ReadBytes(strm, s); }
};

template <>
struct Serializer<ffi::String> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const ffi::String& s) { detail::WriteBytes(strm, s.data(), s.size()); }
  static bool Read(Stream* strm, ffi::String* s) {
    std::string bytes;
    if (!detail::ReadBytes(strm, &bytes)) return false;
    *s = ffi::String(std::move(bytes));
    return true;
  }
};

template <typename T>
struct Serializer<std::vector<T>> {
  static constexpr bool enabled = Serializer<T>::enabled;
  static void Write(Stream* strm, const std::vector<T>& items) {
    strm->Write(static_cast<uint64_t>(items.size()));
    if constexpr (std::is_arithmetic_v<T> && TVM_FFI_IO_NO_ENDIAN_SWAP) {
      if (!items.empty()) strm->Write(static_cast<const void*>(items.data()), items.size() * sizeof(T));
    } else {
      for (const T& item : items) strm->Write(item);
    }
  }
  static bool Read(Stream* strm, std::vector<T>* items) {
    uint64_t count;
    if (!strm->Read(&count)) return false;
    items->resize(static_cast<size_t>(count));
    if constexpr (std::is_arithmetic_v<T> && TVM_FFI_IO_NO_ENDIAN_SWAP) {
      size_t nbytes = items->size() * sizeof(T);
      return nbytes == 0 || strm->Read(static_cast<void*>(items->data()), nbytes) == nbytes;
    } else {
      for (T& item : *items) {
        if (!strm->Read(&item)) return false;
      }
      return true;
    }
  }
};

template <typename T>
struct Serializer<ffi::Array<T>> {
  static constexpr bool enabled = Serializer<T>::enabled;
  static void Write(Stream* strm, const ffi::Array<T>& items) {
    strm->Write(static_cast<uint64_t>(items.size()));
    for (const T& item : items) strm->Write(item);
  }
  static bool Read(Stream* strm, ffi::Array<T>* items) {
    uint64_t count;
    if (!strm->Read(&count)) return false;
    ffi::Array<T> result;
    result.reserve(static_cast<int64_t>(count));
    for (uint64_t i = 0; i < count; ++i) {
      T item;
      if (!strm->Read(&item)) return false;
      result.push_back(std::move(item));
    }
    *items = std::move(result);
    return true;
  }
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_SERIALIZER_H_
