"""Float64 numpy reference for the models tests (trainer/tests/models.rs).

Written independently of the Rust code from torchvision's ResNet definition (v1.5: stride on the
3x3 convolution, 1x1 strided downsample + norm on the first block of a stage when the shape
changes) and VISSL's `mlp` / `eval_mlp` heads (Linear [-> BatchNorm1d] [-> ReLU], last layer bare
unless skip_last_layer_relu_bn is false; eval_mlp = BatchNorm2d -> flatten -> mlp).

Usage: python models_reference.py DIR
  DIR/spec.json    what to compute (see main())
  DIR/weights.npz  named parameters/buffers (torchvision / VISSL names)
  DIR/input.npy    the input batch
Writes DIR/out.npz: the requested outputs, plus updated batch-norm running statistics
("<prefix>running_mean"/"running_var") for every norm run in training mode.
"""

import json
import sys

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

EPS = 1e-5


def conv2d(x, w, stride, pad, groups=1):
    kh, kw = w.shape[2], w.shape[3]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    cin_g = w.shape[1]
    cout_g = w.shape[0] // groups
    outs = []
    for g in range(groups):
        xs = win[:, g * cin_g:(g + 1) * cin_g]
        ws = w[g * cout_g:(g + 1) * cout_g]
        outs.append(np.einsum("nchwij,ocij->nohw", xs, ws))
    return np.concatenate(outs, axis=1)


class Params:
    def __init__(self, arrays, train, momentum, eps, norm="BatchNorm"):
        self.a = {k: v.astype(np.float64) for k, v in arrays.items()}
        self.norm = norm
        self.train = train
        self.momentum = momentum
        self.eps = eps
        self.updated = {}

    def __getitem__(self, name):
        return self.a[name]

    def has(self, name):
        return name in self.a

    def batchnorm(self, x, prefix):
        """BatchNorm over all axes but 1; x is N x C or N x C x H x W."""
        if self.norm == "LayerNorm":
            return self.layernorm(x, prefix)
        axes = tuple(i for i in range(x.ndim) if i != 1)
        shape = [1] * x.ndim
        shape[1] = x.shape[1]
        rm, rv = self[prefix + "running_mean"], self[prefix + "running_var"]
        if self.train:
            mean = x.mean(axis=axes)
            var = x.var(axis=axes)
            n = x.size // x.shape[1]
            m = self.momentum
            self.updated[prefix + "running_mean"] = (1 - m) * rm + m * mean
            self.updated[prefix + "running_var"] = (1 - m) * rv + m * var * n / (n - 1)
        else:
            mean, var = rm, rv
        xn = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + self.eps)
        return xn * self[prefix + "weight"].reshape(shape) + self[prefix + "bias"].reshape(shape)


    def layernorm(self, x, prefix):
        """VISSL's LayerNorm2d: GroupNorm with one group, per-sample statistics over C, H, W."""
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        var = x.var(axis=(1, 2, 3), keepdims=True)
        shape = (1, x.shape[1], 1, 1)
        xn = (x - mean) / np.sqrt(var + self.eps)
        return xn * self[prefix + "weight"].reshape(shape) + self[prefix + "bias"].reshape(shape)


def relu(x):
    return np.maximum(x, 0)


def maxpool3x3s2(x):
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(4, 5))


def avgpool(x, k, s, p):
    """AvgPool2d with count_include_pad=True (PyTorch's default)."""
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    return sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::s, ::s].mean(axis=(4, 5))


STAGES = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


def resnet(P, x, spec):
    pre = spec["prefix"]
    depth = spec["depth"]
    bottleneck = depth >= 50
    groups = spec.get("groups", 1)
    out = {}
    if spec.get("stem", "imagenet") == "cifar":
        x = relu(P.batchnorm(conv2d(x, P[pre + "conv1.weight"], 1, 1), pre + "bn1."))
        out["conv1"] = x
    else:
        x = relu(P.batchnorm(conv2d(x, P[pre + "conv1.weight"], 2, 3), pre + "bn1."))
        out["conv1"] = x
        x = maxpool3x3s2(x)
    out["res1"] = x
    for stage, n_blocks in enumerate(STAGES[depth]):
        for b in range(n_blocks):
            stride = 1
            if b == 0 and stage > 0:
                stride = spec.get("layer4_stride", 2) if stage == 3 else 2
            bp = f"{pre}layer{stage + 1}.{b}."
            if bottleneck:
                y = relu(P.batchnorm(conv2d(x, P[bp + "conv1.weight"], 1, 0), bp + "bn1."))
                y = relu(P.batchnorm(conv2d(y, P[bp + "conv2.weight"], stride, 1, groups), bp + "bn2."))
                y = P.batchnorm(conv2d(y, P[bp + "conv3.weight"], 1, 0), bp + "bn3.")
            else:
                y = relu(P.batchnorm(conv2d(x, P[bp + "conv1.weight"], stride, 1), bp + "bn1."))
                y = P.batchnorm(conv2d(y, P[bp + "conv2.weight"], 1, 1), bp + "bn2.")
            needs_downsample = b == 0 and (stride != 1 or x.shape[1] != y.shape[1])
            assert needs_downsample == P.has(bp + "downsample.0.weight"), bp + " downsample presence"
            if needs_downsample:
                sc = P.batchnorm(conv2d(x, P[bp + "downsample.0.weight"], stride, 0), bp + "downsample.1.")
            else:
                sc = x
            x = relu(y + sc)
        out[f"res{stage + 2}"] = x
    out["res5avg"] = x.mean(axis=(2, 3), keepdims=True)
    out["flatten"] = x.mean(axis=(2, 3))
    return out


def mlp(P, x, prefix, dims, use_bn=False, use_relu=False, skip_last_layer_relu_bn=True, use_bias=True):
    """VISSL's MLP: module indices count every layer of the nn.Sequential, ReLU included."""
    index = 0
    for step in range(len(dims) - 1):
        w = P[f"{prefix}{index}.weight"]
        assert w.shape == (dims[step + 1], dims[step]), f"{prefix}{index}.weight shape {w.shape}"
        x = x @ w.T
        if use_bias:
            x = x + P[f"{prefix}{index}.bias"]
        index += 1
        if step == len(dims) - 2 and skip_last_layer_relu_bn:
            break
        if use_bn:
            x = P.batchnorm(x, f"{prefix}{index}.")
            index += 1
        if use_relu:
            x = relu(x)
            index += 1
    return x


def main():
    folder = sys.argv[1]
    with open(f"{folder}/spec.json") as f:
        spec = json.load(f)
    arrays = dict(np.load(f"{folder}/weights.npz"))
    x = np.load(f"{folder}/input.npy").astype(np.float64)
    P = Params(arrays, spec.get("train", False), spec.get("momentum", 0.1), spec.get("eps", EPS), spec.get("norm", "BatchNorm"))
    kind = spec["kind"]
    if kind == "resnet":
        feats = resnet(P, x, spec)
        out = {name: feats[name] for name in spec["features"]}
    elif kind == "mlp":
        out = {"out": mlp(P, x, spec["prefix"] + "clf.", **spec["mlp"])}
    elif kind == "eval_mlp":
        y = P.batchnorm(x, spec["prefix"] + "channel_bn.").reshape(x.shape[0], -1)
        out = {"out": mlp(P, y, spec["prefix"] + "clf.clf.", **spec["mlp"])}
    elif kind == "avgpool":
        out = {"out": avgpool(x, spec["kernel"], spec["stride"], spec["padding"])}
    else:
        raise SystemExit(f"unknown kind {kind}")
    out.update(P.updated)
    np.savez(f"{folder}/out.npz", **out)


if __name__ == "__main__":
    main()
