/*
 * edgec-agent: the two string helpers the runtime sources use.
 * Written for edgec (thread_pool.cc: IsNumber; rpc_endpoint.cc: StartsWith).
 */
#ifndef TVM_SUPPORT_UTILS_H_
#define TVM_SUPPORT_UTILS_H_

#include <cctype>
#include <string>

namespace tvm {
namespace support {

/*! \return whether `text` is a non-empty run of decimal digits. */
inline bool IsNumber(const std::string& text) {
  if (text.empty()) return false;
  for (char c : text) {
    if (!std::isdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

/*! \return whether `text` begins with `prefix`. */
inline bool StartsWith(const std::string& text, const std::string& prefix) {
  return text.compare(0, prefix.size(), prefix) == 0;
}

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_UTILS_H_
