"""Shared helpers of the float64 numpy reference scripts (JSON in on stdin, JSON out on stdout).

Arrays travel as {"shape": [...], "data": [flat row-major values]}.
"""
import json
import sys

import numpy as np


def read_input():
    return json.load(sys.stdin)


def write_output(obj):
    json.dump(obj, sys.stdout)


def to_array(obj, dtype=np.float64):
    return np.asarray(obj["data"], dtype=dtype).reshape(obj["shape"])


def from_array(a):
    a = np.asarray(a, dtype=np.float64)
    return {"shape": list(a.shape), "data": a.ravel().tolist()}


def central_difference_grad(f, arrays, step=1e-6):
    """d f(arrays) / d arrays[k] for every k, by central differences in float64.

    The truncation error is O(step^2) and the rounding error O(eps / step), about 1e-9 relative
    for smooth losses of order one, far below the float32 tolerances the tests use.
    """
    grads = []
    for k, a in enumerate(arrays):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            original = a[idx]
            a[idx] = original + step
            up = f(arrays)
            a[idx] = original - step
            down = f(arrays)
            a[idx] = original
            g[idx] = (up - down) / (2 * step)
        grads.append(g)
    return grads
