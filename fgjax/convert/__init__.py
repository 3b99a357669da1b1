"""Pretrained-weight import: timm/DeiT/torchvision `.pth`, `.safetensors`, Google ViT `.npz`,
fgjax `.npz` (ViT/DeiT, ResNet, RegNet, VGG).

    params = fgjax.convert.load_checkpoint(path, "deit_base_distilled_patch16",
                                           img_size=448, num_classes=200)
    logits, aux = model.apply({"params": params}, images, train=False)

What happens (the same steps as timm's `checkpoint_filter_fn` and big_vision's `load`):
1. The file is read with numpy only: `.safetensors` by a small header parser, `.npz` by numpy,
   `.pth` by `fgjax.convert.pth_reader` (a restricted unpickler of PyTorch's zip format; torch
   is used only as a fallback for legacy pre-1.6 files). A state dict nested under `"model"`,
   `"state_dict"` or `"module"` and DDP's `module.` prefix are unwrapped.
2. The tensors are renamed to fgjax's parameter tree (timm names -> `blocks_{i}/attn/qkv/...`;
   Google names -> the same, fusing query/key/value into `qkv`; timm/torchvision ResNets,
   timm RegNets and VGGs -> their layouts, BatchNorm statistics into `batch_stats`).
3. The position embedding is resampled to the model's token grid (timm-exact antialiased
   bicubic, prefix tokens kept apart: 2 for DeiT, 1 for ViT).
4. The heads (`head`, `head_dist`, `fc`, VGG's `classifier_6`, RegNet's `head/fc`) are
   re-initialised when the checkpoint's class count differs from `num_classes` (or when the
   checkpoint has no head); a VGG with the "gap" head drops torchvision's classifier.
5. Everything else must match the model exactly: otherwise a `CheckpointMismatchError` lists the
   missing keys, the unexpected keys and the shape mismatches.
"""
from __future__ import annotations

import json
import logging
import os
import re
import struct
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fgjax.convert.resample import resample_pos_embed

log = logging.getLogger(__name__)

FGJAX_NPZ_MARKER = "__fgjax_meta__"
HEAD_NAMES = ("head", "head_dist", "fc", "classifier_6", "head/fc")  # head/fc: RegNet
VGG_CLASSIFIER = ("classifier_0", "classifier_3", "classifier_6")  # torchvision's classifier


class CheckpointError(ValueError):
  """A checkpoint file that cannot be read or does not fit the requested model."""


class CheckpointMismatchError(CheckpointError):
  """Keys or shapes of a checkpoint do not match the model."""


# ----------------------------------------------------------------------------- file readers


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` file into numpy arrays (bf16 via ml_dtypes, exact)."""
  import ml_dtypes  # ships with jax
  path = os.fspath(path)
  with open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 8:
    raise CheckpointError(f"{path}: too short to be a safetensors file")
  (header_len,) = struct.unpack("<Q", raw[:8])
  if header_len > len(raw) - 8:
    raise CheckpointError(f"{path}: corrupt safetensors header (length {header_len})")
  try:
    header = json.loads(raw[8:8 + header_len])
  except ValueError as e:
    raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
  data = memoryview(raw)[8 + header_len:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dt = info["dtype"]
    if dt == "BF16":
      dtype = ml_dtypes.bfloat16
    elif dt in _SAFETENSORS_DTYPES:
      dtype = _SAFETENSORS_DTYPES[dt]
    else:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dt}")
    start, end = info["data_offsets"]
    if end > len(data):
      raise CheckpointError(f"{path}: tensor {name!r} extends past the end of the file "
                            "(truncated download?)")
    arr = np.frombuffer(data[start:end], dtype=np.dtype(dtype).newbyteorder("<"))
    out[name] = arr.reshape(info["shape"]).astype(dtype)
  return out


def _unwrap_state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
  """Finds the state dict in a torch checkpoint object and strips DDP's `module.` prefix."""
  if isinstance(obj, Mapping):
    for key in ("model", "state_dict", "model_state_dict", "module"):
      if key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), "
                          f"found {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if not isinstance(v, np.ndarray):
      continue  # metadata such as epoch numbers
    if k.startswith("module."):
      k = k[len("module."):]
    out[k] = v
  if not out:
    raise CheckpointError(f"{path}: no tensors found (keys: {list(obj)[:10]})")
  return out


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a timm/DeiT `.pth`/`.pt`/`.bin` checkpoint into a flat dict of numpy arrays."""
  from fgjax.convert import pth_reader
  path = os.fspath(path)
  try:
    obj = pth_reader.load_pth(path)
  except pth_reader.PthFormatError as e:
    raise CheckpointError(str(e)) from None
  return _unwrap_state_dict(obj, path)


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (ValueError, OSError) as e:
    raise CheckpointError(f"{path}: cannot read as .npz: {e}") from None


def read_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads any supported checkpoint file into a flat dict name -> numpy array."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if os.path.isdir(path):
    raise CheckpointError(f"{path} is a directory; expected a .pth, .safetensors or .npz file")
  with open(path, "rb") as f:
    magic = f.read(8)
  lower = path.lower()
  if lower.endswith(".safetensors"):
    return read_safetensors(path)
  if lower.endswith(".npz") or (magic[:2] == b"PK" and _is_npz(path)):
    return read_npz(path)
  if lower.endswith((".pth", ".pt", ".bin", ".ckpt", ".tar")) or magic[:2] in (b"PK", b"\x80\x02"):
    return read_pth(path)
  raise CheckpointError(f"{path}: unknown checkpoint format (expected .pth, .safetensors or "
                        ".npz)")


def _is_npz(path: str) -> bool:
  import zipfile
  try:
    with zipfile.ZipFile(path) as z:
      return all(n.endswith(".npy") for n in z.namelist())
  except zipfile.BadZipFile:
    return False


# ----------------------------------------------------------------------------- renaming


def _t(x):
  return np.ascontiguousarray(np.asarray(x).T)


def timm_to_fgjax(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """Renames a timm ViT/DeiT state dict to flat fgjax names ('a/b/c').

  Returns (params, unexpected_keys).
  """
  out: dict[str, np.ndarray] = {}
  unexpected = []
  direct = {"cls_token": "cls_token", "dist_token": "dist_token", "pos_embed": "pos_embed",
            "norm.weight": "norm/scale", "norm.bias": "norm/bias",
            "patch_embed.proj.bias": "patch_embed/bias"}
  block_re = re.compile(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
                        r"\.(weight|bias)$")
  for k, v in sd.items():
    v = np.asarray(v)
    if k in direct:
      out[direct[k]] = v
    elif k == "patch_embed.proj.weight":
      out["patch_embed/kernel"] = np.ascontiguousarray(v.transpose(2, 3, 1, 0))
    elif k in ("head.weight", "head_dist.weight"):
      out[k.split(".")[0] + "/kernel"] = _t(v)
    elif k in ("head.bias", "head_dist.bias"):
      out[k.split(".")[0] + "/bias"] = v
    elif m := block_re.match(k):
      i, mod, kind = m.groups()
      mod = mod.replace(".", "/")
      if mod.startswith("norm"):
        out[f"blocks_{i}/{mod}/{'scale' if kind == 'weight' else 'bias'}"] = v
      else:
        out[f"blocks_{i}/{mod}/{'kernel' if kind == 'weight' else 'bias'}"] = (
            _t(v) if kind == "weight" else v)
    else:
      unexpected.append(k)
  return out, unexpected


_BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("stats", "mean"), "running_var": ("stats", "var")}
_DENSE_NAMES = ("fc", "fc1", "fc2", "fc_reduce", "fc_select")  # Linear or 1x1 conv -> nn.Dense


def _torch_module_path(mod: str) -> str:
  """A torch module path as an fgjax one: 'conv1.paths.0.conv' -> 'conv1/paths_0/conv'."""
  return re.sub(r"\.(\d+)(?=\.|$)", r"_\1", mod).replace(".", "/")


def _put_cnn_leaf(mod: str, field: str, v: np.ndarray, params: dict, stats: dict) -> bool:
  """Puts torch tensor `mod.field` of a conv net at fgjax path `mod` by the kind its last name
  says: conv* (weight -> HWIO kernel), bn* (affine -> params, running stats -> batch_stats),
  fc/fc1/fc2/fc_reduce/fc_select (a Linear or 1x1 conv -> Dense kernel, bias). False for
  anything else (an unexpected key)."""
  name = mod.rsplit("/", 1)[-1]
  if name.startswith("conv") or name == "downsample_conv":
    if field != "weight" or v.ndim != 4:
      return False
    params[f"{mod}/kernel"] = np.ascontiguousarray(v.transpose(2, 3, 1, 0))
  elif name.startswith("bn") or name == "downsample_bn":
    if field not in _BN_FIELDS:
      return False
    where, leaf = _BN_FIELDS[field]
    (params if where == "params" else stats)[f"{mod}/{leaf}"] = v
  elif name in _DENSE_NAMES:
    if field == "bias":
      params[f"{mod}/bias"] = v
    elif field == "weight" and (v.ndim == 2 or (v.ndim == 4 and v.shape[2:] == (1, 1))):
      params[f"{mod}/kernel"] = _t(v.reshape(v.shape[0], -1))
    else:
      return False
  else:
    return False
  return True


def timm_resnet_to_variables(sd: Mapping[str, np.ndarray]) -> tuple[dict, list[str]]:
  """Renames a timm/torchvision ResNet state dict to fgjax `{"params", "batch_stats"}` (nested
  dicts of numpy arrays) for `fgjax.models.resnet.ResNet`. Returns (variables, unexpected).

  Also timm's attention in the blocks (`fgjax.models.resnet`, `attn`): `layer{s}.{j}.se.*`
  (seresnet, CBAM, Gather-Excite) -> `layer{s}_{j}/se/...`; skresnet's Selective Kernel
  `layer{s}.{j}.conv{n}.paths.{i}.*`, `.attn.*` -> `layer{s}_{j}/conv{n}/paths_{i}/...`,
  `.../attn/...`, and its ConvNormAct convs `conv{n}.conv`, `conv{n}.bn` -> `conv{n}`,
  `bn{n}`."""
  params: dict[str, np.ndarray] = {}
  stats: dict[str, np.ndarray] = {}
  unexpected = []
  layer_re = re.compile(r"layer(\d)\.(\d+)\.(.+)$")
  for k, v in sd.items():
    v = np.asarray(v)
    mod, _, field = k.rpartition(".")
    if field == "num_batches_tracked":
      continue
    if m := layer_re.match(mod):
      s, j, sub = m.groups()
      if sub in ("downsample.0", "downsample.1"):
        sub = "downsample_" + ("conv" if sub.endswith("0") else "bn")
      elif cn := re.fullmatch(r"conv(\d)\.(conv|bn)", sub):  # timm's ConvNormAct (skresnet)
        sub = f"{cn.group(2)}{cn.group(1)}"
      else:
        sub = _torch_module_path(sub)
      mod = f"layer{s}_{j}/{sub}"
    elif mod != "fc" and not re.fullmatch(r"(conv|bn)\d", mod):
      unexpected.append(k)  # top level: only the stem and the head
      continue
    if not _put_cnn_leaf(mod, field, v, params, stats):
      unexpected.append(k)
  unflat = lambda d: traverse_util.unflatten_dict(d, sep="/")
  return {"params": unflat(params), "batch_stats": unflat(stats)}, unexpected


def timm_regnet_to_variables(sd: Mapping[str, np.ndarray]) -> tuple[dict, list[str]]:
  """Renames a timm RegNet state dict to fgjax `{"params", "batch_stats"}` for
  `fgjax.models.regnet.RegNet`: `stem.{conv,bn}`, `s{i}.b{j}.{conv1,conv2,conv3,downsample}.
  {conv,bn}`, `s{i}.b{j}.se.{fc1,fc2}` (1x1 convs -> Dense kernels) and `head.fc` keep their
  paths ('s1.b1.conv2.conv.weight' -> params['s1']['b1']['conv2']['conv']['kernel'], grouped
  kernels (O, I / groups, 3, 3) -> (3, 3, I / groups, O)). Returns (variables, unexpected)."""
  params: dict[str, np.ndarray] = {}
  stats: dict[str, np.ndarray] = {}
  unexpected = []
  known = re.compile(r"stem\.(conv|bn)|head\.fc|s\d\.b\d+\.((conv[123]|downsample)\.(conv|bn)"
                     r"|se\.fc[12])")
  for k, v in sd.items():
    mod, _, field = k.rpartition(".")
    if field == "num_batches_tracked":
      continue
    if not known.fullmatch(mod) or not _put_cnn_leaf(_torch_module_path(mod), field,
                                                      np.asarray(v), params, stats):
      unexpected.append(k)
  unflat = lambda d: traverse_util.unflatten_dict(d, sep="/")
  return {"params": unflat(params), "batch_stats": unflat(stats)}, unexpected


def timm_attn_to_variables(sd: Mapping[str, np.ndarray]) -> tuple[dict, list[str]]:
  """Renames the state dict of one timm attention module (`SEModule`, `CbamModule`,
  `SelectiveKernel`, `GatherExcite`) to fgjax `{"params", "batch_stats"}` for its
  `fgjax.models.channel_attention` counterpart ('spatial.conv.bn.weight' ->
  params['spatial']['conv']['bn']['scale'], 'paths.0.conv.weight' -> ['paths_0']['conv']
  ['kernel'], 1x1 convs -> Dense kernels). Returns (variables, unexpected)."""
  params: dict[str, np.ndarray] = {}
  stats: dict[str, np.ndarray] = {}
  unexpected = []
  for k, v in sd.items():
    mod, _, field = k.rpartition(".")
    if field == "num_batches_tracked":
      continue
    if not mod or not _put_cnn_leaf(_torch_module_path(mod), field, np.asarray(v), params,
                                    stats):
      unexpected.append(k)
  unflat = lambda d: traverse_util.unflatten_dict(d, sep="/")
  return {"params": unflat(params), "batch_stats": unflat(stats)}, unexpected


def timm_vgg_to_variables(sd: Mapping[str, np.ndarray]) -> tuple[dict, list[str]]:
  """Renames a torchvision or timm VGG state dict to fgjax `{"params", "batch_stats"}` for
  `fgjax.models.vgg.VGG`: `features.{i}` -> `features_{i}` (a conv, or a BatchNorm where the
  checkpoint has its running statistics); torchvision's `classifier.{0,3,6}` and timm's
  `pre_logits.fc1` (a 7x7 conv), `pre_logits.fc2` (1x1) and `head.fc` -> `classifier_{0,3,6}`,
  the first permuted from torch's (C, H, W) flatten order to fgjax's (H, W, C). Returns
  (variables, unexpected)."""
  params: dict[str, np.ndarray] = {}
  stats: dict[str, np.ndarray] = {}
  unexpected = []
  is_bn = {k.rsplit(".", 1)[0] for k in sd if k.endswith(".running_mean")}
  alias = {"pre_logits.fc1": "classifier.0", "pre_logits.fc2": "classifier.3",
           "head.fc": "classifier.6"}
  bn_fields = {"weight": ("params", "scale"), "bias": ("params", "bias"),
               "running_mean": ("stats", "mean"), "running_var": ("stats", "var")}
  for k, v in sd.items():
    v = np.asarray(v)
    mod, _, field = k.rpartition(".")
    if field == "num_batches_tracked":
      continue
    mod = alias.get(mod, mod)
    m = re.fullmatch(r"(features|classifier)\.(\d+)", mod)
    if m is None or field not in ("weight", "bias", "running_mean", "running_var"):
      unexpected.append(k)
      continue
    name = f"{m.group(1)}_{m.group(2)}"
    if k.rsplit(".", 1)[0] in is_bn:
      where, leaf = bn_fields[field]
      (params if where == "params" else stats)[f"{name}/{leaf}"] = v
    elif field == "bias":
      params[f"{name}/bias"] = v
    elif m.group(1) == "features":
      params[f"{name}/kernel"] = np.ascontiguousarray(v.transpose(2, 3, 1, 0))
    elif name == "classifier_0":  # (4096, C*7*7) in (C, H, W) order -> (7*7*C, 4096)
      out = v.shape[0]
      w = v.reshape(out, -1, 7, 7).transpose(2, 3, 1, 0)
      params[f"{name}/kernel"] = np.ascontiguousarray(w.reshape(-1, out))
    else:
      params[f"{name}/kernel"] = np.ascontiguousarray(v.reshape(v.shape[0], -1).T)
  unflat = lambda d: traverse_util.unflatten_dict(d, sep="/")
  return {"params": unflat(params), "batch_stats": unflat(stats)}, unexpected


# Google ViT checkpoints (google-research/vision_transformer, augreg, big_vision).
_IGNORED_GOOGLE = ("pre_logits/",)


def google_to_fgjax(npz: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """Renames a Google ViT `.npz` (flat '/'-joined keys) to flat fgjax names."""
  out: dict[str, np.ndarray] = {}
  unexpected = []
  blocks: dict[int, dict[str, np.ndarray]] = {}
  blk_re = re.compile(r"Transformer/encoderblock_(\d+)/(.*)$")
  for k, v in npz.items():
    v = np.asarray(v)
    if k == "embedding/kernel":
      out["patch_embed/kernel"] = v
    elif k == "embedding/bias":
      out["patch_embed/bias"] = v
    elif k == "cls":
      out["cls_token"] = v
    elif k in ("dist", "dist_token"):
      out["dist_token"] = v
    elif k == "Transformer/posembed_input/pos_embedding":
      out["pos_embed"] = v
    elif k.startswith("Transformer/encoder_norm/"):
      out["norm/" + k.rsplit("/", 1)[1]] = v
    elif k.startswith(("head/", "head_dist/")):
      out[k] = v
    elif m := blk_re.match(k):
      blocks.setdefault(int(m.group(1)), {})[m.group(2)] = v
    elif k.startswith("Transformer/encoderblock/"):
      raise CheckpointError("this .npz holds scanned (stacked) encoder blocks "
                            "(big_vision scan=True); export it with scan=False")
    elif k.startswith(_IGNORED_GOOGLE):
      log.info("ignoring %s (not used by the fgjax model)", k)
    else:
      unexpected.append(k)
  for i, blk in blocks.items():
    # Module names carry creation indices that differ between codebases
    # (LayerNorm_0/MultiHeadDotProductAttention_1/LayerNorm_2/MlpBlock_3 in the original
    # repository, LayerNorm_0/_1, MultiHeadDotProductAttention_0, MlpBlock_0 in big_vision).
    norms = sorted({re.match(r"(LayerNorm_\d+)/", n).group(1)
                    for n in blk if n.startswith("LayerNorm_")}, key=lambda s: int(s[10:]))
    attn = [n.split("/")[0] for n in blk if n.startswith("MultiHeadDotProductAttention")]
    mlp = [n.split("/")[0] for n in blk if n.startswith("MlpBlock")]
    if len(norms) != 2 or not attn or not mlp:
      unexpected.extend(f"Transformer/encoderblock_{i}/{n}" for n in blk)
      continue
    a, m_ = attn[0], mlp[0]
    p = f"blocks_{i}"
    for src, dst in zip(norms, ("norm1", "norm2")):
      out[f"{p}/{dst}/scale"] = blk.pop(f"{src}/scale")
      out[f"{p}/{dst}/bias"] = blk.pop(f"{src}/bias")
    q, kk, vv = (blk.pop(f"{a}/{n}/kernel") for n in ("query", "key", "value"))
    d = q.shape[0]
    out[f"{p}/attn/qkv/kernel"] = np.concatenate(
        [q.reshape(d, -1), kk.reshape(d, -1), vv.reshape(d, -1)], axis=1)
    out[f"{p}/attn/qkv/bias"] = np.concatenate(
        [blk.pop(f"{a}/{n}/bias").reshape(-1) for n in ("query", "key", "value")])
    o = blk.pop(f"{a}/out/kernel")
    out[f"{p}/attn/proj/kernel"] = o.reshape(-1, o.shape[-1])
    out[f"{p}/attn/proj/bias"] = blk.pop(f"{a}/out/bias")
    for src, dst in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
      out[f"{p}/mlp/{dst}/kernel"] = blk.pop(f"{m_}/{src}/kernel")
      out[f"{p}/mlp/{dst}/bias"] = blk.pop(f"{m_}/{src}/bias")
    unexpected.extend(f"Transformer/encoderblock_{i}/{n}" for n in blk)
  return out, unexpected


def _detect_and_rename(flat: Mapping[str, np.ndarray], path: str):
  """-> (flat params, unexpected keys, {collection: flat arrays} such as batch_stats)."""
  keys = list(flat)
  if FGJAX_NPZ_MARKER in flat or any(k.startswith("params/") for k in keys):
    out = {k[len("params/"):]: v for k, v in flat.items() if k.startswith("params/")}
    stats = {k[len("batch_stats/"):]: v for k, v in flat.items()
             if k.startswith("batch_stats/")}
    rest = [k for k in keys if not k.startswith(("params/", "batch_stats/"))
            and k != FGJAX_NPZ_MARKER]
    return out, rest, ({"batch_stats": stats} if stats else {})
  if any(k.startswith("Transformer/") or k == "embedding/kernel" for k in keys):
    return (*google_to_fgjax(flat), {})
  if any(k.startswith(("blocks.", "patch_embed.")) for k in keys):
    return (*timm_to_fgjax(flat), {})
  cnn = None
  if any(k.startswith("layer1.0.") for k in keys):
    cnn = timm_resnet_to_variables
  elif any(k.startswith("s1.b1.") for k in keys):
    cnn = timm_regnet_to_variables
  elif "features.0.weight" in flat and np.ndim(flat["features.0.weight"]) == 4:
    cnn = timm_vgg_to_variables
  if cnn is not None:
    variables, unexpected = cnn(flat)
    flat_of = lambda d: traverse_util.flatten_dict(d, sep="/")
    return (flat_of(variables["params"]), unexpected,
            {"batch_stats": flat_of(variables["batch_stats"])})
  raise CheckpointError(f"{path}: not a ViT/DeiT/ResNet/VGG checkpoint nor a RegNet one (no "
                        f"timm 'blocks.*', 'layer1.*', 's1.b1.*' or 'features.0.*', Google "
                        f"'Transformer/*' or fgjax 'params/*' keys; first keys: {keys[:8]})")


# ----------------------------------------------------------------------------- loading


def _num_classes_of(params: Mapping[str, np.ndarray], head: str) -> int | None:
  k = params.get(f"{head}/kernel")
  return None if k is None else int(k.shape[-1])


def load_checkpoint(path: str | os.PathLike, model_name: str, img_size=224,
                    num_classes: int = 1000, *, dont_load: Sequence[str] = (),
                    model_kwargs: Mapping[str, Any] | None = None,
                    rng: jax.Array | int = 0, with_collections: bool = False) -> dict:
  """Loads pretrained weights for `fgjax.models.create(model_name, num_classes, img_size)`.

  Args:
    path: `.pth`/`.pt` (timm or DeiT, bare state dict or under "model"), `.safetensors`
      (timm/Hugging Face) or `.npz` (Google ViT, or written by `python -m fgjax.tools.convert`).
    model_name: an fgjax model name (see `fgjax.models.available()`).
    img_size: the model's input size; the position grid is resampled to it.
    num_classes: classes of the new task; heads are re-initialised if it differs.
    dont_load: regular expressions of parameter names (e.g. 'head.*') to keep at their fresh
      initial values instead of loading them.
    model_kwargs: extra architecture arguments for `create` (e.g. `patch_stride=12`).
    rng: seed for re-initialised parameters.
    with_collections: also return the model's other collections (BatchNorm `batch_stats` of a
      ResNet) as `{"params": ..., "batch_stats": ...}`.

  Returns:
    The params pytree (nested dict of float32 numpy arrays) for `model.apply`, or all variables
    with `with_collections`.
  """
  from fgjax import models
  path = os.fspath(path)
  model = models.create(model_name, num_classes=num_classes, img_size=img_size,
                        **dict(model_kwargs or {}))
  renamed = _detect_and_rename(read_file(path), path)
  if not with_collections:
    loaded, unexpected, _ = renamed
    return merge_into_model(model, loaded, unexpected, path=path, dont_load=dont_load, rng=rng)
  return _fit(model, renamed, path, dont_load, rng)


def _fit(module, renamed, path: str, dont_load: Sequence[str], rng) -> dict:
  """{"params", [collections]} of `module` from a renamed checkpoint (`_detect_and_rename`):
  its params through `merge_into_model`, its other collections through `_merge_collections`."""
  loaded, unexpected, collections = renamed
  params = merge_into_model(module, loaded, unexpected, path=path, dont_load=dont_load, rng=rng)
  return {"params": params, **_merge_collections(module, collections, path)}


def load_parts(model, path: str | os.PathLike, *, dont_load: Sequence[str] = (),
               rng: jax.Array | int = 0) -> dict[str, dict]:
  """The checkpoint at `path` fitted to every part the model names in
  `model.checkpoint_parts()`: {"": model} for a whole model (a ViT, a ResNet), {"backbone":
  module} for a wrapper (PMG, CAL), several parts for a model with several trunks. Each part
  goes through its own module's renaming, position-embedding resampling and head rules
  (`merge_into_model`; `dont_load` regexes are paths inside the part, and re-initialised
  leaves come from `init_params(part, rng)`), and must fit exactly (otherwise a
  `CheckpointMismatchError` lists the differences). Returns {part key: {"params": ...,
  ["batch_stats": ...]}} of numpy arrays; the caller puts them into the model's variables
  (`load_into_model`, or sharded on a mesh by `fgjax.train.setup`)."""
  path = os.fspath(path)
  renamed = _detect_and_rename(read_file(path), path)
  return {key: _fit(part, renamed, path, dont_load, rng)
          for key, part in model.checkpoint_parts().items()}


def put_parts(variables: Mapping[str, Any], parts: Mapping[str, Mapping[str, Any]],
              place=lambda tree, target: tree) -> dict:
  """`variables` with each loaded part (`load_parts`) in its place: key "" replaces whole
  collections, another key the sub-tree of that name. `place(tree, target)` may move a loaded
  tree next to the array tree it replaces (e.g. `jax.device_put` with its shardings)."""
  out = {name: dict(tree) for name, tree in variables.items()}
  for key, colls in parts.items():
    for name, tree in colls.items():
      if key:
        out[name][key] = place(tree, out[name][key])
      else:
        out[name] = place(tree, out[name])
  return out


def load_into_model(model, variables: Mapping[str, Any], path: str | os.PathLike, *,
                    dont_load: Sequence[str] = (), rng: jax.Array | int = 0) -> dict:
  """`variables` (the model's fresh ones) with the checkpoint at `path` loaded into every part
  the model names in `model.checkpoint_parts()` (`load_parts`); parts not named keep their
  values."""
  return put_parts(variables, load_parts(model, path, dont_load=dont_load, rng=rng))


def _merge_collections(model, collections: Mapping[str, Mapping[str, np.ndarray]],
                       path: str) -> dict:
  """The model's non-param collections filled from the checkpoint (all keys must match)."""
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1,) + _hw(model) + (3,)), train=False))
  out = {}
  for name, tree in dict(shapes).items():
    if name == "params":
      continue
    target = traverse_util.flatten_dict(dict(tree), sep="/")
    have = dict(collections.get(name, {}))
    missing = sorted(set(target) - set(have))
    extra = sorted(set(have) - set(target))
    bad = sorted(k for k in target if k in have and tuple(have[k].shape) != target[k].shape)
    if missing or extra or bad:
      raise CheckpointMismatchError(
          f"{path}: its {name} do not fit the model: missing {missing[:10]}, unexpected "
          f"{extra[:10]}, shape mismatches {bad[:10]}")
    out[name] = traverse_util.unflatten_dict(
        {k: np.asarray(have[k], dtype=v.dtype) for k, v in target.items()}, sep="/")
  return out


def init_params(model, rng: jax.Array | int = 0) -> dict:
  """Fresh parameters of `model` (params collection only), computed on the host CPU."""
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  h, w = (model.img_size, model.img_size) if isinstance(model.img_size, int) else model.img_size
  dummy = jnp.zeros((1, h, w, 3), jnp.float32)
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    variables = jax.jit(lambda r: model.init(r, dummy, train=False))(rng)
  return jax.tree.map(np.asarray, dict(variables["params"]))


def merge_into_model(model, loaded: Mapping[str, np.ndarray], unexpected: Iterable[str] = (),
                     *, path: str = "<checkpoint>", dont_load: Sequence[str] = (),
                     rng: jax.Array | int = 0) -> dict:
  """Fits renamed checkpoint arrays into `model`'s parameter tree (see `load_checkpoint`)."""
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1,) + _hw(model) + (3,)), train=False))
  target = traverse_util.flatten_dict(dict(shapes["params"]), sep="/")
  loaded = dict(loaded)
  unexpected = list(unexpected)
  prefix = getattr(model, "num_prefix_tokens", 1)

  reinit: set[str] = set()
  if getattr(model, "num_classes", None) == 0:  # a feature extractor: drop classifier weights
    for k in [k for k in loaded if k.split("/")[0] in HEAD_NAMES and k not in target]:
      loaded.pop(k)
  if not any(f"{n}/kernel" in target for n in VGG_CLASSIFIER):
    # A VGG without torchvision's classifier (RA-CNN's "gap" head, a feature extractor).
    dropped = [k for k in loaded if k.split("/")[0] in VGG_CLASSIFIER]
    for k in dropped:
      loaded.pop(k)
    if dropped:
      log.info("%s: not loading the VGG classifier (%s): the model has none", path,
               ", ".join(sorted({k.split("/")[0] for k in dropped})))
  for head in HEAD_NAMES:
    if f"{head}/kernel" not in target:
      continue
    ck = _num_classes_of(loaded, head)
    want = target[f"{head}/kernel"].shape[-1]
    if ck != want:
      if ck is not None:
        log.info("%s: re-initialising %s (%d classes in the checkpoint, %d wanted)",
                 path, head, ck, want)
      loaded.pop(f"{head}/kernel", None)
      loaded.pop(f"{head}/bias", None)
      reinit.update({f"{head}/kernel", f"{head}/bias"})
  # Heads present in the checkpoint but not in the model (e.g. a DeiT head_dist loaded into a
  # ViT) are unexpected, as are all other leftovers.
  for k in list(loaded):
    if k not in target:
      unexpected.append(k)
      loaded.pop(k)
  if "pos_embed" in loaded and "pos_embed" in target:
    want = target["pos_embed"].shape
    have = loaded["pos_embed"].shape
    ck_prefix = 1 + int("dist_token" in loaded)
    # Resample only when width and prefix tokens agree; otherwise the mismatch is reported.
    if have != want and have[-1] == want[-1] and ck_prefix == prefix:
      loaded["pos_embed"] = resample_pos_embed(loaded["pos_embed"], model.grid, prefix)
      log.info("%s: resampled pos_embed %s -> %s", path, have, want)
  patterns = [re.compile(p) for p in dont_load]
  for k in list(loaded):
    if any(p.fullmatch(k) for p in patterns):
      loaded.pop(k)
      reinit.add(k)
  missing = sorted(k for k in target if k not in loaded and k not in reinit)
  mismatched = sorted(f"{k}: checkpoint {tuple(loaded[k].shape)} vs model "
                      f"{tuple(target[k].shape)}"
                      for k in target if k in loaded and
                      tuple(loaded[k].shape) != tuple(target[k].shape))
  if missing or unexpected or mismatched:
    lines = [f"{path} does not fit model {type(model).__name__}"
             f"({getattr(model, 'width', '?')} wide, {getattr(model, 'depth', '?')} blocks):"]
    if missing:
      lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}"
                   + (" ..." if len(missing) > 20 else ""))
    if unexpected:
      lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(sorted(unexpected)[:20])}"
                   + (" ..." if len(unexpected) > 20 else ""))
    if mismatched:
      lines.append(f"  shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:10])}"
                   + (" ..." if len(mismatched) > 10 else ""))
    raise CheckpointMismatchError("\n".join(lines))
  fresh = {}
  if reinit:
    fresh = traverse_util.flatten_dict(init_params(model, rng), sep="/")
  out = {}
  for k, spec in target.items():
    v = fresh[k] if k in reinit else loaded[k]
    out[k] = np.asarray(v, dtype=spec.dtype)
  return traverse_util.unflatten_dict(out, sep="/")


def _hw(model) -> tuple[int, int]:
  s = model.img_size
  return (s, s) if isinstance(s, int) else tuple(s)


# ----------------------------------------------------------------------------- writing


def save_params_npz(path: str | os.PathLike, params: Mapping, meta: Mapping | None = None,
                    collections: Mapping[str, Mapping] | None = None):
  """Writes params (and e.g. `{"batch_stats": ...}` collections) as an fgjax `.npz` (keys
  'params/<a>/<b>', 'batch_stats/<a>/<b>'), loadable by `load_checkpoint` and `init_from`."""
  arrays = {}
  for prefix, tree in {"params": params, **dict(collections or {})}.items():
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(tree)), sep="/")
    arrays.update({f"{prefix}/{k}": np.asarray(v) for k, v in flat.items()})
  arrays[FGJAX_NPZ_MARKER] = np.frombuffer(json.dumps(dict(meta or {})).encode(), np.uint8)
  path = os.fspath(path)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def read_meta(path: str | os.PathLike) -> dict:
  """Metadata stored by `save_params_npz` ({} for other files)."""
  with np.load(os.fspath(path), allow_pickle=False) as f:
    if FGJAX_NPZ_MARKER not in f.files:
      return {}
    return json.loads(f[FGJAX_NPZ_MARKER].tobytes().decode())
