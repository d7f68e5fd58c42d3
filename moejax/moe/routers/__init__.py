"""Routers, one file each: a Router subclass registered with @register('name') (base.py). Every
module of this folder is imported here, so adding a router is adding its file."""
import importlib
import pkgutil

from moejax.moe.routers.base import ROUTERS, Router, register

for _module in pkgutil.iter_modules(__path__):
  if _module.name != 'base':
    importlib.import_module(f'{__name__}.{_module.name}')

__all__ = ['ROUTERS', 'Router', 'register']
