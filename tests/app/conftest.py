"""A real playground server for the API and browser tests: the embedded model, calibrated with a tiny recipe into a
checkpoint, served by ``mobiquant app --checkpoint`` in a subprocess on a free port (the command users run)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_checkpoint(tmp_path_factory, embedded):
    """The embedded model calibrated with a tiny recipe (routers and thresholds real, quality irrelevant)."""
    import copy

    import mobiquant
    from mobiquant import CalibConfig, MoBiQuantConfig

    model, tok = embedded
    path = tmp_path_factory.mktemp("app-ckpt")
    q = mobiquant.calibrate_(copy.deepcopy(model), tok, MoBiQuantConfig(group_size=64),
                             CalibConfig(samples=4, seqlen=64, epochs=1), progress=False)
    mobiquant.save_quantized(q, path, tok)
    return path


@pytest.fixture(scope="session")
def app_server(app_checkpoint, tmp_path_factory):
    """URL of a running `mobiquant app` (stopped at the end of the session)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("app-log") / "server.log"
    env = os.environ | {"GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mobiquant", "app", "--checkpoint", str(app_checkpoint),
                                 "--port", str(port), "--max-new-tokens", "256"], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError(f"the app did not start in 180 s:\n{log.read_text()}")
    yield url
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def client(app_server):
    from gradio_client import Client

    c = Client(app_server, verbose=False)
    yield c
    c.close()
