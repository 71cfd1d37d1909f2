"""The training half (named `training`, not `train`, so that `from sftlab import train` stays the
function): examples -> batches -> objective -> optimizer steps -> checkpoints and export.

In the order a run uses them:

    distributed.py the process group a launcher set up (or one process), seeds, stop signals
    setup.py       the model (LoRA/QLoRA, checkpointing, compiled layers), the optimizer, the schedule
    batching.py    the step plan (which items every step trains on), padded batches, packed rows
    objectives.py  what a step optimises: the seam (count, loss module, records); SFT's objective
    loss.py        SFT's loss inside a module's forward: trunk, supervised rows only, chunked LM head
    parallelize.py DDP or FSDP2 (fully_shard per decoder layer and the root), clipping, gathering
    step.py        one optimizer step: micro-batches -> backward -> sums over processes -> update
    loop.py        train(): setup, resume, the loop (train_step, log, evaluate, checkpoint), export
    evaluation.py  the eval loss (through the objective) and evaluation by generation
    progress.py    the progress bar, metrics.jsonl and the metrics window between log lines
    checkpoint.py  atomic sharded step checkpoints that resume exactly, on any number of processes
    export.py      the output folder's check and the final model in output_dir/final
    optimizer.py   the opt-in AdamW with bf16 moments, and the optimizer step inside backward

The loop receives Examples and a model; it knows nothing of file formats, nor of what it optimises.
"""
