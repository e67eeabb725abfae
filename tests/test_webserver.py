"""`dagster-webserver` on loopback loads the code location and serves every asset."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO, quiet_dagster_home

QUERY = '{ assetNodes { assetKey { path } } }'
EXPECTED = {"raw_traces", "curated_traces", "task_clusters", "slm_candidates", "finetuned_adapters", "shadow_eval",
            "promotion_decisions", "router_config"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port: int) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": QUERY}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@contextmanager
def start_webserver(dagster_home: Path):
    """`dagster-webserver` for the repository's workspace on a free loopback port, once it
    answers with the asset graph; yields the port."""
    port = _free_port()
    webserver = Path(sys.executable).parent / "dagster-webserver"
    process = subprocess.Popen(
        [str(webserver), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env={**os.environ, "DAGSTER_HOME": str(dagster_home)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if _query(port).get("data", {}).get("assetNodes"):
                    break
            except OSError:
                pass
            time.sleep(2)
        assert process.poll() is None, process.stderr.read()
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_webserver_serves_every_asset_of_the_graph(tmp_path):
    with start_webserver(quiet_dagster_home(tmp_path)) as port:
        names = {node["assetKey"]["path"][-1] for node in _query(port)["data"]["assetNodes"]}
    assert names == EXPECTED
