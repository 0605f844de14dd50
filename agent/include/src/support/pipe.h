/*
 * edgec-agent: what rpc_pipe_impl.cc needs to run an RPC peer as a child
 * process over two pipes: pipe/fork/exec/read/write/close and kill.
 * Written for edgec; POSIX only.
 */
#ifndef TVM_SUPPORT_PIPE_H_
#define TVM_SUPPORT_PIPE_H_

#include <signal.h>
#include <sys/types.h>
#include <unistd.h>

#include "ssize.h"

#endif  // TVM_SUPPORT_PIPE_H_
