"""Per optimizer step: the distillation loss over the whole distillation set before the step, the step's
first-order change of it, and cosines. ``diag.py EPOCHS [FIELD=VALUE ...]`` (TrainConfig changes, numbers or
true/false), seed 0, into /tmp/diag/run[_FIELD=VALUE...]."""
import sys, torch
torch.set_num_threads(1)
from relaxtune.data import load_pairs
from relaxtune.train.config import TrainConfig
from relaxtune.train import finetune as ft, keep_pretrained as kp
from relaxtune.train.distill import distillation_loss

orig_add = kp.KeepPretrained.add_gradients
def add(self, step):
    before = [None if p.grad is None else p.grad.clone() for p in self.params]
    out = orig_add(self, step)
    self._data_grad = before
    return out
kp.KeepPretrained.add_gradients = add
orig_update = ft.Trainer._update
def update(self, stats, loss_sum, n_ok):
    old = [p.detach().clone() for p in self.model_params]
    orig_update(self, stats, loss_sum, n_ok)
    delta = [p.detach() - o for p, o in zip(self.model_params, old)]
    c = self.config
    full = distillation_loss(self.model, self.keep.distill, c.stress_weight, self.dtype, c.distill_force_weight)
    # gradient at the new point approximates the old one; use old weights for exactness
    with torch.no_grad():
        for p, o in zip(self.model_params, old): p.copy_(o)
    full = distillation_loss(self.model, self.keep.distill, c.stress_weight, self.dtype, c.distill_force_weight)
    gfull = torch.autograd.grad(full, self.model_params, allow_unused=True)
    data = self.keep._data_grad
    with torch.no_grad():
        for p, o, d in zip(self.model_params, old, delta): p.copy_(o + d)
    dot = lambda a, b: sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b) if x is not None and y is not None)
    nrm = lambda a: dot(a, a) ** 0.5
    print(f"step {self.scheduler.last_epoch}: full distill loss {float(full):.4g}; d(loss) first order {dot(gfull, delta):+.3e}; "
          f"cos(update, -grad_full) {-dot(gfull, delta)/nrm(gfull)/nrm(delta):+.3f}; cos(data grad, grad_full) {dot(data, gfull)/nrm(data)/nrm(gfull):+.3f}", flush=True)
ft.Trainer._update = update
pairs = load_pairs("builtin:si-defects-mini")
train = [p for p in pairs if p.split == "train"]; val = [p for p in pairs if p.split == "val"]
def value(text):
    return {"true": True, "false": False}.get(text.lower(), float(text) if text.replace(".", "", 1).isdigit() else text)


changes = {k: value(v) for k, _, v in (a.partition("=") for a in sys.argv[2:])}
cfg = TrainConfig(seed=0, epochs=int(sys.argv[1]), retention_check=False, **changes)
ft.finetune(cfg, train, val, "/tmp/diag/run" + "".join(f"_{a}" for a in sys.argv[2:]), progress=False, log=print)
