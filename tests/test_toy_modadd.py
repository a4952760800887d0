"""Modular-addition toy experiment: data, the last-position model, schedule, the smoke run."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from toy_experiments import modadd
from toy_experiments import modadd_train as mt
from toy_experiments.modadd_report import phases

HISTORY = ["step", "train_acc", "test_acc", "train_loss", "test_loss", "mean_alpha",
           "num_traps", "l2_norm", "activation_sparsity", "abs_weight_entropy",
           "circuit_complexity", "lr", "lr_steps", "num_traps_tw"]


def test_data_split_is_a_seeded_partition_of_all_pairs():
    p = 7
    d = modadd.make_data(p, 0.3, torch.Generator().manual_seed(1))
    assert len(d.train_y) == round(0.3 * p * p) == 15 and len(d.test_y) == 34
    x = torch.cat([d.train_x, d.test_x])
    assert sorted(map(tuple, x[:, :2].tolist())) == [(a, b) for a in range(p) for b in range(p)]
    assert bool((x[:, 2] == p).all())
    assert torch.equal(torch.cat([d.train_y, d.test_y]), (x[:, 0] + x[:, 1]) % p)
    again = modadd.make_data(p, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(again.train_x, d.train_x)


def test_last_position_model_equals_full_causal_transformer():
    g = torch.Generator().manual_seed(0)
    cfg = modadd.ModelConfig(p=11)
    m = modadd.init_model(cfg, g, dtype=torch.float64)
    x = modadd.make_data(11, 1.0, g).train_x
    torch.testing.assert_close(m(x), modadd.reference_logits(m, x), rtol=0, atol=1e-12)


def test_audited_shapes_are_nanda_architecture():
    m = modadd.init_model(modadd.ModelConfig(p=113), torch.Generator().manual_seed(0))
    shapes = {k: tuple(v.shape) for k, v in modadd.audited_weights(m).items()}
    assert shapes == {"embed.weight": (114, 128), "attn.W_Q.weight": (128, 128),
                      "attn.W_K.weight": (128, 128), "attn.W_V.weight": (128, 128),
                      "attn.W_O.weight": (128, 128), "mlp.W_in.weight": (512, 128),
                      "mlp.W_out.weight": (128, 512), "unembed.weight": (113, 128)}


def test_schedule_warmup_and_segments():
    pr = mt.Preset(p=5, train_frac=0.5, steps=10,
                   schedule=((1, 1e-3, 1.0, 1e-8), (100, 1e-2, 0.0, 1e-16)))
    assert mt.hyper(pr, 1) == pytest.approx((1e-4, 1.0, 1e-8))
    assert mt.hyper(pr, 10) == pytest.approx((1e-3, 1.0, 1e-8))
    assert mt.hyper(pr, 99) == pytest.approx((1e-3, 1.0, 1e-8))
    assert mt.hyper(pr, 100) == pytest.approx((1e-2, 0.0, 1e-16), rel=1e-12, abs=0)
    ramp = mt.Preset(p=5, train_frac=0.5, steps=10, schedule=((1, 1e-3, 1.0, 1e-8),),
                     ramp=(100, 300, 1e-1))
    assert mt.hyper(ramp, 100) == pytest.approx((1e-3, 1.0, 1e-8))
    assert mt.hyper(ramp, 200) == pytest.approx((1e-2, 1.0, 1e-8))
    assert mt.hyper(ramp, 300) == pytest.approx((1e-1, 1.0, 1e-8))
    assert mt.hyper(ramp, 5000) == pytest.approx((1e-1, 1.0, 1e-8))


def test_phases_finds_the_three_phases():
    h = pd.DataFrame(dict(step=[0, 10, 100, 1000, 10000], train_acc=[0.0, 1, 1, 1, 1],
                          test_acc=[0.0, 0.1, 0.95, 0.99, 0.3], mean_alpha=[5, 4, 2.5, 2.0, 3.9],
                          num_traps=[0, 0, 0, 0, 3]))
    ph = phases(h)
    assert (ph["memorised_step"], ph["grok_step"], ph["test_peak_step"]) == (10, 100, 1000)
    assert (ph["collapse_step"], ph["first_trap_step"]) == (10000, 10000)
    assert ph["test_at_collapse"] == 0.3 and ph["alpha_final"] == 3.9


def test_smoke_run_writes_history_layers_figures(tmp_path):
    run = mt.Run(preset=mt.preset_with("smoke", steps=60), out=tmp_path)
    mt.train(run)
    hist = pd.read_csv(tmp_path / "history.csv")
    assert list(hist.columns) == HISTORY
    assert hist["step"].iloc[0] == 0 and hist["step"].iloc[-1] == 60
    assert hist["train_acc"].iloc[-1] > hist["train_acc"].iloc[0]
    # lr_steps: Σ lr of the smoke schedule (3e-3 after a 10-step linear warm-up)
    assert hist["lr_steps"].iloc[-1] == pytest.approx(3e-3 * (sum(range(1, 11)) / 10 + 50))
    layers = pd.read_csv(tmp_path / "layers.csv")
    assert list(layers.columns) == list(mt.LAYER_COLUMNS)
    assert {"rand_num_spikes_ww", "traps_tail_tw"} <= set(layers.columns)
    assert set(layers["name"]) == set(modadd.AUDITED)
    assert len(layers) == len(hist) * len(modadd.AUDITED)
    for f in ("accuracy", "traps_per_layer", "alpha_per_layer", "comparison_signals",
              "max_entry_per_layer"):
        assert (tmp_path / "figures" / f"{f}.png").stat().st_size > 0
    assert (tmp_path / "snapshots").is_dir()


def test_nanda_preset_is_the_canonical_recipe():
    pr = mt.PRESETS["nanda"]
    assert (pr.p, pr.train_frac, pr.schedule, pr.betas, pr.warmup, pr.dtype) == (
        113, 0.3, ((1, 1e-3, 1.0, 1e-8),), (0.9, 0.98), 10, "float32")
    assert mt.hyper(pr, 5) == (5e-4, 1.0, 1e-8) and mt.hyper(pr, 20_000)[0] == 1e-3


def test_cli_parses_the_documented_flags(tmp_path):
    from toy_experiments.__main__ import _parser

    args = _parser().parse_args(["modadd", "--preset", "quick", "--out", str(tmp_path),
                                 "--steps", "7", "--seed", "3", "--device", "cpu", "--p", "31",
                                 "--train-frac", "0.4", "--compile"])
    assert (args.experiment, args.preset, args.steps, args.seed) == ("modadd", "quick", 7, 3)
    assert args.compile
    pr = mt.preset_with(args.preset, steps=args.steps, p=args.p, train_frac=args.train_frac)
    assert (pr.p, pr.train_frac, pr.steps, pr.ramp) == (31, 0.4, 7, (2_000, 6_000, 2e-2))


def test_ensemble_members_follow_their_solo_trajectories(tmp_path):
    """Each member of a stacked ensemble equals the same model trained alone (float64)."""
    from dataclasses import replace

    pr = replace(mt.preset_with("smoke", steps=40), dtype="float64")
    members = (mt.Member(0, 1.0), mt.Member(1, 0.1), mt.Member(0, 0.0))
    ens = mt.Ensemble(members=members, preset=pr, out=tmp_path)
    datas, params = mt.stacked_setup(ens)
    tr = mt.Trainer(ens, params, datas)
    for step in range(1, 41):
        tr.step(step)
    for e, m in enumerate(members):
        run = ens.member_run(m)
        data, model, opt = mt.setup(run)
        assert torch.equal(data.train_x, datas[e].train_x)
        for step in range(1, 41):
            lr, opt.weight_decay, opt.eps = mt.hyper(run.preset, step)
            opt.zero_grad()
            modadd.loss_fn(model(data.train_x), data.train_y).backward()
            opt.step(lr)
        for name, t in model.state_dict().items():
            assert torch.allclose(params[name][e], t, rtol=1e-9, atol=1e-12), (m.name, name)
    assert not torch.allclose(params["mlp.W_in.weight"][0], params["mlp.W_in.weight"][2])


def test_ensemble_cli_writes_one_folder_per_member(tmp_path):
    from toy_experiments.__main__ import main

    assert main(["modadd-ensemble", "--out", str(tmp_path), "--preset", "smoke", "--steps",
                 "30", "--weight-decays", "1,0", "--seeds", "0", "--device", "cpu"]) == 0
    for name in ("wd1_seed0", "wd0_seed0"):
        h = pd.read_csv(tmp_path / name / "history.csv")
        assert h["step"].iloc[-1] == 30 and list(h.columns) == HISTORY
    assert (tmp_path / "checkpoint.pt").exists()


def test_compiled_training_loss_gives_the_plain_gradients():
    """--compile: torch.compile'd forward + loss, same loss and gradients to float32 round-off."""
    run = mt.Run(preset=mt.PRESETS["smoke"], out=None)
    data, model, _ = mt.setup(run)
    grads = []
    for compiled in (False, True):
        model.zero_grad()
        loss = mt.training_loss(model, compiled)(data.train_x, data.train_y)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, comp in zip(*grads, strict=True):
        torch.testing.assert_close(comp, plain, rtol=1e-4, atol=1e-6 * float(plain.abs().max()))


def test_compiled_ensemble_step_follows_the_plain_one(tmp_path):
    """modadd-ensemble --compile on (on CUDA: auto, as CUDA graphs): the compiled stacked step
    gives the plain step's parameters to float64 round-off; a failing compiled loss falls back
    to the plain one."""
    from dataclasses import replace

    pr = replace(mt.preset_with("smoke", steps=5), dtype="float64")
    members = (mt.Member(0, 1.0), mt.Member(1, 0.0))
    trained = []
    for compile in ("off", "on"):
        ens = mt.Ensemble(members=members, preset=pr, out=tmp_path, compile=compile)
        datas, params = mt.stacked_setup(ens)
        tr = mt.Trainer(ens, params, datas)
        assert (tr.loss is mt.stacked_loss) == (compile == "off")
        for step in range(1, 4):
            tr.step(step)
        trained.append(params)
    for name, t in trained[0].items():
        torch.testing.assert_close(trained[1][name], t, rtol=1e-9, atol=1e-12)

    def broken(*args):
        raise RuntimeError("no compiler here")
    tr.loss = broken
    tr.step(4)  # falls back
    assert tr.loss is mt.stacked_loss


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_ensemble_step_matches_the_cpu_step(tmp_path):
    """On CUDA the ensemble's step is compiled as CUDA graphs by default (compile="auto"): its
    parameters after a few steps equal the plain CPU step's (float64)."""
    from dataclasses import replace

    pr = replace(mt.preset_with("smoke", steps=6), dtype="float64")
    members = (mt.Member(0, 1.0), mt.Member(1, 0.0))
    trained = []
    for dev in ("cpu", "cuda"):
        ens = mt.Ensemble(members=members, preset=pr, out=tmp_path, device=torch.device(dev))
        datas, params = mt.stacked_setup(ens)
        tr = mt.Trainer(ens, params, datas)
        assert (tr.loss is mt.stacked_loss) == (dev == "cpu")
        for step in range(1, 6):
            tr.step(step)
        assert tr.loss is not mt.stacked_loss or dev == "cpu"  # no fallback on CUDA
        trained.append({n: t.detach().cpu() for n, t in params.items()})
    for name, t in trained[0].items():
        torch.testing.assert_close(trained[1][name], t, rtol=1e-7, atol=1e-10)
