"""adderjax.huge_pages: the environment, when to start again, and what glibc does with it."""

import os
import subprocess
import sys
import textwrap

import pytest

from adderjax import huge_pages

# Whether this machine honours the tunable (glibc >= 2.35, transparent huge pages on madvise).
HONOURED = huge_pages.needs_restart({})


def test_the_environment_adds_the_tunable_and_keeps_the_others():
  assert huge_pages.environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  env = huge_pages.environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert env == {"PATH": "/bin",
                 "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
  # The caller's own choice stays, once.
  mine = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"}
  assert huge_pages.environment(mine) == mine
  assert huge_pages.environment(huge_pages.environment({})) == huge_pages.environment({})


def test_the_environment_is_a_copy():
  before = dict(os.environ)
  env = huge_pages.environment()
  assert "glibc.malloc.hugetlb" in env["GLIBC_TUNABLES"]
  assert dict(os.environ) == before
  assert {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"} == {
      k: v for k, v in before.items() if k != "GLIBC_TUNABLES"}


@pytest.mark.parametrize(("env", "glibc", "thp_mode", "expected"), [
    ({}, (2, 36), "madvise", True),
    ({}, (3, 0), "madvise", True),
    ({}, (2, 34), "madvise", False),  # No such tunable yet.
    ({}, None, "madvise", False),  # Not glibc (musl, say).
    ({}, (2, 36), "always", False),  # Large mappings get huge pages already.
    ({}, (2, 36), "never", False),  # None to be had.
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, (2, 36), "madvise", False),  # Restarted.
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", False),  # The user's.
    ({"ADDERJAX_NO_HUGE_PAGES": "1"}, (2, 36), "madvise", False),
    ({"ADDERJAX_NO_HUGE_PAGES": "0"}, (2, 36), "madvise", True),
])
def test_when_a_restart_is_needed(env, glibc, thp_mode, expected):
  assert huge_pages._needs_restart(env, glibc, thp_mode) is expected


_RESTARTING = textwrap.dedent("""
    import os, sys
    print(os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:], flush=True)
    from adderjax import huge_pages
    huge_pages.restart_with_huge_pages()
    print("after", os.getpid(), flush=True)
""")


def test_restart_starts_the_same_program_again_where_it_helps(tmp_path):
  script = tmp_path / "program.py"
  script.write_text(_RESTARTING)
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", huge_pages.DISABLE_VARIABLE)}
  out = subprocess.run([sys.executable, str(script), "--flag", "x y"], env=env, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  pid = out[0].split()[0]
  if HONOURED:  # Started again in place: the same process, arguments, then the tunable.
    assert out == [f"{pid}  ['--flag', 'x y']",
                   f"{pid} glibc.malloc.hugetlb=1 ['--flag', 'x y']", f"after {pid}"]
  else:
    assert out == [f"{pid}  ['--flag', 'x y']", f"after {pid}"]
  # Turned off: never.
  out = subprocess.run([sys.executable, str(script)], check=True, capture_output=True, text=True,
                       env=dict(env, ADDERJAX_NO_HUGE_PAGES="1")).stdout.splitlines()
  assert len(out) == 2 and out[1] == f"after {out[0].split()[0]}"


_FAULTS = textwrap.dedent("""
    import ctypes, resource, threading
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    faults = []
    def touch():  # On a thread, as XLA's buffers: a mapping of a thread's arena.
      size = 64 << 20
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      ctypes.memset(libc.malloc(size), 1, size)  # (numpy would advise huge pages itself)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    thread = threading.Thread(target=touch)
    thread.start()
    thread.join()
    print(faults[0])
""")


@pytest.mark.skipif(not HONOURED, reason="needs glibc >= 2.35 and transparent huge pages on "
                    "madvise")
def test_glibc_maps_large_allocations_in_huge_pages_with_it():
  def faults(env):
    return int(subprocess.run([sys.executable, "-c", _FAULTS], env=env, check=True,
                              capture_output=True, text=True).stdout)

  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  small, huge = faults(env), faults(huge_pages.environment(env))
  assert small >= 16384  # One per 4 KiB page.
  assert huge < small / 8, (small, huge)  # 2 MiB pages (where the kernel had them to spare).
