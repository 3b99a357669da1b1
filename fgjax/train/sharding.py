"""The device mesh and the shardings of train state and batches.

A mesh over every device of every process (`config.mesh`): a "data" axis, and with
`config.mesh.fsdp` > 1 an "fsdp" axis too. The train state is replicated, or with fsdp > 1
every large array is split along its largest dimension divisible by the fsdp size (ZeRO-3 style
through sharding annotations: XLA gathers parameters where they are used and reduce-scatters
gradients). Batches are split over all mesh axes.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

FSDP_MIN_SIZE = 2 ** 12  # arrays smaller than this stay replicated


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The device mesh: ("data",) over all devices of all processes, or ("data", "fsdp") when
  `config.mesh.fsdp` > 1 (`config.mesh.data` = -1: all devices not used by fsdp)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  mcfg = config.get("mesh", {}) or {}
  fsdp = int(mcfg.get("fsdp", 1) or 1)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"config.mesh.fsdp={fsdp} must divide the number of devices ({n})")
  want = int(mcfg.get("data", -1))
  if want not in (-1, n // fsdp):
    raise ValueError(f"config.mesh.data={want} but {n} devices with config.mesh.fsdp={fsdp} "
                     f"leave {n // fsdp}")
  auto = jax.sharding.AxisType.Auto
  if fsdp == 1:
    return jax.make_mesh((n,), ("data",), axis_types=(auto,), devices=devices)
  return jax.make_mesh((n // fsdp, fsdp), ("data", "fsdp"), axis_types=(auto, auto),
                       devices=devices)


def fsdp_spec(shape, fsdp: int) -> P:
  """PartitionSpec of one state array: split along its largest dimension divisible by `fsdp`
  (replicated when fsdp == 1, the array is small, or no dimension divides)."""
  if fsdp <= 1 or len(shape) == 0 or int(np.prod(shape)) < FSDP_MIN_SIZE:
    return P()
  for d in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[d] % fsdp == 0:
      return P(*[("fsdp" if i == d else None) for i in range(len(shape))])
  return P()


def state_shardings(tree, mesh):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) of train state."""
  fsdp = int(dict(mesh.shape).get("fsdp", 1))
  return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(a.shape, fsdp)), tree)


def batch_sharding(mesh) -> NamedSharding:
  """Batches: the leading axis split over every mesh axis."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def abstract_with_shardings(tree, mesh):
  """ShapeDtypeStructs of `tree` carrying the train state's shardings (for restoring)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      tree, state_shardings(tree, mesh))
