"""Two nodes simulated on one machine: two torchrun agents of 2 processes each meet through torchrun's own
c10d rendezvous on 127.0.0.1 and run launch/infer.py as one 4-rank job, which generates exactly the tokens
of the same config run as 4 processes on one node, and prints which groups cross the node boundary.

With ``--rdzv-backend c10d`` torchrun numbers the nodes itself (``--node-rank`` is only read by the static
backend); ``is_host`` says which agent serves the rendezvous store, since both agents live on the endpoint's
host here. Only global rank 0 writes ``--output``, so both agents are given the same path.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.multiproc import free_port

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TIMEOUT_S = 180


def _small_config(tmp_path: Path) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "tp2_pcp2_dcp4.yaml").read_text())
    raw["model"]["checkpoint"] = str(REPO / "configs" / raw["model"]["checkpoint"])  # the copy lives in tmp_path
    raw["inference"]["max_new_tokens"] = 4
    path = tmp_path / "tp2_pcp2_dcp4.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _agent_command(port: int, hosts_store: bool, config: Path, output: Path) -> list[str]:
    return [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "cptoolkit-two-nodes",
            "--rdzv-conf", f"is_host={str(hosts_store).lower()}", "--local-addr", "127.0.0.1",
            "launch/infer.py", "--config", str(config), "--output", str(output)]


def _run_two_agents(config: Path, output: Path, logs: list[Path]) -> list[int]:
    """Start both agents, wait for both (killing both on a deadline); their exit statuses."""
    port = free_port()
    agents = []
    try:
        for node, log in enumerate(logs):
            with open(log, "w") as out:
                agents.append(subprocess.Popen(_agent_command(port, node == 0, config, output), cwd=REPO,
                                               stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        return [agent.wait(timeout=max(deadline - time.monotonic(), 1)) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()


def test_two_nodes_generate_the_tokens_of_one_node(tmp_path):
    config = _small_config(tmp_path)
    one_node = tmp_path / "one_node.json"
    done = subprocess.run([*TORCHRUN, "--nproc-per-node", "4", "--master-addr", "127.0.0.1", "--master-port",
                           str(free_port()), "launch/infer.py", "--config", str(config), "--output", str(one_node)],
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    two_nodes, logs = tmp_path / "two_nodes.json", [tmp_path / "node_a.log", tmp_path / "node_b.log"]
    statuses = _run_two_agents(config, two_nodes, logs)
    text = "\n".join(log.read_text() for log in logs)
    assert statuses == [0, 0], text[-4000:]
    # The rank-0 worker saw a world of 4 ranks on nodes of 2: ranks 2-3 ran under the other agent.
    assert "Nodes (2 processes per node; node of rank r = r // 2):" in text, text[-4000:]
    assert "  node1: ranks 2-3  (row pcp1)" in text and "  TP1:  [2, 3]        inside node1" in text
    assert "  DCP0: [0, 2, 1, 3]  crosses nodes 0 and 1" in text

    single, multi = (json.loads(path.read_text()) for path in (one_node, two_nodes))
    assert len(multi["requests"]) == 3 and all(len(r["token_ids"]) == 4 for r in multi["requests"])
    assert [r["token_ids"] for r in multi["requests"]] == [r["token_ids"] for r in single["requests"]]
    assert [r["text"] for r in multi["requests"]] == [r["text"] for r in single["requests"]]
    assert multi["metrics"]["kv_bytes_per_rank"] == single["metrics"]["kv_bytes_per_rank"]
