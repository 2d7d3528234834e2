"""Float64 reference of SwAV's swapped-prediction loss (Caron et al. 2020, arXiv 2006.09882, sec. 3.1
and Algorithm 1), with the codes balanced over the samples of every rank together.

Input: {"scores": [rank][prototype set] -> array (num_crops * images, K), crop-major rows,
        "queues": [rank][prototype set] -> array (len(crops_for_assign), L, K) or null,
        "num_crops": V, "crops_for_assign": [...], "temperature": T, "epsilon": eps,
        "num_iters": n, "hard": bool}
Output: {"losses": [loss of each rank],
         "grads": [rank][set] -> d(sum of rank losses)/d(scores), codes held fixed (SwAV stops their gradient),
         "codes": [rank][set][assigning slot] -> the codes of the rank's own images}

Codes: for prototype set j and assigning crop c, the scores of crop c on every rank (with the rank's
queue rows appended) form S (samples x K over all ranks). Q = exp(S / eps)^T scaled to total mass 1;
n times: scale each prototype row to mass 1/K, then each sample column to mass 1/N (N = all samples);
finally each sample's column is scaled to sum to 1 (hard: one-hot of its largest entry). Loss of a
rank: mean over sets, over assigning crops c and over the other crops p != c of
-mean_i sum_k q_ik log softmax(s_p,i / T)_k.
"""
import numpy as np

from common import central_difference_grad, from_array, read_input, to_array, write_output


def balanced_codes(blocks, epsilon, num_iters, hard):
    """Codes for a list of per-rank score blocks (samples x K), returned per rank."""
    scores = np.concatenate(blocks, axis=0)
    n, k = scores.shape
    q = np.exp((scores - scores.max()) / epsilon).T
    q /= q.sum()
    for _ in range(num_iters):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * n
    q = (q / q.sum(axis=0, keepdims=True)).T
    if hard:
        one_hot = np.zeros_like(q)
        one_hot[np.arange(n), q.argmax(axis=1)] = 1.0
        q = one_hot
    out, start = [], 0
    for b in blocks:
        out.append(q[start:start + b.shape[0]])
        start += b.shape[0]
    return out


def log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def all_codes(scores, queues, inp):
    """codes[rank][set][slot]: the codes of the rank's own images (queue rows dropped)."""
    world, sets = len(scores), len(scores[0])
    v = inp["num_crops"]
    codes = [[[] for _ in range(sets)] for _ in range(world)]
    for j in range(sets):
        for slot, c in enumerate(inp["crops_for_assign"]):
            blocks = []
            for r in range(world):
                n = scores[r][j].shape[0] // v
                block = scores[r][j][c * n:(c + 1) * n]
                if queues[r] is not None:
                    block = np.concatenate([block, queues[r][j][slot]], axis=0)
                blocks.append(block)
            per_rank = balanced_codes(blocks, inp["epsilon"], inp["num_iters"], inp["hard"])
            for r in range(world):
                n = scores[r][j].shape[0] // v
                codes[r][j].append(per_rank[r][:n])
    return codes


def rank_loss(rank_scores, rank_codes, inp):
    v, t = inp["num_crops"], inp["temperature"]
    set_losses = []
    for s, codes in zip(rank_scores, rank_codes):
        n = s.shape[0] // v
        crop_losses = []
        for slot, c in enumerate(inp["crops_for_assign"]):
            terms = [-np.mean(np.sum(codes[slot] * log_softmax(s[p * n:(p + 1) * n] / t), axis=1))
                     for p in range(v) if p != c]
            crop_losses.append(np.mean(terms))
        set_losses.append(np.mean(crop_losses))
    return float(np.mean(set_losses))


def main():
    inp = read_input()
    scores = [[to_array(s) for s in rank] for rank in inp["scores"]]
    queues = [None if q is None else [to_array(x) for x in q] for q in inp["queues"]]
    codes = all_codes(scores, queues, inp)
    losses = [rank_loss(scores[r], codes[r], inp) for r in range(len(scores))]
    grads = [central_difference_grad(lambda s, r=r: rank_loss(s, codes[r], inp), scores[r])
             for r in range(len(scores))]
    write_output({
        "losses": losses,
        "grads": [[from_array(g) for g in rank] for rank in grads],
        "codes": [[[from_array(c) for c in s] for s in rank] for rank in codes],
    })


main()
