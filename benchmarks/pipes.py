"""What one core sustains of each inner-loop formulation of the native kernels (AVX2 or AVX-512).

A register-only loop per formulation, 8 independent accumulators, one thread (``--threads``
runs that many copies at once): vector updates per second, where an update is one vector of
pairs through the formulation's instructions. The counting of the kernels' ceilings starts here:
on Zen 3, for one, vaddps, vsubps, vmaxps and vminps share two pipes and the multiply-adds have
two others, so `max + add` sustains half of what `max + fma(., 1, acc)` can.

    python benchmarks/pipes.py
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import tempfile

from adderjax.ops import native_build

# name: the new accumulator from a (the old one), w (new at each step), x, g, one, lo, hi.
FORMULATIONS = {
    "fma (convolution)": "fmadd(w, g, a)",
    "max + add (forward)": "add(a, max(x, w))",
    "max + fma by one (forward, AVX2)": "fmadd(max(x, w), one, a)",
    "sub + max + min + fma (input grad, direct)": "fmadd(g, min(one, max(lo, sub(w, x))), a)",
    "fnmadd + max + min + fma (input grad, direct, AVX2)":
        "fmadd(g, min(one, max(lo, fnmadd(x, one, w))), a)",
    "min + max + fma (input grad, bounds, AVX2)": "fmadd(g, max(lo, min(hi, w)), a)",
}

PROGRAM = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>
#if defined(__AVX512F__)
using T = __m512;
#define P(op) _mm512_##op##_ps
#else
using T = __m256;
#define P(op) _mm256_##op##_ps
#endif
static T add(T a, T b) { return P(add)(a, b); }
static T sub(T a, T b) { return P(sub)(a, b); }
static T max(T a, T b) { return P(max)(a, b); }
static T min(T a, T b) { return P(min)(a, b); }
static T fmadd(T a, T b, T c) { return P(fmadd)(a, b, c); }
static T fnmadd(T a, T b, T c) { return P(fnmadd)(a, b, c); }
%(kernels)s
int main(int argc, char** argv) {
  const int threads = std::atoi(argv[1]);
  const long steps = 20000000;
  double (*kernels[])(long) = {%(names)s};
  kernels[0](steps);  // Warm up: the first second of a busy loop runs slower here.
  for (auto kernel : kernels) {
    double best = 1e30;  // The best of three runs: the machine is shared.
    for (int run = 0; run < 3; ++run) {
      std::vector<double> seconds(threads);
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { seconds[t] = kernel(steps); });
      for (auto& t : pool) t.join();
      double slowest = 0;
      for (double s : seconds) slowest = s > slowest ? s : slowest;
      best = slowest < best ? slowest : best;
    }
    std::printf("%%.2f\n", steps * 8 / best / 1e9);
  }
}
"""

KERNEL = r"""
__attribute__((noinline)) double kernel%(i)d(long steps) {
  T acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = P(set1)(float(i));
  T x = P(set1)(0.1f), w = P(set1)(0.5f), g = P(set1)(1e-9f), one = P(set1)(1.0f);
  T lo = P(set1)(-1.0f), hi = P(set1)(1.2f);
  __asm__("" : "+x"(one));  // Kept opaque: the compiler folds a multiply by a known 1.
  const auto start = std::chrono::steady_clock::now();
  for (long s = 0; s < steps; ++s) {
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      __asm__("" : "+x"(w));  // w changes at every update: nothing is hoisted.
      const T a = acc[i];
      acc[i] = %(update)s;
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  T total = acc[0];
  for (int i = 1; i < 8; ++i) total = add(total, acc[i]);
  float lanes[16];
  P(storeu)(lanes, total);
  volatile float sink = lanes[0];  // Every accumulator is used.
  (void)sink;
  return seconds;
}
"""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--threads", type=int, default=1, help="copies run at once")
  args = parser.parse_args()
  compiler = native_build.compiler()
  if compiler is None:
    raise SystemExit("no C++ compiler")
  kernels = "".join(KERNEL % dict(i=i, update=update)
                    for i, update in enumerate(FORMULATIONS.values()))
  program = PROGRAM % dict(kernels=kernels,
                           names=", ".join(f"kernel{i}" for i in range(len(FORMULATIONS))))
  with tempfile.TemporaryDirectory() as tmp:
    source, binary = pathlib.Path(tmp) / "pipes.cc", pathlib.Path(tmp) / "pipes"
    source.write_text(program)
    subprocess.run([*compiler, "-O3", "-march=native", "-std=c++17", "-pthread", str(source),
                    "-o", str(binary)], check=True)
    rates = subprocess.run([str(binary), str(args.threads)], check=True, capture_output=True,
                           text=True).stdout.split()
  print(f"| formulation | G vector updates/s per thread ({args.threads} thread(s)) |")
  print("|---|---|")
  for name, rate in zip(FORMULATIONS, rates):
    print(f"| {name} | {rate} |")


if __name__ == "__main__":
  main()
