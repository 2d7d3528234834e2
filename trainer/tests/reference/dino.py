"""Float64 reference of the DINO loss and center update (Caron et al. 2021, arXiv 2104.14294,
eq. 3-4 and Algorithm 1), written from the paper with VISSL's crop layout.

Input: {"students": [per rank: (num_crops * n) x K, crop-major], "teachers": [per rank: (t * n) x K],
        "center": 1 x K, "student_temp", "teacher_temp", "ema_center"}
Output: {"losses": [per rank], "grads": [d(rank loss)/d(student of that rank)], "center": new center}

For rank r: P_t = softmax((teacher chunk i - center) / teacher_temp), log P_s = log_softmax(student
chunk v / student_temp); the loss is the mean over pairs (i, v), v != i, of mean_rows sum_k -P_t log P_s.
The center moves to ema * center + (1 - ema) * (mean of the teacher rows of every rank).
"""
import numpy as np

from common import central_difference_grad, from_array, read_input, to_array, write_output


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def loss(student, teacher, center, ts, tt, num_crops, teacher_crops):
    n = student.shape[0] // num_crops
    total, terms = 0.0, 0
    for i in range(teacher_crops):
        p = softmax((teacher[i * n:(i + 1) * n] - center) / tt)
        for v in range(num_crops):
            if v == i:
                continue
            total += (-(p * log_softmax(student[v * n:(v + 1) * n] / ts)).sum(axis=-1)).mean()
            terms += 1
    return float(total / terms)


def main():
    inp = read_input()
    students = [to_array(s) for s in inp["students"]]
    teachers = [to_array(t) for t in inp["teachers"]]
    center = to_array(inp["center"])
    ts, tt, ema = inp["student_temp"], inp["teacher_temp"], inp["ema_center"]
    num_crops, teacher_crops = inp["num_crops"], inp["teacher_crops"]
    losses, grads = [], []
    for s, t in zip(students, teachers):
        args = (t, center, ts, tt, num_crops, teacher_crops)
        losses.append(loss(s, *args))
        (g,) = central_difference_grad(lambda a: loss(a[0], *args), [s])
        grads.append(from_array(g))
    all_teacher = np.concatenate(teachers, axis=0)
    new_center = ema * center + (1 - ema) * all_teacher.mean(axis=0, keepdims=True)
    write_output({"losses": losses, "grads": grads, "center": from_array(new_center)})


main()
