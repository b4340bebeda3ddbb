"""The torchrun teardown: ``destroy_process_group`` ends the gloo group's worker threads while
Python is alive, with DDP still referenced (as the bundle's config parser keeps it).

A gloo worker alive at interpreter shutdown can abort the process when it frees a finished
collective's tensors ("terminate called without an active exception"; distributed.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RANKS = 2
TIMEOUT_S = 180
# Names Linux gives gloo's threads (/proc/<pid>/task/<tid>/comm).
GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")
SCRIPT = """
import os, torch
from spleen_seg.training import distributed
distributed.init_process_group()
model = distributed.wrap_ddp(torch.nn.Linear(8, 1), torch.device("cpu"))
model(torch.randn(4, 8)).sum().backward()
tensors = [torch.zeros(4) for _ in range({ranks})]
torch.distributed.all_gather(tensors, torch.ones(4))  # a collective on Python tensors
kept = {{"model": model}}
kept["self"] = kept  # a reference cycle keeps DDP alive until shutdown
distributed.destroy_process_group(model)
names = sorted(open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task"))
# One write of one line (under PIPE_BUF): print's text and newline are two writes, and the two ranks'
# lines interleaved on the shared pipe ("...pythonrank 0 threads...").
os.write(1, f"rank {{os.environ['RANK']}} threads after destroy: {{','.join(names)}}\\n".encode())
"""


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from Linux's /proc")
def test_destroy_process_group_joins_gloo_threads(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT.format(ranks=RANKS))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                           f"--nproc_per_node={RANKS}", str(script)], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "threads after destroy" in line]
    assert len(lines) == RANKS, proc.stdout[-3000:]
    assert not [line for line in lines if any(name in line for name in GLOO_THREADS)], lines
