"""Two versions of the native float kernels, called alternately in one process.

On a shared machine whose speed drifts by 30% over seconds, two processes timed one after the
other compare the machine's moods more than the kernels. This builds one program holding the
kernels of a git revision (``--base``, default ``HEAD``) and of the working tree, each in its
own C++ namespace, and calls their XLA FFI handlers (``ForwardImpl``, ``InputGradImpl``,
``WeightGradImpl``) in turns on the same ResNet-20 layers (3x3, stride 1, batch 64), through a
stand-in for XLA's thread pool (``--threads`` helpers besides the caller). The ratio of each pair
of calls is taken at once; the table gives the median ratio and each side's fastest call.

    python benchmarks/native_ab.py --base HEAD~1

The sources are those of ``csrc/`` that define the handlers; each version's headers are
included once (the working tree's), so a change to a header is measured on both sides. The
input gradient takes G unpadded since ``e394234``: against an earlier base its
row is meaningless (the base rejects G).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import tempfile

import jax

from adderjax.ops import native_build

REPO = pathlib.Path(__file__).resolve().parents[1]
CSRC = "adderjax/ops/csrc"
HANDLERS = ("ForwardImpl", "InputGradImpl", "WeightGradImpl")

DRIVER = r"""
%(system)s
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <random>
#include <thread>
#include <vector>
#include "xla/ffi/api/ffi.h"
%(headers)s
#undef XLA_FFI_DEFINE_HANDLER_SYMBOL
#define XLA_FFI_DEFINE_HANDLER_SYMBOL(...)
#define AdderjaxVectorWidth AdderjaxVectorWidthBase
namespace base {
%(base)s
}
#undef AdderjaxVectorWidth
#define AdderjaxVectorWidth AdderjaxVectorWidthWork
namespace work {
%(work)s
}
namespace ffi = xla::ffi;

struct Pool {  // Helper threads running the tasks a handler schedules.
  std::vector<std::thread> threads;
  std::deque<std::pair<XLA_FFI_Task*, void*>> tasks;
  std::mutex mu;
  std::condition_variable cv;
  bool stop = false;
  explicit Pool(int n) {
    for (int i = 0; i < n; ++i)
      threads.emplace_back([this] {
        for (;;) {
          std::unique_lock<std::mutex> lock(mu);
          cv.wait(lock, [&] { return stop || !tasks.empty(); });
          if (tasks.empty()) return;
          auto task = tasks.front();
          tasks.pop_front();
          lock.unlock();
          task.first(task.second);
        }
      });
  }
  ~Pool() {
    { std::lock_guard<std::mutex> lock(mu); stop = true; }
    cv.notify_all();
    for (auto& t : threads) t.join();
  }
};
Pool* pool;
int helpers;
XLA_FFI_Error* Schedule(XLA_FFI_ThreadPool_Schedule_Args* a) {
  { std::lock_guard<std::mutex> lock(pool->mu); pool->tasks.emplace_back(a->task, a->data); }
  pool->cv.notify_one();
  return nullptr;
}
XLA_FFI_Error* NumThreads(XLA_FFI_ThreadPool_NumThreads_Args* a) {
  *a->num_threads = helpers + 1;  // XLA counts the pool's threads; ParallelFor adds the caller.
  return nullptr;
}

struct Array {
  std::vector<float> data;
  std::vector<int64_t> dims;
  XLA_FFI_Buffer buffer;
  Array(std::vector<int64_t> shape, std::mt19937& rng) : dims(shape) {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    std::normal_distribution<float> normal;
    data.resize(n);
    for (float& v : data) v = normal(rng);
    buffer = {sizeof(XLA_FFI_Buffer), nullptr, XLA_FFI_DataType_F32, data.data(),
              int64_t(dims.size()), dims.data()};
  }
  ffi::Buffer<ffi::F32> arg() { return ffi::Buffer<ffi::F32>(&buffer); }
  ffi::Result<ffi::Buffer<ffi::F32>> result() { return arg(); }
};

int main(int argc, char** argv) {
  helpers = std::atoi(argv[1]);
  const int calls = std::atoi(argv[2]);
  const int64_t batch = std::atoi(argv[3]), width = %(width)d;
  Pool threads(helpers);
  pool = &threads;
  XLA_FFI_Api api{};
  api.XLA_FFI_ThreadPool_Schedule = Schedule;
  api.XLA_FFI_ThreadPool_NumThreads = NumThreads;
  ffi::DiagnosticEngine diagnostic;
  auto tp = ffi::CtxDecoding<ffi::ThreadPool>::Decode(&api, nullptr, diagnostic).value();
  std::mt19937 rng(0);
  for (int64_t c : {16, 32, 64}) {
    const int64_t hw = 512 / c, padded = (c + width - 1) / width * width;
    Array x({batch, hw, hw, c}, rng), y({batch, hw, hw, c}, rng), g({batch, hw, hw, c}, rng);
    Array w_forward({1, 9 * c, padded}, rng), w_grad({1, 3, 3, c, padded}, rng);
    Array dx({batch, hw, hw, c}, rng);
    Array dw({1, 3, 3, c, padded}, rng);
    const char* names[] = {"forward", "input grad", "weight grad"};
#define FORWARD(ns) \
  ns::ForwardImpl(tp, x.arg(), w_forward.arg(), y.result(), 3, 3, 1, 1, 1, 1, 1, 1, 1)
#define INPUT_GRAD(ns) \
  ns::InputGradImpl(tp, x.arg(), g.arg(), w_grad.arg(), dx.result(), 1, 1, 1, 1, 1, 1, 1, 1)
#define WEIGHT_GRAD(ns) \
  ns::WeightGradImpl(tp, x.arg(), g.arg(), w_grad.arg(), dw.result(), 1, 1, 1, 1, 1, 1, 1)
    for (int part = 0; part < 3; ++part) {
      std::vector<double> seconds[2], ratios;
      for (int call = 0; call < calls + 1; ++call) {
        for (int side = 0; side < 2; ++side) {
          const auto start = std::chrono::steady_clock::now();
          if (part == 0) side ? FORWARD(work) : FORWARD(base);
          if (part == 1) side ? INPUT_GRAD(work) : INPUT_GRAD(base);
          if (part == 2) side ? WEIGHT_GRAD(work) : WEIGHT_GRAD(base);
          if (call > 0)  // The first pair warms up.
            seconds[side].push_back(
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
        }
        if (call > 0) ratios.push_back(seconds[1].back() / seconds[0].back());
      }
      std::sort(ratios.begin(), ratios.end());
      const double pairs = double(batch) * hw * hw * c * 9 * c;
      const double base_min = *std::min_element(seconds[0].begin(), seconds[0].end());
      const double work_min = *std::min_element(seconds[1].begin(), seconds[1].end());
      std::printf("| %%ldx%%ldx%%ld | %%s | %%.2f ms (%%.1f) | %%.2f ms (%%.1f) | %%.3f |\n",
                  hw, hw, c, names[part], base_min * 1e3, pairs / base_min / 1e9, work_min * 1e3,
                  pairs / work_min / 1e9, ratios[ratios.size() / 2]);
      std::fflush(stdout);
    }
  }
}
"""


def handler_sources(read, names) -> list[str]:
  """The sources among ``names`` that define a handler, read with ``read(name)``."""
  return [n for n in names if n.endswith(".cc")
          and any(re.search(rf"\b{h}\(", read(n)) for h in HANDLERS)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--base", default="HEAD", help="git revision to compare against")
  parser.add_argument("--threads", type=int, nargs="+", default=[0, 1],
                      help="helper threads besides the caller, one table each")
  parser.add_argument("--calls", type=int, default=15, help="timed calls of each side")
  parser.add_argument("--batch", type=int, default=64)
  args = parser.parse_args()
  compiler = native_build.compiler()
  if compiler is None:
    raise SystemExit("no C++ compiler")
  csrc = REPO / CSRC
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    listing = subprocess.run(["git", "ls-tree", "--name-only", f"{args.base}:{CSRC}"], cwd=REPO,
                             check=True, capture_output=True, text=True).stdout.split()
    base_dir = tmp / "base"
    base_dir.mkdir()
    for name in listing:
      text = subprocess.run(["git", "show", f"{args.base}:{CSRC}/{name}"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
      (base_dir / name).write_text(text)
    work_names = sorted(p.name for p in csrc.iterdir())
    base_sources = handler_sources(lambda n: (base_dir / n).read_text(), sorted(listing))
    work_sources = handler_sources(lambda n: (csrc / n).read_text(), work_names)
    include = lambda d, names: "\n".join(f'#include "{d / n}"' for n in names)
    width = 16 if "avx512f" in pathlib.Path("/proc/cpuinfo").read_text() else 8
    # System headers at file scope, before the namespaces (their guards keep them out of both).
    texts = [(base_dir / n).read_text() for n in base_sources]
    texts += [(csrc / n).read_text() for n in work_names]
    system = sorted({line for t in texts for line in t.splitlines()
                     if re.match(r"#include <[^>]+>$", line)})
    program = DRIVER % dict(
        system="\n".join(system),
        headers=include(csrc, [n for n in work_names if n.endswith(".h")]),
        base=include(base_dir, base_sources), work=include(csrc, work_sources), width=width)
    (tmp / "ab.cc").write_text(program)
    binary = tmp / "ab"
    flags = [f for f in native_build.FLAGS if f not in ("-shared", "-fPIC")]
    subprocess.run([*compiler, *flags, "-pthread", f"-I{jax.ffi.include_dir()}", f"-I{csrc}",
                    str(tmp / "ab.cc"), "-o", str(binary)], check=True)
    for helpers in args.threads:
      print(f"\n{helpers + 1} thread(s), batch {args.batch}, {args.calls} calls a side; "
            f"base {args.base} against the working tree\n")
      print("| layer (H, W, C) | pass | base, fastest (G pairs/s) | working tree, fastest "
            "(G pairs/s) | median ratio, tree / base |")
      print("|---|---|---|---|---|")
      subprocess.run([str(binary), str(helpers), str(args.calls), str(args.batch)], check=True)


if __name__ == "__main__":
  main()
