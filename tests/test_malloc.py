"""emjax/_malloc.py: the glibc allocator setting is applied on import, and EMJAX_MALLOC_TUNING=0 turns it off."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


def _run(code: str, tuning: str | None) -> str:
    """stdout of ``code`` in a fresh interpreter with EMJAX_MALLOC_TUNING unset (None) or set to ``tuning``."""
    env = {k: v for k, v in os.environ.items() if k != "EMJAX_MALLOC_TUNING"}
    if tuning is not None:
        env["EMJAX_MALLOC_TUNING"] = tuning
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_applied_by_default_and_can_be_turned_off():
    check = "import emjax, emjax._malloc as m; print(m.APPLIED)"
    assert _run(check, None) == "True"
    assert _run(check, "0") == "False"


def test_large_buffers_stay_mapped():
    """With the setting, a freed 256 MiB block is reused without new page faults: the second allocation of the same
    size costs (almost) no minor faults. Without it glibc unmaps the block and the new one faults in again."""
    code = (
        "import emjax, resource, numpy as np\n"
        "def faults():\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "a = np.ones(64 << 20, np.float32); del a\n"
        "f0 = faults(); b = np.ones(64 << 20, np.float32); print(faults() - f0)\n"
    )
    tuned, default = int(_run(code, "1")), int(_run(code, "0"))
    assert tuned < 64 and default > 10 * max(tuned, 10), (tuned, default)
