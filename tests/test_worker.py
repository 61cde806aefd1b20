"""The persistent worker that keeps a deployment node's model loaded across rounds."""

import os
import signal
import subprocess
import sys

import pytest
from flwr.app import Context, RecordDict

from flowertune_llm import models, worker
from flowertune_llm.config import to_flat_dict
from flowertune_llm.exchange import TRAIN
from flowertune_llm.profiling import Recorder

from conftest import make_config, train_content


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    # One worker for the module: starting one costs the training stack's imports.
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("FLOWERTUNE_LLM_WORKER_DIR", str(tmp_path_factory.mktemp("workers")))
        yield from _node()


def _node():
    config = make_config()
    run_config = to_flat_dict(config)
    context = Context(run_id=1, node_id=77, node_config={"partition-id": 0, "num-partitions": 4},
                      state=RecordDict(), run_config=run_config)  # fmt: skip
    yield config, context
    pid_file = worker.WorkerPaths.for_node(77).pid
    if pid_file.exists():  # stop the worker by its PID, also when the test failed
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _round_content(config, server_round):
    return train_content(models.get_adapter_state(models.build_peft_model(config.model)), server_round)


def test_simulation_runs_in_process_and_deployment_uses_the_worker():
    assert worker.wanted({}) == (not worker.in_simulation())
    assert worker.wanted({"persistent-worker": "true"}) and not worker.wanted({"persistent-worker": False})


def test_the_worker_keeps_the_model_between_rounds(node):
    config, context = node
    replies = []
    for server_round in (1, 2):
        profile = Recorder(node=77)
        replies.append(worker.handle(TRAIN, _round_content(config, server_round), context, profile))
        spans = {e["name"]: e for e in profile.events if e["kind"] == "span"}
        assert spans["worker_connect"]["started_worker"] == (server_round == 1)
        assert spans["model_load"]["cache_hit"] == (server_round == 2)  # loaded once, by the worker
        assert spans["train"]["parent"] == "handler"
    for reply in replies:
        assert reply["metrics"]["num-examples"] == 175
        assert reply["arrays"].keys() == _round_content(config, 1)["arrays"].keys()


def test_a_failed_round_reaches_the_caller_with_the_reason(node):
    config, context = node
    bad = Context(run_id=1, node_id=77, node_config={"dataset-path": "/nowhere/data.jsonl"},
                  state=RecordDict(), run_config=context.run_config)  # fmt: skip
    with pytest.raises(worker.WorkerError, match="dataset-path='/nowhere/data.jsonl': no such file"):
        worker.handle(TRAIN, _round_content(config, 3), bad, Recorder(node=77))
    # The worker survives a failed round and serves the next one, model still loaded.
    profile = Recorder(node=77)
    assert worker.handle(TRAIN, _round_content(config, 4), context, profile)["metrics"]["num-examples"] == 175
    assert [e["cache_hit"] for e in profile.events if e.get("name") == "model_load"] == [True]


def test_the_worker_exits_when_its_supernode_does(tmp_path):
    paths = worker.WorkerPaths(*(tmp_path / f"w{suffix}" for suffix in (".sock", ".key", ".lock", ".log", ".pid")))
    paths.key.write_bytes(os.urandom(32))
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    process = subprocess.Popen(
        [sys.executable, "-m", "flowertune_llm.worker", "--socket", str(paths.socket), "--key", str(paths.key),
         "--watch-pid", str(supernode.pid)],
    )  # fmt: skip
    try:
        supernode.wait()
        process.wait(timeout=60)
        assert not paths.socket.exists()
    finally:
        process.kill()
