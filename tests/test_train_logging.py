"""The training progress written to a file (not a terminal): one plain line per step with count and ETA."""

from __future__ import annotations

from rexrag.train.logging import MetricsLogger, plain_progress_line, read_metrics


def test_plain_progress_line_extrapolates_the_eta_from_steps_done_since_start():
    # resumed at step 4 of 10, 2 steps done in 60 s -> 4 steps left at 30 s each
    line = plain_progress_line(6, 10, 4, started=100.0, now=160.0, info="reward=0.5")
    assert line == "train 6/10  eta 0:02:00  reward=0.5"
    assert plain_progress_line(4, 10, 4, started=0.0, now=1.0, info="") == "train 4/10  eta ?"


def test_progress_to_a_file_prints_one_line_per_step(tmp_path, capsys):
    log = MetricsLogger(tmp_path, tensorboard=False, total_steps=3, progress=True)  # pytest's stdout is no terminal
    for step in (1, 2, 3):
        log.log(step, {"reward/mean": 0.25 * step})
    log.close()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("train ")]
    assert [ln.split()[1] for ln in lines] == ["1/3", "2/3", "3/3"]
    assert "eta 0:00:00" in lines[-1] and "mean=0.75" in lines[-1]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
