"""NiNo as a real ``torch.optim.Optimizer``: shared groups and state, schedulers, hooks, add_param_group,
GradScaler, gradient accumulation (plain and Accelerate, both wrapping orders), wrapped models, all-or-nothing
steps and state loading, defaults and argument checks."""

from __future__ import annotations

import copy
import io
import logging
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nino_fast import NiNo, NiNoModel, build_graph
from nino_fast.wrapped import unwrap_model

from golden import ckpt


class Recorder:
    """A predictor that predicts ``last + shift``, raises ``exc`` on demand and counts its calls."""

    needs_graph = False
    lpe = 0

    def __init__(self, ctx=5, seq_len=40, shift=1.0, exc=None):
        self.ctx, self.seq_len, self.shift, self.exc = ctx, seq_len, shift, exc
        self.calls = 0

    def nowcast(self, graph, states, k, backend=None):
        self.calls += 1
        if self.exc is not None:
            raise self.exc
        return states[:, -1] + self.shift


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, 6, generator=g), torch.randint(0, 3, (n, 8), generator=g)


def train(opt, model, steps, xs=None, ys=None, nino=None):
    """README loop; returns the 1-based counted calls that were NiNo steps."""
    nino = nino or opt
    xs, ys = (xs, ys) if xs is not None else batches(steps)
    at = []
    for i in range(steps):
        opt.zero_grad()
        if nino.need_grads:
            F.cross_entropy(model(xs[i]), ys[i]).backward()
        last = nino.last_nino_step
        opt.step()
        if nino.last_nino_step is not last:
            at.append(nino.last_nino_step["step"])
    return at


# ---- a torch.optim.Optimizer ---------------------------------------------------------------------------------
def test_shares_groups_state_and_defaults():
    model = mlp()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = NiNo(base, model=model, ckpt="linefit", period=10)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    train(opt, model, 3)
    assert len(opt.state) == 4  # AdamW's moments, seen through the wrapper


@pytest.mark.parametrize("kind", ["cosine", "lambda", "hf_cosine_warmup"])
def test_schedulers_on_the_wrapper_set_the_base_lr(kind):
    """A scheduler built on the wrapper drives the base optimizer's lr exactly as on the bare optimizer; each
    call of step(), NiNo steps included, is one scheduler step."""

    def make(opt):
        if kind == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)
        if kind == "lambda":
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        transformers = pytest.importorskip("transformers")
        return transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=30)

    model, ref = mlp(), mlp()
    base, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = NiNo(base, model=model, ckpt="linefit", period=10, max_train_steps=30)
    sched, ref_sched = make(opt), make(ref_opt)
    lrs, ref_lrs = [], []
    for _ in range(25):
        opt.step()
        ref_opt.step()
        sched.step()
        ref_sched.step()
        lrs.append(base.param_groups[0]["lr"])
        ref_lrs.append(ref_opt.param_groups[0]["lr"])
    assert lrs == ref_lrs and opt.step_idx == 25 and opt.last_nino_step["step"] == 20


def test_step_hooks_run_on_every_step():
    model = mlp()
    opt = NiNo(torch.optim.SGD(model.parameters(), lr=0.1), model=model, ckpt="linefit", period=5)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o.step_idx)))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o.step_idx)))
    assert train(opt, model, 6) == [5]
    assert seen == [(w, i + (w == "post")) for i in range(6) for w in ("pre", "post")]


def test_zero_grad_and_state_dict_format():
    model = mlp()
    opt = NiNo(torch.optim.Adam(model.parameters(), lr=0.01), model=model, ckpt="linefit", period=10)
    train(opt, model, 3)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "nino"} and sd["nino"]["num_snapshots"] == 1
    plain = torch.optim.Adam(mlp().parameters(), lr=0.01)
    plain.load_state_dict(sd)  # torch's format: a bare optimizer takes it (the "nino" entry is ignored)
    assert plain.state_dict()["state"][0]["step"] == 3


def test_state_dict_hooks():
    model = mlp()
    opt = NiNo(torch.optim.SGD(model.parameters(), lr=0.1), model=model, ckpt="linefit", period=10)
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    loaded = []
    opt.register_load_state_dict_post_hook(lambda o: loaded.append(True))
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert loaded == [True]


def test_add_param_group_joins_at_the_next_window():
    """The head is not in the optimizer at first: NiNo leaves it alone; added mid-window, the base steps it at
    once and NiNo predicts it from the next window on."""
    model = mlp()
    opt = NiNo(torch.optim.SGD(model[0].parameters(), lr=0.1), model=model, ckpt=Recorder(), period=5)
    assert opt.num_params == 6 * 8 + 8
    head = flat(model[2]).clone()
    train(opt, model, 3)
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.1})
    assert len(opt.param_groups) == 2 and opt.param_groups is opt.base_opt.param_groups
    train(opt, model, 2)  # the NiNo step at 5 closes the window that began without the head
    assert opt.last_nino_step["step"] == 5 and opt.num_params == 6 * 8 + 8
    after_first = flat(model[2]).clone()
    assert not torch.equal(after_first, head)  # base steps 4 (SGD on the new group)
    train(opt, model, 5)
    assert opt.num_params == 83 and opt.last_nino_step["step"] == 10
    assert opt.graph is None or opt.graph.num_params == 83


def test_frozen_after_construction_is_left_alone():
    model = mlp()
    opt = NiNo(torch.optim.SGD(model.parameters(), lr=0.1), model=model, ckpt=Recorder(), period=5)
    train(opt, model, 3)
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    train(opt, model, 2)  # NiNo step at 5: the window began with it trainable, it is not written
    assert opt.last_nino_step["step"] == 5 and torch.equal(model[0].weight, frozen)
    train(opt, model, 5)  # the next window drops it from the graph
    assert opt.num_params == 83 - 48 and torch.equal(model[0].weight, frozen)


# ---- mixed precision ---------------------------------------------------------------------------------------
def _amp_loop(device, dtype, steps=20):
    model = mlp().to(device)
    opt = NiNo(torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, ckpt="linefit", period=10)
    scaler = torch.amp.GradScaler(device)
    xs, ys = batches(steps)
    at = []
    for i in range(steps):
        opt.zero_grad()
        if opt.need_grads:
            with torch.autocast(device, dtype=dtype):
                loss = F.cross_entropy(model(xs[i].to(device)), ys[i].to(device))
            scaler.scale(loss).backward()
        last = opt.last_nino_step
        scaler.step(opt)
        scaler.update()
        if opt.last_nino_step is not last:
            at.append(opt.last_nino_step["step"])
    return opt, scaler, at


def test_grad_scaler_bf16_autocast_cpu():
    """The README loop with GradScaler and bf16 autocast runs through NiNo steps unchanged; the scaler's scale
    is never backed off by a NiNo step (no inf), and its state is the one of a plain run."""
    opt, scaler, at = _amp_loop("cpu", torch.bfloat16)
    assert at == [10, 20] and opt.step_idx == 20
    assert scaler.get_scale() == 65536.0 and scaler._growth_tracker.item() == 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grad_scaler_fp16_cuda():
    opt, scaler, at = _amp_loop("cuda", torch.float16)
    assert at == [10, 20] and torch.isfinite(flat(opt.model)).all()


# ---- gradient accumulation ---------------------------------------------------------------------------------
def test_plain_accumulation_counts_optimizer_steps():
    """step() every 3 micro-batches: NiNo counts the step() calls; need_grads is False for every micro-batch
    before a NiNo step."""
    model = mlp()
    opt = NiNo(torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, ckpt="linefit", period=10)
    xs, ys = batches(60)
    at, skipped = [], 0
    for i in range(60):
        if opt.need_grads:
            (F.cross_entropy(model(xs[i]), ys[i]) / 3).backward()
        else:
            skipped += 1
        if (i + 1) % 3 == 0:
            last = opt.last_nino_step
            opt.step()
            opt.zero_grad()
            if opt.last_nino_step is not last:
                at.append(opt.last_nino_step["step"])
    assert at == [10, 20] and opt.step_idx == 20 and skipped == 6
    assert opt.state[model[0].weight]["step"] == 18


@pytest.mark.parametrize("order", ["prepare_nino", "nino_of_prepared"])
def test_accelerate_accumulation(order, caplog):
    """Accelerator(gradient_accumulation_steps=2), 40 micro-batches = 20 optimizer steps: NiNo steps at 10 and
    20 and AdamW steps 18 times, whichever object wraps the other."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = mlp()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if order == "prepare_nino":
        nino = NiNo(base, model=model, ckpt="linefit", period=10, max_train_steps=20)
        model, opt = acc.prepare(model, nino)
        assert opt.optimizer is nino
    else:
        model, prepared = acc.prepare(model, base)
        with caplog.at_level(logging.WARNING, logger="nino_fast.optim"):
            nino = opt = NiNo(prepared, model=model, ckpt="linefit", period=10, max_train_steps=20)
        assert "accelerator.register_for_checkpointing(opt)" in caplog.text  # save_state would lose NiNo's state
    xs, ys = batches(40)
    at = []
    for i in range(40):
        with acc.accumulate(model):
            if nino.need_grads:
                acc.backward(F.cross_entropy(model(xs[i]), ys[i]))
            last = nino.last_nino_step
            opt.step()
            opt.zero_grad()
            if nino.last_nino_step is not last:
                at.append(nino.last_nino_step["step"])
    assert at == [10, 20] and nino.step_idx == 20
    assert base.state[next(iter(base.state))]["step"] == 18
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ---- wrapped models ----------------------------------------------------------------------------------------
def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20, n_positions=8)
    return transformers.GPT2LMHeadModel(cfg)


def _ddp(model, tmp_path):
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    return nn.parallel.DistributedDataParallel(model)


@pytest.mark.parametrize("wrap", ["compile", "ddp"])
def test_wrapped_model_gets_the_bare_graph_and_step(wrap, tmp_path):
    """torch.compile (``_orig_mod.*``) and DDP (``module.*``) models: the GPT-2 graph with attention heads, the
    names of the bare module, and the same NiNo (GNN) step bit for bit."""
    import torch.distributed as dist

    nino = NiNoModel.from_checkpoint(ckpt("nino_no_posw.pt"))
    bare = _gpt2()
    twin = copy.deepcopy(bare)
    wrapped = torch.compile(twin) if wrap == "compile" else _ddp(twin, tmp_path)
    try:
        assert unwrap_model(wrapped) is twin
        opts = [
            NiNo(torch.optim.SGD(m.parameters(), lr=0.1), model=m, ckpt=nino, period=5, max_train_steps=5)
            for m in (bare, wrapped)
        ]
        assert opts[1]._names == opts[0]._names and opts[1].fingerprint == opts[0].fingerprint
        assert opts[1].graph.num_edges == opts[0].graph.num_edges
        assert opts[1].graph.arch == opts[0].graph.arch == "gpt2"
        assert torch.equal(opts[1].graph.src, opts[0].graph.src) and torch.equal(opts[1].graph.dst, opts[0].graph.dst)
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            noise = [0.01 * torch.randn(p.shape, generator=g) for p in bare.parameters()]
            for m, opt in zip((bare, twin), opts, strict=True):
                with torch.no_grad():
                    for p, d in zip(m.parameters(), noise, strict=True):
                        p.add_(d)
                opt.after_step()
        assert opts[0].last_nino_step["ok"] and torch.equal(flat(bare), flat(twin))
    finally:
        if wrap == "ddp" and dist.is_initialized():
            dist.destroy_process_group()


def test_unknown_transformer_warns_generic(caplog):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.OPTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        vocab_size=20,
        max_position_embeddings=8,
        word_embed_proj_dim=16,
    )
    model = transformers.OPTForCausalLM(cfg)
    with caplog.at_level(logging.WARNING, logger="nino_fast.optim"):
        NiNo(torch.optim.SGD(model.parameters(), lr=0.1), model=model, ckpt=ckpt("nino_no_posw.pt"), period=5)
    assert "OPTForCausalLM" in caplog.text and "generic" in caplog.text


# ---- all or nothing ----------------------------------------------------------------------------------------
def test_interrupt_in_prediction_leaves_everything_as_before():
    model = mlp()
    rec = Recorder(exc=KeyboardInterrupt())
    opt = NiNo(torch.optim.Adam(model.parameters(), lr=0.01), model=model, ckpt=rec, period=5)
    train(opt, model, 4)
    params, sd = flat(model).clone(), copy.deepcopy(opt.state_dict())
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert opt.step_idx == 4 and opt.num_snapshots == 4 and torch.equal(flat(model), params)
    assert torch.equal(opt.state_dict()["nino"]["snapshots"], sd["nino"]["snapshots"])
    rec.exc = None
    opt.step()  # the next call is the NiNo step, and works
    assert opt.last_nino_step["ok"] and torch.equal(flat(model), params + 1)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)


def test_interrupt_in_base_step_restores_the_snapshot_count():
    class Boom(torch.optim.SGD):
        def step(self, closure=None):
            raise KeyboardInterrupt

    model = mlp()
    opt = NiNo(Boom(model.parameters(), lr=0.1), model=model, ckpt=Recorder(), period=10)
    opt.step_idx = 1  # the next call records a snapshot, then the base step is interrupted
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert opt.step_idx == 1 and opt.num_snapshots == 0


def test_interrupt_while_writing_is_held_until_the_write_is_complete(monkeypatch):
    """Ctrl-C arriving in the middle of the write: every parameter is written and the step counted, then
    KeyboardInterrupt is raised; the next window goes on normally."""
    # Python's own SIGINT handler, whatever an earlier test in this process installed (the wrapper hands the held
    # signal to the handler it found, as it should)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_while_writing(monkeypatch)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_while_writing(monkeypatch):
    model = mlp()
    opt = NiNo(torch.optim.SGD(model.parameters(), lr=0.1), model=model, ckpt=Recorder(), period=5)
    train(opt, model, 4)
    expected = flat(model) + 1
    original, second = torch.Tensor.copy_, model[0].bias.data_ptr()

    def copy_and_interrupt(self, src, *a, **kw):
        out = original(self, src, *a, **kw)
        if self.data_ptr() == second:  # the second parameter's write
            signal.raise_signal(signal.SIGINT)
        return out

    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(torch.Tensor, "copy_", copy_and_interrupt)
        try:
            opt.step()
        finally:
            monkeypatch.undo()
    assert torch.equal(flat(model), expected) and opt.step_idx == 5 and opt.num_snapshots == 0
    assert train(opt, model, 5) == [10]


# ---- load_state_dict: checked before anything changes ----------------------------------------------------------
def _opt_pair():
    model = mlp()
    opt = NiNo(torch.optim.Adam(model.parameters(), lr=0.01), model=model, ckpt="linefit", period=10)
    train(opt, model, 5)
    return model, opt


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("step_idx", -1, "step_idx"),
        ("step_idx", 3.0, "step_idx"),
        ("step_idx", True, "step_idx"),
        ("num_snapshots", 5, "num_snapshots"),
        ("num_snapshots", 3, "3 snapshots cannot"),
        ("snapshots", torch.zeros(2, 7), "shape"),
        ("period", 20, "period"),
        ("fingerprint", "0" * 40, "another model"),
    ],
)
def test_load_state_dict_rejects_bad_nino_state_before_changing_anything(key, value, match):
    model, opt = _opt_pair()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = 123.0  # would show if the base part were loaded
    sd["nino"][key] = value
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"][0]["lr"] == 0.01 and after["nino"]["step_idx"] == before["nino"]["step_idx"]
    assert after["nino"]["num_snapshots"] == before["nino"]["num_snapshots"]


def test_load_state_dict_rejects_another_model_of_the_same_size():
    """Same parameter count, other shapes: the fingerprint tells them apart."""
    a = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))  # 83 parameters
    b = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5))  # 89
    c = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 5), nn.Linear(5, 1))  # 83 too
    assert sum(p.numel() for p in c.parameters()) == 83 and sum(p.numel() for p in b.parameters()) != 83
    opt_a = NiNo(torch.optim.SGD(a.parameters(), lr=0.1), model=a, ckpt="linefit", period=5)
    opt_c = NiNo(torch.optim.SGD(c.parameters(), lr=0.1), model=c, ckpt="linefit", period=5)
    sd = opt_a.state_dict()
    sd["param_groups"] = opt_c.state_dict()["param_groups"]
    with pytest.raises(ValueError, match="another model"):
        opt_c.load_state_dict(sd)


def test_load_state_dict_older_layout():
    model, opt = _opt_pair()
    sd = opt.state_dict()
    old = {"base": {"state": sd["state"], "param_groups": sd["param_groups"]}, **sd["nino"]}
    del old["fingerprint"]
    model2 = copy.deepcopy(model)
    opt2 = NiNo(torch.optim.Adam(model2.parameters(), lr=0.01), model=model2, ckpt="linefit", period=10)
    opt2.load_state_dict(old)
    assert opt2.step_idx == 5 and opt2.num_snapshots == 2


# ---- defaults and arguments --------------------------------------------------------------------------------
def test_no_ckpt_picks_the_language_model_checkpoint_for_transformers(caplog):
    """Transformers (an architecture nino_fast knows, or any model with a token embedding) get the bundled
    language-model checkpoint, said at INFO each time; everything else the vision one."""
    pytest.importorskip("transformers")
    from nino_fast.checkpoints import LM, SMALL
    from nino_fast.meta import tasks
    from nino_fast.optim import predictors

    lm_model = tasks.build_model(dict(family="llama", width=16, depth=1, heads=2, kv_heads=1))
    with caplog.at_level(logging.INFO, logger="nino_fast.optim"):
        opt = NiNo(torch.optim.AdamW(lm_model.parameters()), model=torch.compile(lm_model), period=10)
        NiNo(torch.optim.AdamW(lm_model.parameters()), model=lm_model, period=10)
    assert opt.predictor.wte_pos_enc == NiNoModel.from_checkpoint(LM).wte_pos_enc
    assert caplog.text.count("a language model / transformer") == 2 and str(LM) in caplog.text
    embedding = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(12, 3))
    assert predictors.default_ckpt(embedding) == LM and predictors.default_ckpt(mlp()) == SMALL
    assert predictors.default_ckpt(mlp(), arch="gpt2") == LM and predictors.default_ckpt() == SMALL
    # the transformer default serves any vocabulary (no word-position table to outgrow): a 60k-token Llama
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=60_000, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    big_vocab = transformers.LlamaForCausalLM(cfg)
    nino = NiNoModel.from_checkpoint(predictors.default_ckpt(big_vocab))
    graph = build_graph(big_vocab, lpe=nino.lpe)
    states = torch.randn(graph.num_params, 5).cumsum(1)
    assert torch.isfinite(nino.nowcast(graph, states, 3)).all()


def test_no_ckpt_uses_the_bundled_checkpoint(caplog):
    from nino_fast.checkpoints import SMALL

    model = mlp()
    with caplog.at_level(logging.INFO, logger="nino_fast.optim"):
        opt = NiNo(torch.optim.SGD(model.parameters(), lr=0.1), model=model, period=10)
    assert isinstance(opt.predictor, NiNoModel) and "bundled checkpoint" in caplog.text
    assert "not a transformer" in caplog.text and str(SMALL) in caplog.text
    assert train(opt, model, 10) == [10] and opt.last_nino_step["ok"]
    plain = NiNo(torch.optim.SGD(model.parameters(), lr=0.1), model=model, ckpt="none")
    assert plain.predictor is None and all(plain.need_grads for _ in range(3))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(period=12), "multiple of ctx"),
        (dict(period=0), "period"),
        (dict(period=10.0), "period"),
        (dict(period=True), "period"),
        (dict(max_train_steps=-1), "max_train_steps"),
        (dict(k_decay=0), "k_decay"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = mlp()
    with pytest.raises(ValueError, match=match):
        NiNo(torch.optim.SGD(model.parameters(), lr=0.1), model=model, ckpt="linefit", **kwargs)


def test_bad_types():
    model = mlp()
    with pytest.raises(TypeError, match="base_opt"):
        NiNo(model.parameters(), model=model, ckpt="linefit")
    opt = NiNo(torch.optim.SGD(model.parameters(), lr=0.1), model=model, ckpt="linefit", period=5)
    with pytest.raises(TypeError, match="already a NiNo"):
        NiNo(opt, model=model, ckpt="linefit")
    train(opt, model, 4)
    with pytest.raises(TypeError, match="k must be an int"):
        opt.step(k=True)
    assert opt.step_idx == 4 and opt.num_snapshots == 4


def test_peft_model_is_unwrapped_and_falls_back_with_a_warning(caplog):
    """A LoRA model: the transformers model inside is found; its predicted parameters (the adapters) do not
    make a Llama graph, so the generic one is used and the WARNING says why."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=20,
    )
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert type(unwrap_model(model)).__name__ == "LlamaForCausalLM"
    trainable = [p for p in model.parameters() if p.requires_grad]
    with caplog.at_level(logging.WARNING, logger="nino_fast.optim"):
        opt = NiNo(torch.optim.AdamW(trainable), model=model, ckpt=ckpt("nino_no_posw.pt"), period=5)
    assert "llama graph does not fit" in caplog.text and opt.graph.arch == "generic"
    assert opt._names[0].startswith("model.layers.0.self_attn.q_proj.lora_A")
    assert opt.num_params == sum(p.numel() for p in trainable)


def test_graph_of_another_model_with_the_same_count_is_refused():
    from nino_fast import build_graph

    a = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    c = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 5), nn.Linear(5, 1))  # 83 parameters too
    nino = NiNoModel.from_checkpoint(ckpt("nino_no_posw.pt"))
    with pytest.raises(ValueError, match="another model"):
        NiNo(torch.optim.SGD(a.parameters(), lr=0.1), model=a, ckpt=nino, period=5, graph=build_graph(c, lpe=8))


@pytest.mark.parametrize("change", ["add_param_group", "freeze"])
def test_resume_inside_a_window_whose_parameter_set_changed(change):
    """A state saved after a group was added (or a layer frozen) inside a window, before the next one began,
    resumes bitwise into a wrapper built the natural way (with the new set from the start): that window is
    predicted over the set it was taken of, the next one over the new set, as in the uninterrupted run."""
    xs, ys = batches(40)

    def build(changed):
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
        torch.manual_seed(0)
        for p in model.parameters():
            nn.init.normal_(p, std=0.3)
        late = list(model[4].parameters())
        held = [p for p in model.parameters() if change == "freeze" or all(p is not q for q in late)]
        groups = [{"params": held}]
        if changed:
            if change == "freeze":
                model[2].requires_grad_(False)
            else:
                groups.append({"params": late})  # the group added at call 12, here from the start
        nino = NiNoModel.from_checkpoint(ckpt("nino_no_posw.pt"))
        return model, NiNo(torch.optim.Adam(groups, lr=0.01), model=model, ckpt=nino, period=10)

    def run(model, opt, a, b):
        for i in range(a, b):
            if i == 12:  # inside the second window (snapshots at calls 2, 4, ...)
                if change == "freeze":
                    model[2].requires_grad_(False)
                else:
                    opt.add_param_group({"params": list(model[4].parameters())})
            train(opt, model, 1, xs[i : i + 1], ys[i : i + 1])

    model, opt = build(False)
    run(model, opt, 0, 40)
    want = flat(model)
    model, opt = build(False)
    run(model, opt, 0, 15)
    assert opt.num_snapshots == 2
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    model2, opt2 = build(True)
    model2.load_state_dict(weights)
    opt2.load_state_dict(state)
    for i in range(15, 40):
        train(opt2, model2, 1, xs[i : i + 1], ys[i : i + 1])
    assert torch.equal(flat(model2), want)


def test_load_a_base_optimizer_state_and_into_a_plain_wrapper(caplog):
    """The base optimizer's own state (a run without NiNo): loaded into the base, the step count taken from it,
    a new window, said at WARNING. A NiNo state into ckpt='none': the base part and the step count."""
    model = mlp()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    xs, ys = batches(7)
    for i in range(7):
        adam.zero_grad()
        F.cross_entropy(model(xs[i]), ys[i]).backward()
        adam.step()
    opt = NiNo(torch.optim.Adam(model.parameters(), lr=0.01), model=model, ckpt="linefit", period=10)
    with caplog.at_level(logging.WARNING, logger="nino_fast.optim"):
        opt.load_state_dict(adam.state_dict())
    assert "NiNo counts from step 7" in caplog.text
    assert opt.step_idx == 7 and opt.num_snapshots == 0
    assert torch.equal(opt.base_opt.state_dict()["state"][0]["exp_avg"], adam.state_dict()["state"][0]["exp_avg"])
    model, opt = _opt_pair()
    plain = NiNo(torch.optim.Adam(model.parameters(), lr=0.01), model=model, ckpt="none")
    plain.load_state_dict(opt.state_dict())
    assert plain.step_idx == opt.step_idx == 5


def test_sparse_embedding_keeps_sparse_gradients_across_a_nino_step():
    """zero_grad leaves a zero gradient for the NiNo step (GradScaler needs one); it is taken back after the step,
    so a sparse embedding (SparseAdam) never meets a dense gradient, also with zero_grad(set_to_none=False)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3)
            self.emb = nn.Embedding(10, 4, sparse=True)  # registered last: the parameter zero_grad picks

        def forward(self, idx):
            return self.head(self.emb(idx).mean(1))

    torch.manual_seed(0)
    model = Net()
    base = torch.optim.SparseAdam([model.emb.weight], lr=1e-2)
    other = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    opt = NiNo(base, model=model, ckpt="linefit+", period=5)
    idx, y = torch.randint(0, 10, (8, 3)), torch.randint(0, 3, (8,))
    for i in range(12):
        if i == 4:  # as in a run resumed just before the NiNo step: no gradient yet
            model.emb.weight.grad = None
        opt.zero_grad(set_to_none=False)
        other.zero_grad()
        if opt.need_grads:
            F.cross_entropy(model(idx), y).backward()
            other.step()
        opt.step()
        assert model.emb.weight.grad is None or model.emb.weight.grad.layout == torch.sparse_coo
    assert opt.last_nino_step["ok"] and opt.step_idx == 12


def test_a_gradient_computed_on_a_nino_step_is_kept():
    """A loop that runs backward on the NiNo step anyway (to log a gradient norm) accumulates into the zero gradient
    zero_grad left: that gradient is the user's, not taken back."""
    model = mlp()
    opt = NiNo(torch.optim.Adam(model.parameters(), lr=0.01), model=model, ckpt="linefit+", period=5)
    xs, ys = batches(5)
    for i in range(5):
        opt.zero_grad()
        F.cross_entropy(model(xs[i]), ys[i]).backward()
        opt.step()
    assert opt.last_nino_step["ok"] and all(p.grad is not None for p in model.parameters())


def test_names_like_fsdp_are_not_fsdp():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.my_flat_params = nn.Linear(6, 3)

    net = Net()
    assert NiNo(torch.optim.AdamW(net.parameters()), model=net, ckpt="linefit+", period=5).num_params == 21


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_fsdp_sharded_parameters_are_refused(tmp_path, kind):
    """FSDP gives each process a piece of each tensor: no graph or common prediction can come of it."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = mlp()
        try:
            if kind == "fsdp1":
                from torch.distributed.fsdp import FullyShardedDataParallel

                model = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
            else:
                from torch.distributed.fsdp import fully_shard

                fully_shard(model)
        except Exception as exc:  # this torch build cannot shard on the CPU
            pytest.skip(f"{kind} on the CPU: {type(exc).__name__}: {exc}")
        with pytest.raises(ValueError, match="sharded by FSDP"):
            NiNo(torch.optim.AdamW(model.parameters()), model=model, ckpt="linefit+", period=5)
    finally:
        dist.destroy_process_group()
