/* edgec's parallel launch, linked into every CPU lib.so in place of TVM's thread pool.

   TVM's generated code runs a parallel loop by calling the function pointer
   __TVMBackendParallelLaunch(lambda, data, 0); the lambda runs share `task_id` of
   `num_task` equal shares of the loop. TVM's own pool gives share i to thread i and the
   caller waits until every thread has done its share: one worker that is late to wake
   (its CPU busy with another process, or the VM's vCPU not running) stalls every kernel,
   100 ms and more per MobileNetV2 inference on a loaded 2-CPU machine.

   Here the shares are claimed: the caller and the workers take open shares from one word
   (thread i its own share first, then any other still open) until none is left, and the caller
   waits only for shares a worker has started. A worker that wakes late finds its share done by the caller, so a launch never
   waits for a thread that is not running. Workers spin for 2 ms after each launch (the next
   kernel follows within microseconds; EDGEC_THREAD_POOL_SPIN_US sets another time at the first
   launch), then sleep on a condition variable. After 50 us of that spin they yield the CPU at
   each turn: a process that shares the CPUs runs in the pauses between kernels instead of
   preempting a worker inside a share (MobileNetV2, two threads beside one busy process,
   bench/thread_pool.py --busy 1: median 7.2 -> 5.3 ms over 8 processes, p90 11.8 -> 5.7).

   This file defines __TVMBackendParallelLaunch with hidden visibility: the linker keeps
   this definition over the generated code's weak one and leaves the symbol out of lib.so's
   dynamic table, so TVM's loader, which fills the pointer by name, cannot replace it.
   Kernels that use TVM's parallel barrier need every share running at once; lib.so is
   linked without this file when its objects reference __TVMBackendParallelBarrier
   (targets/thread_pool.py).

   Threads: TVM_NUM_THREADS when it is a positive number at the first launch, else the
   CPUs this process may run on; one thread runs every launch in the caller, with no worker.
   EDGEC_THREAD_POOL=tvm at the first launch hands every launch to TVM's runtime instead
   (its TVMBackendParallelLaunch, found in the process: TVM's pool as before edgec had its own).

   A worker asleep for 2 s ends (the next launch starts it again); unloading lib.so stops and
   joins the workers first (a destructor), so no thread runs code that is no longer mapped. */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* glibc 2.34 moved these from libpthread/libdl into libc under new versions; bound to their
   first ones, lib.so still loads with an older glibc (where the process has libpthread and libdl
   already: TVM's runtime links both). A toolchain's glibc before 2.34 has only those versions. */
#if defined(__GLIBC__) && __GLIBC_PREREQ(2, 34)
#if defined(__x86_64__)
#define FIRST_GLIBC "GLIBC_2.2.5"
#elif defined(__aarch64__)
#define FIRST_GLIBC "GLIBC_2.17"
#elif defined(__arm__)
#define FIRST_GLIBC "GLIBC_2.4"
#endif
#endif
#ifdef FIRST_GLIBC
__asm__(".symver pthread_create, pthread_create@" FIRST_GLIBC);
__asm__(".symver pthread_join, pthread_join@" FIRST_GLIBC);
__asm__(".symver pthread_once, pthread_once@" FIRST_GLIBC);
__asm__(".symver dlsym, dlsym@" FIRST_GLIBC);
#endif

typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
typedef int (*Launch)(FTVMParallelLambda lambda, void* cdata, int num_task);

#define MAX_THREADS 32 /* shares are bits of one word */
#define SPIN_US 2000    /* a worker's spin after a launch before it sleeps, by default: 2 ms */
#define PAUSE_NS 50000L /* of which the first 50 us with `pause`, the rest yielding the CPU */
#define IDLE_EXIT_S 2   /* a worker asleep this long ends; the next launch starts it again */

enum { ABSENT, RUNNING, ENDED }; /* a worker's life: ENDED threads wait to be joined */

/* One launch at a time (the caller holds `launching`). `state` packs the launch's share count
   (bits 32-39) and a bit per share claimed (bits 0-31): one compare-and-swap claims a share. A
   share left open belongs to the launch in progress (the caller claims what is left before it
   waits), so a claim never lands in an older launch. Thread i (the caller is 0) claims share i
   first, as TVM's pool would run it: the rows a thread wrote in one kernel are in its core's
   cache for the next; then any share still open. */
static struct {
  _Alignas(64) _Atomic uint64_t state;
  FTVMParallelLambda lambda; /* written before `state` is published; read after a claim */
  void* cdata;
  int num_task;
  _Alignas(64) atomic_int finished; /* shares done: the caller waits on it, not on `state` */
  atomic_int failed;
  _Alignas(64) atomic_int sleepers;
  int threads; /* configured once, at the first launch */
  int64_t spin_ns;
  Launch tvm; /* EDGEC_THREAD_POOL=tvm: TVM's launch */
  atomic_int stopping; /* lib.so is being unloaded (or the process ends): workers end */
  atomic_int life[MAX_THREADS];
  pthread_t thread[MAX_THREADS];
  pthread_mutex_t launching;
  pthread_mutex_t lock; /* guards the condition variable only */
  pthread_cond_t wake;
} pool = {.launching = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static pthread_once_t configured = PTHREAD_ONCE_INIT;
static _Thread_local int in_launch; /* a launch from inside a share runs in its thread */

static uint32_t open_shares(uint64_t state) {
  int shares = (int)((state >> 32) & 0xff);
  uint32_t all = shares >= 32 ? 0xffffffffu : (1u << shares) - 1;
  return all & ~(uint32_t)state;
}

static void pause_cpu(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__) || (defined(__ARM_ARCH) && __ARM_ARCH >= 7)
  __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Claim and run open shares, share `own` first, until none is open. */
static void run_shares(int own) {
  uint64_t state = atomic_load_explicit(&pool.state, memory_order_acquire);
  for (uint32_t open; (open = open_shares(state)) != 0;) {
    int share = own < 32 && (open >> own & 1) ? own : __builtin_ctz(open);
    if (!atomic_compare_exchange_weak_explicit(&pool.state, &state, state | (1ull << share),
                                               memory_order_acq_rel, memory_order_acquire))
      continue; /* `state` now holds the current value */
    /* a claimed share keeps the launch's fields in place until `finished` counts it */
    TVMParallelGroupEnv env = {NULL, pool.num_task};
    in_launch = 1;
    if (pool.lambda(share, &env, pool.cdata) != 0) atomic_store(&pool.failed, 1);
    in_launch = 0;
    atomic_fetch_add_explicit(&pool.finished, 1, memory_order_release);
    state = atomic_load_explicit(&pool.state, memory_order_acquire);
  }
}

/* 1 when a launch has open shares; 0 when this worker should end: lib.so is unloading, or no
   launch came for IDLE_EXIT_S (a process that loads many lib.so files, as MetaSchedule's runner
   does, keeps no idle threads of each). */
static int await_launch(void) {
  const int64_t start = now_ns(), spin_until = start + pool.spin_ns;
  const int64_t yield_after = start + (pool.spin_ns < PAUSE_NS ? pool.spin_ns : PAUSE_NS);
  int yielding = 0;
  for (unsigned i = 1;; ++i) {
    if (open_shares(atomic_load_explicit(&pool.state, memory_order_acquire))) return 1;
    if (atomic_load_explicit(&pool.stopping, memory_order_relaxed)) return 0;
    if (yielding)
      sched_yield(); /* another process's thread waiting for this CPU runs now, not during a share */
    else
      pause_cpu();
    if ((yielding || (i & 255) == 0) && now_ns() > yield_after) yielding = 1;
    if (yielding && now_ns() > spin_until) break;
  }
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until); /* the condition variable's clock */
  until.tv_sec += IDLE_EXIT_S;
  int timed_out = 0;
  pthread_mutex_lock(&pool.lock);
  atomic_fetch_add(&pool.sleepers, 1); /* seq_cst: the caller reads it after publishing */
  while (!open_shares(atomic_load(&pool.state)) && !atomic_load(&pool.stopping) && !timed_out)
    timed_out = pthread_cond_timedwait(&pool.wake, &pool.lock, &until) == ETIMEDOUT;
  atomic_fetch_sub(&pool.sleepers, 1);
  const int open = open_shares(atomic_load(&pool.state)) != 0 && !atomic_load(&pool.stopping);
  pthread_mutex_unlock(&pool.lock);
  return open;
}

static void* worker(void* index) {
  const int own = (int)(intptr_t)index;
  while (await_launch()) run_shares(own);
  atomic_store(&pool.life[own], ENDED); /* joined by the next launch, or when lib.so unloads */
  return NULL;
}

static int thread_count(void) {
  const char* given = getenv("TVM_NUM_THREADS");
  long threads = given ? strtol(given, NULL, 10) : 0;
  if (threads <= 0) {
    cpu_set_t cpus;
    threads = sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus) : sysconf(_SC_NPROCESSORS_ONLN);
  }
  return threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : (int)threads;
}

/* A forked child has the pool's memory but none of its workers, and maybe a launch of the
   parent's in progress: it forgets both and starts workers of its own. */
static void forget_workers(void) {
  atomic_store(&pool.state, 0);
  atomic_store(&pool.finished, 0);
  atomic_store(&pool.failed, 0);
  atomic_store(&pool.sleepers, 0);
  for (int i = 0; i < MAX_THREADS; ++i) atomic_store(&pool.life[i], ABSENT);
  pthread_mutex_init(&pool.launching, NULL);
  pthread_mutex_init(&pool.lock, NULL);
  pthread_cond_init(&pool.wake, NULL);
}

static void configure(void) {
  pool.threads = thread_count();
  const char* spin = getenv("EDGEC_THREAD_POOL_SPIN_US");
  pool.spin_ns = (spin && *spin ? strtol(spin, NULL, 10) : SPIN_US) * (int64_t)1000;
  const char* choice = getenv("EDGEC_THREAD_POOL");
  if (choice && strcmp(choice, "tvm") == 0) {
    pool.tvm = (Launch)dlsym(RTLD_DEFAULT, "TVMBackendParallelLaunch");
    if (!pool.tvm) fprintf(stderr, "edgec: EDGEC_THREAD_POOL=tvm, but TVM's runtime is not in this process: edgec's pool runs\n");
  }
  pthread_atfork(NULL, NULL, forget_workers);
}

/* Workers 1 .. threads-1, each started again after it ended (under `launching`). */
static void keep_workers(void) {
  for (int i = 1; i < pool.threads; ++i) {
    int life = atomic_load(&pool.life[i]);
    if (life == ENDED) pthread_join(pool.thread[i], NULL), life = ABSENT;
    if (life == ABSENT) {
      atomic_store(&pool.life[i], RUNNING);
      if (pthread_create(&pool.thread[i], NULL, worker, (void*)(intptr_t)i) != 0)
        atomic_store(&pool.life[i], ABSENT); /* fewer workers: still correct */
    }
  }
}

/* lib.so is unloading (dlclose) or the process is ending: no worker may run its code after this. */
__attribute__((destructor)) static void stop_workers(void) {
  atomic_store(&pool.stopping, 1);
  pthread_mutex_lock(&pool.lock);
  pthread_cond_broadcast(&pool.wake);
  pthread_mutex_unlock(&pool.lock);
  for (int i = 1; i < MAX_THREADS; ++i)
    if (atomic_load(&pool.life[i]) != ABSENT) pthread_join(pool.thread[i], NULL), atomic_store(&pool.life[i], ABSENT);
}

static int run_alone(FTVMParallelLambda lambda, void* cdata) {
  TVMParallelGroupEnv env = {NULL, 1};
  return lambda(0, &env, cdata) != 0 ? -1 : 0;
}

static int launch(FTVMParallelLambda lambda, void* cdata, int num_task) {
  if (in_launch) return run_alone(lambda, cdata);
  pthread_once(&configured, configure);
  if (pool.tvm) return pool.tvm(lambda, cdata, num_task);
  if (num_task <= 0) num_task = pool.threads;
  if (num_task > MAX_THREADS) num_task = MAX_THREADS;
  if (num_task == 1 || pool.threads == 1) return run_alone(lambda, cdata);
  pthread_mutex_lock(&pool.launching); /* launches from several threads take turns */
  keep_workers();
  pool.lambda = lambda, pool.cdata = cdata, pool.num_task = num_task;
  atomic_store_explicit(&pool.finished, 0, memory_order_relaxed);
  atomic_store_explicit(&pool.failed, 0, memory_order_relaxed);
  atomic_store(&pool.state, (uint64_t)num_task << 32); /* seq_cst: published, every share open */
  if (atomic_load(&pool.sleepers) > 0) {
    pthread_mutex_lock(&pool.lock);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
  }
  run_shares(0);
  /* every share is claimed: wait for those a worker is running */
  for (unsigned i = 1; atomic_load_explicit(&pool.finished, memory_order_acquire) < num_task; ++i) {
    if ((i & 1023) == 0)
      sched_yield(); /* a worker that shares this CPU gets to finish */
    else
      pause_cpu();
  }
  int failed = atomic_load(&pool.failed);
  pthread_mutex_unlock(&pool.launching);
  return failed ? -1 : 0;
}

__attribute__((visibility("hidden"))) int (*__TVMBackendParallelLaunch)(FTVMParallelLambda, void*, int) = launch;
