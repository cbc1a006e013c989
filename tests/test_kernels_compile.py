"""The Triton kernels lower for an H100 (sm_90) through triton's real compiler and ptxas, with no GPU.

Runs in a subprocess: tests/test_kernels.py sets TRITON_INTERPRET=1 in this process, which turns every
``@triton.jit`` function into an interpreted one.
"""

from __future__ import annotations

import os
import subprocess
import sys


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "ossforge.kernels.compile_check"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 kernel variants compiled for sm_90" in proc.stdout
    assert "dx_mxfp4" in proc.stdout and "down_backward_mxfp4" in proc.stdout
    assert "down_backward" in proc.stdout
