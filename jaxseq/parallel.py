"""Data parallelism with JAX's own sharding: one mesh axis ``"data"`` over devices and hosts.

The batch is sharded along the mesh's data axis, parameters and optimizer state are
replicated, and the gradient reduction is left to XLA (the jitted step sees global arrays;
the mean over the batch becomes an all-reduce). The global batch is the same whatever the
device count, so results agree up to floating-point reduction order.

Several hosts: ``initialize_distributed`` calls ``jax.distributed.initialize``; afterwards
``jax.devices()`` lists every process's devices, ``data_mesh`` spans them all, and each
process materialises only its own rows of every batch (``shard_batch`` builds the global
array from per-device callbacks). Only process 0 writes checkpoints and logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxseq.errors import UsageError

DATA_AXIS = "data"


def initialize_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Joins a multi-process run (no-op when ``coordinator`` is None).

    On CPU the collectives go through gloo, which works over TCP on any machine.
    """
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise UsageError("num_processes and process_id need a coordinator address HOST:PORT")
        return
    if num_processes is None or process_id is None:
        raise UsageError("a coordinator needs num_processes and process_id")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UsageError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if ":" not in coordinator:
        raise UsageError(f"coordinator must be HOST:PORT, got {coordinator!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


def use_cpu_devices(n: int) -> None:
    """Present the host CPU to JAX as ``n`` devices, so that a data-parallel run on it splits
    each batch into ``n`` programs that run side by side.

    On a 2-core machine the 2-layer H=256 GRU char LM (batch 64) trains about 1.2x faster
    this way than as one device whose every matmul is split over both cores; at H=512 the
    two are about as fast (``benchmarks/charlm.md``). It sets ``jax_num_cpu_devices``,
    which JAX reads when it starts its CPU backend, so call it before the first
    computation; it does not change the default backend (on a GPU machine the GPUs stay
    the devices of ``data_mesh``). The command lines also put every thread on one malloc
    arena (``experiments._malloc.one_arena_for_devices``), without which the devices'
    temporaries may be page-faulted in afresh on every step.
    """
    if n < 1:
        raise UsageError(f"the number of CPU devices must be positive, got {n}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backend has started: fine if it already has n devices
        have = len(jax.devices("cpu"))
        if have != n:
            raise UsageError(
                f"cannot present the CPU as {n} devices: JAX's CPU backend already started with "
                f"{have} device(s)"
            ) from None


def is_main_process() -> bool:
    return jax.process_index() == 0


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over ``num_devices`` devices (all of them, every host's, by default).

    With several processes the mesh must span all processes' devices, so ``num_devices``
    then counts devices across hosts.
    """
    devices = jax.devices()
    n = len(devices) if not num_devices else num_devices
    if n < 1 or n > len(devices):
        raise UsageError(
            f"num_devices={n}, but only {len(devices)} device(s) available ({devices[0].platform})"
        )
    if jax.process_count() > 1 and n != len(devices):
        raise UsageError("with several processes, num_devices must cover every process's devices")
    return Mesh(np.array(devices[:n]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, axis: int) -> NamedSharding:
    spec = [None] * ndim
    spec[axis] = DATA_AXIS
    return NamedSharding(mesh, P(*spec))


def _global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def shard_batch(mesh: Mesh, value: np.ndarray, axis: int) -> jax.Array:
    """A global array of ``value`` split along ``axis`` over the mesh; each process builds
    only its own devices' rows."""
    if value.shape[axis] % mesh.size:
        raise UsageError(
            f"the batch ({value.shape[axis]}) must divide evenly over {mesh.size} devices"
        )
    return _global_array(value, batch_sharding(mesh, value.ndim, axis))


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Places every leaf of ``tree`` (same value on every process) on all mesh devices."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: _global_array(np.asarray(x), sharding), tree)


def shard_tree(mesh: Mesh, tree: Any, axis: int) -> Any:
    return jax.tree.map(lambda x: shard_batch(mesh, np.asarray(x), axis), tree)


def to_host(tree: Any) -> Any:
    """Fully materialised NumPy copies of every leaf, gathering shards held by other
    processes (every process must call this together)."""

    def fetch(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)


def to_local(tree: Any) -> Any:
    """Process-local copies of replicated arrays, for work each process does on its own
    (evaluation, sampling)."""

    def local(x):
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            if x.sharding.is_fully_replicated:
                return x.addressable_data(0)  # one device's copy: no repeated work
            return to_host(x)
        return x

    return jax.tree.map(local, tree)


def sync(name: str) -> None:
    """A barrier across processes (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def describe(mesh: Mesh | None) -> str:
    if mesh is None:
        return "1 device"
    kinds = {d.platform for d in mesh.devices.flat}
    return (
        f"{mesh.size} {'/'.join(sorted(kinds))} device(s) over {jax.process_count()} "
        f"process(es), batch sharded on '{DATA_AXIS}'"
    )


def device_ids(mesh: Mesh) -> Sequence[int]:
    return [d.id for d in mesh.devices.flat]
