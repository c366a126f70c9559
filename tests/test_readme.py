"""The README's commands and the code in docs/library.md work as written."""
import re
import subprocess
import sys
from pathlib import Path

from tests.multiproc import free_port

REPO = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "docs" / "library.md").read_text(), flags=re.S)


def test_the_own_code_snippet_runs_on_four_ranks(tmp_path):
    (snippet,) = [block for block in _python_blocks() if "initialize_model_parallel" in block]
    script = tmp_path / "snippet.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + snippet)
    logs = tmp_path / "logs"  # one stdout file per rank: printed lines of four processes may interleave
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr",
                           "127.0.0.1", "--master-port", str(free_port()), "--log-dir", str(logs), "--redirects", "3",
                           str(script)], cwd=REPO, capture_output=True, text=True, timeout=240)
    printed = {int(path.parent.name): path.read_text() for path in logs.glob("*/attempt_*/*/stdout.log")}
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + str(printed)
    assert {rank: text.strip() for rank, text in printed.items()} == {r: f"{r} (1, 4, 320)" for r in range(4)}, printed


def test_the_megatron_spec_snippet_builds_the_spec():
    (snippet,) = [block for block in _python_blocks() if "get_gpt_layer_local_spec" in block]
    namespace: dict = {}
    exec(compile(snippet, "docs/library.md", "exec"), namespace)
    from cptoolkit.layers.core_attention import CPCoreAttention

    assert namespace["spec"].submodules.self_attention.submodules.core_attention.module is CPCoreAttention


def test_the_layout_command_prints_the_golden_table():
    done = subprocess.run([sys.executable, "-m", "cptoolkit.parallel_state", "--tp", "2", "--pcp", "2", "--dcp", "4",
                           "--num-heads", "8", "--num-kv-heads", "2"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "DCP0: [0, 2, 1, 3]" in done.stdout
    assert done.stdout.strip() in (REPO / "tests" / "golden" / "layout_tables.txt").read_text()
