import torch
from hf_permerge.merging import PermMerger
from hf_permerge.data import load_tensors
from hf_permerge.alignment.activation import pairwise_activation_statistics
m = PermMerger.from_pretrained("/tmp/joint/w2048")
models = [m.load(i) for i in range(8)]
x = load_tensors("fashion_mnist", "train").subset(10000, 0).pixel_values
spec = models[0].permutation_spec()
stats = pairwise_activation_statistics(models, x, spec, batch_size=1000, products="float64")
sims = {k: v["hidden.0"].similarity("cosine") for k, v in stats.items()}
for name in ("t_base_activation", "t_new_activation", "t_new2_activation"):
    perms = torch.load(f"/tmp/joint/{name}.pt")
    total = 0.0
    for (i, j), s in sims.items():
        pi, pj = perms[i]["hidden.0"], perms[j]["hidden.0"]
        total += float(s[pi, pj].sum())     # slot k: unit pi[k] of net i with unit pj[k] of net j
    print(name, round(total, 4))
