/*
 * edgec-agent: TCP sockets for the RPC channel (rpc_socket_impl.cc).
 *
 * Written for edgec, POSIX only. A TCPSocket is a copyable handle around a
 * file descriptor (copies share it; Close() closes it once). Send and Recv
 * retry when a signal interrupts them and never raise SIGPIPE; they return
 * -1 on failure, leaving errno for Socket::Error.
 */
#ifndef TVM_SUPPORT_SOCKET_H_
#define TVM_SUPPORT_SOCKET_H_

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "errno_handling.h"
#include "ssize.h"

namespace tvm {
namespace support {

/*! \brief A resolved host:port (IPv4 or IPv6). */
class SockAddr {
 public:
  SockAddr() { std::memset(&addr_, 0, sizeof(addr_)); }
  SockAddr(const char* host, int port) : SockAddr() {
    addrinfo hints;
    std::memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    std::string service = std::to_string(port);
    int err = getaddrinfo(host, service.c_str(), &hints, &found);
    TVM_FFI_ICHECK(err == 0 && found != nullptr)
        << "cannot resolve " << host << ":" << port << ": " << gai_strerror(err);
    std::memcpy(&addr_, found->ai_addr, found->ai_addrlen);
    addrlen_ = found->ai_addrlen;
    freeaddrinfo(found);
  }
  int ss_family() const { return addr_.ss_family; }
  const sockaddr* addr() const { return reinterpret_cast<const sockaddr*>(&addr_); }
  socklen_t addrlen() const { return addrlen_; }
  /*! \return "host:port" ("[v6]:port" for IPv6). */
  std::string AsString() const {
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (addr_.ss_family == AF_INET) {
      const auto* v4 = reinterpret_cast<const sockaddr_in*>(&addr_);
      inet_ntop(AF_INET, &v4->sin_addr, host, sizeof(host));
      port = ntohs(v4->sin_port);
      return std::string(host) + ":" + std::to_string(port);
    }
    const auto* v6 = reinterpret_cast<const sockaddr_in6*>(&addr_);
    inet_ntop(AF_INET6, &v6->sin6_addr, host, sizeof(host));
    port = ntohs(v6->sin6_port);
    return "[" + std::string(host) + "]:" + std::to_string(port);
  }

 private:
  sockaddr_storage addr_;
  socklen_t addrlen_ = 0;
};

class Socket {
 public:
  using SockType = int;
  static constexpr SockType kInvalidSocket = -1;

  explicit Socket(SockType sockfd) : sockfd(sockfd) {}

  /*! \return whether the descriptor is closed or no longer a socket. */
  bool BadSocket() const {
    if (sockfd == kInvalidSocket) return true;
    int error = 0;
    socklen_t len = sizeof(error);
    return getsockopt(sockfd, SOL_SOCKET, SO_ERROR, &error, &len) != 0 && errno == EBADF;
  }
  void Close() {
    if (sockfd != kInvalidSocket) {
      close(sockfd);
      sockfd = kInvalidSocket;
    }
  }
  /*! \brief Throw an error naming `what` and errno. */
  [[noreturn]] static void Error(const char* what) { ThrowLastError(what); }

  SockType sockfd;
};

class TCPSocket : public Socket {
 public:
  TCPSocket() : Socket(kInvalidSocket) {}
  explicit TCPSocket(SockType sockfd) : Socket(sockfd) {}

  void Create(int family = AF_INET) {
    sockfd = socket(family, SOCK_STREAM, 0);
    if (sockfd == kInvalidSocket) Error("socket()");
  }
  bool Connect(const SockAddr& addr) {
    int rc;
    do {
      rc = connect(sockfd, addr.addr(), addr.addrlen());
    } while (rc != 0 && ErrnoIsInterrupt());
    return rc == 0;
  }
  ssize_t Send(const void* data, size_t size) {
    ssize_t n;
    do {
      n = send(sockfd, data, size, MSG_NOSIGNAL);
    } while (n == -1 && ErrnoIsInterrupt());
    return n;
  }
  ssize_t Recv(void* data, size_t size) {
    ssize_t n;
    do {
      n = recv(sockfd, data, size, 0);
    } while (n == -1 && ErrnoIsInterrupt());
    return n;
  }
  /*! \return `size`; throws when the peer fails. */
  size_t SendAll(const void* data, size_t size) {
    const char* bytes = static_cast<const char*>(data);
    size_t done = 0;
    while (done < size) {
      ssize_t n = Send(bytes + done, size - done);
      if (n == -1) Error("send()");
      done += static_cast<size_t>(n);
    }
    return done;
  }
  /*! \return the bytes received: fewer than `size` when the peer closed first. */
  size_t RecvAll(void* data, size_t size) {
    char* bytes = static_cast<char*>(data);
    size_t done = 0;
    while (done < size) {
      ssize_t n = Recv(bytes + done, size - done);
      if (n == -1) Error("recv()");
      if (n == 0) break;
      done += static_cast<size_t>(n);
    }
    return done;
  }
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_SOCKET_H_
