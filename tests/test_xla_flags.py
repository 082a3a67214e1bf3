"""emjax/_xla_flags.py: importing emjax adds the XLA:CPU legacy-emitter flag for the jaxlib it was measured on, never
over the user's own setting, not once a backend has started, and EMJAX_XLA_TUNING=0 turns it off."""

import os
import subprocess
import sys

import pytest

from emjax import _xla_flags

CHECK = "import emjax, emjax._xla_flags as x, os; print(x.APPLIED, os.environ.get('XLA_FLAGS', ''))"


def _run(code: str, **env) -> tuple[bool, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "EMJAX_XLA_TUNING")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    applied, _, flags = out.partition(" ")
    return applied == "True", flags


@pytest.mark.skipif(not _xla_flags.APPLIED, reason="this jaxlib is not one the flag was measured on")
def test_flag_added_on_import_and_kept_out_when_asked():
    assert _run(CHECK) == (True, _xla_flags.FLAG)
    applied, flags = _run(CHECK, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert applied and flags.split() == ["--xla_force_host_platform_device_count=2", _xla_flags.FLAG]
    assert _run(CHECK, EMJAX_XLA_TUNING="0") == (False, "")
    assert _run(CHECK, XLA_FLAGS="--xla_cpu_use_fusion_emitters=true") == (False, "--xla_cpu_use_fusion_emitters=true")
    # a backend that already started has read its flags: nothing to add
    late = "import jax; jax.devices(); " + CHECK
    assert _run(late) == (False, "")
    # XLA knows the flag (it aborts on one it does not): a program compiles and runs under it
    applied, _ = _run("import emjax, emjax._xla_flags as x, jax, jax.numpy as jnp; "
                      "assert float(jax.jit(lambda a: jnp.exp(a).sum())(jnp.ones(3))) > 8; print(x.APPLIED, '')")
    assert applied


def test_unknown_jaxlib_gets_no_flag(monkeypatch):
    import importlib.metadata

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("EMJAX_XLA_TUNING", raising=False)
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)  # as if before any backend
    assert _xla_flags.tune() is _xla_flags.APPLIED and ("XLA_FLAGS" in os.environ) is _xla_flags.APPLIED
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9")
    assert _xla_flags.tune() is False and "XLA_FLAGS" not in os.environ
