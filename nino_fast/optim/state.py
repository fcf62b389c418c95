"""Checks of a saved NiNo optimizer state, made in full before anything is loaded (all or nothing)."""

from __future__ import annotations

from .schedule import check_int

WHERE = "NiNo.load_state_dict"
REQUIRED = ("step_idx", "num_snapshots", "snapshots", "num_params", "ctx")


def check_nino_state(saved, nino) -> tuple[int, int, object]:
    """(step_idx, num_snapshots, snapshots) of a ``nino.nino_state_dict()``-like dict, checked against the
    wrapper ``nino`` (counts, ctx, period, the model's fingerprint, snapshot shapes and values); raises
    ValueError naming the first problem."""
    if not isinstance(saved, dict):
        raise ValueError(f"{WHERE}: the NiNo state must be a dict, got {type(saved).__name__}")
    missing = [k for k in REQUIRED if k not in saved]
    if missing:
        raise ValueError(f"{WHERE}: missing key {missing[0]!r} (not a NiNo state_dict?)")
    got = (check_int(WHERE, "num_params", saved["num_params"], 0), check_int(WHERE, "ctx", saved["ctx"], 0))
    if got != (nino.num_params, nino.ctx):
        raise ValueError(
            f"{WHERE}: saved for {got[0]} parameters and ctx={got[1]}, this wrapper has {nino.num_params} and "
            f"ctx={nino.ctx}"
        )
    if (
        "period" in saved
        and nino.predictor is not None
        and check_int(WHERE, "period", saved["period"], 1) != nino.period
    ):
        raise ValueError(f"{WHERE}: saved with period={saved['period']}, this wrapper has period={nino.period}")
    if saved.get("fingerprint") not in (None, nino.fingerprint):
        raise ValueError(
            f"{WHERE}: saved for another model (fingerprint {saved['fingerprint']}, this model's parameters give "
            f"{nino.fingerprint})"
        )
    step_idx = check_int(WHERE, "step_idx", saved["step_idx"], 0)
    # a window never rests full: ctx kept snapshots would be a state saved in the middle of a NiNo step
    count = check_int(WHERE, "num_snapshots", saved["num_snapshots"], 0, max(nino.ctx - 1, 0))
    if nino.interval and count > step_idx // nino.interval:
        raise ValueError(f"{WHERE}: {count} snapshots cannot have been taken in {step_idx} steps")
    if count:
        nino.snapshots.check(count, saved["snapshots"], WHERE)
    return step_idx, count, saved["snapshots"] if count else None


def check_base_groups(param_groups: list[dict], base) -> None:
    """The checks ``torch.optim.Optimizer.load_state_dict`` makes, made before the NiNo part is applied."""
    if not isinstance(base, dict) or not isinstance(base.get("param_groups"), list) or "state" not in base:
        raise ValueError(f"{WHERE}: the base optimizer's part needs 'state' and 'param_groups'")
    sizes = [len(g["params"]) for g in param_groups]
    saved = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in base["param_groups"]]
    if sizes != saved:
        raise ValueError(f"{WHERE}: parameter groups of sizes {saved} saved, the optimizer has {sizes}")
