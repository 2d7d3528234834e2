"""Float64 reference of the MoCo contrastive loss (He et al. 2020, arXiv 1911.05722, eq. 1 and
Algorithm 1), written from the paper.

Input: {"query": n x D, "keys": n x D (unit rows), "queue": D x K (unit columns), "temperature": T}
Output: {"loss": L, "grad": dL/dquery}

q = query / |query| per row;  L = mean_i -log( exp(q_i.k_i / T) / (exp(q_i.k_i / T) + sum_j exp(q_i.queue_j / T)) ).
"""
import numpy as np

from common import central_difference_grad, from_array, read_input, to_array, write_output


def loss(query, keys, queue, temperature):
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    total = 0.0
    for i in range(q.shape[0]):
        positive = np.exp(q[i] @ keys[i] / temperature)
        negatives = np.exp(q[i] @ queue / temperature).sum()
        total += -np.log(positive / (positive + negatives))
    return float(total / q.shape[0])


def main():
    inp = read_input()
    query, keys, queue = (to_array(inp[k]) for k in ("query", "keys", "queue"))
    t = inp["temperature"]
    value = loss(query, keys, queue, t)
    (grad,) = central_difference_grad(lambda a: loss(a[0], keys, queue, t), [query])
    write_output({"loss": value, "grad": from_array(grad)})


main()
