"""scripts/gpu_check.py, the one script a person with a GPU runs, works: here at toy sizes on the CPU."""

import subprocess
import sys
from pathlib import Path

from helpers import HANG

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_section_at_toy_sizes(tmp_path):
    out = tmp_path / "report.md"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--toy", "--out", str(out)],
                       capture_output=True, text=True, timeout=HANG)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    report = out.read_text()
    for title in ("1. Environment", "2. Attention kernels", "3. Training step", "4. Train, resume, sample",
                  "5. Determinism", "6. Benchmarks"):
        assert f"## {title}" in report
    assert "FAILED" not in report and "(bit for bit)" in report and "| MATH |" in report
    assert "seconds per network evaluation" in report  # the sampling-cost benchmark ran
    assert "read back whole by msf.interfaces.load: identical" in report  # the sharded checkpoint section
