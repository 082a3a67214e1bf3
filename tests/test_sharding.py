"""emjax.sharding: mesh shapes from partial specs, and where a batch's rows go (8 simulated CPU devices)."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from emjax import sharding as shd


@pytest.mark.parametrize("given,want", [
    (None, (1, 8, 1)),  # fsdp takes every device
    ({"tensor": 2}, (1, 4, 2)),
    ({"data": -1}, (8, 1, 1)),  # another axis takes the rest: fsdp is then 1, not a second -1
    ({"data": 2, "fsdp": -1}, (2, 4, 1)),
])
def test_make_mesh_fills_the_axes_left_out(given, want):
    assert tuple(shd.make_mesh(given).shape.values()) == want


@pytest.mark.parametrize("overrides,want", [
    ([], (1, 8, 1)),
    (["mesh.data=-1"], (8, 1, 1)),  # no mesh.fsdp=1 needed: unset axes are None, not a second -1
    (["mesh.data=2"], (2, 4, 1)),
    (["mesh.tensor=2"], (1, 4, 2)),
])
def test_training_config_mesh(overrides, want):
    """What ``emjax train`` builds from ``mesh.*``: axes left unset are None, so data=-1 needs no fsdp=1."""
    from emjax import config
    assert tuple(shd.make_mesh(dict(config.load(None, overrides).mesh)).shape.values()) == want


def test_make_mesh_errors():
    with pytest.raises(ValueError, match=r"mesh \{'data': -1, 'fsdp': -1.*at most one axis"):
        shd.make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match="unknown axis"):
        shd.make_mesh({"expert": 2})
    for bad in (0, 9):
        with pytest.raises(ValueError, match=f"mesh.devices {bad}: use 1 to 8"):
            shd.make_mesh({"devices": bad})
    with pytest.raises(ValueError, match="needs 8 devices, have 4"):
        shd.make_mesh({"devices": 4, "data": 8, "fsdp": 1})


@pytest.mark.parametrize("given,want", [
    ({"devices": 4}, (1, 4, 1)),
    ({"devices": 4, "data": 2}, (2, 2, 1)),
    ({"devices": 2, "tensor": -1}, (1, 1, 2)),
])
def test_mesh_over_the_first_devices(given, want):
    """mesh.devices=N (emjax train) / --mesh devices=N (emjax eval run): the first N devices; one device is no mesh
    at all (everything on the first device, nothing sharded)."""
    import jax

    mesh = shd.make_mesh(given)
    assert tuple(mesh.shape.values()) == want
    assert list(mesh.devices.flat) == jax.devices()[:given["devices"]]
    assert shd.mesh_or_none(given) is not None
    assert shd.mesh_or_none({"devices": 1}) is None and shd.mesh_or_none({"devices": 1, "fsdp": -1}) is None
    from emjax import config
    assert shd.mesh_or_none(dict(config.load(None, ["mesh.devices=1"]).mesh)) is None
    assert shd.mesh_or_none(dict(config.load(None, []).mesh)).size == 8


def test_eval_cli_mesh_argument(tmp_path):
    import argparse

    from emjax.eval.cli import _mesh_arg

    assert _mesh_arg("data=2,fsdp=-1") == {"data": 2, "fsdp": -1}
    assert _mesh_arg("devices=1") == {"devices": 1}
    for bad in ("devices=-1", "devices=0", "expert=2", "data", "data=--1", "data=2.5", "fsdp=-2"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected AXIS=SIZE"):
            _mesh_arg(bad)
    from emjax.eval import cli  # more devices than there are: one clear error, before any model is read

    with pytest.raises(SystemExit, match="emjax eval run: --mesh: mesh.devices 9: use 1 to 8"):
        cli.main(["run", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), "--sets", "first_plot",
                  "--limit", "1", "--mesh", "devices=9"])


def test_rows_split_over_the_batch_axes_that_divide_them():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert shd.batch_axes(mesh, 8) == ("data", "fsdp") and shd.batch_axes(mesh, 2) == ("fsdp",)
    assert shd.batch_axes(mesh, 3) == ()
    assert shd.batch_sharding(mesh, 8, dim=1).spec == P(None, ("data", "fsdp"))
    tokens, mask = shd.rows_on(mesh, np.arange(16).reshape(8, 2), np.ones((8, 2)))
    assert tokens.sharding.spec == P(("data", "fsdp")) and shd.mesh_of({"t": tokens}) is mesh
    assert shd.mesh_of({"x": np.ones(3)}) is None and shd.rows_on(None, np.ones(2))[0].shape == (2,)
    np.testing.assert_array_equal(shd.to_host(tokens), np.arange(16).reshape(8, 2))


def test_init_distributed_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(shd.init_distributed, "done", False, raising=False)  # a train() in this worker set it
    for var in ("EMJAX_NUM_PROCESSES", "EMJAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=r"h:1 given without the number of processes \(EMJAX_NUM_PROCESSES\) or "
                                         r"this process's id \(EMJAX_PROCESS_ID\)"):
        shd.init_distributed("h:1")
    monkeypatch.setenv("EMJAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match=r"given without this process's id \(EMJAX_PROCESS_ID\): set it"):
        shd.init_distributed("h:1")

