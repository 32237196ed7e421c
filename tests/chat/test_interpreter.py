"""The code interpreter: what the model reads back, and the sandbox's isolation, each tested on real kernels.

Kernels are shared within the module where a test leaves them usable (a start is ~1-2 s); the tests that
kill a kernel run last on the kernel they share, or have their own.
"""
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chatglm.chat import interpreter as ci
from chatglm.chat.interpreter import CodeInterpreter, InterpreterUnavailable, KernelLimitError, KernelPool, Limits

HAVE_EXTRA = all(importlib.util.find_spec(name) for name in ("jupyter_client", "ipykernel"))
needs_extra = pytest.mark.skipif(not HAVE_EXTRA, reason="needs the interpreter extra: pip install 'chatglm[interpreter]'")
TIGHT = Limits(timeout=2.0, interrupt_grace=2.0, memory_mb=1024, processes=48, file_mb=1, output_chars=10_000)


@pytest.fixture(scope="module")
def kernel():
    with CodeInterpreter() as k:
        yield k


@pytest.fixture(scope="module")
def tight():
    with CodeInterpreter(limits=TIGHT) as k:
        yield k


@pytest.fixture(scope="module")
def pool():
    with KernelPool(max_kernels=2, idle_seconds=3600) as p:
        yield p


@pytest.mark.parametrize("make", [CodeInterpreter, KernelPool], ids=["interpreter", "pool"])
def test_missing_extra_names_it(monkeypatch, make):
    real = importlib.util.find_spec
    monkeypatch.setattr(ci.importlib.util, "find_spec", lambda name: None if name == "ipykernel" else real(name))
    with pytest.raises(InterpreterUnavailable, match=r"ipykernel: install the extra with pip install 'chatglm\[interpreter\]'"):
        make()


@pytest.mark.parametrize("make", [CodeInterpreter, KernelPool], ids=["interpreter", "pool"])
def test_not_linux_is_a_clear_error(monkeypatch, make):
    monkeypatch.setattr(ci.sys, "platform", "darwin")
    with pytest.raises(InterpreterUnavailable, match="sandbox needs Linux .*not darwin"):
        make()


# --- what the model reads --------------------------------------------------------------------------------

@needs_extra
@pytest.mark.parametrize("code,observation", [
    ("1 + 1", "2"),
    ("print('hi')\n3", "hi\n3"),
    ("x = 6\nx * 7", "42"),
    ("import sys; print('to stderr', file=sys.stderr)", "to stderr"),
    ("y = 1", ""),
    ("[i * i for i in range(5)]", "[0, 1, 4, 9, 16]"),
], ids=["expression", "print-then-value", "state", "stderr", "no-output", "list"])
def test_result_block(kernel, code, observation):
    result = kernel.run(code)
    assert result.text == f"```result\n{observation}\n```"
    assert not result.error and not result.timed_out and not result.restarted


@needs_extra
@pytest.mark.parametrize("code,error_line,shown,elided", [
    ("def f():\n    return 1 / 0\nf()", "ZeroDivisionError: division by zero", ["Cell In[", "----> 3 f()"], ["..."]),
    ("import json\njson.loads('{')",
     "JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
     ["----> 2 json.loads('{')", "\n...\n", "json/decoder.py", "obj, end = self.scan_once(s, idx)"],
     ["json/__init__.py", "Decode a JSON document"]),
], ids=["own-frames", "library-frames-elided"])
def test_traceback_trimmed_ansi_free(kernel, code, error_line, shown, elided):
    result = kernel.run(code)
    assert result.error and not result.restarted
    assert "\x1b" not in result.text and result.text.endswith(f"{error_line}\n```")
    assert all(s in result.text for s in shown) and not any(s in result.text for s in elided)


@needs_extra
def test_long_observation_truncated_as_the_anchor(kernel):
    result = kernel.run("print('x' * 5000)")
    assert result.text == "```result\n" + "x" * 1024 + " [TRUNCATED]\n```"
    assert result.stdout == "x" * 5000 + "\n"


@needs_extra
def test_output_cap(tight):
    result = tight.run("for _ in range(100): print('y' * 999)")
    assert len(result.stdout) == TIGHT.output_chars and not result.error


@needs_extra
def test_figure_is_image_observation_and_png(kernel):
    result = kernel.run("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
    assert result.text == "```result\n[Image]\n```", result.text
    assert len(result.images) == 1 and result.images[0].startswith(b"\x89PNG\r\n\x1a\n")


@needs_extra
def test_system_prompt_names_the_working_directory(kernel):
    """In a private mount namespace the kernel works in /mnt/data, the original prompt's path, for every kernel
    alike (a random folder name in the prompt would change what a model writes); its files are in kernel.workdir.
    Without one it works in kernel.workdir itself."""
    shown = "/mnt/data" if kernel.sandbox["files"] == "private" and os.path.isdir("/mnt") else str(kernel.workdir)
    assert kernel.kernel_workdir == shown
    assert f"{shown}/" in kernel.system_prompt() and "不能联网" in kernel.system_prompt()
    assert f"{shown}/" in kernel.system_prompt("en")
    assert kernel.run("import os; os.getcwd()").text == f"```result\n'{shown}'\n```"
    assert kernel.run("import os; os.environ['HOME'] == os.environ['TMPDIR'] == os.getcwd()").text == \
        "```result\nTrue\n```"
    kernel.run("open('from-kernel.txt', 'w').write('hi')")
    assert (kernel.workdir / "from-kernel.txt").read_text() == "hi"
    if shown == "/mnt/data":  # the tmpfs that holds the mount point is read-only
        assert "Read-only file system" in kernel.run("open('/mnt/other', 'w')").text


# --- isolation ---------------------------------------------------------------------------------------

@pytest.fixture
def local_server():
    """A TCP server on 127.0.0.1 that records whether anyone connected."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                pass
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def connect_code(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)"


@needs_extra
def test_no_network(kernel, local_server):
    port, accepted = local_server
    with socket.create_connection(("127.0.0.1", port), timeout=3):  # the server works from here
        pass
    time.sleep(0.3)
    assert len(accepted) == 1
    result = kernel.run(connect_code(port))
    # a network namespace where the system allows one (root, or user namespaces), else the warned-of fallback
    refused = ("OSError: [Errno 101] Network is unreachable" if kernel.network == "namespace"
               else "PermissionError: network access is disabled in the interpreter")
    assert result.error and refused in result.text
    time.sleep(0.3)
    assert len(accepted) == 1


@needs_extra
def test_network_fallback_warns_and_blocks_sockets(monkeypatch, local_server):
    port, accepted = local_server
    monkeypatch.setenv(ci.NO_NAMESPACES_ENV, "1")
    with pytest.warns(RuntimeWarning, match="network namespace.*private mount namespace.*pid namespace"):
        k = CodeInterpreter()
    with k:
        assert k.network.startswith("fallback") and k.sandbox["files"].startswith("shared")
        result = k.run(connect_code(port))
        assert result.error and "PermissionError: network access is disabled in the interpreter" in result.text
        time.sleep(0.3)
        assert accepted == []


@needs_extra
def test_memory_limit_gives_memory_error_and_kernel_survives(tight):
    tight.run("kept = 'still here'")
    result = tight.run(f"big = bytearray({4 * TIGHT.memory_mb} * 2**20)")
    assert result.error and not result.restarted
    assert result.text.endswith("MemoryError: \n```")
    after = tight.run("kept")
    assert after.text == "```result\n'still here'\n```" and not after.restarted


@needs_extra
def test_file_size_limit(tight):
    ok = tight.run(f"open('small', 'wb').write(b'0' * {TIGHT.file_mb * 2**20 // 2})")
    assert not ok.error
    result = tight.run(f"open('big', 'wb').write(b'0' * {2 * TIGHT.file_mb * 2**20})")
    assert result.error and "OSError: [Errno 27] File too large" in result.text
    assert (tight.workdir / "big").stat().st_size == TIGHT.file_mb * 2**20


def _tasks_of(uid: int, skip=()) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and entry.name not in skip and entry.stat().st_uid == uid:
                count += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            pass
    return count


FORK_BOMB = """
import os, time
root, refused, end = os.getpid(), 0, time.time() + 3
while time.time() < end:  # every process keeps forking: exponential until the limit stops it
    try:
        os.fork()
    except OSError:
        refused += 1
    time.sleep(0.05)
if os.getpid() != root:
    os._exit(0)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
print('refused', refused > 0)
"""


@needs_extra
def test_fork_bomb_stopped_by_process_limit(tight):
    limit = next(int(line.split()[2]) for line in Path(f"/proc/{tight.proc.pid}/limits").read_text().splitlines()
                 if line.startswith("Max processes"))
    # the kernel's uid: its own as root; otherwise ours, shared with this process and the other kernels
    uid = tight.uid if tight.uid is not None else os.getuid()
    others = {e.name for e in os.scandir("/proc") if e.name.isdigit() and e.name != str(tight.proc.pid)}
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _tasks_of(uid, skip=others))
            time.sleep(0.02)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = tight.run(FORK_BOMB, timeout=20)
    finally:
        done.set()
        watcher.join()
    assert "refused True" in result.text, result.text
    assert 10 < peak[0] <= limit
    assert tight.run("'alive'").text == "```result\n'alive'\n```"


@needs_extra
def test_timeout_interrupts_the_kernel(tight):
    tight.run("kept = 1")
    result = tight.run("while True: pass")
    assert result.timed_out and result.error and not result.restarted
    assert result.text == f"```result\nTimeoutError: the cell ran past {TIGHT.timeout:g} s and was interrupted\n```"
    assert result.seconds < TIGHT.timeout + TIGHT.interrupt_grace
    assert tight.run("kept").text == "```result\n1\n```"


@needs_extra
def test_timeout_restarts_a_kernel_that_ignores_the_interrupt(tight):
    tight.run("kept = 1")
    pid = tight.proc.pid
    result = tight.run("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass")
    assert result.timed_out and result.restarted and "ignored the interrupt, so its kernel was killed" in result.text
    assert not Path(f"/proc/{pid}").exists()
    after = tight.run("'kept' in dir()", timeout=30)  # a fresh kernel's first cell may take 2 s on a busy machine
    assert after.text == "```result\nFalse\n```" and after.restarted and tight.proc.pid != pid


def _host_processes(*cmdline: str) -> list[str]:
    wanted = "\0".join(cmdline).encode() + b"\0"
    found = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and Path(entry.path, "cmdline").read_bytes() == wanted:
                found.append(entry.name)
        except OSError:
            pass
    return found


@needs_extra
def test_kernel_sees_and_signals_only_its_own_processes(kernel):
    if kernel.sandbox["processes"] != "namespace":
        pytest.skip(f"no pid namespace with its own /proc here ({kernel.sandbox['processes']})")
    assert kernel.run("import os; sorted(int(p) for p in os.listdir('/proc') if p.isdigit())").text == \
        "```result\n[1, 2]\n```"
    result = kernel.run(f"os.kill({os.getpid()}, 0)")  # this test process, by its pid outside
    assert result.error and "ProcessLookupError" in result.text


@needs_extra
def test_killed_mid_cell_then_fresh_kernel(tight):
    tight.run("kept = 1\nimport subprocess\nstray = subprocess.Popen(['sleep', '987.65'])")
    assert len(_host_processes("sleep", "987.65")) == 1
    pid = tight.proc.pid
    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    result = tight.run("import time\nprint('started', flush=True)\ntime.sleep(30)")
    assert result.restarted and result.error and result.seconds < 10
    assert "KernelDied: the kernel stopped while running this cell: it was killed (SIGKILL" in result.text
    assert "the next cell runs in a fresh kernel" in result.text
    after = tight.run("'kept' in dir()")
    assert after.text == "```result\nFalse\n```" and after.restarted and not after.error
    assert _host_processes("sleep", "987.65") == []  # what the lost kernel started went with it


@needs_extra
def test_cpu_time_limit():
    with CodeInterpreter(limits=Limits(timeout=60, cpu_seconds=2)) as k:
        result = k.run("while True: pass")
        assert result.restarted and not result.timed_out
        assert "it used up its CPU time (2 s per process)" in result.text
        assert k.run("'fresh'").text == "```result\n'fresh'\n```"


@needs_extra
def test_conversations_cannot_see_each_other(pool):
    alice, bob = pool.get("alice"), pool.get("bob")
    assert alice is not bob and pool.get("alice") is alice
    assert alice.workdir != bob.workdir
    alice.run("secret = 42\nopen('notes.txt', 'w').write('for alice')")
    assert bob.run("secret").text.endswith("NameError: name 'secret' is not defined\n```")
    assert bob.run("import os; os.listdir('.')").text == "```result\n[]\n```"


@needs_extra
def test_conversations_cannot_reach_each_others_folders(pool):
    alice, bob = pool.get("alice"), pool.get("bob")
    if bob.sandbox["files"] != "private" and bob.uid is None:
        pytest.skip(f"no mount namespace here ({bob.sandbox['files']}) and kernels share this user's uid (see README)")
    alice.run("open('diary.txt', 'w').write('for alice')")
    result = bob.run(f"open('{alice.workdir}/diary.txt').read()")
    assert result.error and ("FileNotFoundError" in result.text or "PermissionError" in result.text)
    if bob.sandbox["files"] == "private":  # the temporary folder shows its own folder, no other kernel's
        listing = bob.run(f"import os; sorted(os.listdir('{bob.root.parent}'))").text
        assert repr(bob.root.name) in listing and repr(alice.root.name) not in listing
        # and the shared scratch folders are each kernel's own
        alice.run("open('/dev/shm/note', 'w').write('a'); open('/var/tmp/note', 'w').write('a')")
        assert bob.run("os.listdir('/dev/shm') + os.listdir('/var/tmp')").text == "```result\n[]\n```"


@needs_extra
def test_rest_of_the_filesystem_is_read_only(kernel):
    """A world-writable file outside the temporary folder: writable by anyone, yet not from the kernel."""
    import tempfile
    spots = [p for p in (Path.cwd(), Path(__file__).parent)
             if os.access(p, os.W_OK) and not str(p.resolve()).startswith(str(Path(tempfile.gettempdir()).resolve()))]
    if kernel.sandbox["files"] != "private":
        pytest.skip(f"no private mount namespace here ({kernel.sandbox['files']})")
    if not spots:
        pytest.skip(f"this test process can write to no folder outside {tempfile.gettempdir()} to try")
    folder = spots[0] / f".chatglm-interpreter-test-{os.getpid()}"
    folder.mkdir(mode=0o777)
    try:
        os.chmod(folder, 0o777)
        (folder / "open.txt").write_text("")
        os.chmod(folder / "open.txt", 0o666)
        result = kernel.run(f"open('{folder}/open.txt', 'a').write('x')")
        assert result.error and "OSError: [Errno 30] Read-only file system" in result.text
        assert (folder / "open.txt").read_text() == ""
        assert not kernel.run("open('mine.txt', 'w').write('x')").error  # its own folder stays writable
    finally:
        shutil.rmtree(folder)


@needs_extra
def test_pool_enforces_max_kernels(pool):
    pool.get("alice"), pool.get("bob")
    with pytest.raises(KernelLimitError, match=r"2 interpreter kernels are live.*max_kernels=2"):
        pool.get("carol")
    assert "carol" not in pool and len(pool) == 2


@needs_extra
def test_pool_release_and_idle_reaping():
    with KernelPool(max_kernels=2, idle_seconds=0.5) as p:
        k = p.get("a")
        root, pid = k.root, k.proc.pid
        p.release("a")
        assert "a" not in p and not root.exists() and not Path(f"/proc/{pid}").exists()
        k = p.get("b")
        root, pid = k.root, k.proc.pid
        end = time.monotonic() + 10
        while ("b" in p or root.exists()) and time.monotonic() < end:
            time.sleep(0.1)
        assert "b" not in p and not root.exists() and not Path(f"/proc/{pid}").exists()


@needs_extra
@pytest.mark.parametrize("ending", ["exit", "SIGKILL"])
def test_kernels_end_with_their_process(ending):
    """At exit every kernel is closed (processes and folder); a killed server's kernels exit within seconds,
    what they started with them (their folders stay behind)."""
    # the interpreter module imports nothing from the package above it, so this process skips torch
    end = "sys.exit(0)" if ending == "exit" else "os.kill(os.getpid(), 9)"
    script = ("import os, sys, types\n"
              f"for name, path in (('chatglm', {str(Path(ci.__file__).parents[1])!r}), ('chatglm.chat', {str(Path(ci.__file__).parent)!r})):\n"
              "    sys.modules[name] = types.ModuleType(name); sys.modules[name].__path__ = [path]\n"
              "from chatglm.chat.interpreter import CodeInterpreter\nk = CodeInterpreter()\n"
              "k.run(\"import subprocess; subprocess.Popen(['sleep', '876.5'])\")\n"
              f"print(k.proc.pid, k.root, flush=True)\n{end}\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    pid, root = out.stdout.split()
    try:
        deadline = time.monotonic() + 10
        while (Path(f"/proc/{pid}").exists() or _host_processes("sleep", "876.5")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists() and _host_processes("sleep", "876.5") == []
        assert Path(root).exists() == (ending == "SIGKILL")
    finally:
        shutil.rmtree(root, ignore_errors=True)
