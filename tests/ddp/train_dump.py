"""Run hpc.train under a launcher and save this rank's final parameters.

    torchrun --nproc_per_node 2 tests/ddp/train_dump.py DUMP_DIR <hpc.train arguments>
    mpirun -n 2 python tests/ddp/train_dump.py DUMP_DIR <hpc.train arguments>

Writes DUMP_DIR/rank<r>.pt = {"params": state_dict, "rank": r, "world": P} on every
rank (hpc.train itself writes only on rank 0), so tests/test_ddp.py can check that the
ranks hold identical parameters."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from hpc.train import build_parser, run, setup_logging  # noqa: E402

if __name__ == "__main__":
    dump = sys.argv[1]
    args = build_parser().parse_args(sys.argv[2:])
    setup_logging(args.verbose)
    model, row, rank, world = run(args)
    os.makedirs(dump, exist_ok=True)
    torch.save({"params": model.state_dict(), "rank": rank, "world": world, "row": row},
               os.path.join(dump, f"rank{rank}.pt"))
