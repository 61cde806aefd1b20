"""The app on Flower's Deployment Engine: a real SuperLink and SuperNodes on 127.0.0.1, TLS and SuperNode auth.

One federation serves the whole module (starting one costs ~10 s; every message in deployment starts a
``flwr-clientapp`` process, and each node's first round starts its persistent worker): three authenticated
SuperNodes, one with its IID partition, one with its own data file and one whose node config names a file that
does not exist, run the quickstart for two rounds, started with the command `flowertune-llm federation` prints.
The third node fails each round, named, and the rounds complete with the other two. Everything a test starts is
stopped by PID in the fixture's teardown, which fails if any process survives.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM

from flowertune_llm.builtin.make_instructions import make_instructions
from flowertune_llm.deploy.certificates import make_certificates
from flowertune_llm.deploy.cli_config import write_cli_connection
from flowertune_llm.deploy.federation import FederationError, LocalFederation

from conftest import APP_DIR, profiled_run_report, run_result_of

pytestmark = pytest.mark.deployment

OWN_EXAMPLES = 37  # the node-local file's size: no partition of the 700 built-in examples has it
# The SuperExec inside each SuperNode polls for new ClientApp tasks every second by default.
FAST_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}
MISSING = Path("/nonexistent/flowertune-llm-test/missing.jsonl")  # the third node's dataset-path


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deployment")
    own_data = tmp / "node-data" / "own.jsonl"
    own_data.parent.mkdir()
    own_data.write_text("".join(json.dumps(r) + "\n" for r in make_instructions(OWN_EXAMPLES, seed=2024)))
    fed = LocalFederation(
        tmp / "federation",
        num_supernodes=3,
        tls=True,
        auth=True,
        node_configs=["partition-id=0 num-partitions=2", {"dataset-path": str(own_data)}, {"dataset-path": str(MISSING)}],
        env=FAST_POLL,
    )
    with fed:  # stops every process by PID on the way out, also when a test failed
        yield fed
    assert not fed.pids(), "processes survived the federation"
    # The workers' logs stay under the federation's directory; a temporary worker directory is gone.
    assert not (fed.workdir / "workers").is_symlink() and fed.worker_dir == fed.workdir / "workers"
    # The CLI connection it wrote is gone with it: `flwr` is not left pointing at a dead SuperLink.
    assert fed.connection not in tomllib.loads((fed.cli_home / "config.toml").read_text())["superlink"]


def quickstart(output_dir: Path, rounds: int, **overrides: object) -> str:
    pairs = {"preset": "'quickstart'", "num-server-rounds": rounds, "output.dir": f"'{output_dir}'", **overrides}
    return " ".join(f"{k}={v}" for k, v in pairs.items())


@pytest.fixture(scope="module")
def two_node_run(federation, tmp_path_factory):
    """Two rounds, started with the command `flowertune-llm federation` prints (so that command runs here too)."""
    output_dir = tmp_path_factory.mktemp("deployment-runs")
    command = federation.run_command(str(APP_DIR), quickstart(output_dir, 2, **{"train.save-every-round": 1, "profile.enabled": "true"}))
    done = subprocess.run(["bash", "-c", command], env={**federation.cli_env, "HF_HUB_OFFLINE": "1"}, cwd=APP_DIR,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    result = run_result_of(done)
    return result, output_dir / str(result.run_id), command, done


def test_the_printed_command_runs_the_quickstart_offline(two_node_run):
    """What `flowertune-llm federation` prints: `flowertune-llm run` on its connection, the quickstart preset,
    nothing from the Hub; it streams the rounds, names the run directory and exits 0 on a completed run."""
    result, run_dir, command, done = two_node_run
    assert command.split()[1:3] == ["flowertune-llm", "run"] and "preset=" in command  # FLWR_HOME=... first
    assert done.returncode == 0 and result.ok, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"Run directory: {run_dir}" in done.stderr and "[round 2/2] train_loss" in done.stdout


def test_two_authenticated_nodes_over_tls_complete_the_run(federation, two_node_run):
    result, run_dir, *_ = two_node_run
    assert result.ok, result.details
    # The partition node by its partition, the node with its own data by its (registered, stable) id.
    own_node, bad_node = federation.supernodes[1:3]
    node_ids = sorted(["partition-0", f"node-{own_node.node_id}"])
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2]
    for record in history:
        # The ids the SuperLink gave at `flwr supernode register` are the ones the ServerApp sampled.
        assert record["nodes"] == sorted([*node_ids, f"node-{bad_node.node_id}"])
        assert sorted(record["aggregated"]) == node_ids and list(record["failures"]) == [f"node-{bad_node.node_id}"]
    assert "[round 2/2] train_loss" in result.output
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-1", "round-2"]


def test_final_checkpoint_loads_with_peft(two_node_run):
    _, run_dir, *_ = two_node_run
    model = AutoPeftModelForCausalLM.from_pretrained(str(run_dir / "checkpoints" / "round-2"))
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained: LoRA B starts at zero
    logits = model(input_ids=torch.tensor([[1, 40, 50, 60]])).logits
    assert torch.isfinite(logits).all()


def client_spans(run_dir: Path, name: str) -> dict[tuple[int, int], dict]:
    """The ClientApps' ``name`` spans from the run's profile, by (node id, round)."""
    events = [json.loads(line) for line in (run_dir / "profile.jsonl").read_text().splitlines()]
    return {(e["node"], e["round"]): e for e in events if e.get("kind") == "span" and e.get("name") == name}


def test_node_local_dataset_is_used_by_its_node(federation, two_node_run):
    _, run_dir, *_ = two_node_run
    partition_node, own_node = federation.supernodes[:2]
    examples = {key: span["examples"] for key, span in client_spans(run_dir, "data_load").items()}
    assert examples == {
        (partition_node.node_id, 1): 350,  # half of the 700 built-in examples
        (partition_node.node_id, 2): 350,
        (own_node.node_id, 1): OWN_EXAMPLES,
        (own_node.node_id, 2): OWN_EXAMPLES,
    }


def test_each_node_keeps_its_model_loaded_across_rounds(federation, two_node_run):
    """Flower starts a ClientApp process per message; the node's persistent worker keeps the model."""
    _, run_dir, *_ = two_node_run
    loads = client_spans(run_dir, "model_load")
    for node in federation.supernodes[:2]:
        assert (loads[(node.node_id, 1)]["cache_hit"], loads[(node.node_id, 2)]["cache_hit"]) == (False, True)
        worker_log = federation.worker_log(node)
        assert (
            worker_log is not None
            and f"on {350 if node is federation.supernodes[0] else OWN_EXAMPLES} examples" in worker_log.read_text()
        )


def test_profile_command_reads_a_deployment_run(two_node_run, tmp_path):
    """Profiling works the same in deployment: the client mod's spans come back in the replies."""
    result, run_dir, *_ = two_node_run
    report = profiled_run_report(result.run_id, run_dir, tmp_path)
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(0.95 <= r["coverage"] <= 1.0 for r in report["rounds"])
    training = [n for n in report["nodes"] if n["model_loads"]]  # the third node fails before it loads a model
    assert len(training) == 2 and all(n["model_loads"] == 1 for n in training)
    # The node's worker, which holds the model and trains, is measured: more memory than the ClientApp process
    # Flower starts per message (which hands the round over), and a GPU field (null: no GPU here).
    for node in training:
        processes = node["peak_rss_mb_by_process"]
        assert processes["worker"] > processes["clientapp"] > 0 and node["peak_rss_mb"] == processes["worker"]
        assert node["gpu_peak_reserved_mb"] is None and node["tokens_per_second_median"] > 0
    memory = [json.loads(line) for line in (run_dir / "profile.jsonl").read_text().splitlines()]
    workers = [e for e in memory if e.get("kind") == "memory" and e.get("process") == "worker"]
    assert workers and all(e["gpu_reserved_mb"] is None and e["gpu_allocated_mb"] is None for e in workers)


def test_node_with_a_bad_node_config_is_named_and_the_rounds_complete(federation, two_node_run):
    result, run_dir, *_ = two_node_run
    assert result.ok, result.details
    bad_name = f"node-{federation.supernodes[2].node_id}"
    for record in json.loads((run_dir / "history.json").read_text()):
        assert bad_name in record["nodes"] and len(record["nodes"]) == 3
        assert len(record["aggregated"]) == 2 and bad_name not in record["aggregated"]
        reason = record["failures"][bad_name]
        assert "NodeConfigError" in reason and "dataset-path" in reason and str(MISSING) in reason, reason
        assert len(reason) <= 300 and "\x1b[" not in reason  # one line for history.json, no terminal colours
    assert f"{bad_name} left out" in result.output
    assert "2/3 nodes" in result.output
    assert (run_dir / "checkpoints" / "round-1" / "adapter_model.safetensors").is_file()


def test_unregistered_supernode_key_is_refused(federation):
    with pytest.raises(FederationError, match="Failed to activate SuperNode") as refused:
        federation.add_supernode("partition-id=0 num-partitions=2", register=False)
    node = federation.supernodes[-1]
    assert node.proc.returncode != 0, refused.value
    online = json.loads(federation.flwr("supernode", "ls", federation.connection, "--format", "json").stdout)
    assert all(n["node-id"] != str(node.node_id) for n in online["nodes"])


def test_cli_without_tls_or_with_another_ca_cannot_reach_the_superlink(federation, tmp_path):
    write_cli_connection(federation.cli_home, "insecure-link", federation.address, None)
    other_ca = make_certificates(tmp_path / "other-ca").ca_cert
    write_cli_connection(federation.cli_home, "wrong-ca-link", federation.address, other_ca)
    for connection in ("insecure-link", "wrong-ca-link"):
        refused = federation.flwr("ls", connection, check=False)
        assert refused.returncode != 0, (connection, refused.stdout)
        assert "Connection to the SuperLink is unavailable" in refused.stdout + refused.stderr
    assert federation.flwr("ls", federation.connection).returncode == 0
