"""A mixture-of-experts and a hybrid model, sftlab next to TRL's SFTTrainer: step time, peak RSS, and
what sftlab's start-of-run packing probe costs.

Run (from the repository root, in a venv with TRL, see benchmarks/README.md):

    /work/benchvenv/bin/python benchmarks/architectures.py                       # both models, 2 repeats
    /work/benchvenv/bin/python benchmarks/architectures.py --models moe --repeats 1 --steps 4   # quicker

Models, built from a config and a seed with Qwen's BPE cut to 32k ids (common.qwen_tokenizer):
  moe     Qwen3-MoE-style: 4 layers, hidden 256, 8 experts of width 256, 2 per token, router loss
          on (output_router_logits, router_aux_loss_coef 0.001), as both trainers then add it
  hybrid  Granite-4-style (granitemoehybrid): 4 layers, Mamba2 layers 1-3 and attention in the 4th,
          4 experts, shared expert
Configurations, each in its own process, alternating, --repeats times (medians):
  sftlab          packing: true as a user would ask; sftlab's probe keeps packing for the MoE and
                  falls back to padded rows for the hybrid (whose Mamba2 layers would leak)
  trl-tuned       SFTTrainer, packing=True (so padding_free), no gradient checkpointing,
                  completion_only_loss. On the hybrid this packs anyway: its loss then mixes
                  examples (what sftlab refuses); it is timed as users would run it
  trl-padded      SFTTrainer padded batches, no checkpointing: the exact comparison for the hybrid
Same data (prompt/completion records, common.prompt_completion_records), batch size, max_length,
steps, fp32, one thread. Step time: median seconds per optimizer step after --warmup-steps;
tokens/s over the same steps; peak RSS of the process. The probe: sftlab.training.architecture.
packing_isolation timed on the loaded model (median of 5), next to one training step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

CONFIGS = ("sftlab", "trl-tuned", "trl-padded")
MODELS = ("moe", "hybrid")


def build_model(name: str, folder: str, tokenizer) -> str:
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    import torch
    import transformers

    sizes = dict(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    if name == "moe":
        config = transformers.Qwen3MoeConfig(intermediate_size=512, moe_intermediate_size=256, num_experts=8,
                                             num_experts_per_tok=2, head_dim=64, output_router_logits=True,
                                             router_aux_loss_coef=0.001, **sizes)
    else:
        config = transformers.GraniteMoeHybridConfig(
            intermediate_size=512, layer_types=["mamba", "mamba", "mamba", "attention"], mamba_n_heads=8, mamba_d_head=64,
            mamba_expand=2, mamba_n_groups=1, mamba_d_state=64, num_local_experts=4, num_experts_per_tok=2,
            shared_intermediate_size=256, output_router_logits=True, router_aux_loss_coef=0.001, **sizes)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    tmp = folder + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.rename(tmp, folder)
    return folder


def child_sftlab(spec: dict) -> dict:
    import statistics

    from transformers import AutoModelForCausalLM

    from sftlab import SFTConfig, train
    from sftlab.training.architecture import packing_isolation

    probe_model = AutoModelForCausalLM.from_pretrained(spec["model_folder"])
    probe_seconds = []
    for _ in range(5):
        started = time.perf_counter()
        check = packing_isolation(probe_model)
        probe_seconds.append(time.perf_counter() - started)
    del probe_model
    config = SFTConfig(model=spec["model_folder"], train_data=spec["data_path"], output_dir=spec["output_dir"],
                       cache_dir=os.path.join(spec["output_dir"], "cache"), max_length=spec["max_length"],
                       per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"], logging_steps=1,
                       packing=True, seed=0)
    result = train(config)
    steps = [r for r in result.history if r.get("type") == "train"]
    return {"step_seconds": [r["seconds"] for r in steps], "step_tokens": [r["tokens"] for r in steps],
            "losses": [r["loss"] for r in steps], "aux_losses": [r.get("aux_loss") for r in steps],
            "probe_seconds": statistics.median(probe_seconds), "packing_isolated": check.isolated,
            "probe_difference": check.max_difference}


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_folder"])
    packed = spec["config"] == "trl-tuned"
    args = SFTConfig(output_dir=spec["output_dir"], use_cpu=True, bf16=False, per_device_train_batch_size=spec["batch_size"],
                     max_steps=spec["steps"], max_length=spec["max_length"], report_to="none", save_strategy="no", seed=0,
                     disable_tqdm=True, logging_steps=1, completion_only_loss=True, packing=packed,
                     gradient_checkpointing=False, model_init_kwargs={"dtype": "float32"})

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())

    clock = StepClock()
    trainer = SFTTrainer(model=spec["model_folder"], args=args, train_dataset=Dataset.from_list(common.read_jsonl(spec["data_path"])),
                         processing_class=tokenizer, callbacks=[clock])
    collate, tokens = trainer.data_collator, []

    def counting_collator(features):
        batch = collate(features)
        tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    return {"step_seconds": seconds, "step_tokens": tokens[: len(seconds)], "threads": torch.get_num_threads(),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(1)
    result = (child_sftlab if spec["config"] == "sftlab" else child_trl)(spec)
    warm = spec["warmup"]
    timed = result["step_seconds"][warm:]
    result.update(step_s=common.median(timed), tokens_per_s=sum(result["step_tokens"][warm:]) / max(sum(timed), 1e-9),
                  peak_rss_mb=common.peak_rss_mb())
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sftlab-bench"))
    parser.add_argument("--wait-load", type=float, default=0.0)
    parser.add_argument("--json", help="also write every run to this file")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    tokenizer = common.qwen_tokenizer(32000)
    data_path = os.path.join(args.workdir, "architectures", "records.jsonl")
    os.makedirs(os.path.dirname(data_path), exist_ok=True)
    common.write_jsonl(data_path, common.prompt_completion_records(args.records, seed=0))
    runs = []
    for model in args.models.split(","):
        folder = build_model(model, os.path.join(args.workdir, "models", f"tiny-{model}"), tokenizer)
        for repeat in range(args.repeats):
            for config in args.configs.split(","):
                quiet = common.wait_for_quiet(args.wait_load) if args.wait_load else {"load_at_start": common.loadavg()}
                spec = dict(config=config, model=model, model_folder=folder, data_path=data_path, batch_size=args.batch_size,
                            max_length=args.max_length, steps=args.steps, warmup=args.warmup_steps,
                            output_dir=tempfile.mkdtemp(prefix=f"{model}-{config}-", dir=args.workdir), name=f"{model}/{config}")
                try:
                    result = common.run_child(os.path.abspath(__file__), spec, timeout=3600)
                except RuntimeError as error:  # e.g. TRL's packed rows on the hybrid: transformers refuses them on the CPU
                    reason = [line for line in str(error).splitlines() if "Error" in line][-1:] or [str(error)[-200:]]
                    print(f"{model:7s} {config:10s} repeat {repeat}: FAILED: {reason[0].strip()}", flush=True)
                    runs.append(dict(model=model, config=config, repeat=repeat, failed=reason[0].strip()))
                    continue
                result.update(model=model, config=config, repeat=repeat, load=quiet.get("load_at_start"))
                runs.append(result)
                print(f"{model:7s} {config:10s} repeat {repeat}: {result['step_s']:.3f} s/step, "
                      f"{result['tokens_per_s']:.0f} tok/s, peak RSS {result['peak_rss_mb']:.0f} MB, load {result['load']:.2f}"
                      + (f", probe {result['probe_seconds']:.3f} s (isolated: {result['packing_isolated']})"
                         if "probe_seconds" in result else ""), flush=True)
    print("\nmedians (ratios against trl-tuned, or trl-padded where trl-tuned failed):")
    for model in args.models.split(","):
        table = {c: [r for r in runs if r["model"] == model and r["config"] == c and "failed" not in r]
                 for c in args.configs.split(",")}
        base = common.median([r["step_s"] for r in table.get("trl-tuned") or table.get("trl-padded") or []])
        for config, rows in table.items():
            if not rows:
                print(f"  {model:7s} {config:10s} failed")
                continue
            step = common.median([r["step_s"] for r in rows])
            rss = common.median([r["peak_rss_mb"] for r in rows])
            print(f"  {model:7s} {config:10s} {step:.3f} s/step ({base / step:.2f}x the TRL baseline's speed), peak RSS {rss:.0f} MB")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": common.machine(), "runs": runs}, handle, indent=1)


if __name__ == "__main__":
    main()
