"""Routed expert blocks, one file each: an ExpertBlock registered with @register('name')
(base.py). Every module of this folder is imported here, so adding a block is adding its file."""
import importlib
import pkgutil

from moejax.moe.experts.base import EXPERTS, ExpertBlock, register

for _module in pkgutil.iter_modules(__path__):
  if _module.name != 'base':
    importlib.import_module(f'{__name__}.{_module.name}')

__all__ = ['EXPERTS', 'ExpertBlock', 'register']
