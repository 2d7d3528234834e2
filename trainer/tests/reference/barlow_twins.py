"""Float64 reference of the Barlow Twins loss (Zbontar et al. 2021, arXiv 2103.03230, eq. 1-2),
written from the paper's definition with VISSL's batch layout and standardisation.

Input: {"embeddings": [array per rank, rows = 2n: the n first views, then the n second views],
        "lambda_": l, "scale_loss": s}
Output: {"loss": L, "grads": [W x dL/d(embeddings of rank r)]}

All rows of all ranks (both views) are standardised per dimension with their mean and biased
variance (+ 1e-5 under the square root). With A the first views and B the second views of every
rank, stacked in rank order, c = A^T B / N (N images in the global batch) and
    L = s * (sum_i (1 - c_ii)^2 + l * sum_{i != j} c_ij^2).
Every rank computes the same L. A rank differentiates its own share of c with the all-reduce as
the identity (VISSL's convention, so that DDP's gradient average gives dL/dz), so the sum of the
ranks' losses has gradient W x dL/dz: that is what the test back-propagates and what is returned.
"""
import numpy as np

from common import central_difference_grad, from_array, read_input, to_array, write_output


def global_loss(embeddings, lam, scale):
    z = np.concatenate(embeddings, axis=0)
    mean = z.mean(axis=0)
    var = ((z - mean) ** 2).mean(axis=0)
    normed = [(e - mean) / np.sqrt(var + 1e-5) for e in embeddings]
    n = embeddings[0].shape[0] // 2
    a = np.concatenate([e[:n] for e in normed], axis=0)
    b = np.concatenate([e[n:] for e in normed], axis=0)
    c = a.T @ b / a.shape[0]
    on = ((1.0 - np.diag(c)) ** 2).sum()
    off = (c ** 2).sum() - (np.diag(c) ** 2).sum()
    return float(scale * (on + lam * off))


def main():
    inp = read_input()
    embeddings = [to_array(e) for e in inp["embeddings"]]
    args = (inp["lambda_"], inp["scale_loss"])
    world = len(embeddings)
    loss = global_loss(embeddings, *args)
    grads = central_difference_grad(lambda es: global_loss(es, *args), embeddings)
    write_output({"loss": loss, "grads": [from_array(world * g) for g in grads]})


main()
