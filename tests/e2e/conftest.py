"""Starts a real `vlm-server` on the repo's tiny checkpoint for the end-to-end tests.

The binary comes from $VLM_SERVER_BIN, else target/release/vlm-server, else
target/debug/vlm-server (build it first: `cargo build --release -p vlm-server`).
"""

import pytest

from e2e_support import Server


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def keyed_server():
    s = Server(["--api-key", "first-key", "--api-key-env", "SECOND_KEY"], env={"SECOND_KEY": "second-key"})
    yield s
    s.stop()


@pytest.fixture(scope="session")
def single_slot_server():
    s = Server(["--max-num-seqs", "1"])
    yield s
    s.stop()
