"""The demo (make demo) runs end to end on a short schedule and reports the NiNo step."""

from __future__ import annotations

import pytest

from golden import ckpt

pytest.importorskip("sklearn")


def test_demo_runs(capsys):
    from nino_fast import demo

    demo.main(["--ckpt", str(ckpt("nino_no_posw.pt")), "--steps", "50", "--k", "5"])
    out = capsys.readouterr().out
    assert "after the NiNo step (k=5" in out and "val loss" in out


def test_demo_missing_checkpoint(tmp_path):
    from nino_fast import demo

    with pytest.raises(SystemExit, match="no NiNo checkpoint"):
        demo.main(["--ckpt", str(tmp_path / "missing.pt")])
