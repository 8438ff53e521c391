"""docs/design.md's layer rules: data and active never pull in torch-heavy code (or Ray, Hypha, Cellpose); the
service's tasks import neither its API nor each other."""

import subprocess
import sys


def test_data_layer_imports_no_heavy_dependencies():
    code = ("import sys, bioadapt.data, bioadapt.data.convert, bioadapt.data.synthetic, bioadapt.active; "
            "print(sorted(m for m in ('torch', 'ray', 'cellpose', 'hypha_rpc', 'bioimageio.core') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_tasks_import_neither_the_service_api_nor_each_other():
    """Each task gets what it needs from the service as a ``ServiceContext``: importing one loads no other."""
    from bioadapt.service.schemas import FUNCTIONS

    tasks = sorted({function.task for function in FUNCTIONS.values() if function.task})
    assert len(tasks) == 5
    for task in tasks:
        code = (f"import sys, bioadapt.service.tasks.{task}; print(sorted(m for m in sys.modules if m == "
                f"'bioadapt.service.api' or m.startswith('bioadapt.service.tasks.') and m != "
                f"'bioadapt.service.tasks.{task}'))")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[]", f"importing tasks.{task} loaded {result.stdout.strip()}"
