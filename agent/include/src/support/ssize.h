/*
 * edgec-agent: ssize_t, the signed byte count of read/write/send/recv.
 * Written for edgec; POSIX systems only (the agent targets Linux boards).
 */
#ifndef TVM_SUPPORT_SSIZE_H_
#define TVM_SUPPORT_SSIZE_H_

#include <sys/types.h>

#endif  // TVM_SUPPORT_SSIZE_H_
