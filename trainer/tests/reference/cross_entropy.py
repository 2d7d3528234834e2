"""Float64 reference of the cross-entropy losses.

Input: {"mode": "pytorch" | "vissl_multi", "outputs": [arrays (N, C)], "target": array (N) of class
        indices or (N, C) of probabilities, "weight": null | [C floats], "ignore_index": int,
        "reduction": "mean" | "sum", "label_smoothing": s, "temperature": T, "normalize_output": bool}
Output: {"loss": float, "grads": [d loss / d output_k]}  (gradients by central differences)

"pytorch" follows torch.nn.CrossEntropyLoss's documented definition (one output): with
log p = log_softmax(x), class-index targets give l_n = -w[y_n] log p[n, y_n], averaged with weights
sum w[y_n] over non-ignored samples; label smoothing s mixes in s/C times the smoothing term
-sum_c w[c] log p[n, c] (same normaliser), the class term taking weight (1 - s). Probability
targets give l_n = -sum_c w[c] y[n, c] log p[n, c], averaged over N.

"vissl_multi" follows VISSL's cross_entropy_multiple_output_single_target: the sum over outputs of
the loss of (normalised if asked) output / T; with label smoothing the target becomes
(1 - s) one_hot + s / C and the loss is -mean_n sum_c target log p (no weight, no ignore_index),
likewise for probability targets; otherwise the "pytorch" class-index mean.
"""
import numpy as np

from common import central_difference_grad, from_array, read_input, to_array, write_output


def log_softmax(x):
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def pytorch_cross_entropy(x, target, weight, ignore_index, reduction, s):
    n, classes = x.shape
    logp = log_softmax(x)
    w = np.ones(classes) if weight is None else weight
    if target.ndim == 2:
        y = target * (1 - s) + s / classes
        per_sample = -(logp * y * w).sum(axis=1)
        return per_sample.sum() if reduction == "sum" else per_sample.mean()
    kept = [k for k in range(n) if target[k] != ignore_index]
    class_term = sum(-w[target[k]] * logp[k, target[k]] for k in kept)
    smooth_term = sum(-(w * logp[k]).sum() for k in kept)
    if reduction == "mean":
        normaliser = sum(w[target[k]] for k in kept)
        class_term, smooth_term = class_term / normaliser, smooth_term / normaliser
    return (1 - s) * class_term + s / classes * smooth_term


def vissl_multi(outputs, target, weight, ignore_index, s, temperature, normalize_output):
    total = 0.0
    for x in outputs:
        if normalize_output:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        x = x / temperature
        classes = x.shape[1]
        if target.ndim == 2 or s > 0:
            if target.ndim == 2:
                y = target
            else:
                y = np.full(x.shape, s / classes)
                y[np.arange(len(target)), target] += 1 - s
            total += -(log_softmax(x) * y).sum(axis=1).mean()
        else:
            total += pytorch_cross_entropy(x, target, weight, ignore_index, "mean", 0.0)
    return total


def main():
    inp = read_input()
    outputs = [to_array(o) for o in inp["outputs"]]
    t = inp["target"]
    target = to_array(t) if len(t["shape"]) == 2 else to_array(t, dtype=np.int64)
    weight = None if inp["weight"] is None else np.asarray(inp["weight"], dtype=np.float64)
    if inp["mode"] == "pytorch":
        def loss(xs):
            return pytorch_cross_entropy(xs[0], target, weight, inp["ignore_index"], inp["reduction"],
                                         inp["label_smoothing"])
    else:
        def loss(xs):
            return vissl_multi(xs, target, weight, inp["ignore_index"], inp["label_smoothing"],
                               inp["temperature"], inp["normalize_output"])
    grads = central_difference_grad(loss, outputs)
    write_output({"loss": float(loss(outputs)), "grads": [from_array(g) for g in grads]})


main()
