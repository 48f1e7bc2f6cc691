"""The training engine on Ray Train: one `TorchTrainer` worker per GPU (or per CPU slot), same command everywhere.

    python training/run.py --workers 8 -i 'data/*_train_*.bin' -j 'data/*_val_*.bin' -o /shared/runs/d12 -e d12 \
        -b 64 -t 1024 -d 524288 -l 6e-4 -q 0.0 -u 700 -c 0.1 -x 18865 -v 250 -s 20000 -n 500 -y 1
    ray job submit --working-dir . -- python training/run.py --workers 16 -o s3://bucket/runs/d24 ...

Every engine flag is `training/train.py`'s (llm.c's letters); training/launcher/flags.py adds the Ray ones
(`--workers`, `--address`, ...). The launcher lives in training/launcher/ (launch.py: the driver). Each worker
runs `training.train.train()` as one rank of the process group Ray Train set up (NCCL on GPU, gloo on CPU), so
data sharding, DDP, ZeRO-1 and checkpoint contents are the engine's.

`-o DIR` is the Ray Train run directory: RunConfig(storage_path=parent of DIR, name=basename of DIR), so
Ray's bookkeeping sits next to the engine's `ckpt_XXXXXXXX/` and `main.log`. A local DIR (shared storage
on a multi-node cluster) is written in place by rank 0 and registered with Ray without a copy; a cloud URI
gets each checkpoint (and main.log) uploaded from a staging directory private to the run. gpt2/rundir.py
owns the directory's layout, its checks (used -o, --overwrite) and the lock the driver holds while it runs.
A failed worker makes Ray restart the group from the latest registered checkpoint (`--max-failures`); errors
that a restart cannot fix (NaN loss, bad data, OOM, bad checkpoint) stop the run with one line naming the
rank and step.

`--workers MAX --min-workers MIN` makes the group elastic (spot capacity): Ray Train runs it at any size in
between that the cluster has room for and restarts it at a new size from the latest checkpoint when a node
is lost or added. -d stays the global batch at every size (training/launcher/elastic.py checks the sizes at launch);
each new group's rank 0 records a resize on the console and in main.log.

`-h 1` (llm.c's flag) scores HellaSwag on every -v step's checkpoint in Ray tasks beside the training, and
`--core-every N` CORE every N steps (training/launcher/placement.py places them, beside_training.py runs them).
Rank 0 prints elapsed / ETA / estimated cost every -v steps and writes `summary.json` at the end
(training/launcher/progress.py).
"""

import sys

from training.launcher.launch import main

if __name__ == "__main__":
    sys.exit(main())
