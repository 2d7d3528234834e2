"""Float64 reference trajectories of PyTorch's SGD and AdamW update rules and apex's LARC, written
from their documentation (torch.optim.SGD / torch.optim.AdamW pseudo-code; apex.parallel.LARC).

Input: {"rule": "sgd" | "adamw", "momentum", "nesterov", "betas", "eps", "amsgrad",
        "larc": null | {"clip", "eps", "trust_coefficient"},
        "params": [{"init": array, "c": array, "b": array, "weight_decay": wd, "head": bool,
                    "has_grad": bool}],
        "steps": [{"lr": lr, "lr_head": lr_head}]}
The gradient of each parameter is that of 0.5 * sum(c p^2) - sum(b p): g = c * p - b; a
parameter with has_grad false gets no gradient and is never touched.
Output: {"trajectory": [[array per param] after each step]}
"""
import numpy as np

from common import from_array, read_input, to_array, write_output


def larc_gradient(p, g, wd, lr, cfg):
    p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
    if p_norm == 0 or g_norm == 0:
        return g  # apex leaves the gradient alone, weight decay included
    local = cfg["trust_coefficient"] * p_norm / (g_norm + p_norm * wd + cfg["eps"])
    if cfg["clip"]:
        local = min(local / lr, 1.0)
    return (g + wd * p) * local


def main():
    inp = read_input()
    params = [to_array(p["init"]) for p in inp["params"]]
    state = [dict() for _ in params]
    trajectory = []
    for t, step in enumerate(inp["steps"], start=1):
        for k, spec in enumerate(inp["params"]):
            if not spec["has_grad"]:
                continue
            p = params[k]
            lr = step["lr_head"] if spec["head"] else step["lr"]
            wd = spec["weight_decay"]
            g = to_array(spec["c"]) * p - to_array(spec["b"])
            if inp["larc"] is not None:
                g, wd = larc_gradient(p, g, wd, lr, inp["larc"]), 0.0
            s = state[k]
            if inp["rule"] == "sgd":
                # d = g + wd p; buf = mu buf + d (first: d); d = d + mu buf (Nesterov) or buf.
                d = g + wd * p
                mu = inp["momentum"]
                if mu != 0:
                    s["buf"] = d.copy() if "buf" not in s else mu * s["buf"] + d
                    d = d + mu * s["buf"] if inp["nesterov"] else s["buf"]
                params[k] = p - lr * d
            else:
                # Decoupled decay, bias-corrected moments, AMSGrad keeps the running max of v.
                b1, b2 = inp["betas"]
                p = p * (1 - lr * wd)
                s["m"] = b1 * s.get("m", 0.0) + (1 - b1) * g
                s["v"] = b2 * s.get("v", 0.0) + (1 - b2) * g * g
                v = s["v"]
                if inp["amsgrad"]:
                    s["vmax"] = np.maximum(s.get("vmax", 0.0), v)
                    v = s["vmax"]
                m_hat = s["m"] / (1 - b1 ** t)
                v_hat = v / (1 - b2 ** t)
                params[k] = p - lr * m_hat / (np.sqrt(v_hat) + inp["eps"])
        trajectory.append([from_array(p) for p in params])
    write_output({"trajectory": trajectory})


main()
