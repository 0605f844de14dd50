/*
 * edgec-agent: turning a failed system call into a TVM error.
 * Written for edgec; used by socket.h.
 */
#ifndef TVM_SUPPORT_ERRNO_HANDLING_H_
#define TVM_SUPPORT_ERRNO_HANDLING_H_

#include <tvm/ffi/error.h>

#include <cerrno>
#include <cstring>

namespace tvm {
namespace support {

/*! \brief Whether the last call failed only because a signal interrupted it (retry then). */
inline bool ErrnoIsInterrupt() { return errno == EINTR; }

/*! \brief Throw an InternalError naming `what` and the current errno. */
[[noreturn]] inline void ThrowLastError(const char* what) {
  int code = errno;
  TVM_FFI_THROW(InternalError) << what << " failed: " << std::strerror(code) << " (errno " << code
                               << ")";
  TVM_FFI_UNREACHABLE();
}

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_ERRNO_HANDLING_H_
