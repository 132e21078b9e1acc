"""gen_jax.host_memory: the glibc malloc settings that keep XLA:CPU scratch buffers in the heap between calls,
and the launchers' restart under them."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from gen_jax import host_memory

linux_glibc = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                 reason="glibc malloc tunables exist only on Linux with glibc")


def test_tuned_environ_adds_the_tunables_and_keeps_the_users_own():
    env = host_memory.tuned_environ({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=4"})
    assert env["PATH"] == "/bin"
    items = dict(kv.split("=") for kv in env["GLIBC_TUNABLES"].split(":"))
    assert items["glibc.malloc.hugetlb"] == "1"
    assert items["glibc.malloc.arena_max"] == "4"  # the user's choice wins
    assert items["glibc.malloc.mmap_max"] == "0" and items["glibc.malloc.trim_threshold"] == str(1 << 32)
    assert host_memory.is_tuned(env) and not host_memory.is_tuned({"PATH": "/bin"})


def test_no_restart_when_opted_out_already_tuned_or_jax_targets_an_accelerator():
    assert not host_memory.applies({host_memory.OPT_OUT: "0"})
    assert not host_memory.applies(host_memory.tuned_environ({}))
    assert not host_memory.applies({"JAX_PLATFORMS": "cuda"})
    assert not host_memory.applies({"JAX_PLATFORMS": "tpu,cpu"})


_ALLOC_LOOP = textwrap.dedent("""
    import ctypes, resource, threading
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 256 << 20
    def cycle():  # what XLA does per call, on a worker thread: malloc a scratch buffer, write it, free it
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
    def on_thread():
        t = threading.Thread(target=cycle); t.start(); t.join()
    on_thread()  # first touch always faults
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        on_thread()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@linux_glibc
def test_tuned_heap_reuses_a_freed_scratch_buffer_instead_of_faulting_it_in_again():
    pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    untuned = int(subprocess.run([sys.executable, "-c", _ALLOC_LOOP], env=env, capture_output=True, text=True,
                                 check=True).stdout)
    tuned = int(subprocess.run([sys.executable, "-c", _ALLOC_LOOP], env=host_memory.tuned_environ(env),
                               capture_output=True, text=True, check=True).stdout)
    assert untuned > 3 * pages  # glibc mmaps and munmaps the block every time: every page faults again
    assert tuned < pages // 4  # the block stays in the heap and is reused


@linux_glibc
def test_a_launcher_started_with_dash_m_restarts_once_under_the_tunables(tmp_path):
    # a stand-in `experiments` package whose launcher reports its environment; the real package __init__
    pkg = tmp_path / "experiments"
    pkg.mkdir()
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "__init__.py")
    (pkg / "__init__.py").write_text(open(src).read())
    (pkg / "probe.py").write_text("import os, sys\nprint('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''))\n"
                                  "print('ARGS=' + ' '.join(sys.argv[1:]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.path.dirname(os.path.dirname(host_memory.__file__))])
    out = subprocess.run([sys.executable, "-m", "experiments.probe", "--preset", "x"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)
    assert out.stderr.count("restarting under GLIBC_TUNABLES") == 1
    assert host_memory.is_tuned({"GLIBC_TUNABLES": out.stdout.split("TUNABLES=")[1].splitlines()[0]})
    assert "ARGS=--preset x" in out.stdout
    env[host_memory.OPT_OUT] = "0"
    out = subprocess.run([sys.executable, "-m", "experiments.probe"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True)
    assert "restarting" not in out.stderr and "TUNABLES=\n" in out.stdout
