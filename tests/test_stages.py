"""The one stage runner of make demo and the benchmarks (palu_ds/stages.py): reuse, failure, checks, console echo."""
import json
import sys

from palu_ds.stages import Stages, log_name


def _writer(path) -> list[str]:
    return [sys.executable, "-c", f"open({str(path)!r}, 'a').write('x'); print('made it')"]


def test_reuses_an_unchanged_stage_and_forgets_a_failed_one(tmp_path):
    """A stage that succeeds returns True, is reused on a rerun with the same command and inputs (with the seconds it
    took when it ran) and rerun when an input changes; a failing stage returns False and leaves no stamp."""
    done, inp = tmp_path / "done.txt", tmp_path / "input.txt"
    inp.write_text("a")
    s = Stages(tmp_path / "out", tag="t")
    assert s.run("make", _writer(done), done=done, inputs=[inp]) is True and done.read_text() == "x"
    again = Stages(tmp_path / "out", tag="t")
    assert again.run("make", _writer(done), done=done, inputs=[inp]) is True and done.read_text() == "x"  # reused
    assert again.seconds["make"] == s.seconds["make"] and again.status["make"] == "reused"
    inp.write_text("bb")  # an input changed: the stage runs again
    assert again.run("make", _writer(done), done=done, inputs=[inp]) is True and done.read_text() == "xx"
    bad = [sys.executable, "-c", "raise SystemExit(3)"]
    assert again.run("fail", bad, done=tmp_path / "never") is False
    assert again.status["fail"] == "FAILED (exit 3)"
    assert not (tmp_path / "out" / "logs" / "fail.cmd.json").exists()
    assert "raise SystemExit(3)" in (tmp_path / "out" / "logs" / "fail.log").read_text()
    fresh = Stages(tmp_path / "out", fresh=True)  # fresh: runs even what is unchanged
    assert fresh.run("make", _writer(done), done=done, inputs=[inp]) is True and done.read_text() == "xxx"


def test_a_shared_stage_is_reused_by_a_command_that_differs_only_where_it_does_not_decide(tmp_path):
    """``decides``: a stage several commands share (a reference cache made by whichever method of its key comes first)
    is reused -- not rewritten under the stages that read it -- by a command whose deciding part is the same, and
    rerun when that part or an input differs (the efficacy protocol's palu and palu_pd rewrote one cache in turn)."""
    done, inp = tmp_path / "done.txt", tmp_path / "input.txt"
    inp.write_text("a")
    decides = lambda cmd: [a for a in cmd if not a.startswith("method.")]  # noqa: E731
    s = Stages(tmp_path / "out")
    assert s.run("ref", _writer(done) + ["method.name=palu"], done=done, inputs=[inp], decides=decides)
    mtime = done.stat().st_mtime_ns
    assert s.run("ref", _writer(done) + ["method.name=palu_pd"], done=done, inputs=[inp], decides=decides)
    assert s.status["ref"] == "reused" and done.read_text() == "x" and done.stat().st_mtime_ns == mtime
    assert s.run("ref", _writer(done) + ["method.name=palu_pd"], done=done, inputs=[inp])  # whole command: rerun
    assert s.status["ref"] == "ok" and done.read_text() == "xx"
    assert s.run("ref", _writer(done) + ["method.name=palu", "K=50"], done=done, inputs=[inp], decides=decides)
    assert s.status["ref"] == "ok" and done.read_text() == "xxx"  # a deciding part differs
    inp.write_text("b")
    assert s.run("ref", _writer(done) + ["method.name=npo", "K=50"], done=done, inputs=[inp], decides=decides)
    assert s.status["ref"] == "ok" and done.read_text() == "xxxx"  # an input changed


def test_check_judges_a_stage_after_exit_0(tmp_path):
    """``check`` returns the stage's status or fails it with its AssertionError; a failed check leaves no stamp, so
    a rerun does the stage again; a stage without ``done`` is never reused."""
    done = tmp_path / "done.txt"
    s = Stages(tmp_path / "out")

    def bad():
        raise AssertionError("weights differ")

    assert s.run("a stage/with spaces", _writer(done), done=done, check=bad) is False
    assert s.status["a stage/with spaces"] == "FAILED: weights differ"
    log = s.log("a stage/with spaces")
    assert log == tmp_path / "out" / "logs" / "a_stage-with_spaces.log" and log_name("a stage/with spaces") in log.name
    assert "made it" in log.read_text()
    assert s.run("a stage/with spaces", _writer(done), done=done, check=lambda: "bit-identical") is True
    assert s.status["a stage/with spaces"] == "bit-identical" and done.read_text() == "xx"
    assert s.run("no done file", _writer(done)) is True and s.run("no done file", _writer(done)) is True
    assert done.read_text() == "xxxx"


def test_echo_streams_the_output_to_the_console_and_the_log(tmp_path, capsys):
    s = Stages(tmp_path / "out", echo=True, cwd=tmp_path)
    assert s.run("say", [sys.executable, "-c", "import os; print('hello from', os.getcwd())"]) is True
    out = capsys.readouterr().out
    assert f"hello from {tmp_path}" in out and "=== say done in" in out
    assert f"hello from {tmp_path}" in (tmp_path / "out" / "logs" / "say.log").read_text()


def test_write_results_writes_json_and_table_and_prints(tmp_path, capsys):
    from benchmarks.output import write_results

    write_results(tmp_path, {"tokens_per_s": 12.5}, "| a |\n|---|")
    assert json.loads((tmp_path / "results.json").read_text()) == {"tokens_per_s": 12.5}
    assert (tmp_path / "table.md").read_text() == "| a |\n|---|\n" and "| a |" in capsys.readouterr().out
    (tmp_path / "only").mkdir()
    write_results(tmp_path / "only", {"x": 1})  # no table: results.json alone
    assert not (tmp_path / "only" / "table.md").exists() and (tmp_path / "only" / "results.json").exists()
