/* The part of QEMU's TCG plugin API (API version 1, as in QEMU 7.2) that edgec's
 * instruction counter uses, declared for edgec: Debian packages QEMU's binaries but
 * not its plugin header.
 *
 * A plugin is a shared library that qemu loads with `-plugin lib.so,key=value,...`.
 * It exports `qemu_plugin_version` (the API level it was written for) and
 * `qemu_plugin_install`; qemu calls the latter once, and the plugin registers
 * callbacks through the functions below, which the qemu executable itself exports
 * (so the plugin links with no library: its undefined symbols resolve in qemu).
 * Only Linux user-mode emulation (qemu-arm, qemu-aarch64) is used by edgec.
 */
#ifndef EDGEC_QEMU_PLUGIN_API_H_
#define EDGEC_QEMU_PLUGIN_API_H_

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define EDGEC_PLUGIN_EXPORT __attribute__((visibility("default")))

enum { EDGEC_QEMU_PLUGIN_API_VERSION = 1 };

typedef uint64_t qemu_plugin_id_t;

/* What qemu tells the plugin at install time (valid during qemu_plugin_install only). */
typedef struct qemu_info_t {
  const char *target_name; /* guest architecture: "arm", "aarch64", ... */
  struct {
    int min; /* oldest API level this qemu accepts */
    int cur; /* API level of this qemu */
  } version;
  bool system_emulation; /* false under qemu-user */
  union {
    struct {
      int smp_vcpus;
      int max_vcpus;
    } system; /* system emulation only */
  };
} qemu_info_t;

struct qemu_plugin_tb;   /* a translation block, during its translation callback */
struct qemu_plugin_insn; /* one guest instruction of such a block */

enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };

typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
typedef void (*qemu_plugin_vcpu_simple_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
/* Called on entry to every guest system call, before qemu carries it out: the number and
 * the first eight arguments, each widened to 64 bits (sign-extended on 32-bit guests). */
typedef void (*qemu_plugin_vcpu_syscall_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num,
                                              uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4,
                                              uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8);

/* The plugin's side. */
EDGEC_PLUGIN_EXPORT extern int qemu_plugin_version;
EDGEC_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv);

/* qemu's side. */
void qemu_plugin_register_vcpu_init_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_simple_cb_t cb);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
/* During a translation callback: call `cb(vcpu_index, userdata)` each time the block runs. */
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, qemu_plugin_vcpu_udata_cb_t cb,
                                          enum qemu_plugin_cb_flags flags, void *userdata);
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_syscall_cb_t cb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t index);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn); /* guest address */
void *qemu_plugin_insn_haddr(const struct qemu_plugin_insn *insn);    /* where qemu read it */
/* Parse "on"/"off"/... of a `key=value` plugin argument; false if it is not a boolean. */
bool qemu_plugin_bool_parse(const char *name, const char *value, bool *result);

#endif /* EDGEC_QEMU_PLUGIN_API_H_ */
