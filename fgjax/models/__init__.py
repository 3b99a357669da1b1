"""fgjax model zoo: `create(name, num_classes, img_size, **kw)` returns a Flax Linen module.

Every model's `apply({"params": params, ...}, images_nhwc, train=False)` returns
`(logits, aux)`. Names follow timm (`deit_small_distilled_patch16`, `vit_base_patch16`, ...);
a trailing resolution suffix such as `_224` is accepted and ignored (the resolution comes from
`img_size`).
"""
from __future__ import annotations

import re
from typing import Callable

import flax.linen as nn

from fgjax.models import cal, cnn, pma, pmg, racnn, regnet, resnet, vgg, vit

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
  def wrap(fn):
    _REGISTRY[name] = fn
    return fn
  return wrap


def _vit_factory(variant: str, distilled: bool, patch_size: int = 16):
  def make(num_classes: int, img_size=224, **kw):
    args = vit.decode_variant(variant)
    args["patch_size"] = patch_size
    args.update(kw)
    return vit.VisionTransformer(num_classes=num_classes, img_size=img_size,
                                 distilled=distilled, **args)
  return make


for _size in ("tiny", "small", "base", "large"):
  register(f"vit_{_size}_patch16")(_vit_factory(_size, distilled=False))
  register(f"deit_{_size}_patch16")(_vit_factory(_size, distilled=False))
  register(f"deit_{_size}_distilled_patch16")(_vit_factory(_size, distilled=True))
register("vit_huge_patch14")(_vit_factory("huge", distilled=False, patch_size=14))


def _trs_factory(variant: str):
  """TRS-DeiT: DeiT with a distillation token and target region selection (spec section 2).
  Same parameter names as DeiT, so DeiT checkpoints load unchanged; `region_selection=None`
  turns the module off (plain DeiT)."""
  base = _vit_factory(variant, distilled=True)

  def make(num_classes: int, img_size=224, **kw):
    kw.setdefault("region_selection", "trs")
    return base(num_classes, img_size, **kw)
  return make


for _size in ("tiny", "small", "base"):
  register(f"trs_deit_{_size}_patch16")(_trs_factory(_size))


def _transfg_factory(variant: str):
  """TransFG (He et al. 2022; spec section 3): ViT with the overlapping patch split (stride 12)
  and part selection from the cls row of the attention rollout over the first L-1 blocks; the
  last block (TransFG's `part_layer`) sees `[cls, one part per head]` and the final norm is its
  `part_norm`. Same parameter names as ViT (`blocks_{L-1}` = part_layer, `norm` = part_norm),
  so Google ViT `.npz` and timm ViT checkpoints load unchanged."""
  base = _vit_factory(variant, distilled=False)

  def make(num_classes: int, img_size=448, **kw):
    kw.setdefault("patch_stride", 12)
    kw.setdefault("region_selection", "cls_row")
    return base(num_classes, img_size, **kw)
  return make


for _size in ("tiny", "small", "base", "large"):
  register(f"transfg_{_size}_patch16")(_transfg_factory(_size))


def _resnet_factory(depth: int, attn: str | None = None):
  """A ResNet; `attn` ("se", "cbam", "sk", "ge"; `fgjax.models.resnet`) in every block, the
  default of the timm-named aliases (`seresnet50` = `resnet50` with attn="se")."""
  def make(num_classes: int, img_size=224, **kw):
    kw.setdefault("attn", attn)
    return resnet.ResNet(num_classes=num_classes, depth=depth, img_size=img_size, **kw)
  return make


for _depth in (18, 34, 50, 101):
  register(f"resnet{_depth}")(_resnet_factory(_depth))
  register(f"seresnet{_depth}")(_resnet_factory(_depth, "se"))  # timm's seresnet*
for _depth in (18, 34, 50):
  register(f"skresnet{_depth}")(_resnet_factory(_depth, "sk"))  # timm's skresnet*


def _regnet_factory(variant: str):
  """A RegNetY (timm layout, SE in every block; `fgjax.models.regnet`)."""
  def make(num_classes: int, img_size=224, **kw):
    return regnet.create(variant, num_classes, img_size, **kw)
  return make


for _variant in regnet.VARIANTS:  # regnety_016, regnety_032, regnety_160
  register(_variant)(_regnet_factory(_variant))


def _vgg_factory(depth: int, batch_norm: bool):
  def make(num_classes: int, img_size=224, **kw):
    return vgg.VGG(num_classes=num_classes, depth=depth, batch_norm=batch_norm,
                   img_size=img_size, **kw)
  return make


for _depth in (11, 13, 16, 19):
  register(f"vgg{_depth}")(_vgg_factory(_depth, False))
  register(f"vgg{_depth}_bn")(_vgg_factory(_depth, True))


def _resnet_backbone(depth: int, img_size, dtype, widths=None, **resnet_kw):
  """A ResNet without its classifier (the stage maps in aux) -> (module, dtype kwargs)."""
  dt = {} if dtype is None else {"dtype": dtype}
  rk = {} if widths is None else {"widths": tuple(widths)}
  return resnet.ResNet(num_classes=0, depth=depth, img_size=img_size, **rk, **resnet_kw,
                       **dt), dt


def _pmg_resnet_factory(depth: int):
  """PMG heads on a ResNet's layer2/3/4 (spec section 5); `attn` goes to the ResNet."""
  def make(num_classes: int, img_size=448, dtype=None, attn=None, **kw):
    backbone, dt = _resnet_backbone(depth, img_size, dtype, attn=attn)
    return pmg.PMG(num_classes=num_classes, backbone=backbone, **dt, **kw)
  return make


_PMG_DEIT_BACKBONE_KWARGS = ("batch_chains", "remat", "drop_rate", "attn_drop_rate",
                             "drop_path_rate", "attention_impl", "attention_chunk")


def _pmg_deit_factory(variant: str):
  """PMG heads on the patch tokens of a DeiT (no distillation token) after blocks L/3, 2L/3, L,
  reshaped to the patch grid."""
  def make(num_classes: int, img_size=448, dtype=None, feature_blocks=None, depth=None, **kw):
    args = vit.decode_variant(variant)
    args["patch_size"] = 16
    if depth is not None:
      args["depth"] = depth
    d = args["depth"]
    blocks = tuple(feature_blocks or (d // 3 - 1, 2 * d // 3 - 1, d - 1))
    dt = {} if dtype is None else {"dtype": dtype}
    # ViT options go to the backbone, the rest (feature_size, ...) to the PMG heads.
    vit_kw = {k: kw.pop(k) for k in _PMG_DEIT_BACKBONE_KWARGS if k in kw}
    backbone = vit.VisionTransformer(num_classes=0, img_size=img_size, distilled=False,
                                     feature_blocks=blocks, **args, **dt, **vit_kw)
    return pmg.PMG(num_classes=num_classes, backbone=backbone, **dt, **kw)
  return make


for _depth in (18, 50, 101):
  register(f"pmg_resnet{_depth}")(_pmg_resnet_factory(_depth))
for _size in ("tiny", "small", "base"):
  register(f"pmg_deit_{_size}")(_pmg_deit_factory(_size))


def _small_cnn_backbone(img_size, dtype, widths=(16, 32, 64, 128), convs_per_stage=1,
                        stem_stride=2):
  """`cnn_small` without its classifier (the demo teacher's layout by default)."""
  dt = {} if dtype is None else {"dtype": dtype}
  return cnn.SmallCNN(num_classes=0, img_size=img_size, widths=tuple(widths),
                      convs_per_stage=convs_per_stage, stem_stride=stem_stride, **dt), dt


@register("pmg_cnn_small")
def _pmg_cnn_small(num_classes: int, img_size=64, dtype=None, widths=(16, 32, 64, 128),
                   convs_per_stage=1, stem_stride=2, **kw):
  """PMG heads on the last three stages of `cnn_small` (CPU-sized PMG evidence)."""
  backbone, dt = _small_cnn_backbone(img_size, dtype, widths, convs_per_stage, stem_stride)
  return pmg.PMG(num_classes=num_classes, backbone=backbone, **dt, **kw)


def _cal_resnet_factory(depth: int):
  """CAL (WS-DAN + counterfactual attention, spec section 4) on a ResNet's layer4, at the
  reference's output stride 16 (layer4 at stride 1, not dilated: 28 x 28 maps at 448);
  `output_stride=32` gives torchvision's layer4 (14 x 14); `attn` goes to the ResNet."""
  def make(num_classes: int, img_size=448, dtype=None, widths=None, output_stride=16,
           dilate=False, attn=None, **kw):
    backbone, dt = _resnet_backbone(depth, img_size, dtype, widths,
                                    output_stride=output_stride, dilate=dilate, attn=attn)
    return cal.CAL(num_classes=num_classes, backbone=backbone, **dt, **kw)
  return make


for _depth in (18, 34, 50, 101):
  register(f"cal_resnet{_depth}")(_cal_resnet_factory(_depth))


@register("cal_cnn_small")
def _cal_cnn_small(num_classes: int, img_size=64, dtype=None, widths=(16, 32, 64, 128),
                   convs_per_stage=1, stem_stride=2, **kw):
  """CAL on `cnn_small`'s last stage (CPU-sized teacher for the synthetic dataset)."""
  backbone, dt = _small_cnn_backbone(img_size, dtype, widths, convs_per_stage, stem_stride)
  return cal.CAL(num_classes=num_classes, backbone=backbone, **dt, **kw)


_RACNN_KWARGS = ("crop_size", "min_side_frac", "k", "share_weights", "apn_hidden",
                 "apn_init_std")


def _racnn(num_classes, img_size, dtype, kw, make_net, crop_default):
  """RA-CNN around the scale-1 classifier `make_net(**net kwargs)` (spec section 6); the
  RA-CNN options in `kw` go to `racnn.RACNN`, the rest to the scale networks."""
  dt = {} if dtype is None else {"dtype": dtype}
  rk = {k: kw.pop(k) for k in _RACNN_KWARGS if k in kw}
  rk.setdefault("crop_size", crop_default)
  return racnn.RACNN(num_classes=num_classes, backbone=make_net(**dt, **kw), img_size=img_size,
                     **rk, **dt)


def _racnn_vgg_factory(depth: int, batch_norm: bool):
  """RA-CNN with a VGG at every scale (the paper: VGG-19), each with the "gap" head: conv5_x
  average-pooled, then fc; the APNs read conv5_x (28 x 28 at 448)."""
  def make(num_classes: int, img_size=448, dtype=None, **kw):
    kw.setdefault("classifier", "gap")
    return _racnn(num_classes, img_size, dtype, kw, lambda **k: vgg.VGG(
        num_classes=num_classes, depth=depth, batch_norm=batch_norm, img_size=img_size, **k),
        img_size // 2)
  return make


for _depth in (16, 19):
  register(f"racnn_vgg{_depth}")(_racnn_vgg_factory(_depth, False))
  register(f"racnn_vgg{_depth}_bn")(_racnn_vgg_factory(_depth, True))


@register("racnn_resnet50")
def _racnn_resnet50(num_classes: int, img_size=448, dtype=None, **kw):
  """RA-CNN with a ResNet-50 at every scale (APNs on layer4)."""
  return _racnn(num_classes, img_size, dtype, kw, lambda **k: resnet.ResNet(
      num_classes=num_classes, depth=50, img_size=img_size, **k), img_size // 2)


@register("racnn_cnn_small")
def _racnn_cnn_small(num_classes: int, img_size=96, dtype=None, **kw):
  """RA-CNN with `cnn_small` at every scale (CPU-sized; crops at the input size by default)."""
  kw.setdefault("widths", (16, 32, 64, 128))
  kw.setdefault("convs_per_stage", 1)
  kw.setdefault("stem_stride", 2)
  return _racnn(num_classes, img_size, dtype, kw, lambda **k: cnn.SmallCNN(
      num_classes=num_classes, img_size=img_size, **k), img_size)


@register("cnn_small")
def _cnn_small(num_classes: int, img_size=64, **kw):
  return cnn.SmallCNN(num_classes=num_classes, img_size=img_size, **kw)


def _pma(num_classes, img_size, backbone, dt, kw):
  """PMA (spec section 7) on `backbone` (num_classes=0; its last stage map is X); `kw` (the
  PMA fields: vocab_size, modality, embed_dim, hidden_dim, ...) goes to `pma.PMA`."""
  return pma.PMA(num_classes=num_classes, backbone=backbone, img_size=img_size, **dt, **kw)


@register("pma_vgg16")
def _pma_vgg16(num_classes: int, img_size=448, dtype=None, batch_norm=False, **kw):
  """PMA on VGG-16's conv5_3 (before pool5: 28 x 28 at 448 -> 14 x 14 blocks), as the paper."""
  dt = {} if dtype is None else {"dtype": dtype}
  backbone = vgg.VGG(num_classes=0, depth=16, batch_norm=batch_norm, img_size=img_size, **dt)
  return _pma(num_classes, img_size, backbone, dt, kw)


@register("pma_resnet50")
def _pma_resnet50(num_classes: int, img_size=448, dtype=None, attn=None, **kw):
  """PMA on ResNet-50's layer4 (14 x 14 at 448 -> 7 x 7 blocks); `attn` goes to the ResNet."""
  backbone, dt = _resnet_backbone(50, img_size, dtype, attn=attn)
  return _pma(num_classes, img_size, backbone, dt, kw)


@register("pma_cnn_small")
def _pma_cnn_small(num_classes: int, img_size=96, dtype=None, widths=(16, 32, 64, 128),
                   convs_per_stage=1, stem_stride=2, **kw):
  """PMA on `cnn_small`'s last stage (CPU-sized: 6 x 6 map at 96 -> 3 x 3 blocks), with small
  text and stage widths by default: embed_dim 32, hidden_dim 64, qrm_dim 64, stage_dim 64."""
  backbone, dt = _small_cnn_backbone(img_size, dtype, widths, convs_per_stage, stem_stride)
  for key, value in (("embed_dim", 32), ("hidden_dim", 64), ("qrm_dim", 64), ("stage_dim", 64)):
    kw.setdefault(key, value)
  return _pma(num_classes, img_size, backbone, dt, kw)


def available() -> list[str]:
  """Names accepted by `create`."""
  return sorted(_REGISTRY)


def canonical_name(name: str) -> str:
  """Strips a timm resolution/tag suffix: 'deit_tiny_distilled_patch16_224.fb_in1k' ->
  'deit_tiny_distilled_patch16'."""
  base = name.split(".")[0]
  if base in _REGISTRY:
    return base
  stripped = re.sub(r"_\d+$", "", base)
  if stripped in _REGISTRY:
    return stripped
  raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")


def create(name: str, num_classes: int, img_size=224, **kw) -> nn.Module:
  """Builds the model `name` (see `available()`) for `num_classes` classes at `img_size`.

  Extra keyword arguments override the architecture defaults, e.g. `dtype=jnp.bfloat16`,
  `drop_path_rate=0.1`, `patch_stride=12`.
  """
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  return _REGISTRY[canonical_name(name)](num_classes=num_classes, img_size=img_size, **kw)
