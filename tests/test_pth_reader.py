"""The torch-free .pth reader against files written by torch.save."""
import argparse
import io
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fgjax.convert import pth_reader  # noqa: E402


def _np(t):
  t = t.detach()
  return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def test_round_trip_dtypes_views_and_metadata(tmp_path):
  base = torch.randn(4, 6)
  tensors = {
      "f32": base, "transposed": base.T, "slice": base[1:, 2:5], "row": base[2],
      "f16": torch.randn(3, 2).half(), "bf16": torch.randn(5).bfloat16(),
      "i64": torch.arange(7), "i32": torch.arange(4, dtype=torch.int32),
      "u8": torch.arange(10, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
      "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3),
      "param": torch.nn.Parameter(torch.randn(2, 2)),
      "f64": torch.randn(3, dtype=torch.float64),
  }
  path = tmp_path / "ckpt.pth"
  torch.save({"model": tensors, "epoch": 3, "args": argparse.Namespace(lr=0.1, name="x")}, path)
  obj = pth_reader.load_pth(path)
  assert obj["epoch"] == 3 and obj["args"].lr == 0.1
  for k, t in tensors.items():
    got = obj["model"][k]
    assert isinstance(got, np.ndarray), k
    assert got.shape == tuple(t.shape), k
    np.testing.assert_array_equal(np.asarray(got, _np(t).dtype), _np(t), err_msg=k)
  assert str(obj["model"]["bf16"].dtype) == "bfloat16"
  assert obj["model"]["f16"].dtype == np.float16
  assert pth_reader.is_torch_zip(path)


def test_real_state_dict_ordered(tmp_path):
  net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                            torch.nn.Linear(4, 2))
  torch.save(net.state_dict(), tmp_path / "sd.pth")
  obj = pth_reader.load_pth(tmp_path / "sd.pth")
  assert list(obj) == list(net.state_dict())
  for k, v in net.state_dict().items():
    np.testing.assert_array_equal(obj[k], v.numpy())


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned > /dev/null",))


def test_forbidden_globals_are_refused_without_running(tmp_path):
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"x": _Evil()}, protocol=2))
    z.writestr("archive/version", "3\n")
  with pytest.raises(pth_reader.PthFormatError, match=r"evil.pth.*(posix|os)\.system"):
    pth_reader.load_pth(path)


def test_truncated_and_garbage_files_name_the_file(tmp_path):
  torch.save({"w": torch.randn(100, 100)}, tmp_path / "ok.pth")
  data = (tmp_path / "ok.pth").read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
  with pytest.raises(pth_reader.PthFormatError, match="cut.pth"):
    pth_reader.load_pth(tmp_path / "cut.pth")
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
  with pytest.raises(pth_reader.PthFormatError, match="junk.pth"):
    pth_reader.load_pth(tmp_path / "junk.pth")


def test_reader_does_not_import_torch(tmp_path):
  torch.save({"model": {"w": torch.ones(2, 3)}}, tmp_path / "m.pth")
  code = ("import sys; sys.modules['torch'] = None\n"
          "from fgjax.convert import pth_reader\n"
          f"o = pth_reader.load_pth({str(tmp_path / 'm.pth')!r})\n"
          "assert o['model']['w'].shape == (2, 3) and o['model']['w'].sum() == 6\n"
          "print('ok')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr
