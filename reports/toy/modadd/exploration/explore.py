import argparse, sys, time, math, torch
sys.path.insert(0, "/work/main")
from toy_experiments.modadd import *
torch.set_num_threads(1)
ap = argparse.ArgumentParser()
ap.add_argument("--p", type=int, default=59); ap.add_argument("--frac", type=float, default=0.5)
ap.add_argument("--lr", type=float, default=1e-3); ap.add_argument("--wd", type=float, default=1.0)
ap.add_argument("--b2", type=float, default=0.98); ap.add_argument("--steps", type=int, default=10000)
ap.add_argument("--load"); ap.add_argument("--save"); ap.add_argument("--every", type=int, default=250)
ap.add_argument("--f64", action="store_true"); ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--eps", type=float, default=1e-8); ap.add_argument("--warm", type=int, default=10)
ap.add_argument("--savelast", type=int, default=0); ap.add_argument("--lr_end", type=float, default=0); ap.add_argument("--batch", type=int, default=0); ap.add_argument("--ramp_steps", type=int, default=0)
a = ap.parse_args()
g = torch.Generator().manual_seed(a.seed)
d = make_data(a.p, a.frac, g)
dt = torch.float64 if a.f64 else torch.float32
m = init_model(ModelConfig(p=a.p), g, dtype=dt)
opt = torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=a.wd, betas=(0.9, a.b2), eps=a.eps)
step0 = 0
if a.load:
    ck = torch.load(a.load)
    m.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"]); step0 = ck["step"]
    for gr in opt.param_groups: gr["lr"] = a.lr; gr["weight_decay"] = a.wd; gr["betas"] = (0.9, a.b2); gr["eps"] = a.eps
t0 = time.time()
for i in range(a.steps + 1):
    step = step0 + i
    if not a.load:
        for gr in opt.param_groups: gr["lr"] = a.lr * min(1.0, (i + 1) / a.warm)
    if a.load and a.lr_end:
        for gr in opt.param_groups: gr["lr"] = a.lr * (a.lr_end / a.lr) ** (min(i, a.ramp_steps or a.steps) / (a.ramp_steps or a.steps))
    if i % a.every == 0:
        with torch.no_grad():
            lt = m(d.train_x); le = m(d.test_x)
            tra = (lt.argmax(-1) == d.train_y).float().mean().item(); tea = (le.argmax(-1) == d.test_y).float().mean().item()
            trl = loss_fn(lt, d.train_y).item(); tel = loss_fn(le, d.test_y).item()
            nrm = math.sqrt(sum(float((q.double()**2).sum()) for q in m.parameters()))
            mx = max(float(q.abs().max()) for q in m.parameters())
        print(f"{step} tr {tra:.3f} te {tea:.3f} trl {trl:.2e} tel {tel:.2e} norm {nrm:.1f} max {mx:.2f} lr {opt.param_groups[0]['lr']:.2e} t {time.time()-t0:.0f}", flush=True)
    if i == a.steps: break
    opt.zero_grad(set_to_none=True)
    if a.batch:
        idx = torch.randint(len(d.train_y), (a.batch,), generator=g)
        loss = loss_fn(m(d.train_x[idx]), d.train_y[idx])
    else:
        loss = loss_fn(m(d.train_x), d.train_y)
    loss.backward(); opt.step()
    if a.savelast and i % a.savelast == 0 and a.save:
        torch.save({"model": m.state_dict(), "opt": opt.state_dict(), "step": step + 1}, a.save)
if a.save:
    torch.save({"model": m.state_dict(), "opt": opt.state_dict(), "step": step}, a.save)
