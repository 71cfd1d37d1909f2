"""The training half (named `training`, not `train`, so that `from sftlab import train` stays the
function): examples -> batches -> loss -> optimizer steps -> checkpoints and export.

    batching.py    padded batches, packed rows (position_ids restarting per example), the step plan
    loss.py        the loss inside a module's forward: trunk, supervised rows only, chunked LM head
    loop.py        the one training loop, setup functions, evaluation, preemption, the final export
    distributed.py the process group a launcher set up (or one process), seeds, stop signals
    parallelize.py DDP or FSDP2 (fully_shard per decoder layer and the root), clipping, gathering
    checkpoint.py  atomic sharded step checkpoints that resume exactly, on any number of processes
    progress.py    the progress bar and metrics.jsonl

The loop receives Examples and a model; it knows nothing of file formats.
"""
