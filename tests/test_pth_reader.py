"""The torch-free .pth reader against files written by torch.save (torch only writes them)."""
import argparse
import collections
import datetime
import os
import pathlib
import pickle
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fgjax.convert import pth_reader  # noqa: E402

READER_FILE = pth_reader.__file__


def _ref(t):
  """What the reader must return for tensor `t`, as numpy (bf16/float8 as float32 or bits)."""
  t = t.detach().resolve_conj().resolve_neg()
  if t.dtype == torch.bfloat16:
    return t.float().numpy()
  if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
    return t.view(torch.uint8).numpy()
  return t.numpy()


def _check(got, t, name):
  assert isinstance(got, np.ndarray), (name, type(got))
  assert got.shape == tuple(t.shape), name
  assert got.flags.c_contiguous and got.flags.writeable and got.flags.owndata, name
  if t.dtype == torch.bfloat16:
    assert got.dtype.name == "bfloat16", name
    np.testing.assert_array_equal(got.astype(np.float32), _ref(t), err_msg=name)
  elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
    assert got.dtype.name == str(t.dtype).replace("torch.", ""), name
    np.testing.assert_array_equal(got.view(np.uint8), _ref(t), err_msg=name)
  else:
    assert got.dtype == _ref(t).dtype, name
    np.testing.assert_array_equal(got, _ref(t), err_msg=name)


def _rewrite(src, dst, *, prefix=None, compression=zipfile.ZIP_STORED, transform=None):
  """Copies a torch.save archive entry by entry, optionally renaming its folder, compressing
  it or transforming entries (name within the folder, bytes) -> bytes."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
    for info in zin.infolist():
      folder, rest = info.filename.split("/", 1)
      data = zin.read(info.filename)
      if transform is not None:
        data = transform(rest, data)
      zout.writestr(f"{prefix or folder}/{rest}", data)


# ----------------------------------------------------------------------------- round trips


def test_round_trip_dtypes_and_special_tensors(tmp_path):
  with_attr = torch.randn(3)
  with_attr.note = "hello"  # pickled through torch._tensor._rebuild_from_type_v2
  param_with_state = torch.nn.Parameter(torch.randn(2))
  param_with_state.extra = 1  # pickled through _rebuild_parameter_with_state
  tensors = {
      "f32": torch.randn(4, 5), "f64": torch.randn(3, dtype=torch.float64),
      "f16": torch.randn(3, 2).half(), "bf16": torch.randn(2, 7).bfloat16(),
      "i64": torch.arange(-3, 7), "i32": torch.arange(4, dtype=torch.int32),
      "i16": torch.arange(-2, 2, dtype=torch.int16), "i8": torch.arange(-2, 2, dtype=torch.int8),
      "u8": torch.arange(250, 256, dtype=torch.uint8),
      "bool": torch.tensor([True, False, True]),
      "c64": torch.randn(3, dtype=torch.complex64), "c128": torch.randn(2, dtype=torch.complex128),
      # dtypes newer than the legacy storage classes: UntypedStorage + _rebuild_tensor_v3
      "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
      "u32": torch.tensor([0, 2**32 - 1], dtype=torch.uint32),
      "u64": torch.tensor([0, 2**63 + 5], dtype=torch.uint64),
      "f8e4m3": torch.randn(5).to(torch.float8_e4m3fn),
      "f8e5m2": torch.randn(5).to(torch.float8_e5m2),
      "scalar": torch.tensor(3.5), "scalar_i": torch.tensor(7),
      "empty": torch.zeros(0, 3), "empty_bf16": torch.zeros(2, 0).bfloat16(),
      "param": torch.nn.Parameter(torch.randn(2, 2)), "param_state": param_with_state,
      "with_attr": with_attr,
      "conj": torch.randn(3, dtype=torch.complex64).conj(),  # conj bit saved as metadata
      "neg": torch.randn(3)._neg_view(),  # neg bit saved as metadata
  }
  path = tmp_path / "ckpt.pth"
  torch.save(tensors, path)
  obj = pth_reader.load_pth(path)
  assert list(obj) == list(tensors)
  for k, t in tensors.items():
    _check(obj[k], t, k)
  assert obj["f16"].dtype == np.float16 and obj["scalar"].shape == ()
  assert pth_reader.is_torch_zip(path)


def test_views_sharing_one_storage(tmp_path, monkeypatch):
  base = torch.randn(6, 4)
  qkv = torch.randn(12, 5)
  q, k, v = qkv.chunk(3)  # timm-style split views with offsets into one storage
  tensors = {
      "base": base, "transposed": base.T, "slice": base[1:, 1:3], "row": base[4],
      "every_other": base[::2, ::3], "q": q, "k": k, "v": v, "v_t": v.T,
      "expanded": torch.arange(3.0).expand(4, 3),  # stride 0
      "permuted": torch.randn(2, 3, 4).permute(2, 0, 1),
  }
  assert not tensors["transposed"].is_contiguous()
  path = tmp_path / "views.pth"
  torch.save(tensors, path)
  with zipfile.ZipFile(path) as z:
    n_blobs = sum("/data/" in n for n in z.namelist())
  assert n_blobs == 4  # base, qkv, arange, the permuted tensor

  reads = []
  blob = pth_reader._Reader._blob
  monkeypatch.setattr(pth_reader._Reader, "_blob", lambda self, name: reads.append(name) or
                      blob(self, name))
  obj = pth_reader.load_pth(path)
  assert sorted(reads) == sorted(set(reads)) and len(reads) == n_blobs  # each blob read once
  for name, t in tensors.items():
    _check(obj[name], t, name)
  obj["base"][0, 0] = 1e6  # copies, not views of one another
  assert obj["transposed"][0, 0] == base[0, 0].item()


def test_nested_training_checkpoint_with_metadata(tmp_path):
  net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
  # An AdamW state_dict after one step, written out (torch.optim would import torch._dynamo,
  # which takes seconds).
  opt = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p),
                       "exp_avg_sq": torch.rand_like(p)} for i, p in enumerate(net.parameters())},
         "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05,
                           "amsgrad": False, "foreach": None, "maximize": False,
                           "capturable": False, "differentiable": False, "fused": None,
                           "params": [0, 1, 2, 3]}]}
  ckpt = {
      "model": net.state_dict(), "optimizer": opt, "epoch": 3,
      "args": argparse.Namespace(lr=0.1, model="deit_base_patch16_224", drop=(0.1, 0.2)),
      "np_scalars": [np.float64(0.25), np.int64(7), np.float32(1.5)],
      "np_array": np.arange(4, dtype=np.int16),
      "size": torch.Size([2, 3]), "device": torch.device("cuda", 1), "dtype": torch.bfloat16,
      "bytes": b"\x00\xffabc", "set": {1, 2}, "complex": 1 + 2j,
      "when": datetime.datetime(2021, 1, 2, 3, 4, 5), "dir": pathlib.PurePosixPath("/ckpt/x"),
      "od": collections.OrderedDict(a=1, b=[2, (3, None)]),
  }
  path = tmp_path / "train.pth"
  torch.save(ckpt, path)
  obj = pth_reader.load_pth(path)
  assert obj["epoch"] == 3
  args = obj["args"]
  assert isinstance(args, argparse.Namespace) and vars(args) == vars(ckpt["args"])
  for k, t in net.state_dict().items():
    _check(obj["model"][k], t, k)
  st = opt
  assert obj["optimizer"]["param_groups"] == st["param_groups"]
  for i, s in st["state"].items():
    for k, t in s.items():
      _check(obj["optimizer"]["state"][i][k], t, f"opt {i} {k}")
  assert obj["np_scalars"] == [0.25, 7, 1.5]
  assert [type(x) for x in obj["np_scalars"]] == [np.float64, np.int64, np.float32]
  np.testing.assert_array_equal(obj["np_array"], np.arange(4, dtype=np.int16))
  assert obj["size"] == (2, 3) and obj["device"] == "cuda:1"
  assert isinstance(obj["dtype"], pth_reader.TorchDtype) and obj["dtype"].name == "bfloat16"
  assert obj["dtype"].numpy.name == "bfloat16"
  assert obj["bytes"] == b"\x00\xffabc" and obj["set"] == {1, 2} and obj["complex"] == 1 + 2j
  assert obj["when"] == ckpt["when"] and str(obj["dir"]) == "/ckpt/x"
  assert obj["od"] == ckpt["od"] and type(obj["od"]) is collections.OrderedDict


def test_real_state_dict_stays_ordered(tmp_path):
  net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                            torch.nn.Flatten(), torch.nn.Linear(4, 2))
  sd = net.state_dict()
  torch.save(sd, tmp_path / "sd.pth")
  obj = pth_reader.load_pth(tmp_path / "sd.pth")
  assert type(obj) is collections.OrderedDict and list(obj) == list(sd)
  for k, v in sd.items():
    _check(obj[k], v, k)
  assert obj["1.num_batches_tracked"].shape == () and obj["1.num_batches_tracked"].dtype == np.int64


def test_pickle_protocol_4(tmp_path):
  d = {"w": torch.randn(3, 2).T, "b": b"bytes", "s": {1}}
  torch.save(d, tmp_path / "p4.pth", pickle_protocol=4)
  obj = pth_reader.load_pth(tmp_path / "p4.pth")
  _check(obj["w"], d["w"], "w")
  assert obj["b"] == b"bytes" and obj["s"] == {1}


def test_bare_storages(tmp_path):
  t = torch.arange(5, dtype=torch.int32)
  torch.save({"untyped": t.untyped_storage()}, tmp_path / "u.pth")
  got = pth_reader.load_pth(tmp_path / "u.pth")["untyped"]
  np.testing.assert_array_equal(got, t.numpy().view(np.uint8))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TypedStorage is deprecated
    torch.save([t.storage()], tmp_path / "t.pth")
  np.testing.assert_array_equal(pth_reader.load_pth(tmp_path / "t.pth")[0], t.numpy())


# ----------------------------------------------------------------------------- archive variants


def test_other_folder_name_and_compressed_entries(tmp_path):
  d = {"model": {"w": torch.randn(4, 3), "v": torch.randn(4, 3).T, "h": torch.randn(3).half()}}
  torch.save(d, tmp_path / "a.pth")
  _rewrite(tmp_path / "a.pth", tmp_path / "renamed.pth", prefix="deit_base_patch16_224-b5f2ef4d")
  _rewrite(tmp_path / "a.pth", tmp_path / "deflated.pth", compression=zipfile.ZIP_DEFLATED)
  for name in ("renamed.pth", "deflated.pth"):
    obj = pth_reader.load_pth(tmp_path / name)
    for k, t in d["model"].items():
      _check(obj["model"][k], t, f"{name} {k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.int64, torch.int16, torch.complex64, torch.uint16,
                                   torch.uint8, torch.bool])
def test_big_endian_archive(tmp_path, dtype):
  t = (torch.randn(3, 4) * 100).to(dtype).T  # a non-contiguous view, too
  torch.save({"x": t}, tmp_path / "le.pth")
  itemsize = torch.empty((), dtype=dtype).element_size()
  part = itemsize // 2 if dtype.is_complex else itemsize

  def to_big(rest, data):
    if rest == "byteorder":
      return b"big"
    if rest.startswith("data/"):
      return np.frombuffer(data, f"<u{part}").byteswap().tobytes()
    return data
  _rewrite(tmp_path / "le.pth", tmp_path / "be.pth", transform=to_big)
  _check(pth_reader.load_pth(tmp_path / "be.pth")["x"], t, str(dtype))


# ----------------------------------------------------------------------------- hostile files


def _zip_with_pickle(path, pkl: bytes):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/byteorder", "little")
    z.writestr("archive/version", "3\n")


class _Evil:
  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return (os.system, (self.cmd,))


@pytest.mark.parametrize("strict", [False, True])
def test_forbidden_globals_are_refused_without_running(tmp_path, strict):
  marker = tmp_path / "pwned"
  cmd = f"touch {marker}"
  cases = {
      # os.system as protocol 2 writes it (posix.system / nt.system), inside a checkpoint dict
      "reduce.pth": pickle.dumps({"model": {"w": 1}, "x": _Evil(cmd)}, protocol=2),
      # the classic hand-written protocol-0 payload
      "proto0.pth": f"cos\nsystem\n(S'{cmd}'\ntR.".encode(),
      "eval.pth": f"cbuiltins\neval\n(S'__import__(\"os\").system(\"{cmd}\")'\ntR.".encode(),
      "getattr.pth": b"cbuiltins\ngetattr\n(cbuiltins\nobject\nS'__subclasses__'\ntR.",
      "subprocess.pth": pickle.dumps(_EvilPopen(["touch", str(marker)]), protocol=2),
  }
  for name, pkl in cases.items():
    _zip_with_pickle(tmp_path / name, pkl)
    with pytest.raises(pth_reader.PthFormatError) as e:
      pth_reader.load_pth(tmp_path / name, strict=strict)
    msg = str(e.value)
    assert name in msg and "nothing was executed" in msg, msg
    assert any(s in msg for s in ("posix.system", "nt.system", "os.system", "builtins.eval",
                                  "builtins.getattr", "subprocess.Popen")), msg
  assert not marker.exists()


class _EvilPopen:
  def __init__(self, argv):
    self.argv = argv

  def __reduce__(self):
    return (subprocess.Popen, (self.argv,))


def test_setting_state_of_classes_is_refused(tmp_path):
  # GLOBAL argparse.Namespace; BUILD (None, {"__repr__": ...}) would set a class attribute.
  pkl = (b"\x80\x02cargparse\nNamespace\nN}X\x08\x00\x00\x00__repr__"
         b"c__builtin__\nlist\ns\x86b.")
  _zip_with_pickle(tmp_path / "build.pth", pkl)
  with pytest.raises(pth_reader.PthFormatError, match=r"build\.pth.*sets the state"):
    pth_reader.load_pth(tmp_path / "build.pth")
  assert argparse.Namespace.__repr__ is not list


def test_pickles_cannot_make_the_reader_allocate_at_will(tmp_path):
  cases = {
      # numpy.ndarray((10**12,)): the ndarray global is only a marker for _reconstruct
      "ndarray.pth": b"\x80\x02cnumpy\nndarray\nJ\xff\xff\xff\x7f\x85\x85R.",
      "reconstruct.pth": (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
                          b"J\xff\xff\xff\x7f\x85C\x01b\x87R."),
      "bytearray.pth": b"\x80\x02c__builtin__\nbytearray\nJ\xff\xff\xff\x7f\x85R.",
      "bytearray8.pth": b"\x80\x05\x96" + (2**40).to_bytes(8, "little") + b"abc.",
  }
  for name, pkl in cases.items():
    _zip_with_pickle(tmp_path / name, pkl)
    with pytest.raises(pth_reader.PthFormatError, match=name.replace(".", r"\.")):
      pth_reader.load_pth(tmp_path / name)


def test_mangled_pickles_only_raise_pth_format_error(tmp_path):
  rng = np.random.default_rng(0)
  base = torch.randn(4, 6)
  torch.save({"model": collections.OrderedDict(a=base, t=base.T, h=torch.ones(3).half()),
              "args": argparse.Namespace(lr=0.1), "epoch": 3, "np": np.float32(2)},
             tmp_path / "src.pth")
  with zipfile.ZipFile(tmp_path / "src.pth") as z:
    pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
  for i in range(300):
    d = bytearray(pkl)
    for j in rng.integers(0, len(d), size=rng.integers(1, 4)):
      d[j] = rng.integers(0, 256)

    def swap_pickle(rest, data, d=bytes(d)):
      return d if rest == "data.pkl" else data
    _rewrite(tmp_path / "src.pth", tmp_path / "m.pth", transform=swap_pickle)
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", pth_reader.UnsupportedGlobalWarning)  # mangled names
        pth_reader.load_pth(tmp_path / "m.pth")
    except pth_reader.PthFormatError as e:
      assert "m.pth" in str(e)


class TrainingConfig:  # a class the reader does not know; pickled by reference
  def __init__(self):
    self.name = "cfg"
    self.ema = torch.ones(2)  # a tensor inside the unknown object stays reachable


def test_unknown_metadata_class_becomes_a_placeholder(tmp_path):
  path = tmp_path / "cfg.pth"
  torch.save({"model": {"w": torch.ones(3)}, "config": TrainingConfig()}, path)
  with pytest.warns(pth_reader.UnsupportedGlobalWarning, match=r"cfg\.pth.*TrainingConfig"):
    obj = pth_reader.load_pth(path)
  cfg = obj["config"]
  assert isinstance(cfg, pth_reader.Unsupported)
  assert cfg.qualname.endswith("TrainingConfig") and cfg.state["name"] == "cfg"
  np.testing.assert_array_equal(cfg.state["ema"], np.ones(2, np.float32))
  np.testing.assert_array_equal(obj["model"]["w"], np.ones(3, np.float32))
  with pytest.raises(pth_reader.PthFormatError, match=r"cfg\.pth.*TrainingConfig"):
    pth_reader.load_pth(path, strict=True)


def test_tensor_kinds_it_cannot_rebuild_are_errors(tmp_path):
  cases = {
      "sparse.pth": (torch.eye(3).to_sparse(), "torch._utils._rebuild_sparse_tensor"),
  }
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # quantized tensors are deprecated
    cases["quantized.pth"] = (torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8),
                              "torch._utils._rebuild_qtensor")
  for name, (t, qualname) in cases.items():
    torch.save({"model": {"w": torch.ones(2), "x": t}}, tmp_path / name)
    with pytest.raises(pth_reader.PthFormatError, match=rf"{name}.*{qualname}"):
      pth_reader.load_pth(tmp_path / name)


def test_truncated_corrupt_and_other_files_name_the_file(tmp_path):
  torch.save({"w": torch.randn(100, 100), "b": torch.randn(100)}, tmp_path / "ok.pth")
  data = (tmp_path / "ok.pth").read_bytes()
  for frac in (0.01, 0.2, 0.5, 0.9, 0.999):
    cut = tmp_path / f"cut{frac}.pth"
    cut.write_bytes(data[: int(len(data) * frac)])
    with pytest.raises(pth_reader.PthFormatError, match=rf"cut{frac}\.pth"):
      pth_reader.load_pth(cut)

  # one flipped byte inside a tensor's blob: the CRC check catches it
  with zipfile.ZipFile(tmp_path / "ok.pth") as z:
    info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
  bad = bytearray(data)
  bad[info.header_offset + 30 + len(info.filename) + 1000] ^= 0xFF
  (tmp_path / "flipped.pth").write_bytes(bytes(bad))
  with pytest.raises(pth_reader.PthFormatError, match=r"flipped\.pth.*CRC"):
    pth_reader.load_pth(tmp_path / "flipped.pth")

  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
  (tmp_path / "empty.pth").write_bytes(b"")
  with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
    z.writestr("readme.txt", "hi")
  for name in ("junk.pth", "empty.pth", "other.zip"):
    with pytest.raises(pth_reader.PthFormatError, match=name.replace(".", r"\.")):
      pth_reader.load_pth(tmp_path / name)
  with pytest.raises(FileNotFoundError):
    pth_reader.load_pth(tmp_path / "missing.pth")
  assert not pth_reader.is_torch_zip(tmp_path / "junk.pth")
  assert not pth_reader.is_torch_zip(tmp_path / "other.zip")
  assert not pth_reader.is_torch_zip(tmp_path / "missing.pth")


# ----------------------------------------------------------------------------- legacy formats


def test_legacy_format_is_read_with_torch(tmp_path):
  d = {"model": {"w": torch.randn(3, 2).T, "bf": torch.randn(4).bfloat16(),
                 "i": torch.arange(3)}, "epoch": 2}
  torch.save(d, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
  assert not pth_reader.is_torch_zip(tmp_path / "legacy.pth")
  obj = pth_reader.load_pth(tmp_path / "legacy.pth")
  assert obj["epoch"] == 2
  for k, t in d["model"].items():
    _check(obj["model"][k], t, k)


def test_torchscript_archive_is_explained(tmp_path):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "scripted.pt"))
  with pytest.raises(pth_reader.PthFormatError, match=r"scripted\.pt.*TorchScript.*state_dict"):
    pth_reader.load_pth(tmp_path / "scripted.pt")


def test_reader_does_not_import_torch(tmp_path):
  torch.save({"model": {"w": torch.ones(2, 3), "bf": torch.full((2,), 1.5).bfloat16()},
              "args": argparse.Namespace(lr=0.1)}, tmp_path / "m.pth")
  torch.save({"w": torch.ones(2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
  # The module is loaded from its file, so only numpy and ml_dtypes are imported with it.
  code = f"""
import importlib.util, sys
sys.modules['torch'] = None  # any `import torch` now fails
spec = importlib.util.spec_from_file_location('pth_reader', {READER_FILE!r})
pr = importlib.util.module_from_spec(spec); spec.loader.exec_module(pr)
o = pr.load_pth({str(tmp_path / 'm.pth')!r})
assert o['model']['w'].shape == (2, 3) and o['model']['w'].sum() == 6
assert str(o['model']['bf'].dtype) == 'bfloat16' and float(o['model']['bf'][0]) == 1.5
assert o['args'].lr == 0.1
try:
  pr.load_pth({str(tmp_path / 'old.pth')!r})
except pr.PthFormatError as e:
  assert 'old.pth' in str(e) and 'legacy PyTorch checkpoint' in str(e), e
  assert 'pip install torch' in str(e) and '.safetensors' in str(e), e
else:
  raise AssertionError('legacy file read without torch?')
assert sys.modules['torch'] is None
print('ok')
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_cli_lists_tensors(tmp_path, capsys):
  torch.save({"model": {"w": torch.ones(2, 3)}, "epoch": 1}, tmp_path / "c.pth")
  pth_reader.main([str(tmp_path / "c.pth")])
  out = capsys.readouterr().out
  assert "model.w float32 (2, 3)" in out and "epoch = 1" in out
