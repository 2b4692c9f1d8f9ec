"""conv1 = ReLU(w.p - theta) per channel: which matters, filter directions w or thresholds theta?"""
import copy, dataclasses, torch
from monossl.models import load_trunk, build_trunk
from monossl.data.datasets import load_dataset, subset
from monossl.eval.probe import probe
from monossl.eval.protocols import get_protocol
from monossl.viz.filters import bn_scale, bn_shift
torch.manual_seed(0)
rand = build_trunk("cifar")
rot = load_trunk("/work/sweep/runs/t0_rotnet")[0]
sup = load_trunk("/work/sweep/runs/t0_sup")[0]
train = subset(load_dataset("cifar10:/work/val", "train"), 10000, seed=0)
test = load_dataset("cifar10:/work/val", "test")
proto = get_protocol("cifar"); proto = dataclasses.replace(proto, pools={"conv1": proto.pools["conv1"]})
x = train.images[:5000].float() / 255

def make(w_from, theta):
    """Trunk whose conv1 has w_from's (BN-scaled) filters and threshold theta (per channel)."""
    t = copy.deepcopy(rand)
    conv, bn = t.stages["conv1"][0], t.stages["conv1"][1]
    src_conv, src_bn = w_from.stages["conv1"][0], w_from.stages["conv1"][1]
    w = src_conv.weight.detach() * bn_scale(src_bn).view(-1, 1, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(w); bn.weight.fill_(1); bn.running_mean.zero_(); bn.running_var.fill_(1 - bn.eps); bn.bias.copy_(-theta)
    return t.eval()

def responses(t):
    with torch.no_grad():
        h = t._input(x); return t.stages["conv1"][0](h)  # pre-BN conv response
def own_theta(src):
    bn = src.stages["conv1"][1]; return -bn_shift(bn)  # ReLU(s*Wx + shift): threshold -shift in scaled units

for name, src in (("rand", rand), ("rot", rot), ("sup", sup)):
    base = make(src, torch.zeros(32))
    r = responses(base)
    mean = r.mean((0, 2, 3)); std = r.std((0, 2, 3))
    for tname, theta in (("own", own_theta(src)), ("zero", torch.zeros(32)), ("mean", mean), ("mean+1sd", mean + std), ("mean-1sd", mean - std)):
        res = probe(make(src, theta), train, test, proto, device="cpu", progress=False, verbose=False)
        print(f"W={name:5s} theta={tname:9s} conv1 {res['taps']['conv1']['top1']:.1f}", flush=True)
