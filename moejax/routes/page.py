"""The token view: a self-contained HTML page of a text sample, each token's background the
colour of its top expert at one MoE layer, its experts and gate weights on hover."""
from __future__ import annotations

import colorsys
import html

NULL_COLOUR = '#d9d9d9'  # a token with no expert in its top slot (a null slot)


def expert_colour(e: int, n: int) -> str:
  """Expert e of n: a light colour (hue spread over the experts; dark text stays legible);
  consecutive experts are far apart in hue."""
  if e >= n:
    return NULL_COLOUR
  step = (n // 2 + 1) if n > 2 else 1  # walk the hue circle in big steps
  while n > 1 and _gcd(step, n) != 1:
    step += 1
  hue = ((e * step) % n) / n
  r, g, b = colorsys.hls_to_rgb(hue, 0.72, 0.85)
  return '#%02x%02x%02x' % (round(r * 255), round(g * 255), round(b * 255))


def _gcd(a: int, b: int) -> int:
  while b:
    a, b = b, a % b
  return a


def render(pieces: list[str], experts, weights, n: int, title: str, note: str = '') -> str:
  """The page.

  Args:
    pieces: each token's text (decoded alone).
    experts: [L, K] each token's experts at the layer shown (first slot: the top one).
    weights: [L, K] their gate weights (None: not shown).
    n: the number of experts.
    title: the page's heading.
    note: a line under it (what was sampled).
  Returns:
    the HTML document (no scripts, no external resources).
  """
  spans = []
  for i, piece in enumerate(pieces):
    row = [int(e) for e in experts[i]]
    parts = [('no expert' if e >= n else f'expert {e}') +
             ('' if weights is None else f' {float(weights[i][j]):.3f}')
             for j, e in enumerate(row)]
    tip = f'token {i} {piece!r}: ' + ', '.join(parts)
    spans.append(f'<span class="t" style="background:{expert_colour(row[0], n)}" '
                 f'title="{html.escape(tip, quote=True)}">{html.escape(piece)}</span>')
  used = sorted({int(e[0]) for e in experts})
  legend = ''.join(f'<span class="k" style="background:{expert_colour(e, n)}">'
                   f'{"none" if e >= n else e}</span>' for e in used)
  return f'''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #111; background: #fff; }}
.text {{ font-family: monospace; font-size: 16px; line-height: 1.9; white-space: pre-wrap;
         word-break: break-all; }}
.t {{ padding: 1px 0; border-radius: 2px; }}
.t:hover {{ outline: 2px solid #000; }}
.k {{ display: inline-block; min-width: 2.2em; text-align: center; margin: 2px;
      padding: 2px 4px; font-family: monospace; }}
</style></head><body>
<h2>{html.escape(title)}</h2>
<p>{html.escape(note)}</p>
<p>Top expert (background colour); hover a token for its experts and gate weights.
Experts in this sample: {legend}</p>
<div class="text">{''.join(spans)}</div>
</body></html>
'''
