"""The CPU environment of palu_ds.localrun: jemalloc preloaded into the processes it starts (PALU_DS_MALLOC), the
user's own preloads kept, bad settings refused by name."""
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


def test_set_malloc_preloads_jemalloc_in_front_and_respects_the_users_choice(found):
    found("libjemalloc.so.2")
    assert _set() == {"LD_PRELOAD": "libjemalloc.so.2"}
    assert _set(LD_PRELOAD="libfoo.so") == {"LD_PRELOAD": "libjemalloc.so.2:libfoo.so"}
    assert _set(LD_PRELOAD="/opt/lib/libtcmalloc.so.4") == {"LD_PRELOAD": "/opt/lib/libtcmalloc.so.4"}  # theirs
    assert _set(LD_PRELOAD="libjemalloc.so.2") == {"LD_PRELOAD": "libjemalloc.so.2"}  # not twice
    assert _set(PALU_DS_MALLOC="system") == {"PALU_DS_MALLOC": "system"}
    assert _set(PALU_DS_MALLOC="system", LD_PRELOAD="libjemalloc.so.2 libfoo.so")["LD_PRELOAD"] == "libfoo.so"
    assert "LD_PRELOAD" not in _set(PALU_DS_MALLOC="system", LD_PRELOAD="libjemalloc.so.2")  # taken out again
    assert _set(PALU_DS_MALLOC="jemalloc")["LD_PRELOAD"] == "libjemalloc.so.2"
    with pytest.raises(ValueError, match=r"PALU_DS_MALLOC='glibc': choose one of auto, jemalloc, system"):
        _set(PALU_DS_MALLOC="glibc")
    found(None)
    assert _set() == {} and _set(LD_PRELOAD="libfoo.so") == {"LD_PRELOAD": "libfoo.so"}
    env = {"PALU_DS_MALLOC": "jemalloc", "LD_PRELOAD": "libfoo.so"}
    with pytest.raises(ValueError, match=r"PALU_DS_MALLOC=jemalloc but the system has no jemalloc: install it"):
        L.set_malloc(env)
    assert env == {"PALU_DS_MALLOC": "jemalloc", "LD_PRELOAD": "libfoo.so"}


def test_child_environments_carry_it(found, monkeypatch):
    found("libjemalloc.so.2")
    monkeypatch.setenv("LD_PRELOAD", "libfoo.so")
    monkeypatch.delenv("PALU_DS_MALLOC", raising=False)
    assert L.cpu_env()["LD_PRELOAD"] == "libjemalloc.so.2:libfoo.so"
    assert L.cpu_env(PALU_DS_MALLOC="system")["LD_PRELOAD"] == "libfoo.so"
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")  # what setdefaults gave this process: a child can opt out
    assert "LD_PRELOAD" not in L.cpu_env(PALU_DS_MALLOC="system")
    env = {}
    L.setdefaults(env)
    assert env["LD_PRELOAD"] == "libjemalloc.so.2" and env["DS_ACCELERATOR"] == "cpu"


def _localrun(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in L.cpu_env().items() if k not in ("LD_PRELOAD", "PALU_DS_MALLOC")}
    return subprocess.run([sys.executable, "-m", "palu_ds.localrun", sys.executable, "-c", code], cwd=ROOT,
                          env={**full, **env}, capture_output=True, text=True, timeout=120)  # its own choice


def test_localrun_runs_its_command_on_jemalloc_where_the_system_has_it():
    """Through the real launcher: the command's process maps jemalloc iff this machine has it (else a note says
    glibc's malloc is used); PALU_DS_MALLOC=system maps none; a bad value is refused (exit 2) by name."""
    have = L.jemalloc() is not None
    p = _localrun(MAPS)
    assert p.returncode == 0 and p.stdout.strip() == str(have)
    assert ("no jemalloc on this machine" in p.stderr) == (not have)
    p = _localrun(MAPS, PALU_DS_MALLOC="system")
    assert p.returncode == 0 and p.stdout.strip() == "False" and "jemalloc" not in p.stderr
    p = _localrun(MAPS, PALU_DS_MALLOC="bogus")
    assert p.returncode == 2 and "error: PALU_DS_MALLOC='bogus': choose one of auto, jemalloc, system" in p.stderr
