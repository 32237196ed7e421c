"""Launches one interpreter kernel inside its sandbox; run as a script by interpreter.py (which imports only
its warning texts from here).

Stage 1 (`sandbox.py CONFIG_JSON KERNEL_ARGS...`, started as the server's user): a new network namespace (a
user namespace too where that needs one), resource limits, a private mount namespace (the temporary folder
shows only this kernel's own folder, which it also sees, and works in, as /mnt/data as the original prompt
says; /tmp, /var/tmp and /dev/shm are small empty ones of its own; as root,
folders closed to other users that hold the Python installation, such as /root, are covered by an empty tmpfs
with only that installation bound back in, read-only; every other mount but /dev read-only), a pid namespace
with its own /proc (this process stays outside as a relay, a second one is pid 1 inside, the kernel pid 2),
as root a uid of its own, and exec of stage 2 as that user, which drops every capability.
Stage 2 (`sandbox.py --kernel MODE KERNEL_ARGS...`): where no network namespace could be made, an audit hook
that refuses Python-level internet sockets (best effort, see NETWORK_FALLBACK), then ipykernel in this process.
Stdlib only: importing the chatglm package would import torch into every kernel.
"""
import json
import os
import resource
import sys

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
NETWORK_FALLBACK = (
    "the interpreter kernel could NOT be put in a network namespace; it only has a best-effort block on "
    "Python sockets (an audit hook), which ctypes or a subprocess such as curl gets around. Model-written "
    "code may reach the network"
)
FILES_SHARED = (
    "the interpreter kernel could NOT get a private mount namespace; it can list the temporary folder and, "
    "unless it runs as a uid of its own (as root), read other conversations' files there"
)
PROCESSES_SHARED = (
    "the interpreter kernel could NOT get a pid namespace with its own /proc; it sees the machine's processes "
    "and, unless it runs as a uid of its own (as root), can signal the server's"
)


def _libc_call(name: str, *args) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{args}: {os.strerror(errno)}")


def _unshare(flags: int) -> None:
    _libc_call("unshare", flags)


def _mount(source, target: str, fstype, flags: int, data) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _libc_call("mount", enc(source), enc(target), enc(fstype), flags, enc(data))


def closed_ancestor(path: str) -> str | None:
    """The outermost folder on the way to `path` that a stranger (another uid, no groups) cannot pass."""
    parts = os.path.realpath(path).split(os.sep)[1:]
    for i in range(len(parts)):
        folder = os.sep + os.path.join(*parts[: i + 1])
        if i < len(parts) - 1 and not os.stat(folder).st_mode & 0o001:
            return folder
    return None


SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable folders every process shares


def private_mounts(python: list[str], tmp: str | None, own: str, stranger: bool, scratch_mb: int) -> str:
    """A mount namespace where `tmp` (where every kernel has its folder) shows only this kernel's folder `own`,
    the shared scratch folders are empty ones of its own (a tmpfs of `scratch_mb` each), and, for a `stranger`
    uid, each closed folder above the Python installation `python` (say /root) shows only that installation,
    read-only. Returns "private", or "shared: why" where no namespace could be made (or `tmp` is None: only
    the installation is made reachable)."""
    under = lambda path, folder: path.startswith(folder.rstrip("/") + "/")  # noqa: E731
    covers: dict[str, list[str]] = {}  # folder -> paths bound back into its tmpfs
    if tmp:
        for folder in {tmp, *(f for f in SCRATCH if os.path.isdir(f))}:
            covers[folder] = [p for p in (own, *python) if under(p, folder)]
    for path in python if stranger else []:
        if folder := closed_ancestor(path):
            covers.setdefault(folder, []).append(path)
    for folder in list(covers):  # a cover inside another one: its paths go to the outer tmpfs
        outer = [f for f in covers if under(folder, f)]
        if outer:
            covers[outer[0]] += covers.pop(folder)
    if not covers:
        return "shared: not asked for"
    try:
        _unshare(CLONE_NEWNS)
        _mount(None, "/", None, MS_REC | MS_PRIVATE, None)  # nothing below propagates to the host
    except OSError as e:
        return f"shared: {e}"
    writable = {own, *(f for f in covers if f in SCRATCH or f == tmp)}
    for folder, keep in sorted(covers.items()):
        keep = sorted(p for p in set(keep) if os.path.exists(p))
        keep = [p for i, p in enumerate(keep) if not any(under(p, q) for q in keep[:i])]  # outermost only
        fds = {path: os.open(path, os.O_PATH) for path in keep}
        scratch = folder in SCRATCH or folder == tmp
        _mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV,
               f"mode=1777,size={scratch_mb}m" if scratch else "mode=0755,size=64k")
        for path, fd in fds.items():
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
            if path != own:
                _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
            os.close(fd)
    if tmp:
        left = readonly_except(writable)
        if left:
            return f"private, but these mounts stay writable: {', '.join(left)}"
    return "private"


SHOWN_WORKDIR = "/mnt/data"  # the original interpreter prompt's path


def fixed_workdir(workdir: str) -> str:
    """Inside a private mount namespace, show the kernel's folder at SHOWN_WORKDIR (a read-only tmpfs over /mnt
    holds the mount point), so the system prompt is ChatGLM3's own and the same for every kernel: a random
    folder name in the prompt changes what a small model writes. Returns the path the kernel sees."""
    if not os.path.isdir(os.path.dirname(SHOWN_WORKDIR)):
        return workdir  # making /mnt would change the host's root folder
    try:
        fd = os.open(workdir, os.O_PATH)
        top = os.path.dirname(SHOWN_WORKDIR)
        _mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        os.mkdir(SHOWN_WORKDIR)
        _mount(f"/proc/self/fd/{fd}", SHOWN_WORKDIR, None, MS_BIND, None)
        _mount(None, top, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        os.close(fd)
    except OSError:
        return workdir
    return SHOWN_WORKDIR


def readonly_except(writable: set[str]) -> list[str]:
    """Every mount read-only but `writable` and /dev's: the kernel writes only to its own folder and its
    scratch folders, even as the server's own user. A remount keeps a mount's flags (those a user namespace
    locks must stay); returns the mount points that could not be made read-only."""
    import re
    keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048,
            "relatime": 1 << 21, "strictatime": 1 << 24}
    left = []
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        options = fields[5].split(",")
        if "ro" in options or point in writable or point == "/dev" or point.startswith("/dev/"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in options:
            flags |= keep.get(option, 0)
        try:
            _mount(None, point, None, flags, None)
        except OSError:
            if os.path.exists(point):  # one hidden under a later mount is out of reach anyway
                left.append(point)
    return left


def isolate_network() -> tuple[str, bool]:
    """A fresh network namespace (no interfaces but a down loopback), or why not; and whether a user namespace
    was made for it. The kernel talks to its client over Unix sockets, which are files and cross namespaces."""
    try:
        _unshare(CLONE_NEWNET)  # root, or CAP_SYS_ADMIN
        return "namespace", False
    except OSError as root_error:
        uid, gid = os.getuid(), os.getgid()
        try:  # unprivileged: a user namespace first, mapping our uid to itself (so files stay ours)
            _unshare(CLONE_NEWUSER | CLONE_NEWNET)
            for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                               ("/proc/self/gid_map", f"{gid} {gid} 1")):
                with open(path, "w") as f:
                    f.write(text)
            return "namespace", True
        except OSError as user_error:
            return f"fallback: unshare failed ({root_error}; as a user namespace: {user_error})", False


def tasks_of(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                count += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            pass
    return count


def apply_limits(limits: dict, processes: int) -> None:
    MB = 1024 * 1024
    pairs = {
        resource.RLIMIT_AS: limits["memory_mb"] * MB,
        resource.RLIMIT_CPU: limits["cpu_seconds"],  # per process, over its life
        resource.RLIMIT_FSIZE: limits["file_mb"] * MB,
        resource.RLIMIT_NPROC: processes,
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NOFILE: limits["open_files"],
    }
    for which, value in pairs.items():
        # past the soft CPU limit SIGXCPU kills it, past the hard one SIGKILL
        resource.setrlimit(which, (value, value + 1 if which == resource.RLIMIT_CPU else value))


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def stage1(config: dict, kernel_args: list[str]) -> None:
    # RLIMIT_NPROC counts the tasks (processes and threads) of the real uid, per user namespace: with a uid or
    # a user namespace of its own the kernel's are all it counts; otherwise its budget comes on top of what
    # the user already runs (counted before a user namespace maps every other uid to "nobody")
    user_tasks = tasks_of(os.getuid()) if config["uid"] is None else 0
    network, in_userns = (("fallback: forced by CHATGLM_INTERPRETER_NO_NAMESPACES", False) if config["force_fallback"]
                          else isolate_network())
    apply_limits(config["limits"], config["limits"]["processes"] + (0 if in_userns else user_tasks))
    # forced fallback: no private temporary folder, but a uid of its own still needs to reach Python
    files = private_mounts(config["python"], None if config["force_fallback"] else config["tmp"], config["root"],
                           stranger=config["uid"] is not None, scratch_mb=config["limits"]["file_mb"])
    if config["force_fallback"]:
        files = "shared: forced by CHATGLM_INTERPRETER_NO_NAMESPACES"
    workdir = fixed_workdir(config["workdir"]) if files.startswith("private") else config["workdir"]
    os.environ["HOME"] = os.environ["TMPDIR"] = workdir
    processes = "shared: forced by CHATGLM_INTERPRETER_NO_NAMESPACES"
    if not config["force_fallback"]:
        processes = isolate_processes(config["parent"], mount_proc=files == "private")  # returns in pid 1
    if config["uid"] is not None:
        drop_privileges(config["uid"])
        if not os.access(sys.executable, os.X_OK):
            sys.exit(f"the kernel's uid {config['uid']} cannot reach Python at {sys.executable} (a folder above it is "
                     f"closed to other users, and no mount namespace could open it: {files}); install Python where "
                     "other users can read it, or run the server as a normal user")
    if processes.startswith("namespace"):
        _fork_kernel()  # returns in the kernel
    else:  # the kernel is the server's child: ipykernel exits when it is gone
        kernel_args = [*kernel_args, f"--IPKernelApp.parent_handle={config['parent']}"]
    os.chdir(workdir)
    os.umask(0o077)
    with open(config["status_file"], "w") as f:  # read by the parent once the kernel answers
        json.dump({"network": network, "files": files, "processes": processes, "workdir": workdir}, f)
    mode = "namespace" if network == "namespace" else "fallback"
    os.execv(sys.executable, [sys.executable, "-s", os.path.abspath(__file__), "--kernel", mode, *kernel_args])


def _relay(child: int, parent: int | None = None) -> None:
    """Pass interrupts on to `child`, wait for it (reaping orphans as a pid 1 must), then exit as it did: a
    pid 1 cannot die of a signal it sends itself, so it exits 128 + signal and the outer relay re-raises it.
    The outer relay (`parent` given) also kills the namespace when the server process is gone."""
    import select
    import signal
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _: os.kill(child, s))
    pidfd = os.pidfd_open(child) if parent is not None else None
    while True:
        if parent is not None:
            if not select.select([pidfd], [], [], 1.0)[0]:
                if os.getppid() != parent:
                    os.kill(child, signal.SIGKILL)
                continue
        pid, status = os.waitpid(-1 if parent is None else child, 0)
        if pid != child:
            continue
        code = os.waitstatus_to_exitcode(status)
        if parent is not None and code > 128:
            code = -(code - 128)
        if code < 0 and parent is not None:
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        os._exit(128 - code if code < 0 else code)


def isolate_processes(parent: int, mount_proc: bool) -> str:
    """A new pid namespace: the kernel sees only its own processes, cannot signal any other, and everything
    it starts dies with it. This process stays outside as a relay; its child, pid 1 inside, returns here
    (after mounting a /proc that shows only the namespace). Returns "namespace..." or "shared: why"."""
    try:
        _unshare(CLONE_NEWPID)
    except OSError as e:
        return f"shared: {e}"
    child = os.fork()
    if child:
        _relay(child, parent)
    if not mount_proc:
        return "namespace (host /proc still mounted: no private mount namespace)"
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    except OSError as e:
        return f"namespace (host /proc still mounted: {e})"
    return "namespace"


def _fork_kernel() -> None:
    """In pid 1: the kernel becomes pid 2 (a pid 1 ignores signals it has no handler for, SIGXCPU included)."""
    child = os.fork()
    if child:
        _relay(child)


def _deny_inet_sockets(event: str, args: tuple) -> None:
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg", "socket.bind"):
        if args[0].family in INET:
            raise PermissionError(f"network access is disabled in the interpreter ({event})")
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        raise PermissionError(f"network access is disabled in the interpreter ({event})")


def stage2(mode: str, kernel_args: list[str]) -> None:
    if mode == "fallback":
        import socket  # not inside the hook: an import there would run the hook again
        global INET
        INET = (socket.AF_INET, socket.AF_INET6)
        sys.addaudithook(_deny_inet_sockets)  # cannot be removed from inside the process
    sys.argv = ["ipykernel_launcher", *kernel_args]
    from ipykernel import kernelapp
    kernelapp.launch_new_instance()


if __name__ == "__main__":
    del sys.path[0]  # this script's folder (chatglm/chat) must not shadow modules the model's code imports
    if sys.argv[1] == "--kernel":
        stage2(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "--kill-uid":  # as root: become the uid, then kill(-1) reaches exactly its processes
        drop_privileges(int(sys.argv[2]))
        os.kill(-1, 9)
    else:
        stage1(json.loads(sys.argv[1]), sys.argv[2:])
