"""
The sandbox: the one place where programs a model wrote are run (evaluate.py's code task, through
benchmarks.py; nothing else in the repository executes generated code). It is the project's
security boundary, so it is small and says exactly what it does and does not do.

    from sandbox import run_program, isolation
    print(isolation()["description"])               # what this machine allows
    result = run_program("assert sum([1, 2]) == 3", timeout=2)
    result.passed, result.status, result.output    # True, 'passed', ''

Every program runs in a fresh Python process (`python -I -S`: no site-packages, user paths or
PYTHON* variables), with an empty environment and standard input closed, in an empty temporary
working directory that is removed afterwards, under limits set with resource.setrlimit: CPU
seconds, address space (memory), the size of a file it writes, open files, processes (one: it
cannot fork or start a thread) and no core files; and it cannot gain privileges
(PR_SET_NO_NEW_PRIVS: sudo and other set-user-ID programs do not raise it). Its output, stdout and
stderr together, is read up to max_output bytes. A program that prints more, or runs past its
wall-clock timeout, is killed with everything it started. It passes only if it runs to its end:
the sandbox prints a secret token after its last statement returns, so sys.exit(0), os._exit(0),
an exception, a signal or a limit all count as a failure.

Where Linux lets it create namespaces (as root; as another user where unprivileged user
namespaces are enabled, the default on most distributions), the program also gets:
- no network: a network namespace of its own, with no interface up, not even loopback;
- its own process-ID namespace and /proc: it sees no other process and can signal none;
- every file system read-only; its working directory is a fresh tmpfs of disk_mb megabytes, the
  only place it can write (and run nothing from); /tmp, /var/tmp, /dev/shm, /home, /root and the
  user's home are empty folders (the Python standard library is mounted back where it was);
- run by root, it runs as the user nobody, with no capabilities.
Without namespaces (some containers forbid them) a program runs as the user who started it, with
the limits above as its only bounds: it can read what that user can, write into the user's files,
use the network and signal the user's processes. isolation() says which case holds; evaluate.py
writes it into its report and refuses to run code without namespaces unless told to.

What the sandbox does not protect against: a bug in the Linux kernel (every system call is open:
it is not a virtual machine, gVisor or a seccomp filter); reading world-readable files outside the
emptied folders (the system's files, a project kept outside a home folder); CPU time, memory and
disk up to the limits. And a pass is only as honest as the program: one written to search its own
memory for the token could fake one (the tests call the program's code inside its own process,
as in every harness); the sandbox keeps programs from harming the machine, not from cheating.

Run as a script, this file is the sandbox's own child process (see run_program); nothing else
runs it.
"""

import ctypes
import json
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

NOBODY = 65534  # the uid and gid of 'nobody' on Linux: what a program started by root runs as

# Linux constants (linux/sched.h, linux/mount.h, linux/prctl.h)
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048,
               "relatime": 1 << 21, "strictatime": 1 << 24}
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SETUP_FAILED = 125  # the child's exit status when it could not build the sandbox (the program never ran)

# What each mode isolates, for reports.
MODES = {
    "privileged": "namespaces (no network, own process IDs, read-only file systems, empty home and temporary "
                  "folders), as user nobody",
    "user": "user namespaces (no network, own process IDs, read-only file systems, empty home and temporary folders), "
            "as the invoking user without capabilities",
    "none": "no namespaces: resource limits only; the program runs as the invoking user (nobody, for root) and can "
            "read and write that user's files, use the network and signal that user's processes",
}


class SandboxError(Exception):
    """The sandbox itself could not run a program (not a failure of the program)."""


@dataclass
class Result:
    passed: bool  # ran to its end: every statement returned
    status: str  # 'passed', 'exit status N' (an exception gives 1), 'killed by signal N', 'timed out', 'output limit'
    output: str  # stdout and stderr, up to max_output bytes
    seconds: float


# -----------------------------------------------------------------------------
# the parent: start the child, feed it the program, read its output, kill it, clean up

_modes = {}


def isolation():
    """{'mode', 'description'} of the isolation this machine gives programs, found once by running one."""
    if "best" not in _modes:
        result, mode = _run("import collections, math, re, typing", "best", 10.0, 256, 1, 1, 16, 1 << 16)
        if not result.passed:
            raise SandboxError(f"the sandbox cannot run Python here ({result.status}): {result.output.strip()[-300:]}")
        _modes["best"] = mode
    mode = _modes["best"]
    return {"mode": mode, "description": MODES[mode]}


def run_program(source, timeout=3.0, memory_mb=1024, file_size_mb=16, disk_mb=64, open_files=64, max_output=1 << 20):
    """Run the Python program source in the sandbox (see the docstring); its Result."""
    return _run(source, isolation()["mode"], timeout, memory_mb, file_size_mb, disk_mb, open_files, max_output)[0]


def limits_description(timeout=3.0, memory_mb=1024, file_size_mb=16, disk_mb=64, open_files=64, max_output=1 << 20):
    """run_program's limits, in words."""
    return (f"{timeout:g} s wall clock and {math.ceil(timeout)} s CPU, {memory_mb} MB address space, files up to "
            f"{file_size_mb} MB" + (f" in a {disk_mb} MB tmpfs" if isolation()["mode"] != "none" else "")
            + f", {open_files} open files, 1 process, {max_output:,} bytes of output")


def run_programs(sources, workers=None, **limits):
    """The Results of run_program for each source, workers (default: CPU cores) at a time."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda source: run_program(source, **limits), sources))


def _run(source, mode, timeout, memory_mb, file_size_mb, disk_mb, open_files, max_output):
    """(Result, the mode the child ran in); mode 'best' takes what the machine allows, another mode must hold."""
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    try:
        if os.geteuid() == 0:
            os.chown(workdir, NOBODY, NOBODY)  # without namespaces, nobody writes here itself
        settings = {"mode": mode, "workdir": workdir, "hide": [os.path.expanduser("~"), tempfile.gettempdir()],
                    "cpu": math.ceil(timeout), "memory": memory_mb << 20, "file_size": file_size_mb << 20,
                    "disk": disk_mb << 20, "open_files": open_files}
        token = secrets.token_hex(16)
        child = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(settings)],
                                 cwd=workdir, env={}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            child.stdin.write(json.dumps({"source": source, "token": token}).encode())
            child.stdin.close()
        except BrokenPipeError:
            pass  # the child died before reading: its status below says why
        output, ending = _read(child, start + timeout, max_output)
        try:
            os.killpg(child.pid, signal.SIGKILL)  # whatever is left of its process group
        except ProcessLookupError:
            pass
        child.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    header, _, body = output.partition(b"\n")
    if not header.startswith(b"sandbox ") and child.returncode == SETUP_FAILED:
        raise SandboxError(output.decode(errors="replace").strip()[-300:])
    ran_in = header[len(b"sandbox "):].decode() if header.startswith(b"sandbox ") else mode
    ran_to_end = body.endswith(token.encode() + b"\n")  # killed after it, the run still fails
    passed = ending is None and child.returncode == 0 and ran_to_end
    if ran_to_end:
        body = body[: -len(token) - 1]
    status = ending or ("passed" if passed else f"killed by signal {-child.returncode}" if child.returncode < 0
                        else f"exit status {child.returncode}")
    return Result(passed, status, body.decode(errors="replace"), time.monotonic() - start), ran_in


def _read(child, deadline, max_output):
    """(output, None) once the child closed its output; (output so far, why) past the deadline or the cap."""
    output = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(output), "timed out"
            if not selector.select(left):
                continue
            chunk = os.read(child.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            output += chunk
            if len(output) > max_output:
                return bytes(output[:max_output]), "output limit"
    try:  # output closed: the program ended, or closed it and went on running
        child.wait(max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        return bytes(output), "timed out"
    return bytes(output), None


# -----------------------------------------------------------------------------
# the child: build the sandbox around itself, then run the program


def _check(result, what):
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _enter_namespaces(libc, mode):
    """The mode entered: new mount, network, PID and IPC namespaces, as root ('privileged') or inside a new user
    namespace that maps the user to itself ('user'); 'none' where neither is allowed or wanted."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
    if mode in ("best", "privileged") and libc.unshare(flags) == 0:
        return "privileged"
    if mode in ("best", "user") and libc.unshare(CLONE_NEWUSER | flags) == 0:
        uid, gid = os.getuid(), os.getgid()
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        return "user"
    return "none"


def _mounts():
    """(mount point, flags to keep) of every mount, parents first (/proc/self/mountinfo)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # \040 is a space
            yield point, sum(MOUNT_FLAGS.get(option, 0) for option in fields[5].split(","))


def _inside(path, folder):
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _isolate_files(libc, settings, owner):
    """Make every file system read-only, empty the folders in settings['hide'] (and the usual ones), mount the
    standard library back, and make the working directory a fresh tmpfs that owner can write in."""
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    for point, flags in list(_mounts()):
        # Pseudo file systems (some of /proc and /sys) may refuse: they stay as they were.
        libc.mount(None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None)
    hide = sorted({os.path.realpath(d) for d in ["/tmp", "/var/tmp", "/dev/shm", "/home", "/root", *settings["hide"]]
                   if os.path.isdir(d)})
    hide = [d for d in hide if not any(_inside(d, h) for h in hide if h != d)]
    # The standard library's folders (sys.path under -S), opened before they are covered.
    stdlib = sorted({os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)})
    keep = {p: os.open(p, os.O_PATH) for p in stdlib
            if any(_inside(p, h) for h in hide) and not any(_inside(p, q) for q in stdlib if q != p)}
    for folder in hide:
        _check(libc.mount(b"tmpfs", folder.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=0755"),
               f"emptying {folder}")
    for path, fd in keep.items():
        os.makedirs(path, exist_ok=True)
        _check(libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND | MS_REC, None), f"mounting {path}")
        libc.mount(None, path.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
        os.close(fd)
    workdir = settings["workdir"]
    os.makedirs(workdir, exist_ok=True)
    options = f"size={settings['disk']},mode=0700,uid={owner[0]},gid={owner[1]}".encode()
    _check(libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options),
           "mounting the working directory")
    for folder in hide:
        _check(libc.mount(None, folder.encode(), None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None),
               f"making {folder} read-only")
    os.chdir(workdir)


def _drop_privileges(libc, mode):
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)  # leaving uid 0 clears every capability
    elif mode == "user":  # the creator of a user namespace holds every capability in it: clear them

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        header, data = Header(0x20080522, 0), (ctypes.c_uint32 * 6)()  # _LINUX_CAPABILITY_VERSION_3, all zero
        _check(libc.capset(ctypes.byref(header), ctypes.byref(data)), "dropping capabilities")


def _child(settings):
    job = json.loads(sys.stdin.buffer.read())  # from the parent's pipe; then standard input is closed
    os.close(0)
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        mode = _enter_namespaces(libc, settings["mode"])
        if settings["mode"] not in ("best", mode):
            raise OSError(f"the {settings['mode']} namespaces are no longer allowed (got {mode})")
        if mode != "none":
            _isolate_files(libc, settings, (NOBODY, NOBODY) if os.geteuid() == 0 else (os.getuid(), os.getgid()))
    except OSError as e:
        sys.stderr.write(f"sandbox error: {e}\n")
        os._exit(SETUP_FAILED)
    # The program runs in a child of this process (the first process of the new PID namespace), never in
    # a child of the evaluator. This one only waits and passes the status on, as the program's user: a
    # program that signals its process group (getppid() is 0 in the namespace) ends both, and its run.
    pid = os.fork()
    if pid:
        if os.geteuid() == 0:
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):  # end the same way, so that the parent sees the signal
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
            os.kill(os.getpid(), os.WTERMSIG(status))
        os._exit(os.waitstatus_to_exitcode(status))
    try:
        if mode != "none":
            _check(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mounting /proc")
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no_new_privs")
        import resource  # noqa: PLC0415 (after the fork: nothing here is the waiting parent's)

        for limit, value in ((resource.RLIMIT_CPU, settings["cpu"]), (resource.RLIMIT_AS, settings["memory"]),
                             (resource.RLIMIT_FSIZE, settings["file_size"]), (resource.RLIMIT_CORE, 0),
                             (resource.RLIMIT_NOFILE, settings["open_files"])):
            resource.setrlimit(limit, (value, value))
        _drop_privileges(libc, mode)
        # After the change of user: a limit the new user is already over at setuid would fail the exec, not
        # the fork. One process, which it already is: no fork, no thread.
        resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "setting the parent-death signal")
    except OSError as e:
        sys.stderr.write(f"sandbox error: {e}\n")
        os._exit(SETUP_FAILED)
    os.write(1, f"sandbox {mode}\n".encode())
    token = job["token"].encode() + b"\n"
    exec(compile(job["source"], "program.py", "exec"), {"__name__": "__main__"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, token)
    os._exit(0)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
