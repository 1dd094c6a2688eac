"""C99 source for a quantized AdderNet: integers only, no floating point (`save_c`).

`save_c` lowers a model quantized by `adderjax.quant.quantize` to an
`adderjax.quant.IntegerProgram` (see `adderjax.quant.integer_program` for its
operations and number formats) and writes it as three files:

- ``model.h``: the input size, the number of classes, the fixed point of the
  logits, and ``model_run(pixels, logits)`` / ``model_predict(pixels)``.
- ``model.c``: the weights as ``static const`` integer arrays, the activation
  buffers as two static arenas (uint8 codes and int32 values, shared between
  tensors whose lifetimes do not overlap), and the layers as plain loops in
  int8/int16/int32/int64 arithmetic. No ``float`` or ``double`` anywhere:
  on x86-64 it builds with ``gcc -mgeneral-regs-only``.
- ``main.c``: reads raw uint8 images (``N x H x W x C``, row major) from
  stdin until its end and prints one predicted class per line, or with
  ``--logits`` the integer logits (``value * 2^MODEL_OUTPUT_FRACTION_BITS``).

The adder layers' patch sums have no multiplication: each sums ``|a - w'|``
over a patch of uint8 codes (for ``bits <= 8``; int32 above). Unsigned codes
``a`` in ``[0, 255]`` against ``m w = 2 w``: ``w' = 2 w`` for ``w >= 0``, and
for ``w < 0`` ``|a - 2 w| = |a - 0| + 2 |w|``, so ``w' = 0`` and each output
channel adds the constant ``sum 2 |w|`` over its negative weights (exact,
zero padding included: padding is the code 0). Signed codes:
``|a - w| = |(a + 128) - (w + 128)|``, the codes stored offset by 128
(padding 128). The sum of absolute differences then has a portable loop, an
AVX2 one (``_mm256_sad_epu8``, built where ``__AVX2__`` is defined, e.g.
``-mavx2`` or ``-march=native``) and a NEON one (``vabdq_u8``/``vpadalq``,
where ``__ARM_NEON`` is), all bit-exact (``-DADDERJAX_NO_SIMD`` forces the
portable loop). Patches and kernels are zero-padded to multiples of 32 bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
import pathlib
from typing import Any

import numpy as np

from adderjax.quant.integer_program import (
    Add,
    AdderSum,
    Flatten,
    InputTable,
    IntegerProgram,
    MaxPool,
    MeanPool,
    MulSum,
    Quantize,
    lower,
)

__all__ = ["save_c"]

_LANES = 32  # patch rows padded to this many bytes, for the SIMD loops

_PRELUDE = r"""
#include <stddef.h>
#include <stdint.h>
#include "model.h"

#if !defined(ADDERJAX_NO_SIMD) && defined(__AVX2__)
#include <immintrin.h>
#define ADDERJAX_SAD_AVX2 1
#elif !defined(ADDERJAX_NO_SIMD) && defined(__ARM_NEON)
#include <arm_neon.h>
#define ADDERJAX_SAD_NEON 1
#endif

typedef struct {
  int32_t h, w, c;      /* input */
  int32_t kh, kw;       /* kernel */
  int32_t sh, sw;       /* strides */
  int32_t dh, dw;       /* dilation */
  int32_t pt, pl;       /* padding, top and left */
  int32_t oh, ow, oc;   /* output */
} geometry;

/* floor((x + 2^(s-1)) / 2^s), without relying on the right shift of negative numbers. */
static int64_t rshift_round(int64_t x, int32_t s) {
  if (s == 0) return x;
  x += (int64_t)1 << (s - 1);
  return x >= 0 ? x >> s : -((-x - 1) >> s) - 1;
}
"""

_RUNTIME = {
    "sad_u8": r"""
/* sum |a[i] - b[i]| over n bytes, n a multiple of 32. */
#if defined(ADDERJAX_SAD_AVX2)
static int32_t sad_u8(const uint8_t *a, const uint8_t *b, int32_t n) {
  __m256i acc = _mm256_setzero_si256();
  __m128i s;
  int32_t i;
  for (i = 0; i < n; i += 32) {
    __m256i x = _mm256_loadu_si256((const __m256i *)(const void *)(a + i));
    __m256i y = _mm256_loadu_si256((const __m256i *)(const void *)(b + i));
    acc = _mm256_add_epi64(acc, _mm256_sad_epu8(x, y));
  }
  s = _mm_add_epi64(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  s = _mm_add_epi64(s, _mm_unpackhi_epi64(s, s));
  return (int32_t)_mm_cvtsi128_si64(s);
}
#elif defined(ADDERJAX_SAD_NEON)
static int32_t sad_u8(const uint8_t *a, const uint8_t *b, int32_t n) {
  uint32x4_t acc = vdupq_n_u32(0);
  int32_t i = 0;
  while (i < n) {
    /* at most 128 steps into 16-bit lanes: 128 * 2 * 255 < 65536 */
    int32_t end = n - i > 16 * 128 ? i + 16 * 128 : n;
    uint16x8_t part = vdupq_n_u16(0);
    for (; i < end; i += 16) part = vpadalq_u8(part, vabdq_u8(vld1q_u8(a + i), vld1q_u8(b + i)));
    acc = vpadalq_u16(acc, part);
  }
  return (int32_t)(vgetq_lane_u32(acc, 0) + vgetq_lane_u32(acc, 1) + vgetq_lane_u32(acc, 2)
                   + vgetq_lane_u32(acc, 3));
}
#else
static int32_t sad_u8(const uint8_t *a, const uint8_t *b, int32_t n) {
  int32_t s = 0, i;
  for (i = 0; i < n; ++i) {
    int32_t d = (int32_t)a[i] - (int32_t)b[i];
    s += d < 0 ? -d : d;
  }
  return s;
}
#endif
""",
    "gather_u8": r"""
/* The patch under output (oy, ox), in (kh, kw, c) order; outside the input: pad. */
static void gather_u8(const uint8_t *in, const geometry *g, int32_t oy, int32_t ox, uint8_t pad,
                      uint8_t *patch) {
  int32_t i, j, k, n = 0;
  for (i = 0; i < g->kh; ++i) {
    int32_t y = oy * g->sh + i * g->dh - g->pt;
    for (j = 0; j < g->kw; ++j) {
      int32_t x = ox * g->sw + j * g->dw - g->pl;
      if (y < 0 || y >= g->h || x < 0 || x >= g->w) {
        for (k = 0; k < g->c; ++k) patch[n++] = pad;
      } else {
        const uint8_t *src = in + ((size_t)y * (size_t)g->w + (size_t)x) * (size_t)g->c;
        for (k = 0; k < g->c; ++k) patch[n++] = src[k];
      }
    }
  }
}
""",
    "gather_i32": r"""
static void gather_i32(const int32_t *in, const geometry *g, int32_t oy, int32_t ox,
                       int32_t *patch) {
  int32_t i, j, k, n = 0;
  for (i = 0; i < g->kh; ++i) {
    int32_t y = oy * g->sh + i * g->dh - g->pt;
    for (j = 0; j < g->kw; ++j) {
      int32_t x = ox * g->sw + j * g->dw - g->pl;
      if (y < 0 || y >= g->h || x < 0 || x >= g->w) {
        for (k = 0; k < g->c; ++k) patch[n++] = 0;
      } else {
        const int32_t *src = in + ((size_t)y * (size_t)g->w + (size_t)x) * (size_t)g->c;
        for (k = 0; k < g->c; ++k) patch[n++] = src[k];
      }
    }
  }
}
""",
    "epilogue": r"""
static int32_t epilogue(int64_t acc, int32_t mult, int64_t offset, int32_t shift, int32_t relu) {
  int64_t t = rshift_round(acc * mult + offset, shift);
  if (relu && t < 0) t = 0;
  return (int32_t)t;
}
""",
    "adder_u8": r"""
/* -sum |a - w'| - wconst per patch, a from the group of each output channel (uint8 codes). */
static void adder_conv_u8(const uint8_t *in, int32_t groups, const geometry *g, int32_t kp,
                          const uint8_t *weights, const int32_t *wconst, const uint8_t *group,
                          uint8_t pad, const int32_t *mult, const int64_t *offset,
                          const int8_t *shift, int32_t relu, int32_t *out, uint8_t *patch) {
  size_t plane = (size_t)g->h * (size_t)g->w * (size_t)g->c;
  int32_t k = g->kh * g->kw * g->c, oy, ox, c, q, i;
  for (q = 0; q < groups; ++q)
    for (i = k; i < kp; ++i) patch[(size_t)q * (size_t)kp + (size_t)i] = 0;
  for (oy = 0; oy < g->oh; ++oy) {
    for (ox = 0; ox < g->ow; ++ox) {
      int32_t *o = out + ((size_t)oy * (size_t)g->ow + (size_t)ox) * (size_t)g->oc;
      for (q = 0; q < groups; ++q)
        gather_u8(in + (size_t)q * plane, g, oy, ox, pad, patch + (size_t)q * (size_t)kp);
      for (c = 0; c < g->oc; ++c) {
        int32_t acc = -(sad_u8(patch + (size_t)group[c] * (size_t)kp,
                               weights + (size_t)c * (size_t)kp, kp) + wconst[c]);
        o[c] = epilogue(acc, mult[c], offset[c], shift[c], relu);
      }
    }
  }
}
""",
    "adder_i32": r"""
/* -sum |a - w'| per patch, int32 codes (bits > 8), a from the group of each output channel. */
static void adder_conv_i32(const int32_t *in, int32_t groups, const geometry *g,
                           const int32_t *weights, const uint8_t *group, const int32_t *mult,
                           const int64_t *offset, const int8_t *shift, int32_t relu,
                           int32_t *out, int32_t *patch) {
  size_t plane = (size_t)g->h * (size_t)g->w * (size_t)g->c;
  int32_t k = g->kh * g->kw * g->c, oy, ox, c, q, i;
  for (oy = 0; oy < g->oh; ++oy) {
    for (ox = 0; ox < g->ow; ++ox) {
      int32_t *o = out + ((size_t)oy * (size_t)g->ow + (size_t)ox) * (size_t)g->oc;
      for (q = 0; q < groups; ++q)
        gather_i32(in + (size_t)q * plane, g, oy, ox, patch + (size_t)q * (size_t)k);
      for (c = 0; c < g->oc; ++c) {
        const int32_t *a = patch + (size_t)group[c] * (size_t)k;
        const int32_t *w = weights + (size_t)c * (size_t)k;
        int32_t acc = 0;
        for (i = 0; i < k; ++i) {
          int32_t d = a[i] - w[i];
          acc -= d < 0 ? -d : d;
        }
        o[c] = epilogue(acc, mult[c], offset[c], shift[c], relu);
      }
    }
  }
}
""",
    "mul_conv": r"""
/* sum t * w per patch (int8 weights, int64 sum): a multiplicative layer. */
static void mul_conv(const int32_t *in, const geometry *g, const int8_t *weights,
                     const int32_t *mult, const int64_t *offset, const int8_t *shift,
                     int32_t relu, int32_t *out, int32_t *patch) {
  int32_t k = g->kh * g->kw * g->c, oy, ox, c, i;
  for (oy = 0; oy < g->oh; ++oy) {
    for (ox = 0; ox < g->ow; ++ox) {
      int32_t *o = out + ((size_t)oy * (size_t)g->ow + (size_t)ox) * (size_t)g->oc;
      gather_i32(in, g, oy, ox, patch);
      for (c = 0; c < g->oc; ++c) {
        const int8_t *w = weights + (size_t)c * (size_t)k;
        int64_t acc = 0;
        for (i = 0; i < k; ++i) acc += (int64_t)patch[i] * w[i];
        o[c] = epilogue(acc, mult[c], offset[c], shift[c], relu);
      }
    }
  }
}
""",
    "table_u8": r"""
static void table_u8(const uint8_t *pixels, int32_t n, int32_t channels, int32_t groups,
                     const uint8_t *table, uint8_t *out) {
  int32_t q, i, c;
  for (q = 0; q < groups; ++q)
    for (i = 0; i < n; ++i)
      for (c = 0; c < channels; ++c)
        out[((size_t)q * (size_t)n + (size_t)i) * (size_t)channels + (size_t)c] =
            table[((size_t)q * (size_t)channels + (size_t)c) * 256u
                  + pixels[(size_t)i * (size_t)channels + (size_t)c]];
}
""",
    "table_i32": r"""
static void table_i32(const uint8_t *pixels, int32_t n, int32_t channels, int32_t groups,
                      const int32_t *table, int32_t *out) {
  int32_t q, i, c;
  for (q = 0; q < groups; ++q)
    for (i = 0; i < n; ++i)
      for (c = 0; c < channels; ++c)
        out[((size_t)q * (size_t)n + (size_t)i) * (size_t)channels + (size_t)c] =
            table[((size_t)q * (size_t)channels + (size_t)c) * 256u
                  + pixels[(size_t)i * (size_t)channels + (size_t)c]];
}
""",
    "quantize_u8": r"""
static void quantize_u8(const int32_t *in, int32_t n, int32_t groups, const int32_t *mult,
                        const int8_t *shift, int32_t lo, int32_t hi, int32_t code_offset,
                        uint8_t *out) {
  int32_t q, i;
  for (q = 0; q < groups; ++q)
    for (i = 0; i < n; ++i) {
      int64_t t = rshift_round((int64_t)in[i] * mult[q], shift[q]);
      t = t < lo ? lo : t > hi ? hi : t;
      out[(size_t)q * (size_t)n + (size_t)i] = (uint8_t)(t + code_offset);
    }
}
""",
    "quantize_i32": r"""
static void quantize_i32(const int32_t *in, int32_t n, int32_t groups, const int32_t *mult,
                         const int8_t *shift, int32_t lo, int32_t hi, int32_t *out) {
  int32_t q, i;
  for (q = 0; q < groups; ++q)
    for (i = 0; i < n; ++i) {
      int64_t t = rshift_round((int64_t)in[i] * mult[q], shift[q]);
      out[(size_t)q * (size_t)n + (size_t)i] = (int32_t)(t < lo ? lo : t > hi ? hi : t);
    }
}
""",
    "add": r"""
static void add_i32(const int32_t *a, const int32_t *b, int32_t n, int64_t ma, int64_t mb,
                    int32_t shift, int32_t relu, int32_t *out) {
  int32_t i;
  for (i = 0; i < n; ++i) {
    int64_t t = rshift_round(a[i] * ma + b[i] * mb, shift);
    out[i] = (int32_t)(relu && t < 0 ? 0 : t);
  }
}
""",
    "max_pool": r"""
static void max_pool_i32(const int32_t *in, int32_t h, int32_t w, int32_t c, int32_t size,
                         int32_t stride, int32_t pad, int32_t oh, int32_t ow, int32_t *out) {
  int32_t oy, ox, k, i, j;
  for (oy = 0; oy < oh; ++oy)
    for (ox = 0; ox < ow; ++ox)
      for (k = 0; k < c; ++k) {
        int32_t best = INT32_MIN;
        for (i = 0; i < size; ++i)
          for (j = 0; j < size; ++j) {
            int32_t y = oy * stride + i - pad, x = ox * stride + j - pad;
            if (y >= 0 && y < h && x >= 0 && x < w) {
              int32_t v = in[((size_t)y * (size_t)w + (size_t)x) * (size_t)c + (size_t)k];
              if (v > best) best = v;
            }
          }
        out[((size_t)oy * (size_t)ow + (size_t)ox) * (size_t)c + (size_t)k] = best;
      }
}
""",
    "mean_pool": r"""
static void mean_pool_i32(const int32_t *in, int32_t hw, int32_t c, int64_t mult, int32_t shift,
                          int32_t *out) {
  int32_t k, i;
  for (k = 0; k < c; ++k) {
    int64_t total = 0;
    for (i = 0; i < hw; ++i) total += in[(size_t)i * (size_t)c + (size_t)k];
    out[k] = (int32_t)rshift_round(total * mult, shift);
  }
}
""",
}

_DEPENDS = {
    "adder_u8": ("sad_u8", "gather_u8", "epilogue"),
    "adder_i32": ("gather_i32", "epilogue"),
    "mul_conv": ("gather_i32", "epilogue"),
}

_MAIN = r"""/* Reads raw uint8 images (N x H x W x C) from stdin, prints a class (or --logits)
 * per line. */
#include <stdio.h>
#include <string.h>
#include "model.h"

static uint8_t image[MODEL_INPUT_SIZE];
static int32_t logits[MODEL_NUM_CLASSES];

int main(int argc, char **argv) {
  int print_logits = 0, i;
  for (i = 1; i < argc; ++i) {
    if (strcmp(argv[i], "--logits") == 0) {
      print_logits = 1;
    } else {
      fprintf(stderr, "usage: %s [--logits] < images.raw\n"
              "  images.raw: N images of %d x %d x %d uint8 pixels (HWC, row major)\n"
              "  prints one class per line, or with --logits the integer logits "
              "(value * 2^%d)\n", argv[0], MODEL_INPUT_HEIGHT, MODEL_INPUT_WIDTH,
              MODEL_INPUT_CHANNELS, MODEL_OUTPUT_FRACTION_BITS);
      return 2;
    }
  }
  for (;;) {
    size_t got = fread(image, 1, MODEL_INPUT_SIZE, stdin);
    if (got == 0) break;
    if (got != MODEL_INPUT_SIZE) {
      fprintf(stderr, "truncated input: an image of %lu bytes, expected %d\n",
              (unsigned long)got, MODEL_INPUT_SIZE);
      return 1;
    }
    model_run(image, logits);
    if (print_logits) {
      for (i = 0; i < MODEL_NUM_CLASSES; ++i) printf(i ? " %ld" : "%ld", (long)logits[i]);
      printf("\n");
    } else {
      int best = 0;
      for (i = 1; i < MODEL_NUM_CLASSES; ++i) if (logits[i] > logits[best]) best = i;
      printf("%d\n", best);
    }
  }
  if (ferror(stdin)) {
    fprintf(stderr, "error reading stdin\n");
    return 1;
  }
  return 0;
}
"""


def _array(ctype: str, name: str, values: np.ndarray, comment: str = "") -> str:
  values = np.asarray(values).reshape(-1)
  if ctype == "int64_t":
    items = [f"INT64_C({int(v)})" for v in values]
    per_line = 6
  else:
    items = [str(int(v)) for v in values]
    per_line = 24
  lines = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)] or ["0"]
  head = f"/* {comment} */\n" if comment else ""
  body = ",\n  ".join(lines)
  return f"{head}static const {ctype} {name}[{max(len(values), 1)}] = {{\n  {body}\n}};\n"


_SIZES = {"uint8_t": 1, "int8_t": 1, "int32_t": 4, "int64_t": 8}


class _Writer:
  """model.c in pieces: constants, the calls of model_run, the runtime it needs, memory."""

  def __init__(self, program: IntegerProgram):
    self.program = program
    self.constants: list[str] = []
    self.calls: list[str] = []
    self.needed: set[str] = set()
    self.weight_bytes = 0
    self.scratch_u8 = 0
    self.scratch_i32 = 0
    self.place: dict[str, tuple[str, int]] = {}

  def const(self, ctype: str, name: str, values: np.ndarray, comment: str = "") -> str:
    values = np.asarray(values)
    self.constants.append(_array(ctype, name, values, comment))
    self.weight_bytes += _SIZES[ctype] * max(values.size, 1)
    return name

  def need(self, name: str) -> None:
    self.needed.add(name)
    self.needed.update(_DEPENDS.get(name, ()))

  def ptr(self, tensor: str) -> str:
    arena, offset = self.place[tensor]
    return f"{arena} + {offset}"


def _is_u8(tensor) -> bool:
  return tensor.storage == "codes" and tensor.bits <= 8


def _allocate(program: IntegerProgram) -> tuple[dict[str, tuple[str, int]], int, int, int]:
  """Offsets of each tensor in the uint8 or int32 arena (first fit over lifetimes)."""
  root = {}
  for op in program.operations:
    root[op.output] = root[op.input] if isinstance(op, Flatten) else op.output
  first, last = {}, {}
  for i, op in enumerate(program.operations):
    first.setdefault(root[op.output], i)
    last[root[op.output]] = max(last.get(root[op.output], i), i)
    inputs = op.inputs if isinstance(op, Add) else () if isinstance(op, InputTable) else (op.input,)
    for name in inputs:
      last[root[name]] = max(last.get(root[name], i), i)
  last[root[program.output]] = len(program.operations)
  placed: dict[str, tuple[str, int]] = {}
  extent = {"arena_u8": 0, "arena_i32": 0}
  live: dict[str, list[tuple[int, int, int, int]]] = {"arena_u8": [], "arena_i32": []}
  largest = 0
  for name in sorted(first, key=first.get):
    tensor = program.tensors[name]
    arena = "arena_u8" if _is_u8(tensor) else "arena_i32"
    size = tensor.size
    largest = max(largest, size * (1 if arena == "arena_u8" else 4))
    busy = sorted((o, o + s) for o, s, a, b in live[arena]
                  if not (b < first[name] or a > last[name]))
    offset = 0
    for lo, hi in busy:
      if offset + size <= lo:
        break
      offset = max(offset, hi)
    live[arena].append((offset, size, first[name], last[name]))
    extent[arena] = max(extent[arena], offset + size)
    placed[name] = (arena, offset)
  for name, r in root.items():
    placed[name] = placed[r]
  return placed, extent["arena_u8"], extent["arena_i32"], largest


def _geometry(op, program: IntegerProgram) -> str:
  t_in, t_out = program.tensors[op.input], program.tensors[op.output]
  kh, kw = op.kernel.shape[:2]
  values = (*t_in.shape, kh, kw, *op.strides, *op.dilation, op.padding[0][0], op.padding[1][0],
            *t_out.shape)
  return "{" + ", ".join(str(int(v)) for v in values) + "}"


def _emit(w: _Writer, index: int, op) -> None:
  program = w.program
  name = f"op{index}"
  out = program.tensors[op.output]
  note = f"{op.path}: {type(op).__name__}"
  if isinstance(op, InputTable):
    if _is_u8(out):
      offset = 128 if out.signed else 0
      table = w.const("uint8_t", f"{name}_table", op.table + offset, note)
      w.need("table_u8")
      fn = "table_u8"
    else:
      table = w.const("int32_t", f"{name}_table", op.table, note)
      w.need("table_i32")
      fn = "table_i32"
    h, wd, c = program.input_shape
    w.calls.append(f"  {fn}(pixels, {h * wd}, {c}, {op.table.shape[0]}, {table}, "
                   f"{w.ptr(op.output)});  /* {note} */")
    return
  if isinstance(op, (AdderSum, MulSum)):
    kh, kw, cin, cout = op.kernel.shape
    k = kh * kw * cin
    flat = op.kernel.reshape(k, cout).T  # (out, k), (kh, kw, c) order as the patches
    ep = op.epilogue
    mult = w.const("int32_t", f"{name}_mult", ep.multiplier)
    offset = w.const("int64_t", f"{name}_offset", ep.offset)
    shift = w.const("int8_t", f"{name}_shift", ep.shift)
    w.constants.append(f"static const geometry {name}_geometry = {_geometry(op, program)};\n")
    tail = f"{mult}, {offset}, {shift}, {int(ep.relu)}, {w.ptr(op.output)}"
    if isinstance(op, MulSum):
      weights = w.const("int8_t", f"{name}_weights", flat, note + " (int8, out x patch)")
      w.need("mul_conv")
      w.scratch_i32 = max(w.scratch_i32, k)
      w.calls.append(f"  mul_conv({w.ptr(op.input)}, &{name}_geometry, {weights}, {tail}, "
                     f"patch_i32);  /* {note} */")
      return
    codes = program.tensors[op.input]
    group = w.const("uint8_t", f"{name}_group", op.group)
    if _is_u8(codes):
      kp = -(-k // _LANES) * _LANES
      if codes.signed:
        stored = flat + 128
        wconst = np.zeros(cout, np.int64)
      else:
        stored = np.where(flat >= 0, 2 * flat, 0)
        wconst = np.where(flat < 0, -2 * flat, 0).sum(axis=1)
      padded = np.zeros((cout, kp), np.int64)
      padded[:, :k] = stored
      weights = w.const("uint8_t", f"{name}_weights", padded,
                        note + f" (w' uint8, out x {kp}: patch padded to {_LANES})")
      wc = w.const("int32_t", f"{name}_wconst", wconst)
      w.need("adder_u8")
      w.scratch_u8 = max(w.scratch_u8, codes.scale_groups * kp)
      pad = 128 if codes.signed else 0
      w.calls.append(f"  adder_conv_u8({w.ptr(op.input)}, {codes.scale_groups}, &{name}_geometry, "
                     f"{kp}, {weights}, {wc}, {group}, {pad}, {tail}, patch_u8);  /* {note} */")
    else:
      weights = w.const("int32_t", f"{name}_weights", op.multiplier * flat,
                        note + " (m w, out x patch)")
      w.need("adder_i32")
      w.scratch_i32 = max(w.scratch_i32, codes.scale_groups * k)
      w.calls.append(f"  adder_conv_i32({w.ptr(op.input)}, {codes.scale_groups}, &{name}_geometry, "
                     f"{weights}, {group}, {tail}, patch_i32);  /* {note} */")
    return
  if isinstance(op, Quantize):
    n = int(np.prod(out.shape))
    mult = w.const("int32_t", f"{name}_mult", op.multiplier, note)
    shift = w.const("int8_t", f"{name}_shift", op.shift)
    if _is_u8(out):
      w.need("quantize_u8")
      w.calls.append(f"  quantize_u8({w.ptr(op.input)}, {n}, {out.scale_groups}, {mult}, {shift}, "
                     f"{op.low}, {op.high}, {128 if out.signed else 0}, {w.ptr(op.output)});"
                     f"  /* {note} */")
    else:
      w.need("quantize_i32")
      w.calls.append(f"  quantize_i32({w.ptr(op.input)}, {n}, {out.scale_groups}, {mult}, {shift}, "
                     f"{op.low}, {op.high}, {w.ptr(op.output)});  /* {note} */")
    return
  if isinstance(op, Add):
    w.need("add")
    a, b = op.inputs
    w.calls.append(f"  add_i32({w.ptr(a)}, {w.ptr(b)}, {int(np.prod(out.shape))}, "
                   f"INT64_C({op.multipliers[0]}), INT64_C({op.multipliers[1]}), {op.shift}, "
                   f"{int(op.relu)}, {w.ptr(op.output)});  /* {note} */")
    return
  if isinstance(op, MaxPool):
    w.need("max_pool")
    h, wd, c = program.tensors[op.input].shape
    w.calls.append(f"  max_pool_i32({w.ptr(op.input)}, {h}, {wd}, {c}, {op.size}, {op.stride}, "
                   f"{op.padding}, {out.shape[0]}, {out.shape[1]}, {w.ptr(op.output)});"
                   f"  /* {note} */")
    return
  if isinstance(op, MeanPool):
    w.need("mean_pool")
    h, wd, c = program.tensors[op.input].shape
    w.calls.append(f"  mean_pool_i32({w.ptr(op.input)}, {h * wd}, {c}, INT64_C({op.multiplier}), "
                   f"{op.shift}, {w.ptr(op.output)});  /* {note} */")
    return
  if isinstance(op, Flatten):
    w.calls.append(f"  /* {note}: the same buffer */")
    return
  raise TypeError(f"unknown operation {op!r}")


def _header(program: IntegerProgram) -> str:
  h, w, c = program.input_shape
  return f"""/* Generated by adderjax.export.save_c: an integer-only AdderNet. */
#ifndef ADDERJAX_MODEL_H
#define ADDERJAX_MODEL_H

#include <stdint.h>

#define MODEL_INPUT_HEIGHT {h}
#define MODEL_INPUT_WIDTH {w}
#define MODEL_INPUT_CHANNELS {c}
#define MODEL_INPUT_SIZE {h * w * c}
#define MODEL_NUM_CLASSES {program.num_classes}
/* logits[i] = value * 2^MODEL_OUTPUT_FRACTION_BITS */
#define MODEL_OUTPUT_FRACTION_BITS {program.output_fraction_bits}

/* The integer logits of one image: pixels[MODEL_INPUT_SIZE] (HWC, uint8),
 * logits[MODEL_NUM_CLASSES]. */
void model_run(const uint8_t *pixels, int32_t *logits);
/* The predicted class (the first of equal largest logits). */
int model_predict(const uint8_t *pixels);

#endif
"""


def _check_floats(values: Sequence[float] | None, name: str) -> Sequence[float] | None:
  if values is None:
    return None
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
    raise ValueError(f"{name} must be a sequence of numbers, one per channel, got "
                     f"{name}={values!r}.")
  return values


def save_c(model: Any, directory: str | pathlib.Path, *, input_shape: Sequence[int],
           mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           verbose: bool = True) -> dict[str, Any]:
  """Writes ``model.h``, ``model.c`` and ``main.c``: the model as integer-only C99.

  Args:
    model: a model quantized by `adderjax.quant.quantize` (LeNet-5-BN or a
      CIFAR ResNet, every adder layer quantized), or an
      `adderjax.quant.IntegerProgram` already lowered.
    directory: where to write the files (created if needed).
    input_shape: one image's ``(height, width, channels)``.
    mean: the per-channel mean subtracted from ``pixels / 255`` before the
      model (e.g. ``adderjax.data.DATASETS["mnist"].mean``); None for 0.
    std: the per-channel divisor after; None for 1.
    verbose: print the memory needed.

  Returns:
    ``{"files", "input_shape", "num_classes", "output_fraction_bits",
    "memory"}``; ``memory`` in bytes: ``weights`` (the constant arrays),
    ``largest_activation`` (the largest tensor), ``activations`` (the two
    arenas), ``scratch`` (patch buffers, `model_predict`'s logits),
    ``main_buffers`` (main.c's image and logits), ``static`` (all of it).
    The stack holds scalars only (no arrays, no recursion).

  Raises:
    ValueError: naming the argument for a bad ``directory``, ``input_shape``,
      ``mean`` or ``std``; naming the module for what `adderjax.quant.lower`
      cannot lower.

  Example:
    >>> import tempfile
    >>> import numpy as np
    >>> from flax import nnx
    >>> from adderjax import export, models, quant
    >>> model = models.lenet5_bn(kind="adder", rngs=nnx.Rngs(0))
    >>> pixels = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), np.uint8)
    >>> qmodel, _ = quant.quantize(model, [pixels / np.float32(255)], bits=8, scale_groups=2)
    >>> info = export.save_c(qmodel, tempfile.mkdtemp(), input_shape=(28, 28, 1), verbose=False)
    >>> sorted(info["files"]), info["num_classes"]
    (['main.c', 'model.c', 'model.h'], 10)
  """
  if not isinstance(directory, (str, pathlib.Path)) or not str(directory):
    raise ValueError(f"directory must be a path, got directory={directory!r}.")
  mean, std = _check_floats(mean, "mean"), _check_floats(std, "std")
  if isinstance(model, IntegerProgram):
    shape = tuple(input_shape) if isinstance(input_shape, Sequence) else input_shape
    if shape != model.input_shape:
      raise ValueError(f"input_shape must be the program's {model.input_shape}, got "
                       f"input_shape={input_shape!r}.")
    if (mean is not None and tuple(mean) != model.mean) or (
        std is not None and tuple(std) != model.std):
      raise ValueError("mean and std are the program's own; pass None with an IntegerProgram.")
    program = model
  else:
    program = lower(model, input_shape=input_shape, mean=mean, std=std)
  directory = pathlib.Path(directory)
  if directory.exists() and not directory.is_dir():
    raise ValueError(f"directory must be a directory, got directory={str(directory)!r} "
                     "(a file).")

  w = _Writer(program)
  w.place, arena_u8, arena_i32, largest = _allocate(program)
  for i, op in enumerate(program.operations):
    _emit(w, i, op)
  out_arena, out_offset = w.place[program.output]
  runtime = "".join(_RUNTIME[name] for name in _RUNTIME if name in w.needed)
  buffers = []
  if arena_u8:
    buffers.append(f"static uint8_t arena_u8[{arena_u8}];")
  if arena_i32:
    buffers.append(f"static int32_t arena_i32[{arena_i32}];")
  if w.scratch_u8:
    buffers.append(f"static uint8_t patch_u8[{w.scratch_u8}];")
  if w.scratch_i32:
    buffers.append(f"static int32_t patch_i32[{w.scratch_i32}];")
  source = (
      "/* Generated by adderjax.export.save_c: an integer-only AdderNet (no floating point).\n"
      f" * Operations: {len(program.operations)}. Build: cc -std=c99 -O2 model.c main.c\n"
      " * (-mavx2 or -march=native for the AVX2 sums on x86-64; NEON on ARM by default). */\n"
      + _PRELUDE + runtime + "\n" + "\n".join(w.constants) + "\n" + "\n".join(buffers) + "\n\n"
      + "void model_run(const uint8_t *pixels, int32_t *logits) {\n  int32_t i;\n"
      + "\n".join(w.calls) + "\n"
      + f"  for (i = 0; i < MODEL_NUM_CLASSES; ++i) logits[i] = {out_arena}[{out_offset} + i];\n"
      + "}\n\n"
      + "int model_predict(const uint8_t *pixels) {\n"
      + "  static int32_t logits[MODEL_NUM_CLASSES];\n  int best = 0, i;\n"
      + "  model_run(pixels, logits);\n"
      + "  for (i = 1; i < MODEL_NUM_CLASSES; ++i) if (logits[i] > logits[best]) best = i;\n"
      + "  return best;\n}\n")
  directory.mkdir(parents=True, exist_ok=True)
  files = {"model.h": _header(program), "model.c": source, "main.c": _MAIN}
  for name, text in files.items():
    (directory / name).write_text(text)
  h, wd, c = program.input_shape
  memory = {
      "weights": w.weight_bytes,
      "largest_activation": largest,
      "activations": arena_u8 + 4 * arena_i32,
      "scratch": w.scratch_u8 + 4 * w.scratch_i32 + 4 * program.num_classes,
      "main_buffers": h * wd * c + 4 * program.num_classes,
  }
  memory["static"] = (memory["weights"] + memory["activations"] + memory["scratch"]
                      + memory["main_buffers"])
  if verbose:
    print(f"Wrote {directory}/model.h, model.c, main.c: weights {memory['weights']:,} B, "
          f"largest activation {memory['largest_activation']:,} B, activation arenas "
          f"{memory['activations']:,} B, scratch {memory['scratch']:,} B; static memory "
          f"{memory['static']:,} B in all (the stack holds scalars only).")
  return {"files": sorted(files), "input_shape": list(program.input_shape),
          "num_classes": program.num_classes,
          "output_fraction_bits": program.output_fraction_bits, "memory": memory}
