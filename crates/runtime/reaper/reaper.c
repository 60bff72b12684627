/*
 * Pid 1 of a sandbox forked from a zygote: the zygote spawns it in the session's new pid
 * namespace just before it forks the session's program into it. It reaps the orphans
 * re-parented to it and holds nothing: no descriptor, no capability, not dumpable, its hard
 * limits as low as reaping allows. The zygote kills it when the program ends, which ends the
 * namespace.
 *
 * Why C and not the ampoule binary: one of these starts for every session, executed twice
 * (see below). The ampoule binary is a 23 MB position-independent executable whose dynamic
 * loading and relocation cost ~1.3 ms of CPU per exec, ~10 % of the CPU of a burst of new
 * sessions; this program, linked statically, needs neither. Built by build.rs (gcc, static
 * glibc), embedded in the ampoule binary and executed from a sealed memfd.
 */
#define _GNU_SOURCE
#include <linux/capability.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#define SEALED "--sealed"

static void limit(int resource, rlim_t value) {
    struct rlimit r = {value, value};
    setrlimit(resource, &r);
}

static void drop_bounding(void) {
    for (int cap = 0; cap <= 63; cap++) prctl(PR_CAPBSET_DROP, cap, 0, 0, 0);
}

int main(int argc, char **argv) {
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    /* Only /dev/null on stdio, so only the program holds the output pipes. */
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
        for (int fd = 0; fd < 3; fd++) dup2(null, fd);
    }
    syscall(SYS_close_range, 3U, ~0U, 0U);
    /* Hard limits the code (the same host uid) cannot raise again. */
    limit(RLIMIT_FSIZE, 0);
    limit(RLIMIT_CORE, 0);
    limit(RLIMIT_NOFILE, 8);
    limit(RLIMIT_CPU, 60);
    /* A user namespace of its own, with nothing mapped, then a fresh image in it: the
     * namespace an image was executed in decides who owns the /proc entries of a process
     * that is not dumpable (its root, here nobody the code can be), and who holds
     * capabilities. */
    int sealed = argc > 1 && strcmp(argv[1], SEALED) == 0;
    if (!sealed && unshare(CLONE_NEWUSER) == 0) {
        /* Every capability of the new namespace is ours until the exec: empty the bounding
         * set now, while that is allowed (it survives the exec; afterwards we hold none). */
        drop_bounding();
        char *args[] = {"reaper", SEALED, NULL};
        char *env[] = {NULL};
        execve("/proc/self/exe", args, env);
    }
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    /* Every capability, in every set (best effort: after the sealed exec there are none). */
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    drop_bounding();
    struct __user_cap_header_struct head = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    syscall(SYS_capset, &head, data);
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0) {
        }
        int sig;
        sigwait(&chld, &sig);
    }
}
