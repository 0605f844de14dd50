/* Checks of targets/thread_pool.c, compiled with it (it is #included: the checks reach the
   pool's state; IDLE_EXIT_S, 2 s, is waited out once) and run with TVM_NUM_THREADS=2 by tests/targets/test_thread_pool.py, on this
   machine and under qemu-user for the ARM presets. Prints "ok" and exits 0, or names the
   failed check and exits 1. */

#include "thread_pool.c"

#include <stdio.h>
#include <sys/wait.h>

#define CHECK(what, condition)                     \
  do {                                             \
    if (!(condition)) {                            \
      fprintf(stderr, "failed: %s\n", what);       \
      exit(1);                                     \
    }                                              \
  } while (0)

static atomic_int runs[MAX_THREADS];
static pthread_t runner[MAX_THREADS];
static atomic_int shares_seen; /* the env's num_task of the last share run */

static void forget_runs(void) {
  for (int i = 0; i < MAX_THREADS; ++i) atomic_store(&runs[i], 0);
}

static int record(int share, TVMParallelGroupEnv* env, void* data) {
  (void)data;
  runner[share] = pthread_self();
  atomic_store(&shares_seen, env->num_task);
  atomic_fetch_add(&runs[share], 1);
  return 0;
}

/* share 0 (the caller's) waits until a worker has started share 1: a worker ran a share */
static int wait_for_worker(int share, TVMParallelGroupEnv* env, void* data) {
  record(share, env, data);
  if (share == 0) {
    int64_t give_up = now_ns() + 10000000000LL;
    while (atomic_load(&runs[1]) == 0 && now_ns() < give_up) sched_yield();
  }
  return 0;
}

static int fail_share_1(int share, TVMParallelGroupEnv* env, void* data) {
  record(share, env, data);
  return share == 1 ? -1 : 0;
}

static int nested(int share, TVMParallelGroupEnv* env, void* data) {
  (void)env, (void)data;
  if (share != 0) return 0; /* share 0 checks; the other runs beside it and touches nothing */
  forget_runs();
  int done = launch(record, NULL, 0); /* inside a share: runs alone, in this thread */
  int alone = atomic_load(&runs[0]) == 1 && atomic_load(&runs[1]) == 0 && atomic_load(&shares_seen) == 1;
  return done == 0 && alone && pthread_equal(runner[0], pthread_self()) ? 0 : -1;
}

/* shares of one launch count into their own array (cdata): launches from two threads at once */
static int count_share(int share, TVMParallelGroupEnv* env, void* data) {
  (void)env;
  atomic_fetch_add(&((atomic_int*)data)[share], 1);
  return 0;
}

static void* launch_often(void* unused) {
  (void)unused;
  for (int round = 0; round < 500; ++round) {
    atomic_int counts[MAX_THREADS];
    for (int i = 0; i < MAX_THREADS; ++i) atomic_init(&counts[i], 0);
    int shares = 1 + round % 40; /* past MAX_THREADS too: capped at it */
    if (launch(count_share, counts, shares) != 0) return (void*)1;
    int ran = shares > MAX_THREADS ? MAX_THREADS : shares;
    for (int i = 0; i < MAX_THREADS; ++i)
      if (atomic_load(&counts[i]) != (i < ran ? 1 : 0)) return (void*)1;
  }
  return NULL;
}

static void wait_until_asleep(void) {
  int64_t give_up = now_ns() + 10000000000LL;
  while (atomic_load(&pool.sleepers) < 1 && now_ns() < give_up) sched_yield();
  CHECK("the worker sleeps once no launch comes (after its spin)", atomic_load(&pool.sleepers) == 1);
}

int main(void) {
  forget_runs();
  CHECK("a launch succeeds", launch(wait_for_worker, NULL, 0) == 0);
  CHECK("the pool runs TVM_NUM_THREADS=2 threads", pool.threads == 2 && atomic_load(&shares_seen) == 2);
  CHECK("each share ran once", atomic_load(&runs[0]) == 1 && atomic_load(&runs[1]) == 1);
  CHECK("a worker ran share 1", !pthread_equal(runner[1], pthread_self()));

  for (int round = 0; round < 2000; ++round) {
    forget_runs();
    CHECK("a launch of 5 shares succeeds", launch(record, NULL, 5) == 0);
    for (int share = 0; share < 5; ++share) CHECK("each of 5 shares ran once", atomic_load(&runs[share]) == 1);
  }

  /* A worker kept from waking: asleep, its wake-up withheld (the pool sees no sleeper) and its
     lock held, so not even a spurious wake-up lets it claim. The caller runs every share. */
  wait_until_asleep();
  pthread_mutex_lock(&pool.lock);
  atomic_store(&pool.sleepers, 0);
  forget_runs();
  CHECK("a launch beside a worker that does not wake succeeds", launch(record, NULL, 0) == 0);
  CHECK("the caller ran both shares",
        atomic_load(&runs[0]) == 1 && atomic_load(&runs[1]) == 1 && pthread_equal(runner[0], pthread_self()) &&
            pthread_equal(runner[1], pthread_self()));
  atomic_store(&pool.sleepers, 1); /* the worker still counts itself */
  pthread_mutex_unlock(&pool.lock);
  forget_runs();
  CHECK("the next launch succeeds", launch(wait_for_worker, NULL, 0) == 0);
  CHECK("... with a worker (woken, or started again) running share 1", !pthread_equal(runner[1], pthread_self()));

  pthread_t callers[2];
  for (int i = 0; i < 2; ++i) pthread_create(&callers[i], NULL, launch_often, NULL);
  for (int i = 0; i < 2; ++i) {
    void* wrong = NULL;
    pthread_join(callers[i], &wrong);
    CHECK("two threads launching at once: every share of every launch ran once", wrong == NULL);
  }

  /* a worker asleep for IDLE_EXIT_S ends; the next launch starts it again */
  int64_t give_up = now_ns() + 20000000000LL;
  while (atomic_load(&pool.life[1]) != ENDED && now_ns() < give_up) sched_yield();
  CHECK("an idle worker ends", atomic_load(&pool.life[1]) == ENDED);
  forget_runs();
  CHECK("a launch after the worker ended succeeds", launch(wait_for_worker, NULL, 0) == 0);
  CHECK("... with a new worker running share 1",
        atomic_load(&pool.life[1]) == RUNNING && !pthread_equal(runner[1], pthread_self()));

  CHECK("a failing share fails the launch", launch(fail_share_1, NULL, 0) == -1);
  CHECK("the next launch succeeds again", launch(record, NULL, 0) == 0);
  CHECK("a launch inside a share runs alone in its thread", launch(nested, NULL, 0) == 0);

  pid_t child = fork();
  if (child == 0) { /* the child has no workers: it starts its own */
    forget_runs();
    int done = launch(wait_for_worker, NULL, 0);
    _exit(done == 0 && atomic_load(&runs[1]) == 1 && !pthread_equal(runner[1], pthread_self()) ? 0 : 1);
  }
  int status = 0;
  CHECK("a forked child runs launches with workers of its own",
        waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0);
  puts("ok");
  return 0;
}
