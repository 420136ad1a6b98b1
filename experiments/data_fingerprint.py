"""Generate the embedded dataset of a spec and print its fingerprint with the library versions that made it.

    python experiments/data_fingerprint.py --out /tmp/fp --set num_train=96 --set num_val=8

Needs only numpy, Pillow and tqdm (not torch), so it runs in a throwaway environment with other library versions:
two environments that print the same fingerprint wrote byte-identical files. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import PIL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workbench.data.synthetic import SyntheticSpec, dataset_fingerprint, generate_synthetic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, type=Path, help="dataset root to write (must be absent or empty)")
    p.add_argument("--set", action="append", default=[], help="SyntheticSpec field=value (JSON values)")
    a = p.parse_args(argv)
    fields = {}
    for item in a.set:
        key, _, value = item.partition("=")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    spec = SyntheticSpec(**fields)
    t0 = time.perf_counter()
    root = generate_synthetic(a.out, spec, progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["fingerprint"] == dataset_fingerprint(root)
    print(json.dumps({"fingerprint": manifest["fingerprint"], "spec": fields, "python": platform.python_version(),
                      "numpy": np.__version__, "pillow": PIL.__version__, "zlib": zlib.ZLIB_RUNTIME_VERSION,
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
