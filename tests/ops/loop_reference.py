"""An independent float64 oracle for the adder convolution, in plain numpy loops.

Written from the paper's formulas, sharing no code with adderjax: for each
kernel tap and each output channel it takes the strided input window and
accumulates the output and both gradients. With an exponent ``p != 1`` the
output is ``-sum |X - F|^p`` and both gradients are its exact ones,
``p * |d|^(p-1) * sign(d)`` of ``d = X - F`` (weights) and ``d = F - X`` (inputs).
"""

import numpy as np

_INPUT_FACTOR = {
    "full_precision": lambda d: np.clip(d, -1.0, 1.0),
    "unclipped": lambda d: d,
    "sign": np.sign,
}


def _exact_factor(d, p):
  return p * np.abs(d) ** (p - 1) * np.sign(d)


def adder_conv_and_grads(x, w, g, *, strides, padding, dilation, groups, grad_mode, p=None):
  """Returns ``(y, dx, dw)`` for output cotangent ``g`` (which may be None).

  ``p``: None or 1 for the L1 distance and ``grad_mode``'s rules; otherwise
  the exponent, with the exact gradient whatever ``grad_mode``.
  """
  lp = p is not None and p != 1
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
        if lp:
          y[..., o] -= (np.abs(diff) ** p).sum(-1)
          weight_factor, input_factor = _exact_factor(diff, p), _exact_factor(-diff, p)
        else:
          y[..., o] -= np.abs(diff).sum(-1)
          weight_factor = np.sign(diff) if grad_mode == "sign" else diff
          input_factor = _INPUT_FACTOR[grad_mode](-diff)
        dw[i, j, :, o] += (go * weight_factor).sum((0, 1, 2))
        dxp[:, rows, cols, chans] += go * input_factor
  return y, dxp[:, top:top + height, left:left + width], dw
