"""How launch scripts end (palu_ds/process.py): the status main gives, SystemExit codes, crashes, flushed output."""
import subprocess
import sys
import textwrap

import pytest

from palu_ds.process import exit_status, refusing
from tests.e2e import ROOT


@pytest.mark.parametrize("code,status", [(None, 0), (0, 0), (3, 3), (143, 143), (True, 1), (False, 0), (256, 0)])
def test_exit_status_matches_sys_exit(code, status):
    assert exit_status(code) == status


def test_refusing_prints_a_refused_input_and_gives_its_status(capsys):
    assert refusing(lambda: 3, ValueError) == 3 and refusing(lambda: None, ValueError) == 0

    def bad():
        raise FileNotFoundError("data/x.jsonl: no such file; pass --data")
    assert refusing(bad, (ValueError, FileNotFoundError), status=1) == 1
    assert capsys.readouterr().err == "error: data/x.jsonl: no such file; pass --data\n"
    with pytest.raises(KeyError):  # not refused input: a crash, with its traceback
        refusing(lambda: {}["k"], ValueError)


def _run(body: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent("""
        import sys, threading, time
        from palu_ds.process import run_main
        def main():
        """) + textwrap.indent(textwrap.dedent(body), "    ") + "\nrun_main(main)\n"
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_run_main_exits_with_main_status_and_flushes_unterminated_output():
    p = _run("""
        sys.stdout.write("no newline, still buffered")
        sys.stderr.write("err too")
        return 7
        """)
    assert p.returncode == 7
    assert p.stdout == "no newline, still buffered" and p.stderr == "err too"


def test_run_main_keeps_systemexit_codes_and_messages():
    assert _run("raise SystemExit(143)").returncode == 143
    p = _run("raise SystemExit('config error: bad key')")
    assert p.returncode == 1 and "config error: bad key" in p.stderr


def test_run_main_prints_the_traceback_of_a_crash_and_exits_1():
    p = _run("raise ValueError('broken shard /x/rank0.safetensors')")
    assert p.returncode == 1
    assert "Traceback" in p.stderr and "ValueError: broken shard /x/rank0.safetensors" in p.stderr


def test_run_main_does_not_wait_for_teardown():
    """A non-daemon thread still running would hold up (or, for C++ threads, abort) a normal interpreter exit."""
    p = _run("""
        threading.Thread(target=time.sleep, args=(120,)).start()
        print("done", flush=True)
        return 0
        """)
    assert p.returncode == 0 and p.stdout == "done\n"
