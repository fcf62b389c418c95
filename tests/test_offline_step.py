"""``nino-fast step`` on sharded checkpoints, snapshot ordering, atomic and safe writes, tied parameters,
parameter order of safetensors files, and the exit status / message of user errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from nino_fast import NiNoModel, build_graph
from nino_fast.cli import main

from golden import ckpt

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nino_path():
    return str(ckpt("nino_no_posw.pt"))


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


class Twisted(nn.Module):
    """Modules registered out of alphabetical order: ``fc_b`` (6 -> 8) runs before ``fc_a`` (8 -> 3)."""

    def __init__(self):
        super().__init__()
        self.fc_b = nn.Linear(6, 8)
        self.fc_a = nn.Linear(8, 3)


def history(sds, names):
    return torch.stack([torch.cat([sd[n].reshape(-1).float() for n in names]) for sd in sds], 1)


def walk(model, n=5):
    """Yield j = 0..n-1 with ``model``'s parameters set to ``base + j * delta`` (a straight line)."""
    base = {k: p.detach().clone() for k, p in model.named_parameters()}
    delta = {k: 0.01 * torch.randn_like(p) for k, p in base.items()}
    for j in range(n):
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(base[k] + j * delta[k])
        yield j


def save_torch_series(model, folder: Path, stem="step_", every=100):
    """Torch state dicts of a 5-point trajectory; (paths, state dicts as saved)."""
    folder.mkdir(exist_ok=True)
    paths, sds = [], []
    for j in walk(model):
        p = folder / f"{stem}{every * (j + 1)}.pt"
        torch.save(model.state_dict(), p)
        paths.append(str(p))
        sds.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return paths, sds


def llama(tie=False):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg)


def nino_expected(nino_path, model, sds, k):
    names = [n for n, _ in model.named_parameters()]
    return names, NiNoModel.from_checkpoint(nino_path).nowcast(build_graph(model), history(sds, names), k)


def read_safetensors(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    """Five sharded HF directories (tied Llama, several model-0000i-of-0000N.safetensors shards)."""
    torch.manual_seed(0)
    model = llama(tie=True)
    root = tmp_path_factory.mktemp("sharded")
    dirs, sds = [], []
    for j in walk(model):
        d = root / f"checkpoint-{200 * (j + 1)}"
        model.save_pretrained(d, max_shard_size="4KB")
        dirs.append(d)
        sds.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert len(json.loads((dirs[0] / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(dirs[0].glob("model-*-of-*.safetensors"))) > 2
    return model, dirs, sds


# ------------------------------------------------------------------------------------- 1. sharded checkpoints


def test_sharded_safetensors_hf_directory(sharded_llama, nino_path, tmp_path):
    """Same shard files and index as the input; the tied model's prediction equals the in-memory NiNo step."""
    transformers = pytest.importorskip("transformers")
    model, dirs, sds = sharded_llama
    (dirs[-1] / "optimizer.pt").write_bytes(b"Trainer state: not copied")
    out = tmp_path / "predicted"  # an earlier prediction: replaced as a whole
    out.mkdir()
    (out / "model-00001-of-00009.safetensors").write_bytes(b"stale shard")
    assert main(["step", *map(str, dirs), "--nino", nino_path, "--k", "5", "--out", str(out)]) == 0
    last = dirs[-1]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in last.iterdir() if p.name != "optimizer.pt")
    index = "model.safetensors.index.json"
    assert json.loads((out / index).read_text()) == json.loads((last / index).read_text())
    for shard in last.glob("model-*.safetensors"):
        assert read_safetensors(out / shard.name).keys() == read_safetensors(shard).keys()
    loaded = transformers.LlamaForCausalLM.from_pretrained(out)
    names, expected = nino_expected(nino_path, model, sds, 5)
    got = torch.cat([p.detach().reshape(-1) for _, p in loaded.named_parameters()])
    assert [n for n, _ in loaded.named_parameters()] == names
    assert torch.equal(got, expected)


def test_sharded_bin_hf_directory_memory_mapped(tmp_path, monkeypatch):
    """pytorch_model.bin.index.json + shards: read with torch.load(mmap=True), written with the same shard
    names and contents; a tie across shards (from the config) gets one prediction; no shard holds a storage
    larger than its own tensors (never the whole prediction per shard)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    delta = {k: 0.01 * torch.randn_like(v) if v.is_floating_point() else torch.zeros_like(v) for k, v in sd.items()}
    delta["lm_head.weight"] = delta["transformer.wte.weight"]
    names = list(sd)
    chunks = [names[: len(names) // 3], names[len(names) // 3 : -1], names[-1:]]  # lm_head alone, last
    shard_names = [f"pytorch_model-0000{i + 1}-of-00003.bin" for i in range(3)]
    weight_map = {n: s for s, chunk in zip(shard_names, chunks, strict=True) for n in chunk}
    dirs = []
    for j in range(5):
        d = tmp_path / f"checkpoint-{j + 1}"
        cfg.save_pretrained(d)
        for s, chunk in zip(shard_names, chunks, strict=True):
            torch.save({n: sd[n] + j * delta[n] for n in chunk}, d / s)
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        dirs.append(str(d))
    calls = []
    real_load = torch.load

    def spy(f, *args, **kwargs):
        calls.append((Path(f).name, kwargs.get("mmap")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    out = tmp_path / "out"
    assert main(["step", *dirs, "--nino", "linefit", "--k", "3", "--out", str(out)]) == 0
    monkeypatch.setattr(torch, "load", real_load)
    assert {c for c in calls if c[0].startswith("pytorch_model")} == {(s, True) for s in shard_names}
    index = "pytorch_model.bin.index.json"
    assert (out / index).read_text() == (Path(dirs[-1]) / index).read_text()
    for s, chunk in zip(shard_names, chunks, strict=True):
        pred = torch.load(out / s, weights_only=True)
        assert list(pred) == chunk
        for n, t in pred.items():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
            if t.is_floating_point():
                torch.testing.assert_close(t, sd[n] + 7 * delta[n], rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(t, sd[n] + 4 * delta[n])


def test_bare_sharded_index_files(sharded_llama, nino_path, tmp_path):
    """``.../model.safetensors.index.json`` paths (given newest first): the output directory gets the index and
    the shards only, equal to the directory route's (the order comes from the config.json beside the index)."""
    _, dirs, _ = sharded_llama
    out_dir, out_idx = tmp_path / "from_dirs", tmp_path / "from_index"
    assert main(["step", *map(str, dirs), "--nino", nino_path, "--k", "4", "--out", str(out_dir)]) == 0
    index = "model.safetensors.index.json"
    idx_paths = [str(d / index) for d in reversed(dirs)]
    assert main(["step", *idx_paths, "--nino", nino_path, "--k", "4", "--out", str(out_idx)]) == 0
    shards = sorted(p.name for p in dirs[-1].glob("model-*.safetensors"))
    assert sorted(p.name for p in out_idx.iterdir()) == sorted([index, *shards])
    for s in shards:
        a, b = read_safetensors(out_dir / s), read_safetensors(out_idx / s)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# ------------------------------------------------------------------------------------- 2. snapshot ordering


def test_glob_order_sorted_by_step(tmp_path, caplog):
    """A shell glob lists checkpoint-1000 before checkpoint-200: the snapshots are sorted by step number (logged
    at INFO) and the prediction is that of the sorted series."""
    torch.manual_seed(2)
    model = mlp()
    paths, sds = save_torch_series(model, tmp_path, stem="checkpoint-", every=200)
    globbed = sorted(paths)
    assert Path(globbed[0]).name == "checkpoint-1000.pt"
    out = tmp_path / "pred.pt"
    caplog.set_level(logging.INFO, logger="nino_fast.offline")
    assert main(["step", *globbed, "--nino", "linefit", "--k", "2", "--out", str(out)]) == 0
    assert "reordered by step number" in caplog.text
    pred = torch.load(out, weights_only=True)
    for n in sds[0]:
        expected = sds[4][n] + 2 * (sds[4][n] - sds[3][n])
        torch.testing.assert_close(pred[n], expected, rtol=1e-5, atol=1e-6)


def test_order_kept_without_step_numbers(tmp_path, caplog):
    """When a name has no step number, the given order is the training order (documented)."""
    torch.manual_seed(3)
    model = mlp()
    paths, sds = save_torch_series(model, tmp_path)
    named = [str(Path(p).rename(tmp_path / f"{'edcba'[j]}.pt")) for j, p in enumerate(paths)]  # e.pt is oldest
    out = tmp_path / "pred.pt"
    caplog.set_level(logging.INFO, logger="nino_fast.offline")
    assert main(["step", *named, "--nino", "linefit", "--k", "1", "--out", str(out)]) == 0
    assert "reordered" not in caplog.text
    pred = torch.load(out, weights_only=True)
    torch.testing.assert_close(pred["0.weight"], 2 * sds[4]["0.weight"] - sds[3]["0.weight"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- 3. atomic and safe writes


def test_out_hard_link_to_input_refused(tmp_path, capsys):
    torch.manual_seed(4)
    paths, _ = save_torch_series(mlp(), tmp_path)
    link = tmp_path / "pred.pt"
    os.link(paths[-1], link)
    before = Path(paths[-1]).read_bytes()
    assert main(["step", *paths, "--nino", "linefit", "--k", "1", "--out", str(link)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "same file as the input" in err
    assert Path(paths[-1]).read_bytes() == before


def test_out_directory_holding_or_being_an_input_refused(tmp_path, capsys):
    """An HF output directory that is an input directory (here through a symlink), or that holds the inputs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    runs = tmp_path / "runs"
    dirs = []
    for j in walk(model):
        d = runs / f"checkpoint-{j + 1}"
        cfg.save_pretrained(d)
        torch.save(model.state_dict(), d / "pytorch_model.bin")
        dirs.append(str(d))
    (tmp_path / "alias").symlink_to(dirs[-1], target_is_directory=True)
    (runs / "config.json").write_text("{}")  # looks like a model directory: only the input check protects it
    for out, message in ((tmp_path / "alias", "same file as the input"), (runs, "holds the input")):
        assert main(["step", *dirs, "--nino", "linefit", "--k", "1", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert all((Path(d) / "pytorch_model.bin").is_file() for d in dirs)


def _fail_after_partial_write(path, *args, **kwargs):
    Path(path).write_bytes(b"partial")
    raise OSError(28, "No space left on device")


def test_failed_write_leaves_existing_out_file_untouched(tmp_path, capsys, monkeypatch):
    torch.manual_seed(6)
    paths, _ = save_torch_series(mlp(), tmp_path)
    out = tmp_path / "pred.pt"
    out.write_bytes(b"previous prediction")
    listing = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **kw: _fail_after_partial_write(f))
    assert main(["step", *paths, "--nino", "linefit", "--k", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "No space left" in err
    assert out.read_bytes() == b"previous prediction"
    assert sorted(os.listdir(tmp_path)) == listing  # no temporary file left behind


def test_failed_write_leaves_existing_out_directory_untouched(sharded_llama, nino_path, tmp_path, monkeypatch, capsys):
    _, dirs, _ = sharded_llama
    out = tmp_path / "predicted"
    out.mkdir()
    (out / "config.json").write_text('{"previous": true}')
    monkeypatch.setattr(safetensors.torch, "save_file", lambda t, f, *a, **kw: _fail_after_partial_write(f))
    assert main(["step", *map(str, dirs), "--nino", "linefit", "--k", "1", "--out", str(out)]) == 2
    assert "No space left" in capsys.readouterr().err
    assert os.listdir(out) == ["config.json"] and (out / "config.json").read_text() == '{"previous": true}'
    assert os.listdir(tmp_path) == ["predicted"]


# ------------------------------------------------------------------------------------- 4. tied parameters


def test_kernels_wider_than_the_checkpoint_keep_their_values(tmp_path, nino_path, caplog):
    """A 5x5 conv (25 values per edge, the checkpoint holds 9): the other tensors are predicted as the wrapper
    predicts them, the conv is written as in the last snapshot, and a warning says so (before any file is read)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 3))
    paths, sds = save_torch_series(model, tmp_path)
    out = tmp_path / "pred.pt"
    with caplog.at_level(logging.WARNING):
        assert main(["step", *paths, "--nino", nino_path, "--k", "5", "--out", str(out)]) == 0
    assert "'0.weight'" in caplog.text and "not predicted" in caplog.text
    pred = torch.load(out, weights_only=True)
    assert torch.equal(pred["0.weight"], sds[-1]["0.weight"])
    names = [n for n, _ in model.named_parameters() if n != "0.weight"]
    graph = build_graph([(n, tuple(sds[0][n].shape)) for n in names])
    expected = NiNoModel.from_checkpoint(nino_path).nowcast(graph, history(sds, names), 5)
    assert torch.equal(torch.cat([pred[n].reshape(-1) for n in names]), expected)


def test_hf_directory_with_legacy_names(tmp_path, nino_path):
    """save_pretrained may store a model's legacy tensor names (transformers 5 writes GPT-NeoX's head as
    ``embed_out``): read as the parameters they load into, predicted as the in-memory model is, written back under
    the stored names (the output loads with from_pretrained)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    cfg = transformers.GPTNeoXConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=40
    )
    model = transformers.GPTNeoXForCausalLM(cfg)
    paths, sds = [], []
    for j in walk(model):
        model.save_pretrained(tmp_path / f"step_{j + 1}")
        paths.append(str(tmp_path / f"step_{j + 1}"))
        sds.append({n: p.detach().clone() for n, p in model.named_parameters()})
    out = tmp_path / "pred"
    assert main(["step", *paths, "--nino", nino_path, "--k", "5", "--out", str(out)]) == 0
    loaded = transformers.GPTNeoXForCausalLM.from_pretrained(out)
    names, expected = nino_expected(nino_path, model, sds, 5)
    got = dict(loaded.named_parameters())
    assert torch.equal(torch.cat([got[n].detach().reshape(-1) for n in names]), expected)


def test_tied_llama_torch_state_dict(tmp_path, nino_path):
    """A tied Llama saved with torch.save(model.state_dict()): one parameter in the graph (the HF model's), the
    one prediction written to both names, which stay one storage."""
    torch.manual_seed(7)
    model = llama(tie=True)
    paths, _ = save_torch_series(model, tmp_path)
    loaded = torch.load(paths[0], weights_only=True)
    emb, head = "model.embed_tokens.weight", "lm_head.weight"
    assert loaded[head].untyped_storage().data_ptr() == loaded[emb].untyped_storage().data_ptr()
    sds = [torch.load(p, weights_only=True) for p in paths]
    out = tmp_path / "pred.pt"
    argv = ["--nino", nino_path, "--k", "5", "--arch", "llama", "--num-heads", "4", "--num-kv-heads", "2"]
    assert main(["step", *paths, *argv, "--out", str(out)]) == 0
    pred = torch.load(out, weights_only=True)
    names, expected = nino_expected(nino_path, model, sds, 5)
    assert torch.equal(torch.cat([pred[n].reshape(-1) for n in names]), expected)
    assert pred[head].untyped_storage().data_ptr() == pred[emb].untyped_storage().data_ptr()
    assert torch.equal(pred[head], pred[emb])


def test_tied_llama_safetensors_with_config(tmp_path, nino_path, capsys):
    """Plain safetensors keep no alias (both names stored): the ties, order and heads come from --config."""
    torch.manual_seed(8)
    model = llama(tie=True)
    model.config.save_pretrained(tmp_path / "cfg")
    paths, sds = [], []
    for j in walk(model):
        p = tmp_path / f"step_{j + 1}.safetensors"
        save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(p))
        paths.append(str(p))
        sds.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    out = tmp_path / "pred.safetensors"
    assert main(["step", *paths, "--nino", nino_path, "--k", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and "--order-from" in err
    argv = ["--nino", nino_path, "--k", "5", "--config", str(tmp_path / "cfg" / "config.json")]
    assert main(["step", *paths, *argv, "--out", str(out)]) == 0
    pred = read_safetensors(out)
    names, expected = nino_expected(nino_path, model, sds, 5)
    assert torch.equal(torch.cat([pred[n].reshape(-1) for n in names]), expected)
    assert torch.equal(pred["lm_head.weight"], pred["model.embed_tokens.weight"])


def test_tied_llama_safetensors_alias_only(tmp_path, nino_path):
    """safetensors' save_model keeps one name of a tie (here lm_head.weight): the parameter is still predicted
    once, under the model's name, with --config or --order-from a torch state dict of the model."""
    torch.manual_seed(12)
    model = llama(tie=True)
    model.config.save_pretrained(tmp_path / "cfg")
    paths, sds = [], []
    for j in walk(model):
        paths.append(str(tmp_path / f"step_{j + 1}.safetensors"))
        safetensors.torch.save_model(model, paths[-1])
        sds.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    torch.save(model.state_dict(), tmp_path / "order.pt")
    stored = read_safetensors(paths[-1]).keys()
    assert ("lm_head.weight" in stored) != ("model.embed_tokens.weight" in stored)
    names, expected = nino_expected(nino_path, model, sds, 5)
    heads = ["--arch", "llama", "--num-heads", "4", "--num-kv-heads", "2"]
    for extra in (["--config", str(tmp_path / "cfg")], ["--order-from", str(tmp_path / "order.pt"), *heads]):
        out = tmp_path / "pred.safetensors"
        assert main(["step", *paths, "--nino", nino_path, "--k", "5", "--out", str(out), *extra]) == 0
        pred = read_safetensors(out)
        assert pred.keys() == stored
        got = torch.cat([pred[n if n in pred else "lm_head.weight"].reshape(-1) for n in names])
        assert torch.equal(got, expected)


# ------------------------------------------------------------------------- 5. order of safetensors parameters


def test_safetensors_order_refused_unless_given(tmp_path, nino_path, capsys):
    """Modules out of alphabetical order: the plain .safetensors is refused (no silently different graph); with
    --order-from (torch file or name list) or a nino_fast_order metadata entry it equals the .pt prediction."""
    torch.manual_seed(9)
    model = Twisted()
    pt_paths, sds = save_torch_series(model, tmp_path / "pt")
    order = [n for n, _ in model.named_parameters()]
    st_dir = tmp_path / "st"
    st_dir.mkdir()
    plain, tagged = [], []
    for j, sd in enumerate(sds):
        plain.append(str(st_dir / f"step_{100 * (j + 1)}.safetensors"))
        save_file(sd, plain[-1])
        tagged.append(str(st_dir / f"tagged_step_{100 * (j + 1)}.safetensors"))
        save_file(sd, tagged[-1], metadata={"nino_fast_order": json.dumps(order)})
    names_txt = tmp_path / "names.txt"
    names_txt.write_text("# model order\n" + "\n".join(order) + "\n")

    def run(paths, *extra):
        out = tmp_path / "pred.safetensors"
        rc = main(["step", *paths, "--nino", nino_path, "--k", "3", "--out", str(out), *extra])
        return rc, (read_safetensors(out) if rc == 0 else capsys.readouterr().err)

    rc, err = run(plain)
    assert rc == 2 and "fc_a.bias" in err and "--config" in err and "--order-from" in err
    assert main(["step", *pt_paths, "--nino", nino_path, "--k", "3", "--out", str(tmp_path / "pred.pt")]) == 0
    reference = torch.load(tmp_path / "pred.pt", weights_only=True)
    given = ((plain, ["--order-from", pt_paths[-1]]), (plain, ["--order-from", str(names_txt)]), (tagged, []))
    for paths, extra in given:
        rc, pred = run(paths, *extra)
        assert rc == 0
        assert all(torch.equal(pred[n], reference[n]) for n in order)
    names_txt.write_text("\n".join(order[:3]))
    rc, err = run(plain, "--order-from", str(names_txt))
    assert rc == 2 and "missing from the order" in err and "fc_a.bias" in err


def test_sequential_safetensors_refused_for_transformer_arch(tmp_path, capsys):
    torch.manual_seed(10)
    _, sds = save_torch_series(mlp(), tmp_path / "pt")
    paths = []
    for j, sd in enumerate(sds):
        paths.append(str(tmp_path / f"step_{j + 1}.safetensors"))
        save_file(sd, paths[-1])
    argv = ["--nino", "linefit", "--k", "1", "--arch", "llama", "--num-heads", "2", "--out", str(tmp_path / "o.st")]
    assert main(["step", *paths, *argv]) == 2
    assert "--arch llama" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- 6. user errors: exit 2


@pytest.fixture
def series(tmp_path):
    torch.manual_seed(11)
    paths, _ = save_torch_series(mlp(), tmp_path)
    return paths


def _error(capsys, argv):
    assert main(["step", *argv]) == 2
    err = capsys.readouterr().err
    assert "error: " in err
    return err


def test_mixed_formats_said_first(series, tmp_path, capsys):
    """A directory among torch files: the error names the mixed formats (not what --out should be)."""
    folder = tmp_path / "step_600"
    folder.mkdir()
    safetensors.torch.save_file(
        {n: t.contiguous() for n, t in torch.load(series[-1]).items()}, folder / "model.safetensors"
    )
    (folder / "config.json").write_text("{}")
    err = _error(capsys, [*series[1:], str(folder), "--nino", "linefit", "--k", "1", "--out", str(tmp_path / "o")])
    assert "the snapshots mix formats" in err


def test_transformer_names_without_config_warn(tmp_path, nino_path, caplog):
    torch.manual_seed(7)
    paths, _ = save_torch_series(llama(), tmp_path)
    with caplog.at_level(logging.WARNING):
        assert main(["step", *paths, "--nino", nino_path, "--k", "5", "--out", str(tmp_path / "p.pt")]) == 0
    assert "look like a transformer's" in caplog.text and "--arch" in caplog.text
    caplog.clear()
    argv = ["--arch", "llama", "--num-heads", "4", "--num-kv-heads", "2", "--out", str(tmp_path / "q.pt")]
    with caplog.at_level(logging.WARNING):
        assert main(["step", *paths, "--nino", nino_path, "--k", "5", *argv]) == 0
    assert "look like a transformer's" not in caplog.text


def test_bad_exclude_regex(series, tmp_path, capsys):
    err = _error(capsys, [*series, "--nino", "linefit", "--k", "1", "--exclude", "(", "--out", str(tmp_path / "o.pt")])
    assert "--exclude '('" in err and "regular expression" in err


@pytest.mark.parametrize("device", ["foo", "cuda:99"])
def test_bad_device(series, tmp_path, nino_path, capsys, device):
    argv = [*series, "--nino", nino_path, "--k", "1", "--device", device, "--out", str(tmp_path / "o.pt")]
    err = _error(capsys, argv)
    assert f"--device {device!r}" in err


@pytest.mark.parametrize("where", ["missing_parent", "parent_is_file"])
def test_unwritable_out(series, tmp_path, capsys, where):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / ("missing" if where == "missing_parent" else "a_file") / "pred.pt"
    err = _error(capsys, [*series, "--nino", "linefit", "--k", "1", "--out", str(out)])
    assert f"--out {out}" in err and "does not exist" in err
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_out_in_read_only_directory(series, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        err = _error(capsys, [*series, "--nino", "linefit", "--k", "1", "--out", str(ro / "pred.pt")])
    finally:
        ro.chmod(0o755)
    assert "no write permission" in err


def test_missing_files_and_conflicting_order_options(series, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o.pt")]
    base = [*series, "--nino", "linefit", "--k", "1", *out]
    missing = [*series[:4], str(tmp_path / "nope.pt")]
    assert "no such file" in _error(capsys, [*missing, "--nino", "linefit", "--k", "1", *out])
    assert "--order-from" in _error(capsys, [*base, "--order-from", str(tmp_path / "nope.txt")])
    assert str(tmp_path / "nope") in _error(capsys, [*base, "--config", str(tmp_path / "nope")])
    cfg = tmp_path / "config.json"
    cfg.write_text("{}")
    assert "give one of them" in _error(capsys, [*base, "--config", str(cfg), "--order-from", series[-1]])


@pytest.mark.parametrize(("option", "value"), [("--exclude", "("), ("--device", "foo")])
def test_errors_from_the_console_have_no_traceback(series, tmp_path, option, value):
    argv = [*series, "--nino", "linefit", "--k", "1", option, value, "--out", str(tmp_path / "o.pt")]
    res = subprocess.run(
        [sys.executable, "-m", "nino_fast.cli", "step", *argv], capture_output=True, text=True, cwd=REPO
    )
    assert res.returncode == 2
    assert "error: " in res.stderr and option in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------------------ 6. the history read from disk


def _files_equal(a: Path, b: Path) -> None:
    for f in sorted(a.rglob("*")):
        if f.is_file():
            assert f.read_bytes() == (b / f.relative_to(a)).read_bytes(), f


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_history_from_disk_equals_memory_hf_directories(sharded_llama, nino_path, tmp_path, dtype):
    """--history disk (the graph assembled per tile, rows read from the shards) writes the same bytes as
    --history memory, for float32 and bfloat16 checkpoints, whatever the tile size."""
    model, dirs, _ = sharded_llama
    if dtype != torch.float32:
        converted = []
        for d in dirs:
            m = type(model).from_pretrained(d, torch_dtype=dtype)
            m.save_pretrained(tmp_path / "in" / d.name, max_shard_size="4KB")
            converted.append(tmp_path / "in" / d.name)
        dirs = converted
    argv = ["step", *map(str, dirs), "--nino", nino_path, "--k", "5"]
    assert main([*argv, "--out", str(tmp_path / "mem"), "--history", "memory"]) == 0
    assert main([*argv, "--out", str(tmp_path / "disk"), "--history", "disk", "--max-memory", "10MB"]) == 0
    _files_equal(tmp_path / "mem", tmp_path / "disk")
    assert main([*argv, "--out", str(tmp_path / "auto")]) == 0  # a small model: in memory
    _files_equal(tmp_path / "mem", tmp_path / "auto")


def test_history_from_disk_torch_files_and_errors(tmp_path, nino_path, capsys):
    torch.manual_seed(3)
    paths, _ = save_torch_series(mlp(), tmp_path)
    argv = ["step", *paths, "--nino", nino_path, "--k", "3"]
    assert main([*argv, "--out", str(tmp_path / "mem.pt"), "--history", "memory"]) == 0
    assert main([*argv, "--out", str(tmp_path / "disk.pt"), "--history", "disk"]) == 0
    mem, disk = torch.load(tmp_path / "mem.pt"), torch.load(tmp_path / "disk.pt")
    assert mem.keys() == disk.keys() and all(torch.equal(mem[n], disk[n]) for n in mem)
    assert main([*argv, "--out", str(tmp_path / "x.pt"), "--history", "disk", "--max-memory", "lots"]) == 2
    assert "--max-memory" in capsys.readouterr().err
    assert (
        main(["step", *paths, "--nino", "linefit", "--k", "3", "--out", str(tmp_path / "x.pt"), "--history", "disk"])
        == 2
    )
    assert "--history disk" in capsys.readouterr().err
    sd = torch.load(paths[2])
    sd["0.weight"][1, 1] = float("inf")
    torch.save(sd, paths[2])
    assert main([*argv, "--out", str(tmp_path / "x.pt"), "--history", "disk"]) == 2
    assert "0.weight" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.pt.nino-step").exists()  # nothing to resume


def test_history_from_disk_resumes_after_an_interrupt(sharded_llama, nino_path, tmp_path, monkeypatch, capsys):
    """An interrupted --history disk step keeps its finished passes and head-pass tiles in OUT.nino-step/; the same
    command continues from there and writes the bytes of an uninterrupted run; --no-resume, another k or a failed
    input start over / leave nothing."""
    from nino_fast import plan, stream

    _, dirs, _ = sharded_llama
    argv = ["step", *map(str, dirs), "--nino", nino_path, "--k", "5", "--history", "disk", "--max-memory", "4500KB"]
    assert main([*argv, "--out", str(tmp_path / "ref")]) == 0
    out, state = tmp_path / "out", tmp_path / "out.nino-step"
    assert not (tmp_path / "ref.nino-step").exists()  # removed once the prediction is written

    def interrupt_after(fn, calls):
        seen = []

        def wrapped(*args, **kwargs):
            if len(seen) == calls:
                raise KeyboardInterrupt
            seen.append(1)
            return fn(*args, **kwargs)

        return wrapped

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished pass ran again")

    head_rows, layer0, layer1 = plan.head_rows, stream._layer0_pass, stream._layer1_pass
    # interrupted in the head pass, after two tiles
    monkeypatch.setattr(plan, "head_rows", interrupt_after(head_rows, 2))
    assert main([*argv, "--out", str(out)]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert not out.exists() and (state / "agg0.pt").is_file() and (state / "agg1.pt").is_file()
    assert json.loads((state / "head.json").read_text())["tiles"] == 2
    tiles = []
    monkeypatch.setattr(plan, "head_rows", lambda *a, **kw: tiles.append(1) or head_rows(*a, **kw))
    monkeypatch.setattr(stream, "_layer0_pass", forbidden)
    monkeypatch.setattr(stream, "_layer1_pass", forbidden)
    assert main([*argv, "--out", str(out)]) == 0
    _files_equal(tmp_path / "ref", out)
    assert not state.exists() and len(tiles) >= 1
    # interrupted in the second message pass: the first one's aggregation is kept
    shutil.rmtree(out)
    monkeypatch.setattr(stream, "_layer0_pass", layer0)
    monkeypatch.setattr(stream, "_layer1_pass", interrupt_after(layer1, 0))
    assert main([*argv, "--out", str(out)]) == 130
    assert (state / "agg0.pt").is_file() and not (state / "agg1.pt").exists()
    monkeypatch.setattr(stream, "_layer0_pass", forbidden)
    monkeypatch.setattr(stream, "_layer1_pass", layer1)
    assert main([*argv, "--out", str(out)]) == 0
    _files_equal(tmp_path / "ref", out)
    # --no-resume, or another step (k), starts over
    monkeypatch.setattr(stream, "_layer1_pass", interrupt_after(layer1, 0))
    monkeypatch.setattr(stream, "_layer0_pass", layer0)
    shutil.rmtree(out)
    assert main([*argv, "--out", str(out)]) == 130 and (state / "agg0.pt").is_file()
    monkeypatch.setattr(stream, "_layer1_pass", layer1)
    passes = []
    monkeypatch.setattr(stream, "_layer0_pass", lambda *a, **kw: passes.append(1) or layer0(*a, **kw))
    assert main([*argv, "--out", str(out), "--no-resume"]) == 0 and passes == [1]
    _files_equal(tmp_path / "ref", out)
    monkeypatch.setattr(stream, "_layer1_pass", interrupt_after(layer1, 0))
    shutil.rmtree(out)
    assert main([*argv, "--out", str(out)]) == 130 and passes == [1, 1]
    monkeypatch.setattr(stream, "_layer1_pass", layer1)
    assert main([*argv[:-6], "--k", "6", *argv[-4:], "--out", str(out)]) == 0 and passes == [1, 1, 1]
    assert not state.exists()
    # interrupted in the head pass, resumed with another tiling (the default one follows the free memory): the
    # aggregations are kept, the head pass starts over
    shutil.rmtree(out)
    monkeypatch.setattr(plan, "head_rows", interrupt_after(head_rows, 2))
    assert main([*argv, "--out", str(out)]) == 130
    monkeypatch.setattr(plan, "head_rows", head_rows)
    monkeypatch.setattr(stream, "_layer0_pass", forbidden)
    assert main([*argv[:-1], "10MB", "--out", str(out)]) == 0
    _files_equal(tmp_path / "ref", out)
    # interrupted, then rerun with other graph options (head counts): another step, started over, not the saved
    # aggregations of another graph
    heads = ["--num-heads", "8", "--num-kv-heads", "4"]
    monkeypatch.setattr(stream, "_layer0_pass", layer0)
    assert main([*argv, *heads, "--out", str(tmp_path / "ref8")]) == 0
    shutil.rmtree(out)
    monkeypatch.setattr(stream, "_layer1_pass", interrupt_after(layer1, 0))
    assert main([*argv, "--out", str(out)]) == 130 and (state / "agg0.pt").is_file()
    monkeypatch.setattr(stream, "_layer1_pass", layer1)
    assert main([*argv, *heads, "--out", str(out)]) == 0
    _files_equal(tmp_path / "ref8", out)


def test_safetensors_read_without_memory_map(tmp_path):
    """Safetensors tensors are read with plain file reads (the process keeps no mapping of the file) and equal
    safetensors' own reading, for every dtype; a truncated file is refused by name."""
    from nino_fast.offline import open_safetensors

    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(2, 2).half(),
        "e": torch.zeros(0, 3),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    f = open_safetensors(path)
    assert f.names == sorted(tensors) and f.metadata == {"format": "pt"}
    for n, t in tensors.items():
        got = f.read(n)
        assert got.dtype == t.dtype and torch.equal(got, t)
        assert f.shapes[n] == tuple(t.shape)
    maps = Path(f"/proc/{os.getpid()}/maps")
    if maps.exists():
        assert str(path) not in maps.read_text()
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(Exception, match="t.safetensors"):
        open_safetensors(path)


def _cli(args, nproc=1, timeout=300):
    """``nino-fast step`` in fresh processes on one thread each (under torchrun for ``nproc`` > 1)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    launch = [sys.executable, "-m", "nino_fast.cli"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        launch += ["-m", "nino_fast.cli"]
    return subprocess.run([*launch, "step", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_history_from_disk_split_over_two_processes(sharded_llama, nino_path, tmp_path):
    """torchrun --nproc-per-node 2 nino-fast step --history disk: each process runs half the rows (gloo
    all-reduces after each message pass and of the result), rank 0 writes the very bytes of one process; a
    NaN in one process's tensors stops both with the error."""
    _, dirs, _ = sharded_llama
    argv = [*map(str, dirs), "--nino", nino_path, "--k", "5"]
    one = _cli([*argv, "--out", str(tmp_path / "one"), "--history", "memory"])
    assert one.returncode == 0, one.stderr
    two = _cli([*argv, "--out", str(tmp_path / "two"), "--history", "disk"], nproc=2)
    assert two.returncode == 0, two.stderr
    _files_equal(tmp_path / "one", tmp_path / "two")
    bad = tmp_path / "bad"
    shutil.copytree(dirs[0].parent, bad)
    shard = sorted((bad / dirs[2].name).glob("model-*.safetensors"))[-1]
    tensors = read_safetensors(shard)
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    argv = [*(str(bad / d.name) for d in dirs), "--nino", nino_path, "--k", "5", "--history", "disk"]
    res = _cli([*argv, "--out", str(tmp_path / "never")], nproc=2)
    assert res.returncode != 0
    assert res.stderr.count("NaN/Inf") >= 2, res.stderr
    assert not (tmp_path / "never").exists()


def test_names_with_numbers_that_are_not_step_numbers_warn(tmp_path, caplog):
    """model_3000.pt ... given out of order: its numbers are not read as step numbers (no step/checkpoint/... before
    them), the given order is kept and a WARNING says so."""
    torch.manual_seed(2)
    paths, _ = save_torch_series(mlp(), tmp_path, stem="model_")
    shuffled = [paths[2], *paths[:2], *paths[3:]]
    with caplog.at_level(logging.WARNING):
        assert main(["step", *shuffled, "--nino", "linefit", "--k", "1", "--out", str(tmp_path / "p.pt")]) == 0
    assert "carry numbers but not step numbers" in caplog.text
