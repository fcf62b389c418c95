"""``nino-fast step``: one NiNo step on torch / safetensors / Hugging Face checkpoints; its errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from nino_fast import NiNoModel, build_graph
from nino_fast.cli import main
from nino_fast.optim import k_schedule

from golden import ckpt

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nino_path():
    return str(ckpt("nino_no_posw.pt"))


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def trajectory(model, n=5):
    """n state dicts on a straight line through parameter space, oldest first; (sds, base, delta)."""
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    delta = {k: 0.01 * torch.randn_like(v) for k, v in base.items()}
    return [{k: base[k] + j * delta[k] for k in base} for j in range(n)], base, delta


def history(sds, names):
    return torch.stack([torch.cat([sd[n].reshape(-1).float() for n in names]) for sd in sds], 1)


def write(tmp_path, sds, fmt):
    """Snapshots step_100 .. step_500 in format ``fmt``."""
    paths = []
    for j, sd in enumerate(sds):
        p = tmp_path / f"step_{100 * (j + 1)}{'.safetensors' if fmt == 'safetensors' else '.pt'}"
        if fmt == "safetensors":
            save_file(sd, str(p), metadata={"format": "pt", "note": "snapshot"})
        else:
            torch.save(sd, p)
        paths.append(str(p))
    return paths


def test_torch_files_linefit_exact(tmp_path, capsys):
    sds, base, delta = trajectory(mlp())
    # an integer buffer: copied from the last snapshot, not predicted
    sds = [{**sd, "bn.num_batches_tracked": torch.tensor(j)} for j, sd in enumerate(sds)]
    paths = write(tmp_path, sds, "pt")
    out = tmp_path / "pred.pt"
    assert main(["step", *paths, "--nino", "linefit", "--k", "2", "--out", str(out)]) == 0
    assert "k=2" in capsys.readouterr().out
    pred = torch.load(out, weights_only=True)
    assert pred.keys() == sds[0].keys() and torch.equal(pred["bn.num_batches_tracked"], torch.tensor(4))
    for name in base:
        torch.testing.assert_close(pred[name], base[name] + 6 * delta[name], rtol=1e-5, atol=1e-6)


def test_torch_files_nino_matches_nowcast(tmp_path, nino_path):
    model = mlp()
    sds, _, _ = trajectory(model)
    nested = [{"state_dict": sd, "epoch": 3} for sd in sds]  # a common wrapper format, kept as is
    paths = write(tmp_path, nested, "pt")
    out = tmp_path / "pred.pt"
    assert main(["step", *paths, "--nino", nino_path, "--k", "7", "--out", str(out)]) == 0
    pred = torch.load(out, weights_only=True)
    assert pred["epoch"] == 3
    names = [n for n, _ in model.named_parameters()]
    expected = NiNoModel.from_checkpoint(nino_path).nowcast(build_graph(model), history(sds, names), 7)
    assert torch.equal(torch.cat([pred["state_dict"][n].reshape(-1) for n in names]), expected)


def test_safetensors_with_schedule(tmp_path, nino_path):
    """k from --period/--max-train-steps at the step parsed from the last name (step_500: the 500th step, i.e.
    schedule index 499 // 100 = 4), bf16 tensors stay bf16, metadata is kept."""
    model = mlp()
    sds, _, _ = trajectory(model)
    sds = [{k: v.to(torch.bfloat16) for k, v in sd.items()} for sd in sds]
    paths = write(tmp_path, sds, "safetensors")
    out = tmp_path / "pred.safetensors"
    argv = [
        "step",
        *paths,
        "--nino",
        nino_path,
        "--period",
        "100",
        "--max-train-steps",
        "1000",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    k = k_schedule(40, 1000, 100)[4]
    assert k == 16
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "snapshot"}
        pred = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
    names = [n for n, _ in model.named_parameters()]
    assert all(pred[n].dtype == torch.bfloat16 for n in names)
    expected = NiNoModel.from_checkpoint(nino_path).nowcast(build_graph(model), history(sds, names), k)
    assert torch.equal(torch.cat([pred[n].reshape(-1) for n in names]), expected.to(torch.bfloat16))


def test_hf_llama_directory(tmp_path, nino_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(cfg)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = {n: 0.01 * torch.randn_like(p) for n, p in base.items()}
    dirs, sds = [], []
    for j in range(5):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n] + j * delta[n])
        d = tmp_path / f"checkpoint-{200 * (j + 1)}"
        model.save_pretrained(d)
        dirs.append(str(d))
        sds.append({n: p.detach().clone() for n, p in model.named_parameters()})
    (Path(dirs[-1]) / "optimizer.pt").write_bytes(b"Trainer state: not copied")
    out = tmp_path / "predicted"
    assert main(["step", *dirs, "--nino", nino_path, "--k", "5", "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "optimizer.pt").exists()
    loaded = transformers.LlamaForCausalLM.from_pretrained(out)
    names = [n for n, _ in model.named_parameters()]
    expected = NiNoModel.from_checkpoint(nino_path).nowcast(build_graph(model), history(sds, names), 5)
    got = torch.cat([p.detach().reshape(-1) for _, p in loaded.named_parameters()])
    assert torch.equal(got, expected)


def test_errors(tmp_path, nino_path, capsys):
    sds, _, _ = trajectory(mlp())
    paths = write(tmp_path, sds, "pt")
    out = str(tmp_path / "pred.pt")

    def error(argv):
        assert main(["step", *argv, "--out", out]) == 2
        return capsys.readouterr().err

    assert "ctx=5 snapshots, got 4" in error([*paths[:4], "--nino", nino_path, "--k", "1"])
    assert "no such file" in error([*paths[:4], str(tmp_path / "step_600.pt"), "--nino", nino_path, "--k", "1"])
    torch.save(sds[1], tmp_path / "iter100.pt")  # shuffled snapshots are sorted; equal step numbers are refused
    dup = [paths[0], str(tmp_path / "iter100.pt"), *paths[2:]]
    assert "the same step number 100" in error([*dup, "--nino", nino_path, "--k", "1"])
    bad = dict(sds[3])
    bad["2.weight"] = torch.zeros(3, 9)
    torch.save(bad, tmp_path / "step_400.pt")
    assert "'2.weight' has shape (3, 9)" in error([*paths, "--nino", nino_path, "--k", "1"])
    torch.save({k: v for k, v in sds[3].items() if k != "2.bias"}, tmp_path / "step_400.pt")
    assert "missing ['2.bias']" in error([*paths, "--nino", nino_path, "--k", "1"])
    torch.save(sds[3], tmp_path / "step_400.pt")
    assert "either --k or --period" in error(
        [*paths, "--nino", nino_path, "--k", "1", "--period", "10", "--max-train-steps", "100"]
    )
    assert "give --k" in error([*paths, "--nino", nino_path])
    renamed = [str(Path(p).rename(tmp_path / f"snap{j}.pt")) for j, p in enumerate(paths)]
    assert "give --step" in error([*renamed, "--nino", nino_path, "--period", "10", "--max-train-steps", "100"])
    assert main(["step", *renamed, "--nino", "linefit", "--k", "1", "--out", renamed[-1]]) == 2
    assert "one of the input snapshots" in capsys.readouterr().err
    assert "NiNoModel" in error([*renamed, "--nino", str(tmp_path / "missing.pt"), "--k", "1"])


def test_console_entry_point(tmp_path):
    sds, base, delta = trajectory(mlp())
    paths = write(tmp_path, sds, "safetensors")
    out = tmp_path / "o.safetensors"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "nino_fast.cli",
            "step",
            *paths,
            "--nino",
            "linefit+",
            "--k",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    with safe_open(str(out), "pt") as f:
        torch.testing.assert_close(f.get_tensor("0.weight"), base["0.weight"] + 5 * delta["0.weight"])


def test_hf_directory_with_bin_and_tied_weights(tmp_path):
    """pytorch_model.bin directories (older transformers) with tied embeddings: the alias ``lm_head.weight``
    receives the prediction of the parameter it is tied to."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert sd["lm_head.weight"].equal(sd["transformer.wte.weight"])
    delta = {k: 0.01 * torch.randn_like(v) if v.is_floating_point() else torch.zeros_like(v) for k, v in sd.items()}
    delta["lm_head.weight"] = delta["transformer.wte.weight"]
    dirs = []
    for j in range(5):
        d = tmp_path / f"checkpoint-{j + 1}"
        cfg.save_pretrained(d)
        torch.save({k: v + j * delta[k] for k, v in sd.items()}, d / "pytorch_model.bin")
        dirs.append(str(d))
    out = tmp_path / "out"
    assert main(["step", *dirs, "--nino", "linefit", "--k", "3", "--out", str(out)]) == 0
    pred = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert (out / "config.json").is_file() and not (out / "model.safetensors").exists()
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "lm_head.weight"):
        torch.testing.assert_close(pred[name], sd[name] + 7 * delta[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "argv, said",
    [
        (["collect", "--out", "{tmp}/s", "--save-every", "0"], "argument --save-every: must be an integer >= 1, got 0"),
        (["collect", "--out", "{tmp}/s", "--max-runs", "-1"], "argument --max-runs: must be an integer >= 0, got -1"),
        (["collect", "--out", "{tmp}/s", "--threads", "0"], "argument --threads: must be an integer >= 1"),
        (["collect", "--out", "{tmp}/file"], "nino-fast collect: error: "),
        (["train", "--data", "{tmp}", "--out", "{tmp}/n.pt", "--batch", "0"], "argument --batch: must be an integer"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/n.pt", "--lr", "nan"], "argument --lr: must be a finite number"),
        (
            ["train", "--data", "{tmp}", "--out", "{tmp}/n.pt", "--backend", "bogus"],
            "--backend 'bogus' is not available",
        ),
        (["metanet", "zoo", "--out", "{tmp}/file"], "nino-fast metanet zoo: error: "),
        (["metanet", "train", "--zoo", "{tmp}", "--out", "{tmp}/m.pt", "--epochs", "0"], "argument --epochs: must be"),
        (["step", "a", "b", "--nino", "linefit", "--out", "o", "--k", "0"], "argument --k: must be an integer >= 1"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, capsys, argv, said):
    """Every subcommand: a bad value is a one-line error with status 2 that names it, never a traceback."""
    (tmp_path / "file").write_text("not a directory")
    argv = [a.format(tmp=tmp_path) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and said in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--period", "33"], "must be a multiple of 5"),
        (["--period", "500", "--steps", "100"], "no NiNo step would happen"),
        (["--steps", "0"], "argument --steps: must be an integer >= 1"),
        (["--lr", "-1"], "argument --lr: must be a finite number > 0"),
        (["--ckpt", "{tmp}/missing.pt", "--steps", "10", "--period", "5", "--seeds", "1"], "no such file"),
    ],
)
def test_demo_bad_options(tmp_path, capsys, argv, said):
    from nino_fast import demo

    argv = [a.format(tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "out")]
    try:
        code = demo.main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and said in capsys.readouterr().err
