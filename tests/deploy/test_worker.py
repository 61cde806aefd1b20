"""The persistent worker that keeps a deployment node's model loaded across rounds."""

import os
import signal
import subprocess
import sys

import pytest
from flwr.app import Context, RecordDict

from flowertune_llm.config import NodeConfig, to_flat_dict
from flowertune_llm.deploy import worker
from flowertune_llm.federated import protocol
from flowertune_llm.observe.profiling import Recorder
from flowertune_llm.training import models
from testbed.grids import train_content

from conftest import make_config

NODE_ID = 77
PARTITION = NodeConfig.parse({"partition-id": 0, "num-partitions": 4})


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    # One worker for the module: starting one costs the training stack's imports.
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("FLOWERTUNE_LLM_WORKER_DIR", str(tmp_path_factory.mktemp("workers")))
        config = make_config()
        context = Context(run_id=1, node_id=NODE_ID, node_config={}, state=RecordDict(), run_config=to_flat_dict(config))
        try:
            yield config, context
        finally:
            pid_file = worker.WorkerPaths.for_node(NODE_ID).pid
            if pid_file.exists():  # stop the worker by its PID, also when the test failed
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _round_content(config, server_round):
    return train_content(models.get_adapter_state(models.build_peft_model(config.model)), server_round)


def test_the_worker_keeps_the_model_between_rounds(node):
    config, context = node
    for server_round in (1, 2):
        profile = Recorder(node=NODE_ID)
        content = _round_content(config, server_round)
        reply = protocol.TrainRes.from_content(worker.handle(protocol.TRAIN, content, context, PARTITION, profile))
        spans = {e["name"]: e for e in profile.events if e["kind"] == "span"}
        assert spans["worker_connect"]["started_worker"] == (server_round == 1)
        assert spans["model_load"]["cache_hit"] == (server_round == 2)  # loaded once, by the worker
        assert spans["train"]["parent"] == "handler"
        assert reply.weight == 175 and reply.train_loss > 0  # the partition's examples, a real loss
        assert list(reply.manifest) == protocol.TrainIns.from_content(content).reply_keys


def test_a_failed_round_reaches_the_caller_with_the_reason(node):
    config, context = node
    missing = NodeConfig.parse({"dataset-path": "/nowhere/data.jsonl"})
    with pytest.raises(worker.WorkerError, match="dataset-path='/nowhere/data.jsonl': no such file"):
        worker.handle(protocol.TRAIN, _round_content(config, 3), context, missing, Recorder(node=NODE_ID))
    # The worker survives a failed round and serves the next one, model still loaded.
    profile = Recorder(node=NODE_ID)
    reply = worker.handle(protocol.TRAIN, _round_content(config, 4), context, PARTITION, profile)
    assert protocol.TrainRes.from_content(reply).weight == 175
    assert [e["cache_hit"] for e in profile.events if e.get("name") == "model_load"] == [True]


def test_the_worker_exits_when_its_supernode_does(tmp_path):
    paths = worker.WorkerPaths(*(tmp_path / f"w{suffix}" for suffix in (".sock", ".key", ".lock", ".log", ".pid")))
    paths.key.write_bytes(os.urandom(32))
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    process = subprocess.Popen(
        [sys.executable, "-m", "flowertune_llm.deploy.worker", "--socket", str(paths.socket), "--key", str(paths.key),
         "--watch-pid", str(supernode.pid)],
    )  # fmt: skip
    try:
        supernode.wait()
        process.wait(timeout=60)
        assert not paths.socket.exists()
    finally:
        process.kill()
