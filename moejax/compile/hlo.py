"""The collectives of a compiled program, read from its optimized HLO text: each one's kind,
bytes, the mesh axes its device groups run over, how often it runs per step, and the part of the
model that made it (its op_name).

Bytes of one execution, per chip: the largest array of the instruction's result (the gathered
array of an all-gather, the operand of an all-reduce, all-to-all or collective-permute, the
input of a reduce-scatter; for a combined all-reduce, all its operands). Runs per step: the
product of the trip counts of the while loops around it (the scanned layers), read from each
loop condition's comparison with a constant; a loop whose count cannot be read counts once, and
the collective says so ('trips_known': False).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import re

import numpy as np

KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'ragged-all-to-all',
         'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2,
                'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8,
                'f64': 8, 'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([\d,]*)\]')
_OP = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s(' + '|'.join(KINDS) +
                 r')(-start)?\(')
_COMPUTATION = re.compile(r'^\s*(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$')
_CALLS = re.compile(r'\b(body|condition|calls|to_apply|branch_computations|async_computation|'
                    r'called_computations)=\{?([^}\s]*(?:,\s*%[\w.\-]+)*)\}?')


@dataclasses.dataclass
class Collective:
  kind: str
  bytes: int  # per chip, one execution
  axes: tuple  # mesh axes the groups span ('?' when the groups match no set of axes)
  group_size: int
  runs: int  # executions per step
  trips_known: bool
  source: str  # op_name: the part of the model that made it
  shape: str  # the largest array of the result, e.g. 'bf16[8,4096,14336]'


def _largest_array(text: str) -> tuple[int, str]:
  best, label, total = 0, '', 0
  for dtype, dims in _ARRAY.findall(text):
    n = math.prod(int(d) for d in dims.split(',') if d) * _DTYPE_BYTES[dtype]
    total += n
    if n > best:
      best, label = n, f'{dtype}[{dims}]'
  return best, label


def _iota_groups(spec: str):
  """'[G,S]<=[dims]T(perm)' (XLA's compact replica groups) -> [G, S] device ids."""
  m = re.fullmatch(r'\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', spec)
  shape = [int(x) for x in m.group(1).split(',')]
  dims = [int(x) for x in m.group(2).split(',')]
  ids = np.arange(math.prod(dims)).reshape(dims)
  if m.group(3):
    ids = ids.transpose([int(x) for x in m.group(3).split(',')])
  return ids.reshape(shape)


def _mesh_groups(line: str):
  """replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'} -> [G, S] device ids. The ids are the
  row-major positions in that mesh, or, after `device_ids=([dims]T(perm))`, iota(dims)
  transposed by perm and flattened; None for a form not known here."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,?\s*device_ids=\(\[([\d,]+)\]"
                r"(?:T\(([\d,]+)\))?\))?\s*\{([^}]*)\}", line)
  if not m:
    return None
  axes = re.findall(r"'?([\w]+)'?=(\d+)", m.group(1))
  names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
  ids = np.arange(math.prod(sizes))
  if m.group(2):
    dims = [int(x) for x in m.group(2).split(',')]
    if math.prod(dims) != ids.size:
      return None
    ids = ids.reshape(dims)
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(',')])
  ids = ids.reshape(sizes)
  inner = [names.index(a.strip().strip("'")) for a in m.group(4).split(',') if a.strip()]
  outer = [i for i in range(len(names)) if i not in inner]
  ids = ids.transpose(outer + inner)
  return ids.reshape(-1, math.prod(sizes[i] for i in inner) if inner else 1)


def _groups(line: str, num_devices: int):
  """The device groups of a collective as a [G, S] array (S: devices per group)."""
  if "replica_groups=mesh[" in line:
    return _mesh_groups(line)
  m = re.search(r'replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)', line)
  if m:
    return _iota_groups(m.group(1))
  m = re.search(r'replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}', line)
  if m:
    groups = [[int(x) for x in g.split(',') if x] for g in re.findall(r'\{([\d,]*)\}',
                                                                      m.group(1))]
    if groups and all(len(g) == len(groups[0]) for g in groups) and groups[0]:
      return np.asarray(groups)
  m = re.search(r'source_target_pairs=\{(.*?)\}\}', line)
  if m:  # a permutation: the devices it connects form the groups (union of its pairs)
    pairs = [tuple(int(x) for x in p.split(',')) for p in re.findall(r'\{(\d+,\d+)', line)]
    parent = list(range(num_devices))

    def find(a):
      while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
      return a
    for a, b in pairs:
      parent[find(a)] = find(b)
    comps = collections.defaultdict(list)
    for d in range(num_devices):
      comps[find(d)].append(d)
    sizes = {len(c) for c in comps.values()}
    if len(sizes) == 1:
      return np.asarray(sorted(comps.values()))
    return None
  return np.arange(num_devices)[None]  # no groups: every device


def axes_of(groups, mesh_shape: dict) -> tuple:
  """The mesh axes (of size > 1) whose devices one group spans, or ('?',) when the groups are
  not the partition of any set of axes. Device i is the i-th of the mesh, row-major."""
  if groups is None:
    return ('?',)
  names = [a for a, s in mesh_shape.items()]
  sizes = [mesh_shape[a] for a in names]
  ids = np.arange(math.prod(sizes)).reshape(sizes)
  want = {frozenset(int(x) for x in g) for g in groups}
  big = [i for i, s in enumerate(sizes) if s > 1]
  for r in range(len(big) + 1):
    for inner in itertools.combinations(big, r):
      outer = [i for i in range(len(sizes)) if i not in inner]
      parts = ids.transpose(outer + list(inner)).reshape(-1, math.prod(
          [sizes[i] for i in inner]) if inner else 1)
      if {frozenset(int(x) for x in p) for p in parts} == want:
        return tuple(names[i] for i in inner) or ('none',)
  return ('?',)


def _computations(text: str):
  """{name: [lines]} of every computation, and the entry's name."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    m = _COMPUTATION.match(line) if line[:1] not in ('', ' ', '\t') else None
    if m:
      current = m.group(2)
      comps[current] = []
      if m.group(1):
        entry = current
      continue
    if current is not None:
      if line.strip() == '}':
        current = None
      else:
        comps[current].append(line)
  return comps, entry


def _trip_count(condition_lines) -> int | None:
  """The trip count of a counted loop: its condition compares the counter with one constant."""
  consts = [int(c) for line in condition_lines
            for c in re.findall(r'[su]32\[\](?:\{[^}]*\})?\s+constant\((-?\d+)\)', line)]
  compares = [line for line in condition_lines if ' compare(' in line]
  if len(consts) == 1 and compares:
    return consts[0]
  return None


def _runs(comps, entry):
  """{computation: (executions per step, every loop count known)} from the entry down."""
  calls = collections.defaultdict(list)  # caller -> [(callee, factor or None)]
  for name, lines in comps.items():
    for line in lines:
      trips = 1
      body_of = None
      if ' while(' in line:
        cond = re.search(r'condition=%?([\w.\-]+)', line)
        body_of = re.search(r'body=%?([\w.\-]+)', line)
        trips = _trip_count(comps.get(cond.group(1), [])) if cond else None
      for key, value in _CALLS.findall(line):
        for callee in re.findall(r'%?([\w.\-]+)', value):
          if callee in comps:
            is_body = body_of is not None and callee == body_of.group(1)
            calls[name].append((callee, trips if is_body else 1))
  runs = {entry: (1, True)}
  stack = [entry]
  while stack:
    name = stack.pop()
    n, known = runs[name]
    for callee, factor in calls.get(name, []):
      m, k = n * (factor if factor else 1), known and factor is not None
      if callee not in runs or runs[callee][0] < m:
        runs[callee] = (m, k)
        stack.append(callee)
  return runs


_DCN = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\ssend\(.*'
                  r'_xla_megascale_transfer_type="(\w+)"')


def collectives(hlo_text: str, mesh_shape: dict, slices: int = 1) -> list[Collective]:
  """Every collective of an optimized HLO module (see the module docstring). `mesh_shape` is
  the mesh within one slice (the device ids of a multi-slice program's groups are a slice's);
  with slices > 1, what crosses slices is a host transfer to the Megascale runtime (a `send`
  naming its transfer type, e.g. ALL_REDUCE), reported over the axis 'dcn'."""
  comps, entry = _computations(hlo_text)
  runs = _runs(comps, entry) if entry else {}
  num_devices = math.prod(mesh_shape.values())
  out = []
  for name, lines in comps.items():
    n, known = runs.get(name, (1, False))
    types = {}  # instruction -> its result type, for operand shapes
    for line in lines:
      d = re.match(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)', line)
      if d:
        types[d.group(1)] = d.group(2)
    for line in lines:
      m = _OP.match(line)
      if not m:
        d = _DCN.match(line) if slices > 1 else None
        if d:
          nbytes, shape = _largest_array(d.group(1))
          src = re.search(r'op_name="([^"]*)"', line)
          out.append(Collective(d.group(2).lower().replace('_', '-'), int(nbytes), ('dcn',),
                                slices, n, known, src.group(1) if src else '', shape))
        continue
      result, kind, start = m.group(2), m.group(3), m.group(4)
      nbytes, shape = _largest_array(result)
      if kind == 'ragged-all-to-all':
        # The result is the receive buffer, sized for the worst case (every pair to one rank);
        # what is sent is at most the operand (this rank's rows), so count the smaller.
        first = re.search(r'ragged-all-to-all\(%?([\w.\-]+)', line)
        if first and first.group(1) in types:
          nbytes = min(nbytes, _largest_array(types[first.group(1)])[0])
      if kind == 'all-reduce' and result.startswith('('):  # combined: every operand counts
        nbytes = sum(math.prod(int(d) for d in dims.split(',') if d) * _DTYPE_BYTES[t]
                     for t, dims in _ARRAY.findall(result))
        if start:
          nbytes //= 2  # the -start tuple lists operands and results
      groups = _groups(line, num_devices)
      src = re.search(r'op_name="([^"]*)"', line)
      out.append(Collective(kind, int(nbytes), axes_of(groups, mesh_shape),
                            int(groups.shape[1]) if groups is not None else 0, n, known,
                            src.group(1) if src else '', shape))
  return out


def summary(found: list[Collective]) -> dict:
  """{kind: {'ops': static count, 'runs': executions per step, 'bytes': bytes per step per
  chip, 'by_axes': {axes: bytes per step}}}."""
  out = {}
  for c in found:
    s = out.setdefault(c.kind, {'ops': 0, 'runs': 0, 'bytes': 0, 'by_axes': {}})
    s['ops'] += 1
    s['runs'] += c.runs
    s['bytes'] += c.bytes * c.runs
    key = ','.join(c.axes)
    s['by_axes'][key] = s['by_axes'].get(key, 0) + c.bytes * c.runs
  return out
