/*
 * close_guard: restores, for the umockdev testbed, a guarantee the kernel gives.
 *
 * On Linux, one thread may close() a file descriptor while another is inside
 * read(), write() or ioctl() on it: the call in flight finishes or fails with
 * EBADF, and the process goes on. umockdev 0.17.16's preload breaks this for
 * testbed device nodes. It routes every read, write and ioctl on such a node
 * over a per-descriptor socket to the testbed's owner, and its close() wrapper
 * closes that socket and frees its bookkeeping without waiting for a call in
 * flight. The thread in flight then talks to a closed socket, and the preload
 * calls abort(): the program under test dies (OctoPrint disconnecting while its
 * reader thread asks TIOCINQ, which is what OctoPrint does whenever a user
 * disconnects a printing printer), and the owner, left mid-conversation, fails
 * an assertion and takes the whole testbed down with it.
 *
 * Loaded in LD_PRELOAD before the umockdev preload, this library wraps the same
 * four calls. For a pty slave (every testbed tty is one; nothing else is
 * touched) close() marks the descriptor as closing, waits for the calls already
 * in flight on it to return, and only then closes it; a call that starts while
 * the descriptor is closing fails with EBADF, as it may on a real kernel. The
 * wait is bounded, so a call that never returns (a blocking read nobody feeds)
 * delays a close by at most CLOSE_WAIT_NS instead of hanging the program.
 *
 * Build: gcc -shared -fPIC -O2 -o close_guard.so close_guard.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

/* Descriptors at or above this number go unguarded: tests never get near it. */
#define GUARDED_FDS 4096
/* Unix98 pty slaves, /dev/pts/N: majors 136 to 143. */
#define PTY_SLAVE_MAJOR_FIRST 136
#define PTY_SLAVE_MAJOR_LAST 143
#define CLOSE_WAIT_NS (2L * 1000 * 1000 * 1000)
#define POLL_NS (50L * 1000)

static atomic_int in_flight[GUARDED_FDS];
static atomic_int closing[GUARDED_FDS];

static void *next_symbol(const char *name)
{
    void *symbol = dlsym(RTLD_NEXT, name);
    if (symbol == NULL) {
        fprintf(stderr, "close_guard: no next %s: %s\n", name, dlerror());
        _exit(127);
    }
    return symbol;
}

/* The raw system call: the umockdev preload's fstat() reports the emulated
 * device's numbers (188:0 for ttyUSB0), not the pty's. */
static int is_pty_slave(int fd)
{
    struct stat st;
    int saved = errno;
    int r = (int) syscall(SYS_fstat, fd, &st);
    errno = saved;
    if (r != 0 || !S_ISCHR(st.st_mode))
        return 0;
    unsigned int m = major(st.st_rdev);
    return m >= PTY_SLAVE_MAJOR_FIRST && m <= PTY_SLAVE_MAJOR_LAST;
}

static int guarded(int fd)
{
    return fd >= 0 && fd < GUARDED_FDS && is_pty_slave(fd);
}

/* Given a guarded fd, count a call in; return 0 if it may go on, -1 (EBADF) if
 * the fd is being closed. Sequentially consistent: either the close sees this
 * call in flight or this call sees the close. */
static int enter(int fd)
{
    atomic_fetch_add(&in_flight[fd], 1);
    if (atomic_load(&closing[fd])) {
        atomic_fetch_sub(&in_flight[fd], 1);
        errno = EBADF;
        return -1;
    }
    return 0;
}

static void leave(int fd)
{
    int saved = errno;
    atomic_fetch_sub(&in_flight[fd], 1);
    errno = saved;
}

ssize_t read(int fd, void *buf, size_t count)
{
    static ssize_t (*next)(int, void *, size_t);
    if (next == NULL)
        next = next_symbol("read");
    if (!guarded(fd))
        return next(fd, buf, count);
    if (enter(fd) != 0)
        return -1;
    ssize_t r = next(fd, buf, count);
    leave(fd);
    return r;
}

ssize_t write(int fd, const void *buf, size_t count)
{
    static ssize_t (*next)(int, const void *, size_t);
    if (next == NULL)
        next = next_symbol("write");
    if (!guarded(fd))
        return next(fd, buf, count);
    if (enter(fd) != 0)
        return -1;
    ssize_t r = next(fd, buf, count);
    leave(fd);
    return r;
}

int ioctl(int fd, unsigned long request, ...)
{
    static int (*next)(int, unsigned long, ...);
    va_list ap;
    void *arg;

    /* ioctl takes at most one argument, a pointer or an integer: both fit. */
    va_start(ap, request);
    arg = va_arg(ap, void *);
    va_end(ap);
    if (next == NULL)
        next = next_symbol("ioctl");
    if (!guarded(fd))
        return next(fd, request, arg);
    if (enter(fd) != 0)
        return -1;
    int r = next(fd, request, arg);
    leave(fd);
    return r;
}

int close(int fd)
{
    static int (*next)(int);
    if (next == NULL)
        next = next_symbol("close");
    if (!guarded(fd))
        return next(fd);
    atomic_store(&closing[fd], 1);
    struct timespec pause = {0, POLL_NS};
    for (long waited = 0; atomic_load(&in_flight[fd]) > 0 && waited < CLOSE_WAIT_NS;
         waited += POLL_NS)
        nanosleep(&pause, NULL);
    int r = next(fd);
    int saved = errno;
    atomic_store(&closing[fd], 0);
    errno = saved;
    return r;
}
