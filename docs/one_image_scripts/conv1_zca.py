"""Can conv1 from one image reach supervision? Filters from whitened patches of the image."""
import copy, dataclasses, torch, faiss, numpy as np
import torch.nn.functional as F
from monossl.models import build_trunk
from monossl.data.datasets import load_dataset, subset
from monossl.data.sources import load_images
from monossl.data.patch_config import make_config
from monossl.data.patches import PatchStream
from monossl.eval.probe import probe as run_probe
from monossl.eval.protocols import get_protocol
torch.manual_seed(0)
rand = build_trunk("cifar")
train = subset(load_dataset("cifar10:/work/val", "train"), 10000, seed=0)
test = load_dataset("cifar10:/work/val", "test")
proto = get_protocol("cifar"); proto = dataclasses.replace(proto, pools={"conv1": proto.pools["conv1"]})
def probe(W, name):
    t = copy.deepcopy(rand); conv, bn = t.stages["conv1"][0], t.stages["conv1"][1]
    with torch.no_grad():
        conv.weight.copy_(W.view(32, 3, 3, 3)); bn.weight.fill_(1); bn.running_mean.zero_(); bn.running_var.fill_(1); bn.bias.zero_()
    r = run_probe(t.eval(), train, test, proto, device="cpu", progress=False, verbose=False)
    print(f"{name:40s} conv1 {r['taps']['conv1']['top1']:.1f}", flush=True)
def patches_of(x):  # (N,3,32,32) in [0,1] -> (M, 27) normalised 3x3 patches
    x = (x - rand.mean) / rand.std
    p = F.unfold(x, 3).transpose(1, 2).reshape(-1, 27)
    return p[torch.randperm(len(p))[:200000]]
for src in ("astronaut", "cifar"):
    if src == "astronaut":
        x = PatchStream(load_images(["builtin:astronaut"]), make_config("all", size=32), seed=0).batch(range(4000))
    else:
        x = train.images[:4000].float() / 255
    P = patches_of(x).double()
    P = P - P.mean(0)
    C = P.T @ P / len(P)
    e, V = torch.linalg.eigh(C)
    zca = V @ torch.diag((e + 1e-2 * e.mean()).rsqrt()) @ V.T  # whitening with a little regularisation
    Pw = (P @ zca).float().numpy()
    km = faiss.Kmeans(27, 32, niter=30, seed=0); km.train(np.ascontiguousarray(Pw))
    cent = torch.from_numpy(km.centroids).double()
    probe((cent @ zca).float() * 0.1, f"{src}: k-means on ZCA-whitened patches")
    g = torch.Generator().manual_seed(0)
    probe((torch.randn(32, 27, generator=g, dtype=torch.float64) @ zca).float() * 0.1, f"{src}: random filters, whitened space")
    probe((V[:, -32:].T if V.shape[1] >= 32 else V.T).float(), f"{src}: top PCA components") if False else None
    pca = V.flip(1)[:, :27].T  # 27 components, pad to 32 with random
    W = torch.cat([pca, torch.randn(5, 27, generator=g, dtype=torch.float64) * 0.2])
    probe(W.float(), f"{src}: PCA basis (+5 random)")
