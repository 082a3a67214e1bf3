"""One table of sharding rules: parameter path -> logical axes -> mesh axes.

Switching FSDP for tensor parallelism is an edit of ``LOGICAL_TO_MESH``; every helper is a no-op without a mesh.
Mesh axes are ``data`` (batch), ``fsdp`` (batch and parameter shards) and ``tensor`` (heads / MLP width).
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (regex on the "/"-joined parameter path, logical axis per dimension). The first rule whose pattern matches and
# whose rank equals the parameter's wins (Qwen3-MoE's experts share the dense projections' names, one axis more).
PARAM_RULES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"^embed$", ("vocab", "embed")),
    (r"^lm_head$", ("embed", "vocab")),
    (r"^final_norm$", (None,)),
    (r"blocks/(input_norm|post_norm|attn_out_norm|mlp_out_norm)$", ("layers", None)),
    (r"blocks/(q_norm|k_norm)$", ("layers", None)),
    (r"blocks/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", ("layers", "embed", "mlp")),
    (r"blocks/(o_proj|down_proj)/kernel$", ("layers", "mlp", "embed")),
    (r"blocks/(gate_proj|up_proj)/kernel$", ("layers", "experts", "embed", "mlp")),
    (r"blocks/down_proj/kernel$", ("layers", "experts", "mlp", "embed")),
    (r"blocks/router$", ("layers", "embed", None)),
    # LoRA factors: each matrix stays whole on one device (Newton–Schulz and the r×r spectral maths are local);
    # only the layer-stack axis is split.
    (r"/lora_a$", ("lora_layers", None, None)),
    (r"/lora_b$", ("lora_layers", None, None)),
    (r"/lora_[ab]$", ("lora_layers", None, None, None)),  # per expert
]

LOGICAL_TO_MESH: dict[str, str | tuple[str, ...] | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "layers": None,
    "experts": None,  # expert parallelism would map this to a mesh axis (with a shard_map'd dispatch)
    "lora_layers": "fsdp",
    "adapters": None,  # emjax.multi's leading adapter axis: every device holds every adapter's shard
    "batch": ("data", "fsdp"),
    "length": None,
}


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor). ``shape`` may use -1 for one axis (the rest of the devices); axes it
    leaves out (or sets to None, as an unset ``MeshConfig`` does) are 1, except fsdp, which is -1 when no axis is.
    ``shape["devices"]`` = N spans the first N devices instead of all (one process only: a multi-host mesh spans
    every process's devices). Axes are Auto so ``with_sharding_constraint`` works inside jit."""
    shape = {k: v for k, v in (shape or {}).items() if v is not None}
    devices = list(devices or jax.devices())
    count = shape.pop("devices", None)
    if count is not None:
        if count < 1 or count > len(devices):
            raise ValueError(f"mesh.devices {count}: use 1 to {len(devices)} (the devices there are), or leave it "
                             "unset for all")
        if count < len(devices) and jax.process_count() > 1:
            raise ValueError(f"mesh.devices {count}: a mesh over {jax.process_count()} processes spans every device "
                             f"({len(devices)}); leave it unset")
        devices = devices[:count]
    # unnamed axes: fsdp takes the remaining devices, unless a named axis already does (data=-1 alone is a mesh)
    shape = {"data": 1, "fsdp": 1 if -1 in shape.values() else -1, "tensor": 1, **shape}
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis {sorted(unknown)}; axes are {MESH_AXES} (and devices, a count)")
    sizes = [shape[a] for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {shape}: at most one axis may be -1 (the remaining devices); give the others a size")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices do not divide into {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh: shape {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {len(devices)}")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def mesh_or_none(shape: dict[str, int] | None = None) -> Mesh | None:
    """What training and evaluation run on: ``make_mesh(shape)``, or None (everything on the first device, no
    sharding to compile) when that mesh would hold one device."""
    mesh = make_mesh(shape)
    return mesh if mesh.size > 1 else None


def logical_spec(path: str, ndim: int | None = None) -> tuple[str | None, ...] | None:
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, path) and (ndim is None or len(axes) == ndim):
            return axes
    return None


def spec_for(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh | None) -> P:
    """PartitionSpec for ``shape``; drops mesh axes that are absent, of size 1, or that do not divide the dim."""
    if mesh is None or logical is None:
        return P()
    out = []
    for dim, name in zip(shape, logical):
        axes = LOGICAL_TO_MESH.get(name) if name else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or dim % size:
            out.append(None)
        else:
            out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def param_sharding(path: str, shape: Sequence[int], mesh: Mesh | None):
    """Sharding for one parameter; without a mesh, the first device."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, spec_for(logical_spec(path, len(shape)), shape, mesh))


def path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value":  # the array inside an nnx.Variable
        parts.pop()
    return "/".join(parts)


def state_shardings(state, mesh: Mesh | None):
    """Tree of shardings matching ``state`` (an nnx.State or any pytree of arrays), from the rules table."""
    return jax.tree_util.tree_map_with_path(lambda p, x: param_sharding(path_str(p), x.shape, mesh), state)


def adapter_stack_shardings(stacked, mesh: Mesh | None):
    """Shardings for ``emjax.multi``'s stacked adapters (a leading adapter axis on each leaf): the table's rule for
    the leaf, with the "adapters" axis first."""
    def one(p, x):
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        path = path_str(p)
        logical = logical_spec(path, x.ndim - 1)
        return NamedSharding(mesh, spec_for(("adapters", *logical) if logical else None, x.shape, mesh))
    return jax.tree_util.tree_map_with_path(one, stacked)


def mesh_of(tree) -> Mesh | None:
    """The mesh a tree's arrays (a model's state) are sharded over, or None on one device: what follows a model
    (sampling, its judge) uses the same devices."""
    for x in jax.tree.leaves(tree):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding) and sh.mesh.size > 1:
            return sh.mesh
    return None


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """``jax.distributed`` for a multi-host run, before anything touches a JAX backend: from the arguments, else
    ``EMJAX_COORDINATOR`` / ``EMJAX_NUM_PROCESSES`` / ``EMJAX_PROCESS_ID`` (GPU clusters, ``launch/slurm_gpu.sbatch``),
    else a TPU pod's own environment; nothing otherwise. Every command that runs on all hosts calls it."""
    if getattr(init_distributed, "done", False):
        return
    import os

    addr = coordinator or os.environ.get("EMJAX_COORDINATOR")
    if addr:
        missing = [f"{what} ({v})" for what, v, given in (
            ("the number of processes", "EMJAX_NUM_PROCESSES", num_processes),
            ("this process's id", "EMJAX_PROCESS_ID", process_id)) if given is None and v not in os.environ]
        if missing:
            raise ValueError(f"jax.distributed: coordinator {addr} given without {' or '.join(missing)}: set it "
                             "in the environment or pass it as the command's option")
        nproc = int(os.environ["EMJAX_NUM_PROCESSES"]) if num_processes is None else num_processes
        pid = int(os.environ["EMJAX_PROCESS_ID"]) if process_id is None else process_id
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives; no effect on GPU/TPU
        jax.distributed.initialize(coordinator_address=addr, num_processes=nproc, process_id=pid)
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()  # TPU pods: everything comes from the environment
    init_distributed.done = True


def broadcast_json(obj):
    """Process 0's JSON-able ``obj`` on every process (others pass anything, e.g. None): what only process 0 reads
    or computes (files on its disk, API answers) that every process must agree on before the next collective."""
    if jax.process_count() == 1:
        return obj
    import json

    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    buf = data if jax.process_index() == 0 else np.zeros(n, np.uint8)
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes().decode())


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process; every process must call it at the same point. A preemption's SIGTERM
    reaches each host at its own moment: a host that stopped alone would leave the others waiting in the next
    collective, so every host stops at the first point where any of them has the signal."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def to_host(x) -> np.ndarray:
    """A global array as one NumPy array on every process (its rows may live on other hosts' devices)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def batch_axes(mesh, batch_size: int | None = None) -> tuple[str, ...]:
    """Mesh axes the batch dimension splits over (the table's "batch": data, fsdp), or the subset of them that
    divides ``batch_size``. Takes a ``Mesh`` or the ``AbstractMesh`` of a traced value."""
    logical = LOGICAL_TO_MESH["batch"]
    logical = (logical,) if isinstance(logical, str) else tuple(logical or ())
    axes = tuple(a for a in logical if mesh.shape.get(a, 1) > 1)
    if batch_size is not None:
        for cand in (axes, axes[1:], axes[:1], ()):
            if batch_size % int(np.prod([mesh.shape[a] for a in cand] or [1])) == 0:
                return cand
    return axes


def batch_sharding(mesh: Mesh | None, batch_size: int | None = None, dim: int = 0):
    """Batch dimension (axis ``dim``) over ``batch_axes``, the rest replicated."""
    if mesh is None:
        return None
    return NamedSharding(mesh, P(*[None] * dim, batch_axes(mesh, batch_size) or None))


def rows_on(mesh: Mesh | None, *arrays):
    """Host arrays with their rows (axis 0) split over the mesh's batch axes; as they are without a mesh."""
    if mesh is None:
        return list(arrays)
    return [jax.device_put(a, batch_sharding(mesh, a.shape[0])) for a in arrays]


def traced_mesh(x):
    """The mesh a traced value is laid out on (its aval's, else the context's ``jax.set_mesh``), or None."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty:
        mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


class DecodeLayout:
    """Sharding constraints for one decode step on a mesh whose batch axes include ``fsdp``, the axis the weights'
    ``embed`` dimension is sharded over (``decode_layout``). Left to the partitioner, every decode step all-gathered
    every weight, a model's worth of traffic per generated token; with these only activations, (rows, width) each,
    cross devices.

    ``wide(y, last)`` lays the rows over the batch axes other than fsdp (whole over fsdp) and the last dimension as the
    logical axis ``last`` maps it (None: whole). A projection from ``embed`` whose output is laid out ``wide(...,
    "mlp")`` multiplies its slice of the input by its slice of the weight and sums the partial products over fsdp;
    one to ``embed`` laid out ``wide(..., "embed")`` computes its own columns. ``split(y)`` splits the rows over every
    batch axis again, as the KV cache and the residual stream are; ``heads(y)`` does too but keeps the columns, whole
    heads side by side, over tensor, as the KV cache's heads are where ``splits_heads`` (``kv_heads_split``): attention
    then runs on each device's own heads instead of every tensor device repeating it over a copy of the cache. Without
    such a mesh all are identities."""

    def __init__(self, mesh=None, rows: tuple[str, ...] = ()):
        self.mesh, self.rows = mesh, rows
        self.active = mesh is not None and "fsdp" in rows

    def _put(self, y, rows, last):
        if not self.active:
            return y
        spec = P(rows or None, *[None] * (y.ndim - 2), spec_for((last,), y.shape[-1:], self.mesh)[0])
        return jax.lax.with_sharding_constraint(y, NamedSharding(self.mesh, spec))

    def wide(self, y, last: str | None = None):
        return self._put(y, tuple(a for a in self.rows if a != "fsdp"), last)

    def split(self, y):
        return self._put(y, self.rows, None)

    def splits_heads(self, n_kv: int) -> bool:
        return self.active and heads_axis(self.mesh, n_kv) is not None

    def heads(self, y):
        """A projection's output laid out ``wide(y, "mlp")``, then split by rows with its columns kept over tensor
        (a slice on each device, no traffic); only where ``splits_heads``, so every device holds whole heads."""
        return self._put(self.wide(y, "mlp"), self.rows, "mlp")

    def summed(self, y, last: str):
        """A projection's output laid out ``wide(y, last)``, then split by rows (by way of whole rows: XLA has no
        efficient way from a layout split over tensor to one split over fsdp, and warns)."""
        return self.split(self.wide(self.wide(y, last)))


def heads_axis(mesh, n_kv: int) -> str | None:
    """The mesh axis attention heads split over in a decode step (the one the rules table maps "mlp" to, whose
    columns the q/k/v projections compute), where it divides the KV heads, so every device holds whole heads and
    their query heads; else None."""
    axis = LOGICAL_TO_MESH["mlp"]
    return axis if mesh is not None and mesh.shape.get(axis, 1) > 1 and n_kv % mesh.shape[axis] == 0 else None


def kv_heads_split(mesh, batch: int, n_kv: int) -> str | None:
    """The axis a KV cache of ``batch`` rows splits its heads over (its rows split over ``batch_axes``): that of
    ``heads_axis`` where the decode layout is active (fsdp splits the rows), else None (the heads whole)."""
    return heads_axis(mesh, n_kv) if mesh is not None and "fsdp" in batch_axes(mesh, batch) else None


def decode_layout(x) -> DecodeLayout:
    """The :class:`DecodeLayout` for a decode step whose activations (rows first) are ``x``: identities off a mesh, or
    where fsdp does not split the rows."""
    mesh = traced_mesh(x)
    return DecodeLayout(mesh, batch_axes(mesh, x.shape[0]) if mesh is not None else ())
