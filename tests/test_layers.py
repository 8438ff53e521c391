"""docs/design.md's layer rule: data and active never pull in torch-heavy code (or Ray, Hypha, Cellpose)."""

import subprocess
import sys


def test_data_layer_imports_no_heavy_dependencies():
    code = ("import sys, bioadapt.data, bioadapt.data.convert, bioadapt.data.synthetic, bioadapt.active; "
            "print(sorted(m for m in ('torch', 'ray', 'cellpose', 'hypha_rpc', 'bioimageio.core') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
