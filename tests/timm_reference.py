"""timm, imported for its reference ViTs and checkpoint loaders, with or without torchvision.

timm is not among the test dependencies: it requires torchvision, and the torchvision wheel
that pip finds beside PyTorch's CPU wheel cannot load its operators ('operator torchvision::nms
does not exist'), which also breaks transformers' vision models. Install it alone,
`pip install --no-deps timm`, and the timm tests run; without it they are skipped.

timm imports torchvision at import time for modules these tests never run (datasets, image
transforms, a frozen BatchNorm). Where torchvision does not import, its modules are replaced by
placeholders: any name imports, calling one raises. timm's ViT and its checkpoint loaders use
none of them.
"""

import importlib.abc
import importlib.machinery
import sys
import types

import pytest


class _Placeholder(type):
  """A torchvision class or constant that is not there: attributes are placeholders too."""

  def __getattr__(cls, name):
    if name.startswith('__'):
      raise AttributeError(name)
    return _Placeholder(f'{cls.__name__}.{name}', (), {})

  def __call__(cls, *args, **kwargs):
    raise RuntimeError(f'{cls.__name__}: torchvision is not available')


class _AbsentModule(types.ModuleType):
  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    value = _Placeholder(name, (), {})
    setattr(self, name, value)
    return value


class _AbsentTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, name, path, target=None):
    if name == 'torchvision' or name.startswith('torchvision.'):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    module = _AbsentModule(spec.name)
    module.__path__ = []
    return module

  def exec_module(self, module):
    pass


def import_timm():
  """The timm package (skips the calling test where timm is not installed)."""
  pytest.importorskip('torch')
  try:
    import torchvision  # noqa: F401
  except Exception:  # ImportError, or the RuntimeError of a torchvision built for another torch
    for name in [n for n in sys.modules if n == 'torchvision' or n.startswith('torchvision.')]:
      del sys.modules[name]
    if not any(isinstance(f, _AbsentTorchvision) for f in sys.meta_path):
      sys.meta_path.insert(0, _AbsentTorchvision())
  return pytest.importorskip('timm')
