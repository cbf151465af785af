"""Run under ``torchrun``: ``softrepa train`` (the real CLI) for 3 steps, then the
same run killed-and-resumed to 4 steps, in ONE launch (starting processes is
the slow part on a small CI box).

Usage: ``torchrun --nproc-per-node 2 -m tests.softrepa.dp_train_driver -- TRAIN ARGS...``.
The driver owns the gloo process group, so ``softrepa.train`` joins it and
leaves it open between the two runs. Between them the first process deletes
the step-3 checkpoint and the final tokens: the state of a run killed after
step 3 was logged but before its checkpoint was written.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch.distributed as dist


def main(argv: list[str]) -> None:
    from softrepa.cli import app

    args = argv[1:] if argv and argv[0] == "--" else argv
    out = Path(args[args.index("--out") + 1])
    dist.init_process_group("gloo")
    app(["train", *args, "--steps", "3"], standalone_mode=False)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(out / "checkpoints" / "step-0000003")
        shutil.rmtree(out / "tokens")
    dist.barrier()
    app(["train", *args, "--steps", "4", "--resume"], standalone_mode=False)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
