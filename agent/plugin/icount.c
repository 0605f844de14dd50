/* edgec's instruction counter: a QEMU TCG plugin for qemu-user (QEMU 7.2, plugin API 1).
 *
 *   qemu-arm -cpu cortex-a7 -plugin libedgec-icount.so[,report=on] ./program
 *
 * Counts the guest instructions each guest thread executes and tells a thread its
 * own count when it asks (see agent/src/icount.h for the request). Counts
 * are deterministic: the same code on the same data executes the same instructions,
 * whatever the host's load; that is what makes an emulated board a usable
 * performance instrument.
 *
 * How:
 * - Translation: every translation block (TB) qemu translates gets an execution
 *   callback carrying the TB's instruction count. A TB runs from its first to its
 *   last instruction unless an exception (a fault, a signal) cuts it short, which
 *   the code edgec measures does not do.
 * - Execution: the callback adds that count to the running vCPU's counter. Under
 *   qemu-user each guest thread is its own vCPU, so counters are per thread: a
 *   worker thread spinning while it waits for work (thread pools, OpenMP) does not
 *   change the count of the thread that runs the model. (One inline add into one
 *   global counter is cheaper, but it mixes all threads: measured here, spinning
 *   threads moved a model's count by 30% between runs.) Each counter is written by
 *   its own thread only; other threads read it (relaxed atomics) for the total.
 * - Answering: a request is the system call EDGEC_ICOUNT_SYSCALL(EDGEC_ICOUNT_ASK,
 *   guest_address). Plugin API 1 cannot write guest memory, but under qemu-user the
 *   guest's memory is the host's, shifted by one offset (qemu's guest_base): the
 *   host address qemu reads an instruction from, minus the instruction's guest
 *   address. The plugin learns that offset from translated instructions, checks it
 *   is the same for every block (otherwise it answers nothing and says so), and
 *   answers only a request whose struct already holds EDGEC_ICOUNT_ASK.
 *
 * Options: report=on prints every vCPU's count to stderr at exit.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "icount.h"
#include "qemu_plugin_api.h"

EDGEC_PLUGIN_EXPORT int qemu_plugin_version = EDGEC_QEMU_PLUGIN_API_VERSION;

enum { MAX_VCPUS = 4096 }; /* guest threads alive at once; more are counted in `overflow` */

/* One cache line per counter: threads add to their own counters without sharing lines. */
struct counter {
  uint64_t instructions;
  char pad[64 - sizeof(uint64_t)];
};
static struct counter counters[MAX_VCPUS] __attribute__((aligned(64)));
static uint64_t overflow;          /* vCPUs >= MAX_VCPUS, atomically */
static unsigned int vcpus_seen;    /* 1 + the highest vCPU index initialised */
static uint64_t address_mask;      /* guest pointer width: 32 or 64 bits */
static int base_state;             /* BASE_UNKNOWN, BASE_KNOWN or BASE_INCONSISTENT */
static uintptr_t guest_base;       /* host address of guest address 0 */
static int warned;                 /* the inconsistent-base warning was printed */
static int report_at_exit;

enum { BASE_UNKNOWN, BASE_KNOWN, BASE_INCONSISTENT };

/* To stderr: qemu's own log (qemu_plugin_outs) shows only with `-d plugin`. */
static void say(const char *text) {
  fputs(text, stderr);
  fflush(stderr);
}

static void on_tb_exec(unsigned int vcpu, void *instructions) {
  uint64_t n = (uint64_t)(uintptr_t)instructions;
  if (vcpu < MAX_VCPUS) {
    uint64_t *count = &counters[vcpu].instructions;  /* only this vCPU's thread writes it */
    __atomic_store_n(count, __atomic_load_n(count, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
  } else {
    __atomic_fetch_add(&overflow, n, __ATOMIC_RELAXED);
  }
}

/* Learn guest_base from one translated instruction: host address - guest address. */
static void note_base(const struct qemu_plugin_insn *insn) {
  const void *host = qemu_plugin_insn_haddr(insn);
  if (host == NULL) return;
  uintptr_t base = (uintptr_t)host - (uintptr_t)qemu_plugin_insn_vaddr(insn);
  int state = __atomic_load_n(&base_state, __ATOMIC_ACQUIRE);
  if (state == BASE_UNKNOWN) {
    /* Translations may run in several threads: the first one to get here sets the base. */
    static int claimed;
    if (!__atomic_exchange_n(&claimed, 1, __ATOMIC_ACQ_REL)) {
      guest_base = base;
      __atomic_store_n(&base_state, BASE_KNOWN, __ATOMIC_RELEASE);
      return;
    }
    while ((state = __atomic_load_n(&base_state, __ATOMIC_ACQUIRE)) == BASE_UNKNOWN) {
    }
  }
  if (state == BASE_KNOWN && base != guest_base) {
    __atomic_store_n(&base_state, BASE_INCONSISTENT, __ATOMIC_RELEASE);
  }
}

static void on_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  (void)id;
  size_t n = qemu_plugin_tb_n_insns(tb);
  if (n == 0) return;
  note_base(qemu_plugin_tb_get_insn(tb, 0));
  qemu_plugin_register_vcpu_tb_exec_cb(tb, on_tb_exec, QEMU_PLUGIN_CB_NO_REGS, (void *)(uintptr_t)n);
}

static void on_vcpu_init(qemu_plugin_id_t id, unsigned int vcpu) {
  (void)id;
  unsigned int seen = __atomic_load_n(&vcpus_seen, __ATOMIC_RELAXED);
  while (vcpu + 1 > seen && !__atomic_compare_exchange_n(&vcpus_seen, &seen, vcpu + 1, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

static uint64_t count_of(unsigned int vcpu) {
  return vcpu < MAX_VCPUS ? __atomic_load_n(&counters[vcpu].instructions, __ATOMIC_RELAXED) : 0;
}

static uint64_t count_of_all(void) {
  uint64_t total = __atomic_load_n(&overflow, __ATOMIC_RELAXED);
  unsigned int seen = __atomic_load_n(&vcpus_seen, __ATOMIC_RELAXED);
  for (unsigned int vcpu = 0; vcpu < seen && vcpu < MAX_VCPUS; ++vcpu) total += count_of(vcpu);
  return total;
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2, uint64_t a3,
                       uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8) {
  (void)id, (void)a3, (void)a4, (void)a5, (void)a6, (void)a7, (void)a8;
  if (num != EDGEC_ICOUNT_SYSCALL || (a1 & address_mask) != EDGEC_ICOUNT_ASK) return;
  on_vcpu_init(id, vcpu);  /* a vCPU created before the plugin was installed counts too */
  int state = __atomic_load_n(&base_state, __ATOMIC_ACQUIRE);
  if (state != BASE_KNOWN) {
    if (state == BASE_INCONSISTENT && !__atomic_exchange_n(&warned, 1, __ATOMIC_RELAXED)) {
      say("edgec-icount: translated blocks disagree on where guest memory lies; counts are not answered\n");
    }
    return;
  }
  struct edgec_icount *request = (struct edgec_icount *)(guest_base + (uintptr_t)(a2 & address_mask));
  if (request->magic != EDGEC_ICOUNT_ASK) return;
  request->thread = count_of(vcpu);
  request->all_threads = count_of_all();
  request->vcpu = vcpu;
  __atomic_store_n(&request->magic, (uint64_t)EDGEC_ICOUNT_ANSWER, __ATOMIC_RELEASE);
}

static void report(qemu_plugin_id_t id, void *userdata) {
  (void)id, (void)userdata;
  if (!report_at_exit) return;
  char line[128];
  unsigned int seen = __atomic_load_n(&vcpus_seen, __ATOMIC_RELAXED);
  for (unsigned int vcpu = 0; vcpu < seen && vcpu < MAX_VCPUS; ++vcpu) {
    snprintf(line, sizeof(line), "edgec-icount: vcpu %u: %" PRIu64 " instructions\n", vcpu, count_of(vcpu));
    say(line);
  }
  snprintf(line, sizeof(line), "edgec-icount: all threads: %" PRIu64 " instructions\n", count_of_all());
  say(line);
}

EDGEC_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
  if (info->system_emulation) {
    say("edgec-icount: needs qemu-user (qemu-arm, qemu-aarch64), not system emulation\n");
    return 1;
  }
  for (int i = 0; i < argc; ++i) {
    const char *equals = strchr(argv[i], '=');
    bool on = false;
    if (equals != NULL && strncmp(argv[i], "report", (size_t)(equals - argv[i])) == 0 && equals - argv[i] == 6 &&
        qemu_plugin_bool_parse("report", equals + 1, &on)) {
      report_at_exit = on;
    } else {
      char line[256];
      snprintf(line, sizeof(line), "edgec-icount: unknown option '%s' (known: report=on|off)\n", argv[i]);
      say(line);
      return 1;
    }
  }
  /* 32-bit guests' system call arguments arrive sign-extended to 64 bits. */
  address_mask = strcmp(info->target_name, "arm") == 0 || strcmp(info->target_name, "i386") == 0 ? 0xffffffffu : ~(uint64_t)0;
  qemu_plugin_register_vcpu_init_cb(id, on_vcpu_init);
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_trans);
  qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
  qemu_plugin_register_atexit_cb(id, report, NULL);
  return 0;
}
