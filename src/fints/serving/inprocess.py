"""An app served by uvicorn in a background thread: for the load test and the tests."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from fints.errors import FintsError


class RunningServer:
    """A uvicorn server on an ephemeral loopback port, in a background thread.

    ``with RunningServer(app) as server:`` serves ``app`` at ``server.url`` (the
    app's lifespan included) until the block ends.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", startup_timeout_s: float = 60) -> None:
        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))
        port = self._socket.getsockname()[1]
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise FintsError("the in-process server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self._socket.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
