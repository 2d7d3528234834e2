"""Float64 reference of SimCLR's InfoNCE (NT-Xent) loss and its multi-crop variant, written from
the published formula (Chen et al. 2020, arXiv 2002.05709, eq. 1) with VISSL's batch layout.

Input: {"embeddings": [array per rank, rows = num_crops x images, crop-major],
        "temperature": T, "num_crops": k, "negatives": "all_ranks" | "own_rank"}
Output: {"losses": [loss of each rank], "grads": [d(sum of rank losses)/d(embeddings of rank r)]}

For rank r, anchor = crop c of local image i (row c*n + i), every other crop c' of the same image
is a positive, giving one term
    -log( e(a, p) / (e(a, p) + sum over negatives q of e(a, q)) ),   e(x, y) = exp(<x, y> / T)
on L2-normalised embeddings. Negatives are all crops of all *other* images: on every rank
("all_ranks", SimCLR) or only on rank r ("own_rank", VISSL's multi-crop loss). The rank's loss is
the mean of its terms. Gradients are central differences of the summed rank losses.
"""
import numpy as np

from common import central_difference_grad, from_array, read_input, to_array, write_output


def normalize(e):
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def rank_loss(embeddings, rank, num_crops, temperature, negatives):
    z = [normalize(e) for e in embeddings]
    rows = z[rank].shape[0]
    n = rows // num_crops
    terms = []
    for c in range(num_crops):
        for i in range(n):
            anchor = z[rank][c * n + i]

            def e(other):
                return np.exp(anchor @ other / temperature)

            negative_sum = 0.0
            for r, zr in enumerate(z):
                if negatives == "own_rank" and r != rank:
                    continue
                for c2 in range(num_crops):
                    for j in range(n):
                        if r == rank and j == i:
                            continue  # a crop of the anchor's own image
                        negative_sum += e(zr[c2 * n + j])
            for c2 in range(num_crops):
                if c2 == c:
                    continue
                positive = e(z[rank][c2 * n + i])
                terms.append(-np.log(positive / (positive + negative_sum)))
    return float(np.mean(terms))


def main():
    inp = read_input()
    embeddings = [to_array(e) for e in inp["embeddings"]]
    args = (inp["num_crops"], inp["temperature"], inp["negatives"])
    world = len(embeddings)
    losses = [rank_loss(embeddings, r, *args) for r in range(world)]
    grads = central_difference_grad(lambda es: sum(rank_loss(es, r, *args) for r in range(world)), embeddings)
    write_output({"losses": losses, "grads": [from_array(g) for g in grads]})


main()
