"""The demo (make demo) runs end to end on a short schedule, reports steps to target and writes its outputs."""

from __future__ import annotations

import json

import pytest

from golden import ckpt

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_demo_runs(capsys, tmp_path):
    from nino_fast import demo

    out = tmp_path / "out"
    argv = ["--ckpt", str(ckpt("nino_no_posw.pt")), "--seeds", "1", "--steps", "200", "--period", "50"]
    assert demo.main(argv + ["--eval-every", "10", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "predictor: NiNo (nino_no_posw.pt)" in text and "seed 0: target" in text
    res = json.loads((out / "demo_results.json").read_text())
    (row,) = res["seeds"]
    assert row["steps_adamw"] is not None and row["steps_adamw"] <= 200
    assert row["nino_steps_time"] > 0  # NiNo steps did run (200 / 50 = 4 of them)
    assert (out / "demo_loss.png").stat().st_size > 1000


def test_demo_bundled_fallback(capsys, tmp_path, monkeypatch):
    """Without the official checkpoint the demo says so and uses our bundled one."""
    from nino_fast import demo

    monkeypatch.setattr(demo, "DEFAULT_CKPT", tmp_path / "missing.pt")
    argv = ["--seeds", "1", "--steps", "100", "--period", "50", "--out", str(tmp_path / "o")]
    assert demo.main(argv) == 0
    text = capsys.readouterr().out
    assert "bundled checkpoint" in text and "predictor: NiNo (nino_fast_small.pt)" in text


def test_demo_linefit_fallback(capsys, tmp_path, monkeypatch):
    """Without any NiNo checkpoint the demo says so and uses Linefit+."""
    from nino_fast import demo

    monkeypatch.setattr(demo, "DEFAULT_CKPT", tmp_path / "missing.pt")
    monkeypatch.setattr(demo, "BUNDLED_CKPT", tmp_path / "missing_too.pt")
    argv = ["--seeds", "1", "--steps", "100", "--period", "50", "--out", str(tmp_path / "o")]
    assert demo.main(argv) == 0
    text = capsys.readouterr().out
    assert "using the Linefit+ baseline" in text and "predictor: Linefit+" in text


def test_demo_missing_checkpoint(tmp_path):
    from nino_fast import demo

    with pytest.raises((SystemExit, FileNotFoundError, ValueError)):
        demo.main(["--ckpt", str(tmp_path / "missing.pt"), "--seeds", "1", "--steps", "10"])


def test_demo_lm_task_runs_with_the_bundled_language_model_checkpoint(capsys, tmp_path):
    """``python -m nino_fast.demo --task lm``: a character-level GPT-2, AdamW vs AdamW + NiNo with the checkpoint
    the wrapper picks for transformers; its own outputs beside the ConvNet demo's."""
    from nino_fast import demo

    out = tmp_path / "out"
    argv = ["--task", "lm", "--seeds", "1", "--steps", "100", "--period", "50", "--eval-every", "10"]
    assert demo.main(argv + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "predictor: NiNo (nino_fast_lm.pt)" in text and "character-level GPT-2" in text
    res = json.loads((out / "demo_lm_results.json").read_text())
    (row,) = res["seeds"]
    assert res["args"]["lr"] == 1e-3 and row["final_acc_adamw"] is None
    assert row["steps_adamw"] is not None and row["final_loss_nino"] < 4.0  # learned: ln(96) = 4.56 at the start
    assert row["nino_steps_time"] > 0
    assert (out / "demo_lm_loss.png").stat().st_size > 1000 and not (out / "demo_loss.png").exists()
