"""A torch-free reader of PyTorch checkpoints (`torch.save`'s zip format, torch >= 1.6).

    obj = load_pth("deit_base_distilled_patch16_224-df68dfff.pth")   # tensors -> numpy
    sd = obj["model"]                                                # {name: np.ndarray}

The file format
---------------
A `torch.save` file is an uncompressed zip archive whose entries share one folder name (the
"prefix": the file's stem when torch.save was given a path, `archive/` for a file object):

* `<prefix>/data.pkl`: a pickle (protocol 2 by default) of the saved object. A tensor is
  pickled as a call of `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
  requires_grad, hooks[, metadata])` (`_rebuild_tensor_v3(..., dtype, metadata)` for dtypes
  newer than the legacy storage classes), wrapped in `_rebuild_parameter[_with_state]` for an
  `nn.Parameter` and in `torch._tensor._rebuild_from_type_v2` for a tensor with Python
  attributes or of a subclass. A storage is a persistent id `('storage', storage_type, key,
  location, numel)`, `storage_type` being a legacy typed class (`torch.FloatStorage`, ...;
  `numel` counts elements) or `torch.storage.UntypedStorage` (`numel` counts bytes, the dtype
  comes from `_rebuild_tensor_v3`).
* `<prefix>/data/<key>`: the raw bytes of each storage, in the byte order of
* `<prefix>/byteorder` (`little` or `big`; files of older torch versions lack it: little).
* `<prefix>/version`, `<prefix>/.data/version`, `.format_version`, `.storage_alignment`,
  `.data/serialization_id`: bookkeeping that does not change how the pickle is read.

How it is read
--------------
The archive is memory-mapped; each storage blob is located once (its CRC checked once) and
viewed in place, and every tensor is copied out of it into its own C-contiguous numpy array
with the tensor's offset, shape and strides applied (views sharing one storage, transposes
saved as they are, broadcast strides, conjugate and negative bits). bfloat16 and float8
tensors use `ml_dtypes` types, so their values are exact.

The pickle is read by a restricted unpickler that never imports or calls anything of the
file's choosing. The allowed globals are the tensor rebuild functions above, storage and dtype
names, `torch.Size` (-> tuple), `torch.device` (-> str such as "cuda:0"), `collections`
containers, a few builtin value types (set, frozenset, complex, bytearray, slice, and the
plain constructors list/dict/tuple/int/float/str/bool), `_codecs.encode` (bytes in protocol 2),
`argparse.Namespace` (DeiT checkpoints carry their training `args`), `datetime` values, pure
paths, and numpy's scalar/array/dtype reconstruction.

Other globals:
* in `torch` (sparse, quantized, nested, meta or device tensors, TorchScript internals) and in
  modules that can run code or touch the system (`os`, `subprocess`, `builtins.eval`, ...)
  raise `PthFormatError` naming `module.name` and the file: a tensor is never silently
  dropped and nothing is executed;
* any other class (for example a training-config object in a checkpoint's metadata) becomes
  an opaque `Unsupported` placeholder that keeps what the pickle gave it (`.args`, `.state`,
  `.items`, `.list`; tensors inside stay reachable there), with one `UnsupportedGlobalWarning`
  per file. Nothing of that class is imported or run. Pass `strict=True` to `load_pth` to raise
  `PthFormatError` for these as well.

Legacy (torch < 1.6, non-zip) files are read with `torch.load(path, map_location="cpu",
weights_only=True)` when torch is importable, tensors converted to numpy; without torch a
`PthFormatError` says to install torch or convert the file to .safetensors. TorchScript archives
(`torch.jit.save`; `torch.load(weights_only=True)` refuses them too) raise a `PthFormatError`
that says how to convert them. torch is never imported for zip-format checkpoints.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import collections
import datetime
import io
import mmap
import os
import pathlib
import pickle
import struct
import types
import warnings
import zipfile
import zlib
from typing import Any

import numpy as np

__all__ = ["PthFormatError", "Unsupported", "UnsupportedGlobalWarning", "TorchDtype",
           "load_pth", "is_torch_zip"]

LEGACY_HINT = ("this is a legacy PyTorch checkpoint; install torch (pip install torch) to read "
               "it, or convert it to .safetensors")


class PthFormatError(ValueError):
  """The file is not a readable PyTorch checkpoint; the message names the file and why."""


class UnsupportedGlobalWarning(UserWarning):
  """A checkpoint's metadata held objects of classes returned as `Unsupported` placeholders."""


# ----------------------------------------------------------------------------- dtypes


def _ml_dtype(name: str):
  try:
    import ml_dtypes  # ships with jax
  except ImportError:
    return None
  t = getattr(ml_dtypes, name, None)
  return None if t is None else np.dtype(t)


# torch dtype name -> numpy dtype (a string: a numpy name; "ml:<name>": an ml_dtypes type;
# None: a torch dtype numpy cannot hold, such as quantized, packed 4-bit or bit types).
_TORCH_DTYPE_NAMES: dict[str, str | None] = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": "ml:bfloat16",
    "int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
    "int16": "int16", "short": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
    "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "complex64": "complex64", "cfloat": "complex64", "complex128": "complex128",
    "cdouble": "complex128",
    "float8_e4m3fn": "ml:float8_e4m3fn", "float8_e5m2": "ml:float8_e5m2",
    "float8_e4m3fnuz": "ml:float8_e4m3fnuz", "float8_e5m2fnuz": "ml:float8_e5m2fnuz",
    "float8_e8m0fnu": "ml:float8_e8m0fnu",
    "complex32": None, "chalf": None, "bcomplex32": None, "float4_e2m1fn_x2": None,
    "qint8": None, "quint8": None, "qint32": None, "quint4x2": None, "quint2x4": None,
    "bits8": None, "bits16": None, "bits1x8": None, "bits2x4": None, "bits4x2": None,
    **{f"uint{i}": None for i in range(1, 8)}, **{f"int{i}": None for i in range(1, 8)},
}
# Legacy typed storage class -> torch dtype name (None: untyped, the dtype comes with the tensor).
_STORAGE_NAMES: dict[str, str | None] = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}


def _numpy_dtype(torch_name: str) -> np.dtype | None:
  spec = _TORCH_DTYPE_NAMES.get(torch_name)
  if spec is None:
    return None
  if spec.startswith("ml:"):
    return _ml_dtype(spec[3:])
  return np.dtype(spec)


class TorchDtype:
  """A `torch.<dtype>` object found in a pickle, e.g. in metadata; `.numpy` is the numpy dtype
  (None if numpy cannot represent it)."""
  _cache: dict[str, "TorchDtype"] = {}

  def __new__(cls, name: str):
    if name not in cls._cache:
      self = object.__new__(cls)
      self.name = name
      self.numpy = _numpy_dtype(name)
      cls._cache[name] = self
    return cls._cache[name]

  def __reduce__(self):
    return TorchDtype, (self.name,)

  def __setattr__(self, name, value):
    if name in self.__dict__:
      raise AttributeError(f"TorchDtype.{name} is read-only")
    object.__setattr__(self, name, value)

  def __repr__(self):
    return f"torch.{self.name}"


class _StorageType:
  """A storage class of a persistent id: typed (`torch.FloatStorage`) or untyped."""

  def __init__(self, qualname: str, dtype_name: str | None):
    self.qualname, self.dtype_name = qualname, dtype_name

  def __repr__(self):
    return self.qualname


class _TorchClass:
  """`torch.Tensor` / `torch.nn.Parameter` as the `new_type` of `_rebuild_from_type_v2`; not
  callable (a pickle calling it would get a TypeError, reported as a PthFormatError)."""

  def __init__(self, qualname):
    self.qualname = qualname

  def __repr__(self):
    return self.qualname


# ----------------------------------------------------------------------------- placeholders


class Unsupported:
  """Placeholder for a pickled object of a class this reader does not reconstruct (metadata
  such as a training-config object). Nothing of that class is imported or run; what the
  pickle passed is kept: `args`/`kwargs` (constructor arguments), `state` (`__setstate__`),
  `items` (dict-style entries), `list` (list-style entries). `qualname` names the class."""
  qualname = "?"

  def __new__(cls, *args, **kwargs):
    self = object.__new__(cls)
    self.args, self.kwargs = args, kwargs
    self.state, self.items, self.list = None, {}, []
    return self

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items[key] = value

  def append(self, value):
    self.list.append(value)

  def extend(self, values):
    self.list.extend(values)

  def __repr__(self):
    return f"<Unsupported {self.qualname}>"


def _placeholder(qualname: str) -> type:
  return type("Unsupported", (Unsupported,), {"qualname": qualname, "__module__": __name__})


# ----------------------------------------------------------------------------- allowed globals


def _encode(text, encoding="utf-8"):
  """`_codecs.encode` as protocol-2 pickles use it for bytes (text codecs only)."""
  if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in (
      "latin1", "latin-1", "iso-8859-1", "utf-8", "utf8", "ascii"):
    raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
  return text.encode(encoding)


def _device(kind, index=None):
  if isinstance(kind, str) and index is None:
    return kind
  return f"{kind}:{index}"


def _size(dims=()):
  return tuple(int(d) for d in dims)


def _bytearray(*args):
  if args and not isinstance(args[0], (bytes, str, list, tuple)):
    raise pickle.UnpicklingError("bytearray() of a size is not allowed")
  return bytearray(*args)


class _NdarrayType:
  """`numpy.ndarray` as the subtype argument of `_reconstruct` (not callable, so a pickle
  cannot allocate an array of any shape it likes)."""

  def __repr__(self):
    return "numpy.ndarray"


_NDARRAY = _NdarrayType()


def _numpy_core(part: str):
  import importlib
  try:
    return importlib.import_module(f"numpy._core.{part}")
  except ImportError:  # numpy < 2
    return importlib.import_module(f"numpy.core.{part}")


def _reconstruct(subtype, shape, dtype):
  """numpy's array pickling: an empty array (shape (0,)) whose state BUILD then sets."""
  if subtype is not _NDARRAY or tuple(shape) != (0,):
    raise pickle.UnpicklingError(f"numpy _reconstruct({subtype!r}, {shape!r}) is not allowed "
                                 f"(only plain numpy arrays are)")
  return _numpy_core("multiarray")._reconstruct(np.ndarray, (0,), dtype)


def _numpy_global(module: str, name: str):
  if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    if name == "scalar":
      return _numpy_core("multiarray").scalar
    if name == "_reconstruct":
      return _reconstruct
  if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
    return _numpy_core("numeric")._frombuffer
  if module == "numpy" and name == "dtype":
    return np.dtype
  if module == "numpy" and name == "ndarray":
    return _NDARRAY
  if module == "numpy.dtypes" and name.endswith("DType"):
    found = getattr(getattr(np, "dtypes", None), name, None)
    return found if isinstance(found, type) and issubclass(found, np.dtype) else None
  return None


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "Counter"): collections.Counter,
    ("collections", "defaultdict"): collections.defaultdict,
    ("collections", "deque"): collections.deque,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex, ("builtins", "bytearray"): _bytearray,
    ("builtins", "slice"): slice, ("builtins", "list"): list, ("builtins", "dict"): dict,
    ("builtins", "tuple"): tuple, ("builtins", "int"): int, ("builtins", "float"): float,
    ("builtins", "str"): str, ("builtins", "bool"): bool,
    ("_codecs", "encode"): _encode,
    ("argparse", "Namespace"): argparse.Namespace,
    ("torch", "Size"): _size,
    ("torch", "device"): _device,
    ("torch", "Tensor"): _TorchClass("torch.Tensor"),
    ("torch._tensor", "Tensor"): _TorchClass("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TorchClass("torch.nn.Parameter"),
    **{("datetime", n): getattr(datetime, n)
       for n in ("datetime", "date", "time", "timedelta", "timezone")},
    **{(m, n): (pathlib.PureWindowsPath if "Windows" in n else pathlib.PurePosixPath)
       for m in ("pathlib", "pathlib._local")
       for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                 "PureWindowsPath")},
}

# Modules whose globals are refused outright (rather than made placeholders): torch internals
# may be tensors, the others can run code or touch the system.
_REFUSED_MODULES = frozenset({
    "torch", "builtins", "__builtin__", "os", "posix", "nt", "sys", "subprocess", "shutil",
    "importlib", "runpy", "pickle", "_pickle", "copyreg", "copy_reg", "marshal", "code",
    "codeop", "codecs", "_codecs", "ctypes", "socket", "pty", "webbrowser", "types",
    "functools", "operator", "io", "_io", "platform", "multiprocessing", "threading",
    "_thread", "signal", "tempfile", "zipimport", "shelve", "dill", "cloudpickle", "inspect",
    "asyncio", "pdb", "bdb", "trace", "timeit", "cProfile", "profile", "pip", "setuptools",
    "distutils", "ensurepip", "_posixsubprocess", "pydoc",
    "http", "urllib", "ftplib", "smtplib", "telnetlib", "sqlite3", "glob", "fileinput",
})


# ----------------------------------------------------------------------------- the reader


class _Storage:
  """One storage blob: raw bytes (a read-only view of the mapped file) and its typed dtype."""

  def __init__(self, key: str, raw: np.ndarray, dtype_name: str | None, numel: int):
    self.key, self.raw, self.dtype_name, self.numel = key, raw, dtype_name, numel
    self.used = False
    self._views: dict[np.dtype, np.ndarray] = {}


# BUILD (`__setstate__` or attribute assignment) is refused on these: a hostile pickle could
# otherwise set attributes of classes, functions or this module's shared objects.
_NO_BUILD = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
             TorchDtype, _StorageType, _TorchClass, _NdarrayType)


class _Reader(pickle._Unpickler):  # noqa: SLF001 - the pure-Python unpickler, to guard BUILD
  """The restricted unpickler (the pure-Python implementation, so that BUILD can be checked;
  a data.pkl is small: a few kB per hundred tensors)."""
  dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001

  def __init__(self, data: bytes, archive: zipfile.ZipFile, mapped, prefix: str, path: str,
               byteorder: str, strict: bool):
    super().__init__(io.BytesIO(data), encoding="utf-8")
    self.size = len(data)
    self.archive, self.mapped, self.prefix, self.path = archive, mapped, prefix, path
    self.swap = byteorder != "little"
    self.strict = strict
    self.storages: dict[str, _Storage] = {}
    self.placeholders: dict[str, type] = {}
    self._rebuild = {
        ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    }

  def error(self, what: str) -> PthFormatError:
    return PthFormatError(f"{self.path}: {what}")

  # -- globals

  def find_class(self, module, name):
    if self.proto < 3:  # Python 2 names, as protocol 2 writes them (__builtin__.set, ...)
      if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
      elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    key = (module, name)
    if key in self._rebuild:
      return self._rebuild[key]
    if key in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[key]
    if module == "torch" and name in _STORAGE_NAMES:
      return _StorageType(f"torch.{name}", _STORAGE_NAMES[name])
    if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage", "_LegacyStorage"):
      return _StorageType(f"torch.storage.{name}", None)
    if module == "torch" and name in _TORCH_DTYPE_NAMES:
      return TorchDtype(name)
    if module.startswith("numpy"):
      found = _numpy_global(module, name)
      if found is not None:
        return found
    top = module.split(".", 1)[0]
    if self.strict or top in _REFUSED_MODULES:
      why = ("a tensor type or torch internal this torch-free reader cannot rebuild"
             if top == "torch" else "not on this reader's allow-list")
      raise self.error(f"the pickle references {module}.{name} ({why}); nothing was executed")
    qualname = f"{module}.{name}"
    if qualname not in self.placeholders:
      self.placeholders[qualname] = _placeholder(qualname)
    return self.placeholders[qualname]

  def load_build(self):
    inst = self.stack[-2] if len(self.stack) >= 2 else None  # the stack ends (inst, state)
    if isinstance(inst, (_NO_BUILD, _Storage)):
      raise self.error(f"the pickle sets the state of {inst!r}, which is not allowed; "
                       f"nothing was executed")
    super().load_build()

  dispatch[pickle.BUILD[0]] = load_build

  def load_bytearray8(self):
    # The stock handler allocates the length the pickle claims before reading the bytes.
    (n,) = struct.unpack("<Q", self.read(8))
    data = self.read(min(n, self.size))
    if len(data) != n:
      raise self.error("corrupt pickle (a bytearray runs past the end)")
    self.append(bytearray(data))

  dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

  # -- storages

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise self.error(f"unsupported persistent id {pid!r} (not a torch.save storage)")
    _, storage_type, key, _location, numel = pid[:5]
    key = str(key)
    if key in self.storages:
      return self.storages[key]
    if not isinstance(storage_type, _StorageType):
      raise self.error(f"storage {key} has an unsupported storage type {storage_type!r}")
    raw = self._blob(f"{self.prefix}data/{key}")
    storage = _Storage(key, raw, storage_type.dtype_name, int(numel))
    if storage.dtype_name is None:
      expected = storage.numel
    else:
      dt = self._dtype(storage.dtype_name, f"storage {key}")
      expected = storage.numel * dt.itemsize
    if raw.nbytes < expected:
      raise self.error(f"storage {key} holds {raw.nbytes} bytes, {expected} expected "
                       f"(truncated or corrupt file)")
    self.storages[key] = storage
    return storage

  def _blob(self, name: str) -> np.ndarray:
    """The bytes of one archive entry, read once: in place from the mapped file when stored
    uncompressed (as torch writes them), else decompressed by zipfile."""
    try:
      info = self.archive.getinfo(name)
    except KeyError:
      raise self.error(f"storage {name} is missing from the archive") from None
    if info.flag_bits & 0x1:
      raise self.error(f"storage {name} is encrypted")
    if info.compress_type != zipfile.ZIP_STORED or self.mapped is None:
      return np.frombuffer(self.archive.read(name), np.uint8)
    mm = self.mapped
    start = info.header_offset
    header = mm[start:start + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
      raise self.error(f"corrupt zip entry {name} (bad local header)")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start += 30 + name_len + extra_len
    if start + info.file_size > len(mm):
      raise self.error(f"storage {name} extends past the end of the file (truncated)")
    raw = np.frombuffer(mm, np.uint8, count=info.file_size, offset=start)
    if zlib.crc32(raw) != info.CRC:
      raise self.error(f"storage {name} fails its CRC check (corrupt file)")
    return raw

  def _dtype(self, name: str | None, what: str) -> np.dtype:
    if name is None:
      raise self.error(f"{what} has no dtype (an untyped storage outside _rebuild_tensor_v3)")
    dt = _numpy_dtype(name)
    if dt is None and (_TORCH_DTYPE_NAMES.get(name) or "").startswith("ml:"):
      raise self.error(f"{what} has dtype torch.{name}, which needs the ml_dtypes package "
                       f"(pip install ml_dtypes; it comes with jax)")
    if dt is None:
      raise self.error(f"{what} has dtype torch.{name}, which numpy cannot represent "
                       f"(quantized, packed, bit and complex32 types are not supported)")
    return dt

  def _elements(self, storage: _Storage, dt: np.dtype) -> np.ndarray:
    """The storage's bytes as a 1-d array of `dt` in native byte order (cached per dtype)."""
    arr = storage._views.get(dt)
    if arr is None:
      raw = storage.raw[:storage.raw.nbytes - storage.raw.nbytes % dt.itemsize]
      if self.swap and dt.itemsize > 1:
        part = dt.itemsize // 2 if dt.kind == "c" else dt.itemsize
        arr = raw.view(f"u{part}").byteswap().view(dt)
      else:
        arr = raw.view(dt)
      storage._views[dt] = arr
    return arr

  # -- tensors

  def _tensor(self, storage, offset, size, stride, dtype_name, metadata=None) -> np.ndarray:
    if not isinstance(storage, _Storage):
      raise self.error(f"a tensor is rebuilt from {type(storage).__name__}, not a storage")
    dt = self._dtype(dtype_name, f"a tensor in storage {storage.key}")
    storage.used = True
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(offset)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
      raise self.error(f"invalid tensor geometry (size {size}, stride {stride})")
    if 0 in size:
      out = np.zeros(size, dt)
    else:
      flat = self._elements(storage, dt)
      end = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
      if offset < 0 or end > flat.size:
        raise self.error(f"a tensor view (elements {offset}..{end}) exceeds storage "
                         f"{storage.key} ({flat.size} elements)")
      # A strided view of the storage (as np.lib.stride_tricks.as_strided would give, which
      # cannot carry ml_dtypes types), then a C-contiguous copy.
      view = np.ndarray(size, dtype=dt, buffer=flat, offset=offset * dt.itemsize,
                        strides=tuple(st * dt.itemsize for st in stride))
      out = np.array(view, order="C", copy=True)
    for flag, value in dict(metadata or {}).items():
      if not value:
        continue
      if flag == "conj":
        np.conjugate(out, out=out)
      elif flag == "neg":
        np.negative(out, out=out)
      else:
        raise self.error(f"a tensor carries unsupported metadata {flag!r}")
    return out

  def _rebuild_tensor(self, storage, offset, size, stride):
    return self._tensor(storage, offset, size, stride, getattr(storage, "dtype_name", None))

  def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False,
                         backward_hooks=None, metadata=None):
    return self._tensor(storage, offset, size, stride, getattr(storage, "dtype_name", None),
                        metadata)

  def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, backward_hooks,
                         dtype, metadata=None):
    if not isinstance(dtype, TorchDtype):
      raise self.error(f"_rebuild_tensor_v3 with dtype {dtype!r}")
    return self._tensor(storage, offset, size, stride, dtype.name, metadata)


def _rebuild_parameter(data, *unused):
  return data  # requires_grad, hooks and Python attributes of a Parameter are dropped


def _rebuild_from_type_v2(func, new_type, args, state):
  return func(*args)  # the subclass and Python attributes of a tensor are dropped


# ----------------------------------------------------------------------------- entry points


def _find_data_pkl(names: list[str]) -> str | None:
  candidates = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
  return min(candidates, key=lambda n: (n.count("/"), len(n))) if candidates else None


def is_torch_zip(path: str | os.PathLike) -> bool:
  """True for a zip archive written by `torch.save` (>= 1.6) or `torch.jit.save`, i.e. one
  with a `<prefix>/data.pkl`; False otherwise (legacy files, other files, missing files)."""
  try:
    with zipfile.ZipFile(os.fspath(path)) as z:
      return _find_data_pkl(z.namelist()) is not None
  except (zipfile.BadZipFile, OSError, ValueError):
    return False


def load_pth(path: str | os.PathLike, *, strict: bool = False) -> Any:
  """Reads a `torch.save` checkpoint without torch.

  Returns the unpickled object with every tensor (and `nn.Parameter`) as a numpy array: a
  C-contiguous copy with the tensor's shape, strides and offset applied; bfloat16/float8 as
  `ml_dtypes` types. Dicts (OrderedDict stays OrderedDict), lists and tuples are kept;
  `torch.Size` -> tuple, `torch.device` -> str, `torch.float16` & co. -> `TorchDtype`,
  `argparse.Namespace` stays a Namespace. Classes outside the allow-list become `Unsupported`
  placeholders (or raise with `strict=True`); see the module docstring.

  Raises:
    FileNotFoundError: no such file.
    PthFormatError: not a readable checkpoint (truncated, corrupt, forbidden or unsupported
      content, legacy format without torch); the message names the file.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if os.path.isdir(path):
    raise PthFormatError(f"{path} is a directory, not a PyTorch checkpoint file")
  with open(path, "rb") as f:
    head = f.read(512)
    if not head:
      raise PthFormatError(f"{path}: empty file")
    try:
      archive = zipfile.ZipFile(f)
    except MemoryError:
      raise
    except Exception as e:  # noqa: BLE001 - BadZipFile, or worse on a mangled directory
      if head[:2] == b"PK":
        raise PthFormatError(f"{path}: truncated or corrupt zip archive ({e})") from None
      return _load_with_torch(path, head, reason="not a zip archive")
    with archive:
      try:
        obj, placeholders = _load_zip(f, archive, path, strict)
      except (PthFormatError, MemoryError):
        raise
      except Exception as e:  # noqa: BLE001 - any failure of a corrupt or hostile file
        raise PthFormatError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); "
                             f"the file may be truncated or corrupt") from None
  if placeholders:
    warnings.warn(f"{path}: objects of {', '.join(placeholders)} were not reconstructed and "
                  f"are returned as fgjax.convert.pth_reader.Unsupported placeholders",
                  UnsupportedGlobalWarning, stacklevel=2)
  return obj


def _load_zip(f, archive: zipfile.ZipFile, path: str, strict: bool):
  names = archive.namelist()
  pkl = _find_data_pkl(names)
  if pkl is None:
    raise PthFormatError(f"{path}: a zip archive without data.pkl, not a PyTorch checkpoint "
                         f"(entries: {names[:5]})")
  prefix = pkl[: -len("data.pkl")]
  if f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names):
    # torch.load(weights_only=True) refuses these too, so torch is no help here.
    raise PthFormatError(
        f"{path}: a TorchScript archive (torch.jit.save), not a torch.save checkpoint. Where "
        f"torch is installed, convert it with torch.save(torch.jit.load(path, "
        f"map_location='cpu').state_dict(), 'weights.pth') (loading TorchScript runs the "
        f"archive's code: only for trusted files), or export .safetensors")
  byteorder = "little"
  if f"{prefix}byteorder" in names:
    byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
    if byteorder not in ("little", "big"):
      raise PthFormatError(f"{path}: unknown byte order {byteorder!r}")
  try:
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  except (OSError, ValueError):
    mapped = None  # e.g. a file system without mmap: zipfile reads the blobs instead
  reader = None
  try:
    reader = _Reader(archive.read(pkl), archive, mapped, prefix, path, byteorder, strict)
    obj = reader.load()
    if any(not st.used for st in reader.storages.values()):
      obj = _bare_storages(obj, reader, {})
    return obj, sorted(reader.placeholders)
  finally:
    if reader is not None:  # drop the views of the mapped file, then unmap it
      reader.storages.clear()
      reader.memo.clear()
      reader = None
    if mapped is not None:
      try:
        mapped.close()
      except BufferError:  # a view is still referenced (e.g. by a placeholder); GC unmaps it
        pass


def _bare_storages(obj, reader: _Reader, memo: dict):
  """Replaces storages pickled on their own (not as a tensor) by 1-d arrays (copies)."""
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, _Storage):
    if obj.dtype_name is None:
      out = np.array(obj.raw[:obj.numel], copy=True)
    else:
      out = reader._tensor(obj, 0, (obj.numel,), (1,), obj.dtype_name)
    memo[id(obj)] = out
    return out
  memo[id(obj)] = obj
  if isinstance(obj, dict):
    for k, v in obj.items():
      obj[k] = _bare_storages(v, reader, memo)
  elif isinstance(obj, list):
    obj[:] = [_bare_storages(v, reader, memo) for v in obj]
  elif isinstance(obj, tuple):
    new = tuple(_bare_storages(v, reader, memo) for v in obj)
    if any(a is not b for a, b in zip(new, obj)):
      new = type(obj)(*new) if hasattr(obj, "_fields") else type(obj)(new)
      memo[id(obj)] = new
      return new
  elif isinstance(obj, Unsupported):
    obj.args = _bare_storages(obj.args, reader, memo)
    obj.state = _bare_storages(obj.state, reader, memo)
    obj.items = _bare_storages(obj.items, reader, memo)
    obj.list = _bare_storages(obj.list, reader, memo)
  elif isinstance(obj, argparse.Namespace):
    _bare_storages(vars(obj), reader, memo)
  return obj


# ----------------------------------------------------------------------------- torch fallback


def _load_with_torch(path: str, head: bytes, reason: str):
  """Legacy (pre-1.6, non-zip) files: torch.load(weights_only=True) when torch is there."""
  try:
    import torch
  except ImportError:
    legacy = head[:1] == b"\x80" or head[257:262] == b"ustar"  # pickle or (very old) tar
    if legacy:
      raise PthFormatError(f"{path}: {LEGACY_HINT}") from None
    raise PthFormatError(f"{path}: not a PyTorch checkpoint ({reason}; starts with "
                         f"{head[:16]!r})") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - report torch's reason with the file name
    raise PthFormatError(f"{path}: {reason}, and torch.load(weights_only=True) could not read "
                         f"it either: {type(e).__name__}: {e}") from None
  try:
    return _torch_to_numpy(obj, torch)
  except Exception as e:  # noqa: BLE001
    raise PthFormatError(f"{path}: cannot convert to numpy: {type(e).__name__}: {e}") from None


def _torch_to_numpy(obj, torch):
  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    if t.is_conj():
      t = t.resolve_conj()
    if t.is_neg():
      t = t.resolve_neg()
    dt = _numpy_dtype(str(t.dtype).replace("torch.", ""))
    if dt is not None and dt.type.__module__.startswith("ml_dtypes"):
      bits = {1: torch.uint8, 2: torch.int16}[dt.itemsize]
      return t.contiguous().view(bits).numpy().view(dt).copy()
    return np.ascontiguousarray(t.numpy()).copy()
  if isinstance(obj, torch.Size):
    return tuple(obj)
  if isinstance(obj, torch.device):
    return str(obj)
  if isinstance(obj, torch.dtype):
    return TorchDtype(str(obj).replace("torch.", ""))
  if isinstance(obj, dict):
    out = {k: _torch_to_numpy(v, torch) for k, v in obj.items()}
    return collections.OrderedDict(out) if isinstance(obj, collections.OrderedDict) else out
  if isinstance(obj, (list, tuple)):
    vals = [_torch_to_numpy(v, torch) for v in obj]
    if isinstance(obj, list):
      return vals
    return type(obj)(*vals) if hasattr(obj, "_fields") else tuple(vals)
  return obj


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
    elif prefix:
      print(f"{prefix} = {o!r}"[:200])
  walk(obj)


if __name__ == "__main__":
  main()
