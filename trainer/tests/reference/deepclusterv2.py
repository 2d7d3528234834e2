"""Float64 reference of DeepCluster-v2 (Caron et al. 2020, arXiv 2006.09882, appendix A): spherical
k-means of a memory bank held by several ranks, then a softmax classification of every crop into
its sample's cluster.

Input: {"memories": [rank][bank] -> array (rows, dim), unit rows; "indices": [rank] -> dataset index
        per memory row; "clusterings": [{"bank": b, "init_rows": rows of rank 0's bank b}];
        "iters": k-means rounds; "num_samples": dataset size; "temperature": T;
        "outputs": [rank] -> array (crops * images, dim); "targets": [rank] -> sample index per row}
Output: {"losses": [per rank], "grads": [per rank] d(sum of rank losses)/d(outputs),
         "centroids": [per clustering], "assignments": [per clustering] cluster per sample (-100: none)}

k-means over the union of all ranks' rows: centroids start at rank 0's chosen rows; each round
assigns each row to the centroid of largest dot product and replaces every centroid that has
members by the normalised mean of its members; a last assignment follows. Loss of a rank: mean
over clusterings of the mean over rows whose sample has a cluster of -log softmax(<x/|x|, c> / T)
at the sample's cluster.
"""
import numpy as np

from common import central_difference_grad, from_array, read_input, to_array, write_output


def normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def kmeans(rows, init, iters):
    c = init.copy()
    for _ in range(iters):
        a = (rows @ c.T).argmax(axis=1)
        for k in range(c.shape[0]):
            members = rows[a == k]
            if len(members):
                c[k] = members.mean(axis=0)
        c = normalize(c)
    return c, (rows @ c.T).argmax(axis=1)


def rank_loss(output, targets, centroids, assignments, t):
    z = normalize(output)
    losses = []
    for c, a in zip(centroids, assignments):
        logits = z @ c.T / t
        logits = logits - logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        labels = a[targets]
        keep = labels != -100
        losses.append(-np.mean(logp[keep, labels[keep]]))
    return float(np.mean(losses))


def main():
    inp = read_input()
    memories = [[to_array(b) for b in rank] for rank in inp["memories"]]
    indices = np.concatenate([np.asarray(i, dtype=np.int64) for i in inp["indices"]])
    centroids, assignments = [], []
    for clustering in inp["clusterings"]:
        bank = clustering["bank"]
        rows = np.concatenate([rank[bank] for rank in memories], axis=0)
        init = memories[0][bank][np.asarray(clustering["init_rows"], dtype=np.int64)]
        c, a = kmeans(rows, init, inp["iters"])
        full = np.full(inp["num_samples"], -100, dtype=np.int64)
        full[indices] = a
        centroids.append(c)
        assignments.append(full)
    outputs = [to_array(o) for o in inp["outputs"]]
    targets = [np.asarray(t, dtype=np.int64) for t in inp["targets"]]
    t = inp["temperature"]
    losses = [rank_loss(o, tg, centroids, assignments, t) for o, tg in zip(outputs, targets)]
    grads = [central_difference_grad(lambda x, tg=tg: rank_loss(x[0], tg, centroids, assignments, t), [o])[0]
             for o, tg in zip(outputs, targets)]
    write_output({
        "losses": losses,
        "grads": [from_array(g) for g in grads],
        "centroids": [from_array(c) for c in centroids],
        "assignments": [a.tolist() for a in assignments],
    })


main()
