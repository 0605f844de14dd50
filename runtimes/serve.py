"""``edgec device serve``: a TVM RPC server with edgec's device functions.

Runs on a board that has Python and the apache-tvm wheel (e.g. aarch64). It
binds 127.0.0.1 unless told otherwise: anyone who can reach the port can
upload and run code.

Each session runs in a worker process (TVM's server). A worker that dies --
an uploaded lib.so that is truncated kills it with SIGBUS, a wrong one with
SIGSEGV -- ends that session only: TVM's listener raises when a worker exits
non-zero, which would end the listener thread and leave a server that
accepts connections but serves nobody; edgec's server logs the death and
goes on listening (see :func:`_surviving`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import socket
import threading

from edgec.core.errors import DeviceError
from edgec.runtimes import device_functions

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def start_server(host: str = "127.0.0.1", port: int = 9090, port_end: int | None = None, tracker: tuple[str, int] | None = None, key: str = "edgec"):
    """Start the server in a child process; returns the tvm.rpc.Server (``.port``, ``.terminate()``)."""
    from tvm import rpc

    if not 0 < port < 65536:
        raise DeviceError(f"--port {port} is not a TCP port (1-65535)")
    end = port_end or port + 1
    if not any(_can_bind(host, candidate) for candidate in range(port, end)):
        which = f"port {port}" if end == port + 1 else f"every port in {port}-{end - 1}"
        raise DeviceError(f"{which} on {host} is in use (another server?); choose another --port")
    try:
        return rpc.Server(
            host=host,
            port=port,
            port_end=end,
            tracker_addr=tracker,
            key=key if tracker else "",  # direct clients connect with an empty key
            silent=True,
            server_init_callback=init_server,
        )
    except Exception as error:  # noqa: BLE001 - port taken meanwhile, bad host...
        lines = str(error).strip().splitlines()
        raise DeviceError(f"could not start the RPC server on {host}:{port}: {lines[-1] if lines else type(error).__name__}") from None


def _can_bind(host: str, port: int) -> bool:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise DeviceError(f"cannot bind the RPC server to {host!r}: {error.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TVM's server binds
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise DeviceError(f"cannot bind the RPC server to {host}:{port}: {error.strerror}") from None
    return True


def init_server() -> None:
    """The server process's init: edgec's device functions, and sessions whose worker dies end alone."""
    import tvm.rpc.server as tvm_server

    device_functions.register()
    if not getattr(tvm_server._serving, "edgec_surviving", False):
        tvm_server._serving = _surviving(tvm_server._serving)


def _surviving(serving):
    """Wrap TVM's per-session ``_serving(sock, addr, opts, load_library)``: when the session's worker
    exits non-zero it raises RuntimeError with the cwd still in the session's scratch directory;
    log it, go back, close the client's socket, and return to the listen loop."""

    @functools.wraps(serving)
    def serve_one(sock, addr, opts, load_library):
        cwd = os.getcwd()
        try:
            serving(sock, addr, opts, load_library)
        except Exception as error:  # noqa: BLE001 - the worker's death must not end the listener
            log.warning("session from %s ended abnormally: %s", addr, error)
            os.chdir(cwd)
            with contextlib.suppress(OSError):
                sock.close()

    serve_one.edgec_surviving = True
    return serve_one


def serve_forever(server, stop: threading.Event | None = None) -> None:
    """Block until SIGINT/SIGTERM (or ``stop``), then stop the server process."""
    stop = stop or threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            if server.proc is None or not server.proc.is_alive():
                raise DeviceError("the RPC server process exited unexpectedly")
    finally:
        server.terminate()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
