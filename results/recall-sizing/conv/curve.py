import sys, time, numpy as np, torch
sys.path.insert(0, "/work/main")
import recall
o = dict(recall.DEFAULTS, labelled_only="False")  # labelled_only=True: head and last MLP at the answers only (lr/ logs)
for a in sys.argv[1:]:
    k, v = a.lstrip("-").split("="); o[k] = type(o[k])(v)
labelled_only = o["labelled_only"] == "True"
torch.set_num_threads(o["threads"] or 2)
T_ = int(o["T"])
torch.manual_seed(o["seed"]); rng = np.random.default_rng(o["seed"])
m = recall.GPT(recall.model_config(o["attention"], T_, o))
opt = m.configure_optimizers(o["weight_decay"], o["learning_rate"], (0.9, 0.99), "cpu")
batch = o["tokens_per_iter"] // T_
mix = [int(p) for p in o["train_pairs"].split(",")]
test = recall.mqar_batch(np.random.default_rng(5), 128, T_, mix[-1], o["n_keys"], o["n_values"])
t0 = time.time(); ls = []
for it in range(o["iters"]):
    for g in opt.param_groups: g["lr"] = recall.lr_at(it, o)
    x, y = recall.mqar_batch(rng, batch, T_, int(rng.choice(mix)), o["n_keys"], o["n_values"])
    _, loss = m(torch.from_numpy(x), torch.from_numpy(y), labelled_only=labelled_only); opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); ls.append(loss.item())
    if (it + 1) % 100 == 0:
        print(it + 1, round(np.mean(ls[-100:]), 3), round(recall.accuracy(m, *test, 32), 3), round(time.time() - t0), flush=True)
