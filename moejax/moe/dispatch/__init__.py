"""Dispatchers, one file each: a Dispatcher dataclass registered with @register('name')
(base.py) whose fields are its config fields. Every module of this folder is imported here, so
adding a dispatcher is adding its file."""
import importlib
import pkgutil

from moejax.moe.dispatch.base import DISPATCHERS, Dispatcher, register

for _module in pkgutil.iter_modules(__path__):
  if _module.name != 'base':
    importlib.import_module(f'{__name__}.{_module.name}')

__all__ = ['DISPATCHERS', 'Dispatcher', 'register']
