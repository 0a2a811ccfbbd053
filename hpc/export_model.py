"""``python -m hpc.export_model RUN.pt OUT.pt``: a trained CGINS checkpoint without its
optimizer state: the form to ship a trained model in.

AdamW keeps two moments per weight, so a training checkpoint is about three times the
size of its weights. The export keeps everything else: the weights, the model, loss and
train configs, the step, the loss log and ``init_from``, and records the sha256 of RUN.pt
under ``exported_from``. It loads wherever a checkpoint does (``--solver cgins --model``,
``hpc.evaluate --models``) and computes the same; it starts new runs (``hpc.train
--init-from OUT.pt``) but cannot be resumed (no optimizer state). The file is written
atomically (nothing half-written on failure) and is never loaded with pickle.

Exit status: 0 written, 2 bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpc.export_model",
                                description="Write a CGINS checkpoint without its optimizer state (for shipping).")
    p.add_argument("checkpoint", help="a checkpoint written by python -m hpc.train")
    p.add_argument("out", help="the exported checkpoint (.pt)")
    a = p.parse_args(argv)
    from model.train import export_weights
    try:
        info = export_weights(a.checkpoint, a.out)
    except (OSError, ValueError) as exc:
        print(f"hpc.export_model: error: {exc}", file=sys.stderr)
        return 2
    print(f"{a.out}: step {info['step']}, {os.path.getsize(a.out) / 1e6:.1f} MB "
          f"(from {a.checkpoint}, sha256 {info['sha256'][:12]}, {os.path.getsize(a.checkpoint) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
