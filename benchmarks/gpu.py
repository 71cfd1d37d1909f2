"""sftlab next to TRL on one GPU: bf16, packed rows, Qwen2.5-0.5B- and 1.5B-sized models.

One command, about 6 minutes on one H100/H200 (each run in its own process, a timeout per run):

    python benchmarks/gpu.py --json gpu.json            # on the GPU machine
    python benchmarks/gpu.py --dry-run                  # anywhere: a tiny model on the CPU, 3 steps

Both sides train the same randomly initialised weights (a Qwen2 config of the real sizes, seed 0,
saved once to --workdir) on the same prompt/completion records, packed into rows of
--max-length tokens with position_ids restarting at every example, in bf16:

    sftlab   packing: true, bf16: true, the sparse LM head (supervised rows only, chunked)
    trl      TRL's fastest GPU settings: packing=True, padding_free=True, use_liger_kernel=True
             (Liger's fused linear cross-entropy: the chunked loss), bf16=True, no checkpointing

Attention: flash_attention_2 (varlen through position_ids) when flash_attn imports, sdpa
otherwise, the same on both sides. Reported per run: tokens/s and supervised tokens/s over the
timed steps (the first --warmup-steps are not timed), peak GPU memory
(torch.cuda.max_memory_allocated), and MFU = model FLOPs per second / the GPU's dense bf16 peak,
with model FLOPs = 6 x (parameters in matrix multiplies, the LM head included, the embedding
lookup not) x tokens + 6 x layers x hidden x (sum over packed examples of length^2) for causal
attention, the same formula for both sides (sftlab's sparse head does less work than this counts).

--dry-run runs the same code on a 2-layer model and a small trained BPE, on the CPU, in fp32
(no bf16 on most CPUs), TRL only if installed: it checks the script, not the hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

# Qwen2.5 shapes (config.json of the released models); weights are random here, never downloaded.
MODELS = {
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
# Dense bf16 peak, TFLOP/s, by the name torch.cuda reports (NVIDIA data sheets, SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def attn_implementation(device: str) -> str:
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def small_bpe(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE trained on the benchmark's own text, for --dry-run (no vocabulary package needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sftlab.data.chat import CHATML

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def model_folder(name: str, tokenizer, workdir: str, device: str) -> str:
    folder = os.path.join(workdir, "models", f"{name}-{len(tokenizer)}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=32768,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **MODELS[name],
    )
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the CPU for 1.5B
        model = Qwen2ForCausalLM(config)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.rename(tmp, folder)
    return folder


def model_flops(config, tokens: int, attended: float) -> float:
    """FLOPs of forward + backward for `tokens` tokens whose examples average `attended` =
    sum(length^2) / sum(length) (see the module docstring)."""
    d, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * inter  # q and o, k and v, gate/up/down
    matmul_params = layers * per_layer + d * config.vocab_size  # + the LM head
    return 6.0 * matmul_params * tokens + 6.0 * layers * d * attended * tokens


# --- children: one training run each ---------------------------------------------------------


def child(spec: dict) -> None:
    import torch

    from sftlab import TargetSettings, prepare_examples
    from sftlab.models import load_tokenizer

    tokenizer = load_tokenizer(spec["model_folder"])
    started = time.perf_counter()
    seconds, supervised, tokens = (run_sftlab if spec["side"] == "sftlab" else run_trl)(spec)
    total = time.perf_counter() - started
    warm = spec["warmup"]
    timed = sum(seconds[warm:])
    timed_tokens = sum(tokens[warm:])
    # Attention work per token from the examples both sides pack (sftlab's tokenization of the records).
    from transformers import AutoConfig

    lengths = prepare_examples(
        spec["data_path"], tokenizer, TargetSettings(max_length=spec["max_length"]), use_cache=False
    ).lengths
    attended = float((lengths.astype("float64") ** 2).sum() / lengths.sum())
    flops = model_flops(AutoConfig.from_pretrained(spec["model_folder"]), timed_tokens, attended)
    result = {
        "step_seconds": seconds,
        "tokens_per_s": timed_tokens / timed,
        "supervised_per_s": sum(supervised[warm:]) / timed,
        "step_s": timed / max(1, len(seconds) - warm),
        "model_tflops_per_s": flops / timed / 1e12,
        "call_seconds": total,
        "peak_rss_mb": common.peak_rss_mb(),
    }
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        name = torch.cuda.get_device_name()
        peak = next((value for key, value in PEAK_TFLOPS.items() if key in name), None)
        result.update(gpu=name, mfu=result["model_tflops_per_s"] / peak if peak else None)
    print("RESULT " + json.dumps(result), flush=True)


def run_sftlab(spec: dict):
    from sftlab import SFTConfig, train

    config = SFTConfig(
        model=spec["model_folder"],
        train_data=spec["data_path"],
        output_dir=spec["output_dir"],
        cache_dir=os.path.join(spec["output_dir"], "cache"),
        max_length=spec["max_length"],
        packing=True,
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        logging_steps=1,
        bf16=spec["bf16"],
        attn_implementation=spec["attn"],
        seed=0,
    )
    steps = [r for r in train(config).history if r.get("type") == "train"]
    return [r["seconds"] for r in steps], [r["supervised_tokens"] for r in steps], [r["tokens"] for r in steps]


def run_trl(spec: dict):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=spec["output_dir"],
        use_cpu=spec["device"] == "cpu",
        bf16=spec["bf16"],
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        max_length=spec["max_length"],
        seed=0,
        disable_tqdm=True,
        logging_steps=1,
        completion_only_loss=True,
        packing=True,
        padding_free=True,
        gradient_checkpointing=False,
        use_liger_kernel=spec["device"] == "cuda",  # Liger's kernels are Triton: GPU only
        model_init_kwargs={"attn_implementation": spec["attn"], "dtype": "bfloat16" if spec["bf16"] else "float32"},
    )
    marks, counts = [], []

    class StepClock(TrainerCallback):
        def _mark(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        def on_train_begin(self, *a, **k):
            self._mark()

        def on_step_end(self, *a, **k):
            self._mark()

    trainer = SFTTrainer(
        model=spec["model_folder"],
        args=args,
        train_dataset=Dataset.from_list(common.read_jsonl(spec["data_path"])),
        processing_class=AutoTokenizer.from_pretrained(spec["model_folder"]),
        callbacks=[StepClock()],
    )
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        counts.append((int((batch["labels"][:, 1:] != -100).sum()), int(batch["position_ids"].numel())))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    seconds = [b - a for a, b in zip(marks, marks[1:])]
    return seconds, [c[0] for c in counts[: len(seconds)]], [c[1] for c in counts[: len(seconds)]]


# --- parent -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, 3 steps: checks the script")
    parser.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-1.5b")
    parser.add_argument("--sides", default="sftlab,trl")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="packed rows per step")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds allowed per run (4 runs fit 10 minutes)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sftlab-bench-gpu"))
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    import importlib.util

    import torch

    if args.dry_run:
        args.models, args.steps, args.warmup_steps, args.batch_size, args.max_length, args.records = (
            "tiny",
            3,
            1,
            2,
            256,
            64,
        )
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        sys.exit("no GPU: run with --dry-run to check the script on the CPU")
    sides = [s for s in args.sides.split(",") if s != "trl" or importlib.util.find_spec("trl") is not None]
    if len(sides) < len(args.sides.split(",")):
        print("trl is not installed: sftlab only (pip install -r benchmarks/requirements.txt)", file=sys.stderr)

    os.makedirs(args.workdir, exist_ok=True)
    data_path = os.path.join(args.workdir, f"data-{args.records}.jsonl")
    records = common.prompt_completion_records(args.records)
    common.write_jsonl(data_path, records)
    if args.dry_run:
        tokenizer = small_bpe([r["prompt"] + r["completion"] for r in records])
    else:
        tokenizer = common.qwen_tokenizer(None)
    runs = []
    for name in args.models.split(","):
        folder = model_folder(name, tokenizer, args.workdir, device)
        for side in sides:
            spec = dict(
                side=side,
                model_folder=folder,
                data_path=data_path,
                device=device,
                bf16=device == "cuda",
                attn=attn_implementation(device),
                steps=args.steps,
                warmup=args.warmup_steps,
                batch_size=args.batch_size,
                max_length=args.max_length,
                output_dir=os.path.join(args.workdir, "runs", f"{name}-{side}"),
                name=f"{name}/{side}",
            )
            shutil.rmtree(spec["output_dir"], ignore_errors=True)
            try:
                result = common.run_child(os.path.abspath(__file__), spec, timeout=args.timeout)
            except Exception as error:  # one failed or timed-out run must not lose the others' figures
                result = {"error": str(error).splitlines()[-1][:300]}
            shutil.rmtree(spec["output_dir"], ignore_errors=True)
            result.update(model=name, side=side, attn=spec["attn"])
            runs.append(result)
            print(
                f"{spec['name']}: {json.dumps({k: v for k, v in result.items() if k != 'step_seconds'})}",
                file=sys.stderr,
                flush=True,
            )

    print(
        f"\n{device}, {args.batch_size} packed rows x {args.max_length} tokens, {args.steps} steps ({args.warmup_steps} not timed), "
        f"torch {torch.__version__}"
    )
    print(
        f"{'model':<14}{'side':<8}{'attn':<19}{'tok/s':>10}{'sup tok/s':>11}{'s/step':>8}{'peak GPU MB':>13}{'MFU':>7}"
    )
    for r in runs:
        if "error" in r:
            print(f"{r['model']:<14}{r['side']:<8}{r['attn']:<19} failed: {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        memory = f"{r['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in r else f"rss {r['peak_rss_mb']:.0f}"
        print(
            f"{r['model']:<14}{r['side']:<8}{r['attn']:<19}{r['tokens_per_s']:>10.0f}{r['supervised_per_s']:>11.0f}"
            f"{r['step_s']:>8.2f}{memory:>13}{mfu:>7}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": common.machine(), "args": vars(args), "runs": runs}, handle, indent=1)


if __name__ == "__main__":
    main()
