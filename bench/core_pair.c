/* Can two threads run at full speed together on this machine, now?
 *
 * Each thread runs `steps` iterations of twelve independent vector multiply-adds (as a
 * convolution's register tile does: bound by the FMA units, not by latency). One thread alone,
 * then two at once; where the two at once take about twice as long per thread, they shared one
 * physical core (a hypervisor that placed both virtual CPUs on SMT siblings of one core, or a
 * guest CPU shared with another busy thread). bench/core_pair.py builds and loads this file. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

typedef float vec __attribute__((vector_size(32)));

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static volatile float sink, scale_value = 0.999f, shift_value = 0.001f;  /* volatile: nothing folds */

#define EACH(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

static void multiply_adds(long steps) {
  const vec scale = (vec){0} + scale_value, shift = (vec){0} + shift_value;
#define START(i) vec acc##i = (vec){0} + (1.0f + 0.01f * i); /* distinct: no chains merged */
  EACH(START)
  for (long s = 0; s < steps; s++) {
#define STEP(i) acc##i = acc##i * scale + shift;
    EACH(STEP)
  }
  vec total = (vec){0};
#define SUM(i) total += acc##i;
  EACH(SUM)
  sink = total[0] + total[7];
}

static atomic_int go, done;
static long worker_steps;
static double worker_seconds;

static void *worker(void *unused) {
  (void)unused;
  int seen = 0;
  for (;;) {
    int round;
    while ((round = atomic_load(&go)) == seen) {
    }
    if (round < 0) return NULL;
    seen = round;
    double start = now();
    multiply_adds(worker_steps);
    worker_seconds = now() - start;
    atomic_fetch_add(&done, 1);
  }
}

static int by_value(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* seconds[0]: median time of one thread alone; seconds[1], seconds[2]: median times of the
 * calling thread and of a second thread running at once. Returns 0, or -1 if no thread started. */
int core_pair_seconds(long steps, int rounds, double *seconds) {
  double *alone = malloc(3 * sizeof(double) * rounds), *first = alone + rounds, *second = first + rounds;
  pthread_t thread;
  if (alone == NULL) return -1;
  worker_steps = steps;
  atomic_store(&go, 0);
  if (pthread_create(&thread, NULL, worker, NULL) != 0) {
    free(alone);
    return -1;
  }
  for (int r = 0; r < rounds; r++) {
    double start = now();
    multiply_adds(steps);
    alone[r] = now() - start;
    atomic_store(&done, 0);
    atomic_store(&go, r + 1);
    start = now();
    multiply_adds(steps);
    first[r] = now() - start;
    while (atomic_load(&done) < 1) {
    }
    second[r] = worker_seconds;
  }
  atomic_store(&go, -1);
  pthread_join(thread, NULL);
  qsort(alone, rounds, sizeof(double), by_value);
  qsort(first, rounds, sizeof(double), by_value);
  qsort(second, rounds, sizeof(double), by_value);
  seconds[0] = alone[rounds / 2];
  seconds[1] = first[rounds / 2];
  seconds[2] = second[rounds / 2];
  free(alone);
  return 0;
}
