"""``edgec device serve``: a TVM RPC server with edgec's device functions.

Runs on a board that has Python and the apache-tvm wheel (e.g. aarch64). It
binds 127.0.0.1 unless told otherwise: anyone who can reach the port can
upload and run code.
"""

from __future__ import annotations

import logging
import signal
import threading

from edgec.errors import DeviceError
from edgec.runtimes import device_functions

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def start_server(host: str = "127.0.0.1", port: int = 9090, port_end: int | None = None, tracker: tuple[str, int] | None = None, key: str = "edgec"):
    """Start the server in a child process; returns the tvm.rpc.Server (``.port``, ``.terminate()``)."""
    from tvm import rpc

    try:
        return rpc.Server(
            host=host,
            port=port,
            port_end=port_end or port + 1,
            tracker_addr=tracker,
            key=key if tracker else "",  # direct clients connect with an empty key
            silent=True,
            server_init_callback=device_functions.register,
        )
    except Exception as error:  # noqa: BLE001 - port in use, bad host...
        raise DeviceError(f"could not start the RPC server on {host}:{port}: {error}") from None


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
