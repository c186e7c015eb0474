"""The CPU environment of palu_ds.localrun: jemalloc preloaded into the processes it starts when PALU_DS_MALLOC asks,
the user's own preloads kept, bad settings refused by name; a master port no stale shm buffer names."""
import subprocess
import sys

import pytest

from palu_ds import localrun as L
from tests.e2e import ROOT

MAPS = "print('libjemalloc' in open('/proc/self/maps').read())"


@pytest.fixture
def found(monkeypatch):
    """Pretend the system has (``"libjemalloc.so.2"``) or lacks (None) jemalloc."""
    def pretend(lib):
        monkeypatch.setattr(L, "jemalloc", lambda: lib)
    return pretend


def _set(**env) -> dict:
    L.set_malloc(env)
    return env


def test_set_malloc_preloads_jemalloc_in_front_only_when_asked(found):
    found("libjemalloc.so.2")
    assert _set() == {} and _set(LD_PRELOAD="libfoo.so") == {"LD_PRELOAD": "libfoo.so"}  # unset: as it is
    assert _set(PALU_DS_MALLOC="jemalloc")["LD_PRELOAD"] == "libjemalloc.so.2"
    assert _set(PALU_DS_MALLOC="jemalloc", LD_PRELOAD="libfoo.so")["LD_PRELOAD"] == "libjemalloc.so.2:libfoo.so"
    assert _set(PALU_DS_MALLOC="jemalloc", LD_PRELOAD="/opt/libtcmalloc.so.4")["LD_PRELOAD"] == "/opt/libtcmalloc.so.4"
    assert _set(PALU_DS_MALLOC="jemalloc", LD_PRELOAD="libjemalloc.so.2")["LD_PRELOAD"] == "libjemalloc.so.2"
    assert _set(PALU_DS_MALLOC="system", LD_PRELOAD="libjemalloc.so.2 libfoo.so")["LD_PRELOAD"] == "libfoo.so"
    assert "LD_PRELOAD" not in _set(PALU_DS_MALLOC="system", LD_PRELOAD="libjemalloc.so.2")  # taken out again
    with pytest.raises(ValueError, match=r"PALU_DS_MALLOC='auto': choose jemalloc or system, or leave it unset"):
        _set(PALU_DS_MALLOC="auto")
    found(None)
    env = {"PALU_DS_MALLOC": "jemalloc", "LD_PRELOAD": "libfoo.so"}
    with pytest.raises(ValueError, match=r"PALU_DS_MALLOC=jemalloc but the system has no jemalloc: install it"):
        L.set_malloc(env)
    assert env == {"PALU_DS_MALLOC": "jemalloc", "LD_PRELOAD": "libfoo.so"}


def test_child_environments_carry_it(found, monkeypatch):
    found("libjemalloc.so.2")
    monkeypatch.setenv("LD_PRELOAD", "libfoo.so")
    monkeypatch.delenv("PALU_DS_MALLOC", raising=False)
    assert L.cpu_env()["LD_PRELOAD"] == "libfoo.so"
    assert L.cpu_env(PALU_DS_MALLOC="jemalloc")["LD_PRELOAD"] == "libjemalloc.so.2:libfoo.so"
    monkeypatch.setenv("PALU_DS_MALLOC", "jemalloc")
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")  # what setdefaults gave this process: a child can opt out
    assert "LD_PRELOAD" not in L.cpu_env(PALU_DS_MALLOC="system")
    env = {"PALU_DS_MALLOC": "jemalloc"}
    L.setdefaults(env)
    assert env["LD_PRELOAD"] == "libjemalloc.so.2" and env["DS_ACCELERATOR"] == "cpu"


def _localrun(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in L.cpu_env().items() if k not in ("LD_PRELOAD", "PALU_DS_MALLOC")}
    return subprocess.run([sys.executable, "-m", "palu_ds.localrun", sys.executable, "-c", code], cwd=ROOT,
                          env={**full, **env}, capture_output=True, text=True, timeout=120)  # its own choice


def test_localrun_runs_its_command_on_jemalloc_when_asked():
    """Through the real launcher: by default the command maps no jemalloc; with PALU_DS_MALLOC=jemalloc it does on a
    machine that has it, and is refused by name (exit 2) on one that has not; a bad value is refused too."""
    p = _localrun(MAPS)
    assert p.returncode == 0 and p.stdout.strip() == "False"
    p = _localrun(MAPS, PALU_DS_MALLOC="jemalloc")
    if L.jemalloc() is not None:
        assert p.returncode == 0 and p.stdout.strip() == "True"
    else:
        assert p.returncode == 2 and "PALU_DS_MALLOC=jemalloc but the system has no jemalloc" in p.stderr
    p = _localrun(MAPS, PALU_DS_MALLOC="bogus")
    assert p.returncode == 2 and "error: PALU_DS_MALLOC='bogus': choose jemalloc or system" in p.stderr


def test_free_port_passes_over_a_port_a_stale_shm_buffer_names(monkeypatch):
    """A killed job's /dev/shm all-reduce buffer names its port; free_port takes the next free port instead (CI once
    failed a leak check on a buffer an earlier, killed job had left under the port it drew)."""
    ports = iter([40001, 40002])

    class Sock:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, addr):
            self.port = next(ports)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(L.socket, "socket", Sock)
    monkeypatch.setattr(L, "shm_buffers", lambda port: ["stale"] if port == 40001 else [])
    assert L.free_port() == 40002
