"""Name -> class tables that the MoE pieces register into with a decorator (routers, dispatchers,
expert blocks), so adding a piece is adding its file."""
from __future__ import annotations


class Table(dict):
  """{config name: class} of one kind of piece ('router', 'dispatcher', 'expert block')."""

  def __init__(self, kind: str):
    super().__init__()
    self.kind = kind

  def register(self, name: str):
    """Class decorator: the class is the piece `name`; cls.NAME is set to it."""
    def add(cls):
      if name in self:
        raise ValueError(f'two {self.kind}s registered as {name!r}')
      cls.NAME = name
      self[name] = cls
      return cls
    return add
