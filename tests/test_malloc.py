"""emjax/_malloc.py: the glibc allocator setting is applied on import, and EMJAX_MALLOC_TUNING=0 turns it off."""

import os
import subprocess
import sys

import pytest

CHECK = "import emjax, emjax._malloc as m; print(m.APPLIED)"


def _applied(env_value):
    env = {k: v for k, v in os.environ.items() if k != "EMJAX_MALLOC_TUNING"}
    if env_value is not None:
        env["EMJAX_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_applied_by_default_and_can_be_turned_off():
    assert _applied(None) == "True"
    assert _applied("0") == "False"


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

    def minor_faults(value):
        env = dict(os.environ, EMJAX_MALLOC_TUNING=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    tuned, default = minor_faults("1"), minor_faults("0")
    assert tuned < 64 and default > 10 * max(tuned, 10), (tuned, default)
