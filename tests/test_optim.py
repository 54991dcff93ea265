"""The optimizer: which parameters Muon takes, MuonAdamW equal to its two parts stepped apart, its
state surviving a save and load, and a vit-train run with it (schedule, checkpoint, resume);
Lookahead's averaging step by step and in a vit-train run."""

import copy
import csv

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import FAST, TINY_MODEL, compose_train
from vit.checkpoint import load_checkpoint
from vit.model import VisionTransformer
from vit.optim import Muon, MuonAdamW, build_optimizer, newton_schulz, param_groups
from vit.schedule import lookahead_alpha, lr_factor
from vit.train import train

NET = dict(img_size=16, patch_size=4, num_classes=3, embed_dim=16, depth=2, num_heads=2)


def _names(net, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in net.named_parameters() if id(p) in ids)


def test_muon_takes_the_blocks_weight_matrices_and_adamw_the_rest():
    net = VisionTransformer(**NET, class_token=True)
    muon, (decay, no_decay) = param_groups(net, lr=1e-3, weight_decay=0.05, muon_lr=0.02)
    per_block = ["attn.proj.weight", "attn.qkv.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
    assert _names(net, muon[0]) == [f"blocks.{i}.{w}" for i in range(2) for w in per_block]
    assert _names(net, decay) == ["head.weight", "patch_embed.proj.weight"]
    assert "pos_embed" in _names(net, no_decay) and "cls_token" in _names(net, no_decay)
    assert all(
        p.ndim <= 1
        for n, p in net.named_parameters()
        if n in _names(net, no_decay) and n not in ("pos_embed", "cls_token")
    )
    assert [g["peak_lr"] for g in (*muon, decay, no_decay)] == [0.02, 1e-3, 1e-3]
    assert muon[0]["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    # Without muon_lr every parameter is AdamW's, as before.
    none, adamw = param_groups(net, lr=1e-3, weight_decay=0.05)
    assert none == [] and sum(len(g["params"]) for g in adamw) == len(list(net.parameters()))
    assert type(build_optimizer(net, 1e-3, 0.05, (0.9, 0.999))) is torch.optim.AdamW


def _loss(net, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 3, (8,), generator=g)
    return F.cross_entropy(net(x), y)


@pytest.mark.parametrize("muon_lr", [None, 0.02])
def test_fused_adamw_takes_the_foreach_steps_up_to_rounding(muon_lr):
    # optim.fused: torch's fused AdamW kernel for the AdamW groups; the same update as the default
    # (foreach) kernel up to float rounding, with the groups' weight decays and peak lrs kept.
    # No qkv bias: the keys' bias gets a gradient of rounding noise alone (softmax ignores it), which
    # Adam scales up to lr-sized steps that differ between the kernels.
    torch.manual_seed(0)
    nets = [VisionTransformer(**NET, qkv_bias=False) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    start = {k: v.clone() for k, v in nets[0].named_parameters()}
    opts = [build_optimizer(n, 1e-2, 0.05, (0.9, 0.999), muon_lr=muon_lr, fused=f) for n, f in zip(nets, (False, True))]
    adamws = [o.adamw if isinstance(o, MuonAdamW) else o for o in opts]
    assert [a.defaults["fused"] for a in adamws] == [None, True]
    for seed in range(3):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            _loss(net, seed).backward()
            opt.step()
    for (name, a), b, a0 in zip(nets[0].named_parameters(), nets[1].parameters(), start.values()):
        assert not torch.equal(a, a0), name  # three steps moved every weight ...
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)  # ... the same way


def test_muon_adamw_steps_exactly_as_muon_and_adamw_stepped_apart():
    torch.manual_seed(0)
    net = VisionTransformer(**NET)
    ref = copy.deepcopy(net)
    opt = build_optimizer(net, 1e-3, 0.05, (0.9, 0.99), muon_lr=0.02, muon_momentum=0.9, muon_weight_decay=0.01)
    assert isinstance(opt, MuonAdamW)
    muon, adamw = param_groups(ref, 1e-3, 0.05, 0.02, 0.01)
    ref_muon = Muon(muon, momentum=0.9)
    ref_adamw = torch.optim.AdamW(adamw, betas=(0.9, 0.99))
    for seed in range(3):

        def closure(seed=seed):
            loss = _loss(net, seed)
            loss.backward()
            return loss

        opt.zero_grad()
        loss = opt.step(closure)  # one forward and backward, as Lightning calls it
        ref_muon.zero_grad(), ref_adamw.zero_grad()
        ref_loss = _loss(ref, seed)
        ref_loss.backward()
        ref_muon.step(), ref_adamw.step()
        assert torch.equal(loss, ref_loss)
        for (name, a), b in zip(net.named_parameters(), ref.parameters()):
            assert torch.equal(a, b), name
    # Every parameter moved, and the schedule's handle (the groups) reaches both optimizers.
    assert len(opt.param_groups) == 3 and opt.param_groups[0] is opt.muon.param_groups[0]
    opt.param_groups[0]["lr"] = 0.5
    assert opt.muon.param_groups[0]["lr"] == 0.5
    assert len(opt.state) == len(list(net.parameters()))


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_our_muon_in_bfloat16_is_torchs_muon_bit_for_bit(nesterov, adjust_lr_fn):
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((48, 16), (16, 48), (16, 16))]
    refs = [torch.nn.Parameter(w.detach().clone()) for w in ws]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ours, theirs = Muon(ws, ns_dtype=torch.bfloat16, **kw), torch.optim.Muon(refs, **kw)
    for step in range(3):
        for w, r in zip(ws, refs):
            w.grad = torch.randn_like(w)
            r.grad = w.grad.clone()
        ours.step(), theirs.step()
        for w, r in zip(ws, refs):
            assert torch.equal(w, r), step
    for w, r in zip(ws, refs):
        assert torch.equal(ours.state[w]["momentum_buffer"], theirs.state[r]["momentum_buffer"])


def test_newton_schulz_in_float32_orthogonalizes_like_bfloat16_and_leaves_its_input():
    torch.manual_seed(0)
    for shape in ((64, 16), (16, 64), (32, 32)):
        g = torch.randn(*shape)
        before = g.clone()
        x32 = newton_schulz(g, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32)
        x16 = newton_schulz(g, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.bfloat16).float()
        assert torch.equal(g, before) and x32.dtype == torch.float32 and x32.shape == g.shape
        # The quintic iteration maps every singular value into roughly [0.5, 1.5] (not exactly 1).
        s = torch.linalg.svdvals(x32)
        assert s.min() > 0.3 and s.max() < 1.6, s
        assert (x32 - x16).norm() / x32.norm() < 0.05  # the same map, at bfloat16's precision


def test_muon_adamw_state_round_trips_and_refuses_an_adamw_state():
    torch.manual_seed(0)
    net = VisionTransformer(**NET)
    opt = build_optimizer(net, 1e-3, 0.05, (0.9, 0.999), muon_lr=0.02)
    for seed in range(2):
        opt.zero_grad()
        _loss(net, seed).backward()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(net)
    twin_opt = build_optimizer(twin, 1e-3, 0.05, (0.9, 0.999), muon_lr=0.02)
    twin_opt.load_state_dict(saved)
    for o, n in ((opt, net), (twin_opt, twin)):
        o.zero_grad()
        _loss(n, 7).backward()
        o.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    adamw_state = torch.optim.AdamW(VisionTransformer(**NET).parameters()).state_dict()
    with pytest.raises(ValueError, match="not MuonAdamW's"):
        twin_opt.load_state_dict(adamw_state)


@pytest.mark.slow
def test_vit_train_with_muon_follows_the_schedule_checkpoints_and_resumes(folder_data, tmp_path):
    overrides = ["data=folder", f"data.root={folder_data}", "data.img_size=16", "test=false", *TINY_MODEL, *FAST]
    overrides += ["trainer.max_epochs=2", "trainer.log_every_n_steps=1", "optim.warmup_epochs=0.4"]
    overrides += ["optim.lr=1e-3", "optim.muon_lr=0.02", "optim.min_lr_ratio=0"]
    run = tmp_path / "run"
    train(compose_train(overrides, run))
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    muon = {int(r["step"]): float(r["lr-MuonAdamW/pg1"]) for r in rows if r.get("lr-MuonAdamW/pg1")}
    adamw = {int(r["step"]): float(r["lr-MuonAdamW/pg2"]) for r in rows if r.get("lr-MuonAdamW/pg2")}
    assert sorted(muon) == list(range(10))  # 90 images, 16 a batch: 5 steps an epoch
    for step in muon:  # one schedule, two peaks
        assert muon[step] == pytest.approx(0.02 * lr_factor(step / 10, 0.2, 0.0), abs=1e-12)
        assert adamw[step] == pytest.approx(1e-3 * lr_factor(step / 10, 0.2, 0.0), abs=1e-12)
    ckpt = run / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(raw["optimizer_states"][0]) == {"muon", "adamw"}
    assert load_checkpoint(ckpt).model.training is False
    resumed = tmp_path / "resumed"
    train(compose_train([*overrides, "trainer.max_epochs=3", f"ckpt_path={ckpt}"], resumed))
    raw = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert raw["global_step"] == 15 and set(raw["optimizer_states"][0]) == {"muon", "adamw"}


def test_lookahead_restarts_every_k_steps_from_the_slow_weights_alpha_of_the_way_to_adamws():
    torch.manual_seed(0)
    net = VisionTransformer(**NET)
    ref = copy.deepcopy(net)
    opt = build_optimizer(net, 1e-2, 0.05, (0.9, 0.999), lookahead_k=3)
    ref_opt = build_optimizer(ref, 1e-2, 0.05, (0.9, 0.999))
    assert type(ref_opt) is torch.optim.AdamW and opt.param_groups[0]["lookahead_alpha"] == 1.0
    slow = None  # timm's: the slow weights start as the weights of the first sync (step 3)
    for step in range(1, 10):
        for group in opt.param_groups:
            group["lookahead_alpha"] = 0.25
        for o, n in ((opt, net), (ref_opt, ref)):
            o.zero_grad()
            _loss(n, step).backward()
            o.step()
        if step % 3 == 0:  # the slow weights move a quarter of the way; AdamW goes on from them
            with torch.no_grad():
                slow = slow or [p.detach().clone() for p in ref.parameters()]
                for s, p in zip(slow, ref.parameters()):
                    s.add_(p - s, alpha=0.25)
                    p.copy_(s)
        for a, b in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # Not AdamW alone: the same steps without the restarts end elsewhere.
    torch.manual_seed(0)
    plain = VisionTransformer(**NET)
    plain_opt = build_optimizer(plain, 1e-2, 0.05, (0.9, 0.999))
    for step in range(1, 10):
        plain_opt.zero_grad()
        _loss(plain, step).backward()
        plain_opt.step()
    assert max((a - b).abs().max().item() for a, b in zip(net.parameters(), plain.parameters())) > 1e-3


def test_lookahead_alpha_falls_from_one_to_one_minus_decay_along_the_power():
    assert lookahead_alpha(0.0, 0.774, 3.0) == 1.0
    assert lookahead_alpha(0.5, 0.774, 3.0) == pytest.approx(1 - 0.774 / 8)
    assert lookahead_alpha(1.0, 0.774, 3.0) == pytest.approx(0.226)


@pytest.mark.slow
def test_vit_train_with_lookahead_sets_alpha_from_the_clock_and_resumes(folder_data, tmp_path):
    overrides = ["data=folder", f"data.root={folder_data}", "data.img_size=16", "test=false", *TINY_MODEL, *FAST]
    overrides += ["trainer.max_epochs=2", "optim.lookahead_k=2", "optim.lookahead_decay=0.5", "optim.lookahead_power=1"]
    run = tmp_path / "run"
    train(compose_train(overrides, run))
    raw = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    groups = raw["optimizer_states"][0]["param_groups"]
    # 10 steps of a 10-step run: alpha for the next step is 1 - 0.5 x 1; 5 slow updates each group.
    assert [(g["lookahead_alpha"], g["lookahead_k"], g["lookahead_step"]) for g in groups] == [(0.5, 2, 10)] * 2
    assert any("lookahead_slow_buff" in s for s in raw["optimizer_states"][0]["state"].values())
    resumed = tmp_path / "resumed"
    train(
        compose_train([*overrides, "trainer.max_epochs=3", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"], resumed)
    )
    raw = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert raw["global_step"] == 15
    assert [g["lookahead_step"] for g in raw["optimizer_states"][0]["param_groups"]] == [15, 15]


def test_lookahead_around_muon_adamw_keeps_its_slow_weights_through_a_save_and_load():
    torch.manual_seed(0)
    net = VisionTransformer(**NET)
    opt = build_optimizer(net, 1e-3, 0.05, (0.9, 0.999), muon_lr=0.02, lookahead_k=2)
    for group in opt.param_groups:
        group["lookahead_alpha"] = 0.5
    for seed in range(3):  # one sync at step 2; step 3 leaves the fast weights off the slow ones
        opt.zero_grad()
        _loss(net, seed).backward()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert sum("lookahead_slow_buff" in s for part in saved.values() for s in part["state"].values()) == len(
        list(net.parameters())
    )
    twin = copy.deepcopy(net)
    twin_opt = build_optimizer(twin, 1e-3, 0.05, (0.9, 0.999), muon_lr=0.02, lookahead_k=2)
    twin_opt.load_state_dict(saved)
    for o, n in ((opt, net), (twin_opt, twin)):
        o.zero_grad()
        _loss(n, 7).backward()
        o.step()  # step 4: a sync, from the saved slow weights
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)
