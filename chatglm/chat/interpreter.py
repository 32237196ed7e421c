"""ChatGLM3's code interpreter: `<|assistant|>interpreter` cells run in a Jupyter kernel, one per conversation.

Each CodeInterpreter owns one ipykernel process started by sandbox.py: its own temporary working directory,
new network, mount and pid namespaces (no network; the temporary folders show only its own, and it can
write nowhere else; it sees and signals only its own processes, which die with it), rlimits (address space, CPU seconds, processes, file
size, open files), as root a uid of its own (so the process limit counts only its processes), a scrubbed
environment, and a wall-clock timeout per cell that interrupts the kernel and kills it when the interrupt
is ignored. The client talks to it over Unix sockets (ZMQ `ipc`), which cross the network namespace.
KernelPool keeps one interpreter per conversation id, never shared.

Needs the `interpreter` extra (jupyter_client + ipykernel); nothing here imports them before they are used.
"""
from __future__ import annotations

import atexit
import base64
import importlib.util
import json
import logging
import os
import queue
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("chatglm.interpreter")

EXTRA_HINT = "pip install 'chatglm[interpreter]'"
SANDBOX = Path(__file__).with_name("sandbox.py")
NO_NAMESPACES_ENV = "CHATGLM_INTERPRETER_NO_NAMESPACES"  # "1": skip namespaces (tests the fallback)

# ChatGLM3's code-interpreter system prompt (composite demo), pointing at this kernel's folder.
SYSTEM_PROMPTS = {
    "zh": "你是一位智能AI助手，你叫ChatGLM，你连接着一台电脑，但请注意不能联网。在使用Python解决任务时，你可以运行代码并得到结果，"
          "如果运行结果有错误，你需要尽可能对代码进行改进。你可以处理用户上传到电脑上的文件，文件默认存储路径是{workdir}。",
    "en": "You are an intelligent AI assistant, named ChatGLM3. You are connected to a computer, but please note that you "
          "cannot connect to the internet. When using Python to solve tasks, you can run the code and get the results. "
          "If there are errors in the running results, you need to improve the code as much as possible. You can process "
          "files uploaded by users to your computer, and the default storage path for files is {workdir}.",
}
ANSI = re.compile(r"(\x9B|\x1B\[)[0-?]*[ -/]*[@-~]")
ARROW = re.compile(r"\s*-+> ")  # IPython's marker of the line that raised
SANDBOX_UID_BASE = 1_600_000_000  # far above any real account; one uid per kernel process tree


class InterpreterUnavailable(ImportError):
    pass


class KernelLimitError(RuntimeError):
    pass


def require_extra() -> None:
    """The one clear error when the `interpreter` extra is missing (or the system cannot host the sandbox)."""
    if sys.platform != "linux":
        raise InterpreterUnavailable(f"the code interpreter's sandbox needs Linux (namespaces, rlimits), not {sys.platform}")
    missing = [name for name in ("jupyter_client", "ipykernel") if importlib.util.find_spec(name) is None]
    if missing:
        raise InterpreterUnavailable(
            f"the code interpreter needs {' and '.join(missing)}: install the extra with {EXTRA_HINT}")


@dataclass(frozen=True)
class Limits:
    timeout: float = 30.0          # wall seconds per cell, then SIGINT; `interrupt_grace` later, the kernel is killed
    interrupt_grace: float = 3.0
    memory_mb: int = 2048          # address space of the kernel (RLIMIT_AS): MemoryError past it
    cpu_seconds: int = 600         # CPU seconds of each process over its life, startup included (RLIMIT_CPU):
                                   # stops what the timeout cannot, e.g. a busy child left running in the background
    processes: int = 64            # processes + threads of its uid or user namespace (RLIMIT_NPROC); the kernel
                                   # itself uses ~12
    file_mb: int = 64              # largest file it can write (RLIMIT_FSIZE), and the size of its own /tmp
    open_files: int = 256
    output_chars: int = 100_000    # printed output kept per cell (CellResult.stdout); the rest is dropped
    observation_chars: int = 1024  # what the model reads, then " [TRUNCATED]" (as the composite demo)
    images: int = 8                # figures kept per cell
    startup_timeout: float = 60.0


@dataclass
class CellResult:
    text: str                      # the observation for the model: a ```result block
    images: list[bytes] = field(default_factory=list)  # PNG bytes of the figures, for people
    error: bool = False
    stdout: str = ""               # printed output, stderr included, up to Limits.output_chars
    timed_out: bool = False
    restarted: bool = False        # the kernel was lost (killed, died, or ignored the interrupt): variables are gone
    seconds: float = 0.0


def result_block(text: str, limit: int) -> str:
    text = text.strip("\n")
    if len(text) > limit:
        text = text[:limit] + " [TRUNCATED]"
    return f"```result\n{text}\n```"


def trim_traceback(frames: list[str], limit: int) -> str:
    """IPython's traceback (a header, one entry per frame, the error line), ANSI-stripped; library frames
    between the cell's own frames and the innermost one become "...", and the tail is kept within `limit`:
    the last lines name the error."""
    frames = [f for f in (ANSI.sub("", f).strip("\n") for f in frames) if f.strip("-")]
    if len(frames) > 3:  # header, frames..., innermost frame, error line
        head, inner, last = frames[0], frames[1:-2], frames[-2:]
        kept = [f for f in inner if f.startswith("Cell In")]
        innermost = last[0] if last[0].startswith("Cell In") else "\n".join(  # its file and the failing line
            line for i, line in enumerate(last[0].splitlines()) if i == 0 or ARROW.match(line))
        frames = [head, *kept, *(["..."] if len(kept) < len(inner) else []), innermost, last[1]]
    text = "\n".join(frames)
    if len(text) > limit:
        text = "[TRUNCATED] ..." + text[-limit:]
    return text


def _live_uids() -> set[int]:
    uids = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                uids.add(entry.stat().st_uid)
            except OSError:
                pass
    return uids


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of a sandbox uid: kill(-1) from a process of that uid reaches exactly those,
    in one pass the kernel makes under its task lock, so forking children cannot slip out."""
    subprocess.run([sys.executable, "-I", "-S", str(SANDBOX), "--kill-uid", str(uid)], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30, check=False)


_font_cache: dict[str, bytes] = {}  # matplotlib's font list (~1 s to build), copied into each new kernel
_font_cache_lock = threading.Lock()
_font_cache_started = False


def _build_font_cache() -> None:
    """Built once by a process of our own, never taken from a kernel: a kernel's files are the model's code's
    to write (a planted symlink, data for another conversation)."""
    if importlib.util.find_spec("matplotlib") is None:
        return
    with tempfile.TemporaryDirectory() as d:
        env = {"PATH": os.environ.get("PATH", ""), "MPLCONFIGDIR": d, "HOME": d}
        subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"], env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300, check=False)
        for path in Path(d).glob("fontlist-*.json"):
            _font_cache[path.name] = path.read_bytes()


def _write_font_cache(folder: Path, uid: int | None) -> None:
    folder.mkdir(mode=0o700)
    for name, data in list(_font_cache.items()):
        (folder / name).write_bytes(data)
    for path in (folder, *folder.iterdir()):
        if uid is not None:
            os.chown(path, uid, uid)


def _python_paths() -> list[str]:
    """What the kernel's Python must reach: the interpreter, its prefixes, this process' import path."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
             str(SANDBOX.parent)}
    return sorted({os.path.realpath(p) for p in paths | {p for p in sys.path if p and os.path.isdir(p)}})


_live: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for interpreter in list(_live):
        interpreter.close()


class CodeInterpreter:
    """One sandboxed Jupyter kernel. Not thread-safe across calls: run() holds a lock."""

    def __init__(self, *, limits: Limits | None = None, start: bool = True):
        require_extra()
        self.limits = limits or Limits()
        self.root = Path(tempfile.mkdtemp(prefix="chatglm-interpreter-"))
        self.workdir = self.root / "work"
        self.rundir = self.root / "run"  # connection file, Unix sockets, kernel log
        self.uid = self._pick_uid() if os.geteuid() == 0 else None
        for d in (self.workdir, self.rundir):
            d.mkdir(mode=0o700)
            if self.uid is not None:
                os.chown(d, self.uid, self.uid)
        os.chmod(self.root, 0o711)  # its uid may pass through, not list
        self.network = None  # "namespace" or "fallback: why", once a kernel has started
        self.sandbox = {}  # its launcher's report: network, files ("private" or "shared: why"), processes, workdir
        self.proc: subprocess.Popen | None = None
        self.client = None
        self._lock = threading.RLock()
        self._closed = False
        self._lost = False  # the last kernel was lost; the next run() says restarted
        self.last_used = time.monotonic()
        _live.add(self)
        with _font_cache_lock:
            global _font_cache_started
            if not _font_cache_started:  # in the background: kernels started meanwhile build their own
                _font_cache_started = True
                threading.Thread(target=_build_font_cache, name="chatglm-font-cache", daemon=True).start()
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    def _pick_uid(self) -> int:
        used = _live_uids()
        while True:
            uid = SANDBOX_UID_BASE + random.randrange(1 << 24)
            if uid not in used:
                return uid

    # --- the kernel process -------------------------------------------------------------------

    def start(self) -> None:
        from jupyter_client import BlockingKernelClient
        from jupyter_client.connect import write_connection_file

        with self._lock:
            if self._closed:
                raise RuntimeError("this interpreter is closed")
            if self.proc is not None:
                return
            t0 = time.perf_counter()
            conn = self.rundir / "kernel.json"
            status = self.rundir / "sandbox.json"
            for stale in self.rundir.iterdir():  # sockets and caches of a killed kernel
                shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
            _write_font_cache(self.rundir / "matplotlib", self.uid)
            write_connection_file(fname=str(conn), transport="ipc", ip=str(self.rundir / "k"),
                                  key=secrets.token_hex(16).encode())
            if self.uid is not None:
                os.chown(conn, self.uid, self.uid)
            config = {"workdir": str(self.workdir), "uid": self.uid, "status_file": str(status),
                      "python": _python_paths(), "tmp": str(self.root.parent), "root": str(self.root),
                      "parent": os.getpid(),
                      "force_fallback": os.environ.get(NO_NAMESPACES_ENV) == "1",
                      "limits": {k: getattr(self.limits, k) for k in
                                 ("memory_mb", "cpu_seconds", "processes", "file_mb", "open_files")}}
            self._log = open(self.rundir / "kernel.log", "wb")
            self.proc = subprocess.Popen(
                [sys.executable, "-s", str(SANDBOX), json.dumps(config), "-f", str(conn),
                 "--HistoryManager.enabled=False", "--InteractiveShell.colors=nocolor"],
                env=self._env(), cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=self._log,
                stderr=subprocess.STDOUT, start_new_session=True)
            client = BlockingKernelClient(connection_file=str(conn))
            client.load_connection_file()
            client.start_channels(hb=False)
            self.client = client
            try:
                self._wait_ready(t0 + self.limits.startup_timeout)
                self.sandbox = json.loads(status.read_text())
                self.network = self.sandbox["network"]
            except Exception as e:
                tail = self._log_tail()
                self._kill()
                raise RuntimeError(f"the interpreter kernel did not start ({e}): {tail or 'no output'}") from None
            self.start_seconds = time.perf_counter() - t0
            from .sandbox import FILES_SHARED, NETWORK_FALLBACK, PROCESSES_SHARED
            gaps = [f"{text} ({why})" for text, why, ok in (
                (NETWORK_FALLBACK, self.network, self.network == "namespace"),
                (FILES_SHARED, self.sandbox["files"], self.sandbox["files"] == "private"),
                (PROCESSES_SHARED, self.sandbox["processes"], self.sandbox["processes"] == "namespace")) if not ok]
            if gaps:
                warnings.warn(f"chatglm interpreter: {'; '.join(gaps)}", RuntimeWarning, stacklevel=2)
                log.warning("%s", "; ".join(gaps))

    def _env(self) -> dict:
        one = "1"
        return {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.workdir), "TMPDIR": str(self.workdir), "USER": "sandbox", "LOGNAME": "sandbox",
            "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": one, "PYTHONUNBUFFERED": one,
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "MPLCONFIGDIR": str(self.rundir / "matplotlib"), "IPYTHONDIR": str(self.rundir / "ipython"),
            # one thread per math library and few malloc arenas: the address-space limit stays for data
            "OMP_NUM_THREADS": one, "OPENBLAS_NUM_THREADS": one, "MKL_NUM_THREADS": one, "MALLOC_ARENA_MAX": "2",
        }

    def _wait_ready(self, deadline: float) -> None:
        """kernel_info until both the reply and an iopub message arrive (so no early output is lost)."""
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("exited")
            msg_id = self.client.kernel_info()
            try:
                self._shell_reply(msg_id, min(1.0, deadline - time.perf_counter()))
            except queue.Empty:
                continue
            try:
                while True:
                    self.client.iopub_channel.get_msg(timeout=0.2)
                    return
            except queue.Empty:
                continue
        raise TimeoutError("startup timeout")

    def _shell_reply(self, msg_id: str, timeout: float) -> dict:
        end = time.perf_counter() + timeout
        while True:
            msg = self.client.shell_channel.get_msg(timeout=max(0.0, end - time.perf_counter()))
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    def _log_tail(self) -> str:
        try:
            return (self.rundir / "kernel.log").read_text(errors="replace")[-2000:].strip()
        except OSError:
            return ""

    def _kill(self) -> None:
        """Kernel and everything it spawned, gone; the next run() starts a fresh kernel, same folder."""
        if self.client is not None:
            self.client.stop_channels()
            self.client = None
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            self.proc = None
            self._log.close()
        if self.uid is not None:
            _kill_uid(self.uid)

    def interrupt(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGINT)  # ipykernel turns it into KeyboardInterrupt in the cell

    # --- cells ----------------------------------------------------------------------------------

    def run(self, code: str, *, timeout: float | None = None) -> CellResult:
        """Run one cell; `timeout` overrides Limits.timeout for this cell."""
        with self._lock:
            t0 = time.perf_counter()
            restarted = self._lost
            self._lost = False
            if self.proc is None:
                self.start()
            while True:  # stale replies from an interrupted cell
                try:
                    self.client.shell_channel.get_msg(timeout=0)
                except queue.Empty:
                    break
            msg_id = self.client.execute(code, store_history=False, allow_stdin=False)
            result = self._collect(msg_id, t0, self.limits.timeout if timeout is None else timeout)
            result.restarted = result.restarted or restarted
            result.seconds = time.perf_counter() - t0
            self.last_used = time.monotonic()
            return result

    def _collect(self, msg_id: str, t0: float, timeout: float) -> CellResult:
        lim = self.limits
        parts: list[str] = []        # what the model reads, in output order
        stdout: list[str] = []
        kept = 0
        images: list[bytes] = []
        error = ""
        deadline = t0 + timeout
        interrupted_at = None
        while True:
            now = time.perf_counter()
            if self.proc.poll() is not None:
                return self._lost_kernel(parts, stdout, images, self._death_reason())
            if interrupted_at is None and now > deadline:
                self.interrupt()
                interrupted_at = now
            if interrupted_at is not None and now > interrupted_at + lim.interrupt_grace:
                self._kill()
                return self._lost_kernel(parts, stdout, images,
                                         f"TimeoutError: the cell ran past {timeout:g} s and ignored the "
                                         "interrupt, so its kernel was killed", timed_out=True)
            wait = (deadline if interrupted_at is None else interrupted_at + lim.interrupt_grace) - now
            try:
                msg = self.client.iopub_channel.get_msg(timeout=max(0.01, min(0.25, wait)))
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                break
            if kind == "stream":
                text = content["text"][: max(0, lim.output_chars - kept)]
                kept += len(text)
                stdout.append(text)
                parts.append(text)
            elif kind in ("execute_result", "display_data"):
                data = content.get("data", {})
                if "image/png" in data:
                    if len(images) < lim.images:
                        images.append(base64.b64decode(data["image/png"]))
                    parts.append("[Image]\n")
                elif "text/plain" in data and kept < lim.output_chars:
                    text = ANSI.sub("", data["text/plain"])[: lim.output_chars - kept]
                    kept += len(text)
                    parts.append(text + "\n")
            elif kind == "error":
                error = trim_traceback(content.get("traceback") or [f"{content['ename']}: {content['evalue']}"],
                                       lim.observation_chars)
        timed_out = interrupted_at is not None
        if timed_out:
            error = f"TimeoutError: the cell ran past {timeout:g} s and was interrupted"
        text = "".join(parts)
        if error:
            text = (text.rstrip("\n") + "\n" + error) if text.strip() else error
        return CellResult(text=self._block(text, keep_tail=bool(error)), images=images, error=bool(error),
                          stdout="".join(stdout), timed_out=timed_out)

    def _block(self, text: str, keep_tail: bool) -> str:
        limit = self.limits.observation_chars
        if keep_tail and len(text) > limit:  # the error line is at the end
            return f"```result\n[TRUNCATED] ...{text[-limit:]}\n```"
        return result_block(text, limit)

    def _death_reason(self) -> str:
        code = self.proc.returncode
        if code is not None and code < 0:
            sig = signal.Signals(-code)
            if sig == signal.SIGXCPU:
                why = f"it used up its CPU time ({self.limits.cpu_seconds} s per process)"
            elif sig == signal.SIGKILL:
                why = "it was killed (SIGKILL: out of memory, the CPU-time limit, or stopped from outside)"
            else:
                why = f"it was stopped by {sig.name}"
        else:
            why = f"it exited with status {code}"
        return f"KernelDied: the kernel stopped while running this cell: {why}"

    def _lost_kernel(self, parts, stdout, images, reason: str, timed_out: bool = False) -> CellResult:
        self._kill()
        self._lost = True
        text = "".join(parts).rstrip("\n")
        text = f"{text}\n{reason}" if text else reason
        text += ". Its variables are gone; the next cell runs in a fresh kernel (files in the folder remain)."
        return CellResult(text=self._block(text, keep_tail=True), images=images, error=True, stdout="".join(stdout),
                          timed_out=timed_out, restarted=True)

    # --- the rest ------------------------------------------------------------------------------

    def system_prompt(self, language: str = "zh") -> str:
        self.start()  # the kernel's folder as it sees it: /mnt/data in a private mount namespace
        return SYSTEM_PROMPTS[language].format(workdir=f"{self.kernel_workdir}/")

    @property
    def kernel_workdir(self) -> str:
        """self.workdir as the kernel sees it (sandbox.fixed_workdir), once a kernel has started."""
        return self.sandbox.get("workdir", str(self.workdir))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._kill()
            shutil.rmtree(self.root, ignore_errors=True)
            _live.discard(self)

    def __enter__(self) -> CodeInterpreter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass


class KernelPool:
    """One CodeInterpreter per conversation id, never shared; kernels idle past `idle_seconds` are closed by a
    background thread (a kernel running a cell is never idle); at most `max_kernels` live at once."""

    def __init__(self, *, max_kernels: int = 8, idle_seconds: float = 600.0, limits: Limits | None = None):
        require_extra()
        if max_kernels < 1:
            raise ValueError(f"max_kernels must be at least 1, got {max_kernels}")
        self.max_kernels = max_kernels
        self.idle_seconds = idle_seconds
        self.limits = limits
        self._kernels: dict[str, CodeInterpreter] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._reap_loop, name="chatglm-kernel-reaper", daemon=True).start()

    def get(self, conversation_id: str) -> CodeInterpreter:
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("this kernel pool is closed")
            kernel = self._kernels.get(conversation_id)
            if kernel is None:
                if len(self._kernels) >= self.max_kernels:
                    raise KernelLimitError(
                        f"{len(self._kernels)} interpreter kernels are live, the most this pool allows "
                        f"(max_kernels={self.max_kernels}); end a conversation, or wait for idle ones to be "
                        f"closed after {self.idle_seconds:g} s")
                kernel = self._kernels[conversation_id] = CodeInterpreter(limits=self.limits, start=False)
            kernel.last_used = time.monotonic()
        try:
            kernel.start()  # outside the pool's lock: a start takes about a second
        except BaseException:
            self.release(conversation_id)
            raise
        return kernel

    def release(self, conversation_id: str) -> None:
        with self._lock:
            kernel = self._kernels.pop(conversation_id, None)
        if kernel is not None:
            kernel.close()

    def __len__(self) -> int:
        return len(self._kernels)

    def __contains__(self, conversation_id: str) -> bool:
        return conversation_id in self._kernels

    def reap(self) -> list[str]:
        """Close the kernels idle longer than idle_seconds; their conversation ids."""
        reaped = []
        for cid, kernel in list(self._kernels.items()):
            if time.monotonic() - kernel.last_used <= self.idle_seconds or not kernel._lock.acquire(blocking=False):
                continue  # recent, or running a cell
            try:
                with self._lock:
                    if self._kernels.get(cid) is not kernel:
                        continue
                    del self._kernels[cid]
            finally:
                kernel._lock.release()
            kernel.close()
            reaped.append(cid)
        return reaped

    def _reap_loop(self) -> None:
        while not self._closed.wait(min(30.0, max(0.05, self.idle_seconds / 4))):
            self.reap()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            kernels = list(self._kernels.values())
            self._kernels.clear()
        for kernel in kernels:
            kernel.close()

    def __enter__(self) -> KernelPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
