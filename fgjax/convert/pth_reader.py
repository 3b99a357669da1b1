"""A torch-free reader of PyTorch checkpoints (`torch.save`'s zip format, torch >= 1.6).

    obj = load_pth("deit_base_distilled_patch16_224-df68dfff.pth")   # tensors -> numpy

A `.pth` file is a zip archive: `<prefix>/data.pkl` (a pickle whose tensors reference storages
by key), `<prefix>/data/<key>` (raw little-endian storage bytes), `<prefix>/byteorder` and
`<prefix>/version`. The pickle is read by a restricted unpickler: only the handful of globals
PyTorch writes for tensors, storages and plain containers are allowed (no arbitrary code runs);
anything else in the metadata becomes an opaque `Unsupported` placeholder, never a tensor that
silently disappears. Legacy (pre-1.6, non-zip) files are read with torch when it is installed.
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np


class PthFormatError(ValueError):
  """The file is not a readable PyTorch checkpoint; the message names the file and why."""


def _bf16():
  import ml_dtypes  # ships with jax
  return ml_dtypes.bfloat16


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": "bfloat16", "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


def _np_dtype(d):
  return np.dtype(_bf16()) if d == "bfloat16" else np.dtype(d)


class _StorageType:
  def __init__(self, name):
    self.name = name
    self.dtype = _np_dtype(_STORAGE_DTYPES[name])


class _TorchDtype:
  def __init__(self, name):
    self.name = name
    self.dtype = _np_dtype(_TORCH_DTYPES[name])


class Unsupported:
  """Placeholder for a pickled object of a class the reader does not reconstruct
  (metadata such as a training-config object); `qualname` says what it was."""
  qualname = "?"

  def __new__(cls, *args, **kwargs):
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):
    self.args = args

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f"Unsupported({self.qualname})"


def _placeholder(qualname: str):
  return type("Unsupported", (Unsupported,), {"qualname": qualname})


class _Storage:
  def __init__(self, data: np.ndarray):
    self.data = data


def _rebuild_tensor(storage, offset, size, stride, *unused):
  if not isinstance(storage, _Storage):
    raise PthFormatError(f"tensor without storage ({type(storage).__name__})")
  flat = storage.data
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  n = int(np.prod(size)) if size else 1
  if n == 0:
    return np.zeros(size, flat.dtype)
  end = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
  if offset < 0 or end > flat.size:
    raise PthFormatError(f"tensor view out of its storage bounds ({offset}..{end} of "
                         f"{flat.size})")
  item = flat.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                         strides=tuple(st * item for st in stride))
  return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, fileobj, archive: zipfile.ZipFile, prefix: str, path: str, byteorder: str):
    super().__init__(fileobj)
    self.archive, self.prefix, self.path, self.byteorder = archive, prefix, path, byteorder
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    key = (module, name)
    if key in _ALLOWED:
      return _ALLOWED[key]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "torch" and name in _TORCH_DTYPES:
      return _TorchDtype(name)
    if module == "argparse" and name == "Namespace":
      return argparse.Namespace  # a plain attribute bag; DeiT checkpoints carry their args
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and \
        name in ("scalar", "_reconstruct"):
      try:
        from numpy._core import multiarray
      except ImportError:  # numpy < 2
        from numpy.core import multiarray
      return getattr(multiarray, name)
    if module == "numpy" and name in ("dtype", "ndarray"):
      return getattr(np, name)
    if module == "_codecs" and name == "encode":
      import codecs
      return codecs.encode
    if module.startswith(("torch", "numpy", "collections", "builtins", "_codecs")) or \
        module in ("os", "posix", "nt", "subprocess", "sys", "shutil", "importlib"):
      # Executable or unknown torch internals: refuse (a tensor may depend on them).
      raise PthFormatError(f"{self.path}: the pickle references {module}.{name}, which this "
                           f"torch-free reader does not allow")
    return _placeholder(f"{module}.{name}")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise PthFormatError(f"{self.path}: unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid[:5]
    key = str(key)
    if key in self.storages:
      return self.storages[key]
    if isinstance(storage_type, _StorageType):
      dtype = storage_type.dtype
    elif isinstance(storage_type, _TorchDtype):
      dtype = storage_type.dtype
    else:
      raise PthFormatError(f"{self.path}: unsupported storage type {storage_type!r}")
    name = f"{self.prefix}data/{key}"
    try:
      raw = self.archive.read(name)
    except KeyError:
      raise PthFormatError(f"{self.path}: storage {name} is missing (truncated file?)") from None
    dt = dtype.newbyteorder("<" if self.byteorder == "little" else ">")
    arr = np.frombuffer(raw, dtype=dt)
    if numel is not None and arr.size < int(numel):
      raise PthFormatError(f"{self.path}: storage {key} holds {arr.size} elements, expected "
                           f"{numel} (truncated file?)")
    if dt.byteorder not in ("=", "|") and dt != dtype:
      arr = arr.astype(dtype)
    storage = _Storage(arr)
    self.storages[key] = storage
    return storage


def is_torch_zip(path: str | os.PathLike) -> bool:
  """True for a zip archive with a `data.pkl` (PyTorch's format since 1.6)."""
  try:
    with zipfile.ZipFile(os.fspath(path)) as z:
      return any(n.endswith("data.pkl") for n in z.namelist())
  except (zipfile.BadZipFile, OSError):
    return False


def _to_numpy_tree(obj):
  import torch
  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    if t.dtype == torch.bfloat16:
      return t.float().numpy().astype(_bf16())
    return t.numpy().copy()
  if isinstance(obj, dict):
    return {k: _to_numpy_tree(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_to_numpy_tree(v) for v in obj)
  return obj


def load_pth(path: str | os.PathLike) -> Any:
  """Unpickles a `torch.save` file with every tensor as a numpy array (see module docstring)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    archive = None
  if archive is None:
    try:
      import torch
    except ImportError:
      raise PthFormatError(
          f"{path}: not a zip-format PyTorch checkpoint. If it is a legacy (torch < 1.6) file, "
          f"install torch (pip install torch) to read it, or convert it to .safetensors") \
          from None
    try:
      return _to_numpy_tree(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - report torch's reason with the file name
      raise PthFormatError(f"{path}: torch could not read it either: {e}") from None
  with archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if not pkl:
      raise PthFormatError(f"{path}: zip archive without data.pkl (a TorchScript or other "
                           f"archive, not a torch.save checkpoint)")
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in names:
      byteorder = archive.read(f"{prefix}byteorder").decode().strip() or "little"
    try:
      data = archive.read(pkl[0])
      return _Unpickler(io.BytesIO(data), archive, prefix, path, byteorder).load()
    except PthFormatError:
      raise
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, KeyError, ValueError,
            OSError) as e:
      raise PthFormatError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); "
                           f"the file may be truncated or corrupt") from None


def main(argv=None):
  parser = argparse.ArgumentParser(description="List the tensors of a .pth file (no torch).")
  parser.add_argument("path")
  args = parser.parse_args(argv)
  obj = load_pth(args.path)

  def walk(o, prefix=""):
    if isinstance(o, np.ndarray):
      print(f"{prefix} {o.dtype} {o.shape}")
    elif isinstance(o, dict):
      for k, v in o.items():
        walk(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(o, (list, tuple)):
      for i, v in enumerate(o):
        walk(v, f"{prefix}[{i}]")
  walk(obj)


if __name__ == "__main__":
  main()
