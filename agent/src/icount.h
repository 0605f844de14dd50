/* How a program running under qemu-user asks edgec's instruction-counting plugin
 * (agent/plugin/icount.c) for its own instruction count: shared by the plugin (C, on
 * the host) and edgec-agent (C++, the guest). edgec/runtimes/icount.py holds the same
 * numbers for Python guests; tests/runtimes/test_icount.py checks that they agree.
 *
 * The guest fills a struct edgec_icount with .magic = EDGEC_ICOUNT_ASK and makes the
 * system call EDGEC_ICOUNT_SYSCALL(EDGEC_ICOUNT_ASK, &that_struct). No Linux kernel has
 * such a call: it returns -ENOSYS everywhere, under qemu too. But qemu hands every
 * system call to the plugin first, and the plugin answers by filling the struct in
 * the guest's memory, .magic = EDGEC_ICOUNT_ANSWER written last. On a real board, or
 * under qemu without the plugin, .magic stays EDGEC_ICOUNT_ASK: no counter.
 *
 * All fields are 64-bit, so the layout is the same for armv7, aarch64 and the host.
 */
#ifndef EDGEC_ICOUNT_H_
#define EDGEC_ICOUNT_H_

#include <stdint.h>

#define EDGEC_ICOUNT_SYSCALL 0xedc0      /* above every Linux syscall number, below ARM's private 0xf0000 range */
#define EDGEC_ICOUNT_ASK 0x45444743u     /* "EDGC" */
#define EDGEC_ICOUNT_ANSWER 0x49434e54u  /* "ICNT" */
/* Calls a count evaluator makes before it counts: the first does lazy initialisation, and
 * after it a Relax VM run still took a few hundred instructions more or fewer than the
 * steady runs that follow (the heap's state; measured on aarch64). */
#define EDGEC_ICOUNT_UNCOUNTED_CALLS 2

struct edgec_icount {
  uint64_t magic;       /* EDGEC_ICOUNT_ASK from the guest; EDGEC_ICOUNT_ANSWER once answered */
  uint64_t thread;      /* guest instructions this thread (qemu vCPU) executed so far */
  uint64_t all_threads; /* guest instructions all threads of this process tree executed so far */
  uint64_t vcpu;        /* qemu's vCPU index of the asking thread */
};

#endif /* EDGEC_ICOUNT_H_ */
