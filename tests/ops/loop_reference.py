"""An independent float64 oracle for the adder convolution, in plain numpy loops.

Written from the paper's formulas, sharing no code with adderjax: for each
kernel tap and each output channel it takes the strided input window and
accumulates the output and both gradients.
"""

import numpy as np

_INPUT_FACTOR = {
    "full_precision": lambda d: np.clip(d, -1.0, 1.0),
    "unclipped": lambda d: d,
    "sign": np.sign,
}


def adder_conv_and_grads(x, w, g, *, strides, padding, dilation, groups, grad_mode):
  """Returns ``(y, dx, dw)`` for output cotangent ``g`` (which may be None)."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  batch, height, width, _ = x.shape
  kh, kw, cg, out = w.shape
  per_group = out // groups
  (sh, sw), (dh, dw_), ((top, bottom), (left, right)) = strides, dilation, padding
  xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  ho = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
  wo = (xp.shape[2] - (kw - 1) * dw_ - 1) // sw + 1
  y = np.zeros((batch, ho, wo, out))
  g = np.zeros_like(y) if g is None else np.asarray(g, np.float64)
  dxp, dw = np.zeros_like(xp), np.zeros_like(w)
  for i in range(kh):
    for j in range(kw):
      rows = slice(i * dh, i * dh + (ho - 1) * sh + 1, sh)
      cols = slice(j * dw_, j * dw_ + (wo - 1) * sw + 1, sw)
      for o in range(out):
        chans = slice((o // per_group) * cg, (o // per_group + 1) * cg)
        diff = xp[:, rows, cols, chans] - w[i, j, :, o]
        go = g[..., o:o + 1]
        y[..., o] -= np.abs(diff).sum(-1)
        weight_factor = np.sign(diff) if grad_mode == "sign" else diff
        dw[i, j, :, o] += (go * weight_factor).sum((0, 1, 2))
        dxp[:, rows, cols, chans] += go * _INPUT_FACTOR[grad_mode](-diff)
  return y, dxp[:, top:top + height, left:left + width], dw
