"""Training methods, one module each; the protocol they follow is `fgjax.methods.base`.

  classifier  cross-entropy (teachers, baselines, plain ViT/DeiT)
  trs_deit    TRS-DeiT: hard distillation from a frozen teacher + contrastive loss
  transfg     TransFG: part-layer cross-entropy + contrastive loss
  pmg         PMG: progressive multi-granularity training (S + 1 updates per batch)
  cal         CAL: counterfactual attention learning on WS-DAN
  racnn       RA-CNN: three scales, attention proposal networks, alternating optimizers
  pma         PMA: bi-modal progressive mask attention (image + noun phrases)
  distill     an image-only student on a teacher's soft probabilities (PMA's distiller)

`get_method(config, model, num_classes)` builds the method `config.method` names (a method
defined elsewhere joins with `register(name, cls)`);
`sections(name)` gives its config sections with their defaults (what `configs/common.py`
adds to a config).
"""
from __future__ import annotations

import copy
import importlib

from fgjax.methods.base import (Context, Helper, HelperEnv, Method, OptimizerSpec, Phase,
                                Update)
from fgjax.methods.cal import CAL
from fgjax.methods.classifier import Classifier
from fgjax.methods.distill import Distill
from fgjax.methods.pma import PMA
from fgjax.methods.pmg import PMG
from fgjax.methods.racnn import RACNN
from fgjax.methods.regions import part_hits, point_hits
from fgjax.methods.transfg import TransFG
from fgjax.methods.trs_deit import TRSDeiT

METHODS: dict[str, type[Method]] = {"classifier": Classifier, "trs_deit": TRSDeiT,
                                    "transfg": TransFG, "pmg": PMG, "cal": CAL,
                                    "racnn": RACNN, "pma": PMA, "distill": Distill}


def register(name: str, cls: type[Method]) -> type[Method]:
  """Makes `cls` available as `config.method = name` (a method defined outside fgjax: a
  research project's own file, a test)."""
  if not (isinstance(cls, type) and issubclass(cls, Method)):
    raise TypeError(f"register({name!r}, ...): {cls!r} is not a subclass of fgjax.methods.Method")
  METHODS[name] = cls
  return cls


def import_path(cls: type[Method]) -> str:
  """'module:QualName' of a method class (saved with a run, see `method_class`)."""
  return f"{cls.__module__}:{cls.__qualname__}"


def method_class(name: str, import_from: str | None = None) -> type[Method]:
  """The class of method `name`; one registered outside fgjax that is not registered in this
  process (restoring its run without its config file) is imported from `import_from`
  ('module:QualName', saved by the run as `method_import_resolved`)."""
  if name not in METHODS and import_from:
    module, _, qualname = import_from.partition(":")
    try:
      obj = importlib.import_module(module)
      for part in qualname.split("."):
        obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
      raise ValueError(f"config.method: {name!r} is not registered and {import_from!r} does "
                       f"not import ({e}); import the module that registers it") from None
    register(name, obj)
  if name not in METHODS:
    raise ValueError(f"config.method: unknown method {name!r}; available: {sorted(METHODS)}")
  return METHODS[name]


def sections(name: str) -> dict[str, dict]:
  """{config key: defaults} of method `name`'s own config sections (deep copies)."""
  return copy.deepcopy({k: dict(v) for k, v in method_class(name).sections.items()})


def get_method(config, model, num_classes) -> Method:
  cls = method_class(config.get("method", "classifier"), config.get("method_import_resolved"))
  return cls(config, model, num_classes)


__all__ = ["CAL", "Classifier", "Context", "Distill", "Helper", "HelperEnv", "METHODS", "Method",
           "OptimizerSpec", "PMA", "PMG", "Phase", "RACNN", "TRSDeiT", "TransFG", "Update", "get_method",
           "import_path", "method_class", "part_hits", "point_hits", "register", "sections"]
