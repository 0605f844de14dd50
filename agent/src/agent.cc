// edgec-agent: a TVM RPC server for boards without Python.
//
// It speaks the protocol of python/tvm/rpc/server.py: the [magic, keylen, key]
// handshake, then TVM's own RPC server loop (rpc.ServerLoop) on the socket,
// and optionally the tracker protocol (update_info / put / pending matchkeys,
// re-registered after every session). Each session runs in a forked child, as
// the Python server runs each in a new process: a crashing kernel or a stale
// dlopen'ed lib.so never outlives its session, and the agent keeps serving.

// 64-bit file offsets on armv7 too: a 32-bit readdir() fails with EOVERFLOW on filesystems
// with 64-bit directory cookies (ext4, overlayfs), e.g. under qemu-user on an x86-64 host.
#define _FILE_OFFSET_BITS 64
#include <dirent.h>
#include <ftw.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <unistd.h>

#include "icount.h"

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace {
namespace ffi = tvm::ffi;
namespace json = tvm::ffi::json;

#ifndef EDGEC_TVM_VERSION
#define EDGEC_TVM_VERSION "unknown"
#endif
constexpr const char* kVersion = "0.1.0";
constexpr int32_t kRPCMagic = 0xff271, kTrackerMagic = 0x2f271;  // tvm/rpc/base.py
enum TrackerCode { kSuccess = 0, kPut = 3, kUpdateInfo = 5, kGetPendingMatchkeys = 7 };
#if defined(__aarch64__)
constexpr const char* kCpuArch = "aarch64";
#elif defined(__arm__)
constexpr const char* kCpuArch = "armv7";
#else
constexpr const char* kCpuArch = "x86_64";
#endif

volatile sig_atomic_t g_stop = 0;
std::string g_workdir;

void Log(const std::string& message) { std::fprintf(stderr, "edgec-agent: %s\n", message.c_str()); }
double Now() { timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

bool SendAll(int fd, const void* data, size_t size) {
  for (const char* p = static_cast<const char*>(data); size != 0;) {
    ssize_t n = send(fd, p, size, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n, size -= n;
  }
  return true;
}
bool RecvAll(int fd, void* data, size_t size) {
  for (char* p = static_cast<char*>(data); size != 0;) {
    ssize_t n = recv(fd, p, size, 0);
    if (n < 0 && errno == EINTR && !g_stop) continue;
    if (n <= 0) return false;
    p += n, size -= n;
  }
  return true;
}
void SetTimeouts(int fd, int seconds) {
  timeval tv{seconds, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}
int Connect(const std::string& host, int port) {
  addrinfo hints{}, *found = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0) return -1;
  int fd = socket(found->ai_family, SOCK_STREAM, 0);
  if (fd >= 0 && connect(fd, found->ai_addr, found->ai_addrlen) != 0) close(fd), fd = -1;
  freeaddrinfo(found);
  return fd;
}
int Listen(const std::string& host, int port) {
  addrinfo hints{}, *found = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0) return -1;
  int fd = socket(found->ai_family, SOCK_STREAM, 0), one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (fd >= 0 && (bind(fd, found->ai_addr, found->ai_addrlen) != 0 || listen(fd, 8) != 0)) close(fd), fd = -1;
  freeaddrinfo(found);
  return fd;
}

// ---- the global functions a TVM RPC client calls on its server --------------------------
std::string WorkPath(const std::string& name) {
  if (name.empty() || name[0] == '/' || ("/" + name + "/").find("/../") != std::string::npos)
    TVM_FFI_THROW(ValueError) << "'" << name << "' is not a plain path inside the agent's workdir";
  return g_workdir + "/" + name;
}

// ---- instruction counts on emulated boards (agent/plugin/icount.c) -----------------------
struct Counts {
  uint64_t thread = 0, all_threads = 0;
};
// This thread's and all threads' guest instruction counts so far, from edgec's qemu plugin;
// false on a real board or under qemu without the plugin (the system call does nothing there).
bool ReadCounts(Counts* counts) {
  edgec_icount request{EDGEC_ICOUNT_ASK, 0, 0, 0};
  int saved = errno;
  syscall(EDGEC_ICOUNT_SYSCALL, static_cast<long>(EDGEC_ICOUNT_ASK), &request);
  errno = saved;  // ENOSYS, whether the plugin answered or not
  if (request.magic != EDGEC_ICOUNT_ANSWER) return false;
  counts->thread = request.thread, counts->all_threads = request.all_threads;
  return true;
}
bool g_counts_instructions = false;  // probed once at start

// edgec.device.count_evaluator(module, name, number, repeat) -> f(args...) -> JSON string
// {"number": N, "instructions": [...], "other_threads": [...]}: like runtime.RPCTimeEvaluator,
// but per repeat the guest instructions that `number` calls of the function executed on the
// calling thread, net of the count read itself; "other_threads" the instructions other
// threads ran meanwhile (0 when the kernels run on one thread; otherwise the calling
// thread's count is only its share). EDGEC_ICOUNT_UNCOUNTED_CALLS calls first, not counted.
ffi::Function CountEvaluator(ffi::Optional<ffi::Module> module, const std::string& name, int number, int repeat) {
  if (!g_counts_instructions)
    TVM_FFI_THROW(RuntimeError) << "this device counts no instructions: that needs edgec-agent under qemu-user with "
                                   "edgec's counting plugin (edgec device emulate); real boards report time only";
  if (number < 1 || repeat < 1) TVM_FFI_THROW(ValueError) << "number and repeat must be >= 1";
  ffi::Optional<ffi::Function> found =
      module.has_value() ? module.value()->GetFunction(name, /*query_imports=*/true) : ffi::Function::GetGlobal(name);
  if (!found.has_value()) TVM_FFI_THROW(ValueError) << "no function '" << name << "' to count";
  ffi::Function f = *found;
  return ffi::Function::FromPacked([f, number, repeat](const ffi::AnyView* args, int num_args, ffi::Any* rv) {
    // Nothing allocates between the uncounted calls and the last count: the heap's state
    // decides how many instructions malloc takes, and it must be the same for every run.
    std::vector<Counts> befores(repeat), afters(repeat);
    ffi::Any ignored;
    for (int i = 0; i < EDGEC_ICOUNT_UNCOUNTED_CALLS; ++i) f.CallPacked(args, num_args, &ignored);
    Counts first, second;
    ReadCounts(&first), ReadCounts(&second);
    for (int r = 0; r < repeat; ++r) {
      ReadCounts(&befores[r]);
      for (int i = 0; i < number; ++i) f.CallPacked(args, num_args, &ignored);
      ReadCounts(&afters[r]);
    }
    const uint64_t reading = second.thread - first.thread;  // instructions between two reads
    json::Array instructions, other_threads;
    for (int r = 0; r < repeat; ++r) {
      uint64_t own = afters[r].thread - befores[r].thread;
      instructions.push_back(static_cast<int64_t>(own - reading));
      other_threads.push_back(static_cast<int64_t>(afters[r].all_threads - befores[r].all_threads - own));
    }
    *rv = json::Stringify(json::Object{{"number", static_cast<int64_t>(number)}, {"instructions", instructions},
                                       {"other_threads", other_threads}});
  });
}

std::string DeviceInfo() {
  utsname u{};
  uname(&u);
  const char* emulated = std::getenv("EDGEC_EMULATED");
  const char* cpu = std::getenv("EDGEC_EMULATED_CPU");
  json::Object info{{"agent", ffi::String("edgec-agent")}, {"version", ffi::String(kVersion)},
                    {"machine", ffi::String(u.machine)}, {"cpu_arch", ffi::String(kCpuArch)},
                    {"num_cores", static_cast<int64_t>(sysconf(_SC_NPROCESSORS_ONLN))},
                    {"emulated", emulated != nullptr && std::string(emulated) == "1"},
                    {"emulated_cpu", cpu != nullptr && *cpu ? json::Value(ffi::String(cpu)) : json::Value(nullptr)},
                    {"counts_instructions", g_counts_instructions}};
  return json::Stringify(info);
}
void RegisterServerFunctions() {
  // tvm.rpc.server.upload/download/remove come with the runtime (rpc_server_env.cc) and
  // resolve names through tvm.rpc.server.workpath.
  auto def = [](const char* name, ffi::Function f) { ffi::Function::SetGlobal(name, f, true); };
  def("tvm.rpc.server.workpath", ffi::Function::FromTyped([](std::string name) { return WorkPath(name); }));
  def("tvm.rpc.server.load_module", ffi::Function::FromTyped([](std::string name) {
        std::string path = WorkPath(name);
        if (access(path.c_str(), R_OK) != 0) TVM_FFI_THROW(ValueError) << "no file '" << name << "' in the workdir; upload it first";
        if (path.size() < 3 || path.compare(path.size() - 3, 3, ".so") != 0)
          TVM_FFI_THROW(ValueError) << "the agent loads shared libraries (.so) only, not '" << name << "'";
        Log("load_module " + path);
        return ffi::Module::LoadFromFile(path);
      }));
  def("tvm.rpc.server.listdir", ffi::Function::FromTyped([](std::string name) {
        std::string dir = name.empty() || name == "." ? g_workdir : WorkPath(name), names;
        DIR* d = opendir(dir.c_str());
        if (d == nullptr) TVM_FFI_THROW(ValueError) << "cannot list '" << name << "': " << std::strerror(errno);
        errno = 0;
        while (dirent* e = readdir(d)) {
          std::string entry = e->d_name;
          if (entry != "." && entry != "..") names += (names.empty() ? "" : ",") + entry;
        }
        int error = errno;
        closedir(d);
        if (error != 0) TVM_FFI_THROW(RuntimeError) << "cannot list '" << name << "': " << std::strerror(error);
        return names;
      }));
  def("edgec.device.info", ffi::Function::FromTyped([]() { return DeviceInfo(); }));
  def("edgec.profile.register_kernel",
      ffi::Function::FromTyped([](ffi::Module module, std::string kernel, std::string global_name) {
        ffi::Optional<ffi::Function> f = module->GetFunction(kernel, /*query_imports=*/true);
        if (!f.has_value()) TVM_FFI_THROW(ValueError) << "no kernel '" << kernel << "' in the module or its imports";
        ffi::Function::SetGlobal(global_name, *f, true);
      }));
  def("edgec.device.count_evaluator",
      ffi::Function::FromTyped([](ffi::Optional<ffi::Module> module, std::string name, int number, int repeat) {
        return CountEvaluator(module, name, number, repeat);
      }));
}

// ---- tracker client (tvm/rpc/server.py _listen_loop) ------------------------------------
struct Tracker {
  std::string host, key;
  int port = 0, fd = -1, server_port = 0;
  std::string matchkey;
  std::set<std::string> old_keys;
  int unmatched_periods = 0;
  std::mt19937_64 rng{static_cast<uint64_t>(Now() * 1e9) ^ (static_cast<uint64_t>(getpid()) << 32)};

  bool SendJSON(const json::Value& value) {
    std::string text = json::Stringify(value);
    int32_t size = static_cast<int32_t>(text.size());
    return SendAll(fd, &size, 4) && SendAll(fd, text.data(), text.size());
  }
  bool RecvJSON(json::Value* value) {
    int32_t size;
    if (!RecvAll(fd, &size, 4) || size <= 0 || size > (1 << 20)) return false;
    std::string text(size, '\0');
    if (!RecvAll(fd, &text[0], size)) return false;
    ffi::String error;
    *value = json::Parse(text, &error);
    return error.empty();
  }
  bool Call(const json::Value& request, json::Value* reply) { return SendJSON(request) && RecvJSON(reply); }
  bool CallOk(const json::Value& request) {
    json::Value reply;
    return Call(request, &reply) && reply.as<int64_t>() == int64_t{kSuccess};
  }
  // Offer this agent under a new random matchkey ("KEY:0.123..."), as the Python server does.
  bool Put() {
    do {
      matchkey = key + ":" + std::to_string(std::uniform_real_distribution<double>(0, 1)(rng));
    } while (old_keys.count(matchkey));
    old_keys.insert(matchkey);
    unmatched_periods = 0;
    return CallOk(json::Array{int64_t{kPut}, ffi::String(key), json::Array{int64_t{server_port}, ffi::String(matchkey)}, nullptr});
  }
  bool Register() {
    Drop();
    fd = Connect(host, port);
    if (fd < 0) return false;
    SetTimeouts(fd, 30);
    int32_t magic = kTrackerMagic;
    if (!SendAll(fd, &magic, 4) || !RecvAll(fd, &magic, 4) || magic != kTrackerMagic) return Drop();
    json::Object info{{"key", ffi::String("server:" + key)}, {"addr", json::Array{nullptr, int64_t{server_port}}}};
    if (!CallOk(json::Array{int64_t{kUpdateInfo}, info}) || !Put()) return Drop();
    Log("registered with tracker " + host + ":" + std::to_string(port) + " as '" + key + "'");
    return true;
  }
  // Every idle ping period: if the tracker handed our matchkey to a client that never came,
  // offer a fresh one (server.py regenerates after about 8 s).
  bool Ping(double period) {
    json::Value reply;
    if (!Call(json::Array{int64_t{kGetPendingMatchkeys}}, &reply)) return Drop();
    bool pending = false;
    if (auto keys = reply.as<json::Array>()) {
      for (const auto& k : *keys) pending |= k.as<ffi::String>().value_or("") == matchkey;
    }
    unmatched_periods = pending ? 0 : unmatched_periods + 1;
    if (unmatched_periods * period > 4 + period) return Put() || Drop();
    return true;
  }
  bool Drop() {
    if (fd >= 0) close(fd);
    fd = -1;
    return false;
  }
};

// ---- serving -----------------------------------------------------------------------------
// Reads the client's [magic, keylen, key "client:KEY [-timeout=S]"]; answers as server.py does.
bool Handshake(int conn, const std::string& expected, const std::string& also_ok, const std::string& key,
               double* timeout) {
  int32_t magic = 0, size = 0;
  if (!RecvAll(conn, &magic, 4) || magic != kRPCMagic || !RecvAll(conn, &size, 4) || size < 0 || size > 4096)
    return false;
  std::string client_key(size, '\0');
  if (!RecvAll(conn, &client_key[0], size)) return false;
  std::string head = client_key.substr(0, client_key.find(' '));
  if (head != expected && head != also_ok) {
    int32_t mismatch = kRPCMagic + 2;
    SendAll(conn, &mismatch, 4);
    Log("refused a client with key '" + head + "'");
    return false;
  }
  size_t at = client_key.find(" -timeout=");
  *timeout = at == std::string::npos ? 0 : std::atof(client_key.c_str() + at + 10);
  std::string server_key = "server:" + key;
  int32_t ok = kRPCMagic, len = static_cast<int32_t>(server_key.size());
  return SendAll(conn, &ok, 4) && SendAll(conn, &len, 4) && SendAll(conn, server_key.data(), len);
}

void ServeSession(int conn, double timeout, int listen_fd, int tracker_fd) {
  pid_t pid = fork();
  if (pid == 0) {
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    close(listen_fd);
    if (tracker_fd >= 0) close(tracker_fd);
    int rc = chdir(g_workdir.c_str()) == 0 ? 0 : 1;
    try {
      ffi::Function::GetGlobalRequired("rpc.ServerLoop")(static_cast<int64_t>(conn));
    } catch (const std::exception& e) {
      Log(std::string("session ended with an error: ") + e.what());
      rc = 1;
    }
    std::fflush(nullptr);
    _exit(rc);
  }
  if (pid < 0) return Log(std::string("fork failed: ") + std::strerror(errno));
  double start = Now(), stopping = 0;
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (g_stop && stopping == 0) kill(pid, SIGTERM), stopping = Now();
    if (stopping != 0 && Now() - stopping > 2) kill(pid, SIGKILL);
    if (!g_stop && timeout > 0 && Now() - start > timeout) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      char seconds[32];
      std::snprintf(seconds, sizeof(seconds), "%g", timeout);
      Log(std::string("session timed out after ") + seconds + " s");
      std::string msg = std::string("RPCSessionTimeoutError: Your ") + seconds +
                        "s session has expired, try to increase the \"session_timeout\" value.";
      try {  // tell the client why, as server.py does; it may be gone already
        ffi::Function::GetGlobalRequired("rpc.ReturnException")(static_cast<int64_t>(conn), msg);
      } catch (const std::exception&) {
      }
      break;
    }
    usleep(20000);
  }
}

void RemoveTree(const std::string& dir) {
  nftw(dir.c_str(), [](const char* path, const struct stat*, int, FTW*) { return remove(path); }, 16,
       FTW_DEPTH | FTW_PHYS);
}

const char* kUsage =
    "usage: edgec-agent [--host H] [--port P] [--port-end E] [--tracker HOST:PORT] [--key KEY]\n"
    "                   [--workdir DIR] [--help] [--version]\n"
    "TVM RPC server for edgec (bench/profile over --rpc or --tracker).\n"
    "  --host H       address to listen on (default 127.0.0.1; RPC runs uploaded code: keep it private)\n"
    "  --port P       port (default 9090); with --port-end E the first free one in [P, E)\n"
    "  --tracker H:P  register with a TVM RPC tracker (python -m tvm.exec.rpc_tracker)\n"
    "  --key KEY      device key reported to the tracker (default edgec)\n"
    "  --workdir DIR  where uploaded files go (default: a fresh temp dir, removed at exit)\n";
}  // namespace

int main(int argc, char** argv) {
  std::string host = "127.0.0.1", tracker, key = "edgec", workdir;
  int port = 9090, port_end = 0;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) std::fprintf(stderr, "edgec-agent: %s needs a value\n%s", arg.c_str(), kUsage), std::exit(2);
      return argv[++i];
    };
    if (arg == "--help" || arg == "-h") return std::printf("%s", kUsage), 0;
    if (arg == "--version") return std::printf("edgec-agent %s (%s, TVM runtime %s)\n", kVersion, kCpuArch, EDGEC_TVM_VERSION), 0;
    if (arg == "--host") host = value();
    else if (arg == "--port") port = std::atoi(value().c_str());
    else if (arg == "--port-end") port_end = std::atoi(value().c_str());
    else if (arg == "--tracker") tracker = value();
    else if (arg == "--key") key = value();
    else if (arg == "--workdir") workdir = value();
    else return std::fprintf(stderr, "edgec-agent: unknown option %s\n%s", arg.c_str(), kUsage), 2;
  }
  if (port <= 0 || port > 65535 || (port_end != 0 && port_end <= port))
    return std::fprintf(stderr, "edgec-agent: bad --port/--port-end\n"), 2;
  Tracker trk;
  if (!tracker.empty()) {
    size_t colon = tracker.rfind(':');
    if (colon == std::string::npos || colon == 0) return std::fprintf(stderr, "edgec-agent: --tracker wants HOST:PORT\n"), 2;
    trk.host = tracker.substr(0, colon), trk.port = std::atoi(tracker.c_str() + colon + 1), trk.key = key;
  }
  if (host != "127.0.0.1" && host != "localhost" && host != "::1")
    Log("warning: listening on " + host + ": whoever reaches this port can run code here (RPC runs uploaded code)");

  bool own_workdir = workdir.empty();
  if (own_workdir) {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/edgec-agent-XXXXXX";
    if (mkdtemp(&pattern[0]) == nullptr) return Log("cannot create a temp workdir: " + std::string(std::strerror(errno))), 1;
    workdir = pattern;
  } else if (mkdir(workdir.c_str(), 0700) != 0 && errno != EEXIST) {
    return Log("cannot create workdir " + workdir + ": " + std::strerror(errno)), 1;
  }
  char resolved[PATH_MAX];
  g_workdir = realpath(workdir.c_str(), resolved) ? resolved : workdir;
  Counts probe;
  g_counts_instructions = ReadCounts(&probe);
  RegisterServerFunctions();

  int listen_fd = -1;
  for (int p = port; listen_fd < 0 && p < (port_end ? port_end : port + 1); ++p) {
    if ((listen_fd = Listen(host, p)) >= 0) port = p;
  }
  int rc = 0;
  if (listen_fd < 0) {
    Log("cannot listen on " + host + ":" + std::to_string(port) + (port_end ? "-" + std::to_string(port_end) : "") +
        ": " + std::strerror(errno));
    rc = 1;
  } else {
    struct sigaction sa {};
    sa.sa_handler = [](int) { g_stop = 1; };  // no SA_RESTART: blocking calls return EINTR
    sigaction(SIGTERM, &sa, nullptr);
    sigaction(SIGINT, &sa, nullptr);
    signal(SIGPIPE, SIG_IGN);
    std::printf("edgec-agent %s listening on %s:%d (workdir %s)\n", kVersion, host.c_str(), port, g_workdir.c_str());
    std::fflush(stdout);
    trk.server_port = port;
    const double ping_period = 2.0;
    double next_register = 0;
    while (!g_stop) {
      if (!trk.host.empty() && trk.fd < 0 && Now() >= next_register && !trk.Register()) {
        Log("tracker " + tracker + " unreachable or not a TVM tracker; retrying in 5 s");
        next_register = Now() + 5;
      }
      pollfd pfd{listen_fd, POLLIN, 0};
      int ready = poll(&pfd, 1, static_cast<int>(ping_period * 1000));
      if (ready == 0 && trk.fd >= 0) trk.Ping(ping_period);
      if (ready <= 0) continue;
      int conn = accept(listen_fd, nullptr, nullptr);
      if (conn < 0) continue;
      SetTimeouts(conn, 10);  // a silent peer cannot hold the agent in the handshake
      double timeout = 0;
      // Direct connections may name no key or ours; through a tracker only the matchkey it handed out.
      std::string expected = "client:" + (trk.host.empty() ? key : trk.matchkey);
      std::string also_ok = trk.host.empty() ? "client:" : expected;
      if ((trk.host.empty() || trk.fd >= 0) && Handshake(conn, expected, also_ok, key, &timeout)) {
        SetTimeouts(conn, 0);
        ServeSession(conn, timeout, listen_fd, trk.fd);
        if (trk.fd >= 0 && !trk.Put()) trk.Drop();  // offer the board again
      }
      close(conn);
    }
    close(listen_fd);
    trk.Drop();
    Log("stopped");
  }
  if (own_workdir) RemoveTree(g_workdir);
  return rc;
}
