"""adderjax.allocator: the environment, when to start again, and what glibc does with it."""

import os
import subprocess
import sys
import textwrap

import pytest

from adderjax import allocator

ALL = ":".join(allocator.TUNABLES)
# Whether this process could take the tunables (Linux, glibc >= 2.26).
TUNABLE_HERE = allocator.needs_restart({})


def _without_tunables():
  return {k: v for k, v in os.environ.items()
          if k not in ("GLIBC_TUNABLES", allocator.DISABLE_VARIABLE)}


def test_the_environment_adds_the_tunables_and_keeps_the_others():
  assert allocator.environment({})["GLIBC_TUNABLES"] == ALL
  env = allocator.environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"glibc.malloc.tcache_count=0:{ALL}"}
  # The caller's own values stay, once each.
  mine = allocator.environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"]
  assert mine.split(":") == ["glibc.malloc.hugetlb=0", *allocator.TUNABLES[:-1]]
  assert allocator.environment(allocator.environment({})) == allocator.environment({})


def test_the_environment_is_a_copy():
  before = dict(os.environ)
  env = allocator.environment()
  assert all(t.split("=")[0] in env["GLIBC_TUNABLES"] for t in allocator.TUNABLES)
  assert dict(os.environ) == before
  assert {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"} == {
      k: v for k, v in before.items() if k != "GLIBC_TUNABLES"}


@pytest.mark.parametrize(("env", "glibc", "expected"), [
    ({}, (2, 36), True),
    ({}, (2, 26), True),
    ({}, (3, 0), True),
    ({}, (2, 25), False),  # No GLIBC_TUNABLES yet.
    ({}, None, False),  # Not glibc (musl, say).
    ({"GLIBC_TUNABLES": ALL}, (2, 36), False),  # Restarted.
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}, (2, 36), True),  # Some missing.
    ({allocator.DISABLE_VARIABLE: "1"}, (2, 36), False),
    ({allocator.DISABLE_VARIABLE: "0"}, (2, 36), True),
])
def test_when_a_restart_is_needed(env, glibc, expected):
  assert allocator._needs_restart(env, glibc) is expected


_RESTARTING = textwrap.dedent("""
    import os, sys
    print(os.getpid(), os.environ.get("GLIBC_TUNABLES", "-"), sys.argv[1:], flush=True)
    from adderjax import allocator
    allocator.restart_with_tuned_allocator()
    print("after", os.getpid(), flush=True)
""")


def test_restart_starts_the_same_program_again_where_it_helps(tmp_path):
  script = tmp_path / "program.py"
  script.write_text(_RESTARTING)
  env = _without_tunables()
  out = subprocess.run([sys.executable, str(script), "--flag", "x y"], env=env, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  pid = out[0].split()[0]
  if TUNABLE_HERE:  # Started again in place: the same process and arguments, the tunables.
    assert out == [f"{pid} - ['--flag', 'x y']", f"{pid} {ALL} ['--flag', 'x y']", f"after {pid}"]
  else:
    assert out == [f"{pid} - ['--flag', 'x y']", f"after {pid}"]
  # Turned off: never.
  out = subprocess.run([sys.executable, str(script)], check=True, capture_output=True, text=True,
                       env=dict(env, **{allocator.DISABLE_VARIABLE: "1"})).stdout.splitlines()
  assert len(out) == 2 and out[1] == f"after {out[0].split()[0]}"


_FAULTS = textwrap.dedent("""
    import ctypes, resource, threading
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    faults = []
    def steps():  # On a thread, as XLA's buffers; 80 MiB: more than a thread arena's heap.
      for _ in range(3):
        size = 80 << 20
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = libc.malloc(size)
        ctypes.memset(buffer, 1, size)  # (numpy would advise huge pages by itself)
        libc.free(buffer)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    thread = threading.Thread(target=steps)
    thread.start()
    thread.join()
    print(faults[-1])
""")


@pytest.mark.skipif(not TUNABLE_HERE, reason="needs Linux and glibc >= 2.26")
def test_a_freed_large_buffer_is_reused_without_page_faults():
  def faults(env):
    return int(subprocess.run([sys.executable, "-c", _FAULTS], env=env, check=True,
                              capture_output=True, text=True).stdout)

  env = _without_tunables()
  default, tuned = faults(env), faults(allocator.environment(env))
  # Without: mapped afresh each time, a fault per page (4 KiB; 2 MiB where the kernel gives every
  # large mapping huge pages: 40). With: the same pages again (measured: 20,481 against 0).
  assert default >= 40 and tuned < 5, (default, tuned)
