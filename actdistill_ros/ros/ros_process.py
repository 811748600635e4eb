"""Process plumbing shared by the tools and tests that drive ROS 2 nodes from outside.

- ``BackgroundRos``: this process's own rclpy Context, one node and an executor spinning in a
  thread; a callback that raises is logged and spinning goes on. ``close()`` (also run at
  interpreter exit for any instance left open) stops and joins the thread before it tears rclpy
  down: a daemon thread still inside rclpy when Python finalizes is ended with pthread_exit, whose
  unwinding through rclpy's C++ frames aborts the process ("terminate called without an active
  exception", exit -6) and loses whatever it had not flushed.
- ``NodeProcess``: a node module as a subprocess (``python -m MODULE --ros-args ...``) in a ROS
  environment (``ros_environment``), output in one log file, stopped with SIGINT, then killed.
- ``rss_bytes``: a process's resident set size, from /proc.
"""

from __future__ import annotations

import atexit
import logging
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

from actdistill_ros.ros.env import ros_environment

log = logging.getLogger("actdistill_ros.ros")

SPIN_PERIOD_S = 0.05
ERROR_BACKOFF_S = 0.01  # after a failed spin: keeps an executor that fails every time from busy-looping
JOIN_TIMEOUT_S = 5.0

_open_instances: "weakref.WeakSet[BackgroundRos]" = weakref.WeakSet()


@atexit.register
def _close_open_instances() -> None:
    """atexit runs before Python ends daemon threads: join every spin thread while that is still safe."""
    for ros in list(_open_instances):
        ros.close()


class BackgroundRos:
    """An rclpy Context of its own with one node, spun by a SingleThreadedExecutor in a daemon thread.

    ``domain_id`` None: the ROS_DOMAIN_ID of this process. Use ``close()`` (or ``with``) to shut down.
    """

    def __init__(self, node_name: str, domain_id: int | None = None):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        try:
            self.node = rclpy.create_node(node_name, context=self.context)
            self.executor = SingleThreadedExecutor(context=self.context)
            self.executor.add_node(self.node)
        except BaseException:
            self.context.try_shutdown()
            raise
        self.callback_errors = 0  # callbacks that raised (logged, spinning went on)
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._spin, name=f"{node_name}_spin", daemon=True)
        self._thread.start()
        _open_instances.add(self)

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        while not self._stop.is_set() and self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=SPIN_PERIOD_S)
            except ExternalShutdownException:
                return
            except Exception as err:  # one bad message must not end the thread and every later callback
                if not self.context.ok():
                    return  # shutting down: the executor's handles are going away
                self.callback_errors += 1
                log.error("%s: callback failed, still spinning: %s: %s", self.node.get_name(),
                          type(err).__name__, str(err).strip().splitlines()[0] if str(err).strip() else "")
                log.debug("callback traceback", exc_info=True)
                time.sleep(ERROR_BACKOFF_S)

    def close(self) -> None:
        """Stop and join the spin thread, then destroy the node and shut the context down (idempotent)."""
        if self._closed:
            return
        self._closed = True
        _open_instances.discard(self)
        self._stop.set()
        self.executor.wake()  # ends a wait in progress now instead of after SPIN_PERIOD_S
        self._thread.join(timeout=JOIN_TIMEOUT_S)
        if self._thread.is_alive():  # a callback that does not return: shutting the context down ends its waits
            log.warning("%s: spin thread still running after %g s; shutting its context down",
                        self.node.get_name(), JOIN_TIMEOUT_S)
            self.context.try_shutdown()
            self._thread.join(timeout=JOIN_TIMEOUT_S)
        self.executor.shutdown(timeout_sec=1.0)
        if self.context.ok():
            self.node.destroy_node()
        self.context.try_shutdown()

    def __enter__(self) -> "BackgroundRos":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rss_bytes(pid: int) -> int | None:
    """Resident set size of process ``pid`` in bytes (VmRSS in /proc/PID/status), None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # the kernel's "kB" are KiB
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None  # a zombie has no VmRSS line


def param_arg(value: Any) -> str:
    """A ``-p name:=value`` value that parses back to the same type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # keeps the decimal point: 1.0 stays a double
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(param_arg(v) for v in value) + "]"
    return str(value)


def node_command(module: str, params: Mapping[str, Any] | None = None,
                 params_file: str | Path | Sequence[str | Path] | None = None, node_name: str | None = None) -> list[str]:
    """``python -m MODULE --ros-args [-r __node:=NAME] [--params-file FILE ...] -p name:=value ...``
    (several files: each later one overrides the ones before it)."""
    argv = [sys.executable, "-m", module, "--ros-args"]
    if node_name:
        argv += ["-r", f"__node:={node_name}"]
    files = [] if params_file is None else [params_file] if isinstance(params_file, (str, Path)) else params_file
    for path in files:
        argv += ["--params-file", str(path)]
    for name, value in (params or {}).items():
        argv += ["-p", f"{name}:={param_arg(value)}"]
    return argv


class NodeProcess:
    """A node subprocess with stdout and stderr in ``log_path``; ``stop()`` sends SIGINT, then kills.

    ``command``: a module name (run as ``python -m MODULE --ros-args`` + ``ros_args``) or a whole argv.
    ``env`` None: ``ros_environment(domain_id=domain_id)``.
    """

    def __init__(self, command: str | Sequence[str], log_path: Path, *, ros_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, domain_id: int | None = None, name: str | None = None,
                 cwd: str | Path | None = None):
        argv = [sys.executable, "-m", command, "--ros-args", *ros_args] if isinstance(command, str) else list(command)
        env = dict(ros_environment(domain_id=domain_id) if env is None else env)
        env.setdefault("PYTHONUNBUFFERED", "1")  # the log shows what happened up to a crash
        self.name = name or (command if isinstance(command, str) else Path(argv[0]).name)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        except BaseException:
            self._log.close()
            raise

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output().strip().splitlines()[-lines:])

    def failure(self) -> str | None:
        """One line on why the process exited (its last error line), or None while it runs."""
        code = self.proc.poll()
        if code is None:
            return None
        lines = [line.strip() for line in self.output().splitlines() if line.strip()]
        last = next((l for l in reversed(lines) if "FATAL" in l or "Error" in l), lines[-1] if lines else "no output")
        return f"{self.name} exited with code {code}: {last}"

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGINT (the nodes' clean shutdown: zero motion, then exit), SIGKILL after ``timeout`` s."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
