"""Read TensorBoard event files the way TensorBoard does, for trainer/tests/metrics_tensorboard.rs.

Usage: metrics_tensorboard_read.py <event file or folder>
Prints JSON: {"records": N, "scalars": {tag: [[step, value], ...]},
              "histograms": {tag: [[step, min, max, num, sum, sum_squares, [limits], [counts]], ...]}}
Every record's framing CRCs are checked by tensorboard's own record reader, which raises on a mismatch.
"""
import glob
import json
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow


def count_records(path):
    reader = pywrap_tensorflow.PyRecordReader_New(path.encode(), 0, None)
    records = 0
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            return records
        records += 1


def main(target):
    files = [target] if os.path.isfile(target) else sorted(glob.glob(os.path.join(target, "*tfevents*")))
    if len(files) != 1:
        sys.exit(f"expected one event file in {target}, found {files}")
    records = count_records(files[0])
    acc = EventAccumulator(files[0], size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]}
    histograms = {}
    for t in tags["histograms"]:
        rows = []
        for e in acc.Histograms(t):
            h = e.histogram_value
            rows.append([e.step, h.min, h.max, h.num, h.sum, h.sum_squares, list(h.bucket_limit), list(h.bucket)])
        histograms[t] = rows
    print(json.dumps({"records": records, "scalars": scalars, "histograms": histograms}))


if __name__ == "__main__":
    main(sys.argv[1])
