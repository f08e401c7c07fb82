"""Supervised step vs GapMatch step timed alternately in ONE process (so both see the same CPU contention),
torch threads 1, 4 labelled + 4 unlabelled 128x128 slices of random data, no data loading.

Run from the repository root: python tools/gapmatch_interleaved_speed.py
"""
import json, statistics, time, torch
from monai.losses import DiceCELoss
from common.networks import UNet2D
from common.losses.unsupervised import FixMatchLoss
from common.methods.gapmatch import GapMatchMethod
torch.set_num_threads(1); torch.manual_seed(0)

class E:
    def __init__(s, net, opt): s.network, s.optimizer, s.step_index = net, opt, 0
    def backward(s, l): l.backward()
    def sync_gradients(s, p): pass

def make(method_kind):
    net = UNet2D(1, 4); opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return net, opt
x = torch.rand(4, 1, 128, 128); y = torch.randint(0, 4, (4, 1, 128, 128)).float()
u = {"image": torch.rand(4, 1, 128, 128)}; u["image_strong"] = u["image"] * 1.2
sup_net, sup_opt = make("sup"); sup_loss = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, batch=True, lambda_ce=0.5, lambda_dice=0.5)
gm_net, gm_opt = make("gm")
gm = GapMatchMethod(DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, batch=True), FixMatchLoss(threshold=0.0), gap=True)
gm_engine = E(gm_net, gm_opt)
def sup_step():
    sup_opt.zero_grad(set_to_none=True); sup_loss(sup_net(x), y).backward(); sup_opt.step()
def gm_step():
    gm_opt.zero_grad(set_to_none=True); out = gm.train_step(gm_engine, {"image": x, "label": y}, u); out["loss"].backward(); gm_opt.step()
    assert out["loss_unsup_perturbed"] > 0
ts, tg = [], []
for i in range(23):
    t0 = time.perf_counter(); sup_step(); t1 = time.perf_counter(); gm_step(); t2 = time.perf_counter()
    if i >= 3: ts.append(t1 - t0); tg.append(t2 - t1)
ratios = [g / s for g, s in zip(tg, ts)]
print(json.dumps({"supervised_s_median": round(statistics.median(ts), 4), "gapmatch_s_median": round(statistics.median(tg), 4),
                  "ratio_of_medians": round(statistics.median(tg) / statistics.median(ts), 2),
                  "median_of_paired_ratios": round(statistics.median(ratios), 2), "pairs": len(ts), "threads": 1}))
